"""The Llama 3.2 Vision image encoder (HF `MllamaVisionModel`, SPEC 2.2): tiled ViT with gated tile/position
embeddings, 32 local + 8 gated global layers, and intermediate features interleaved into a 7680-wide output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from .llama import Linear


class PrecomputedAspectRatioEmbedding(nn.Module):
    """One gated D-vector per tile, looked up by aspect-ratio id (pre- and post-tile embeddings)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.max_tiles, self.dim = config.max_num_tiles, config.hidden_size
        self.embedding = nn.Embedding(config.max_aspect_ratio_id + 1, config.max_num_tiles * config.hidden_size)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """x (N, T, P, D), aspect_ratio_ids (N,)."""
        emb = self.embedding(aspect_ratio_ids).reshape(-1, self.max_tiles, 1, self.dim)  # (N, T, 1, D)
        return x + emb * self.gate.tanh()


class PrecomputedPositionEmbedding(nn.Module):
    """(1 - tanh g) * shared per-patch positions + tanh g * per-(aspect ratio, tile, patch) positions."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.max_tiles, self.patches, self.dim = config.max_num_tiles, config.num_patches, config.hidden_size
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(torch.zeros(self.patches, self.dim))
        self.tile_embedding = nn.Embedding(config.max_aspect_ratio_id + 1, self.max_tiles * self.patches * self.dim)

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """x (N, T, P, D), aspect_ratio_ids (N,)."""
        gate = self.gate.tanh()
        x = x + ((1 - gate) * self.embedding).view(1, 1, self.patches, self.dim)
        tiles = self.tile_embedding(aspect_ratio_ids).reshape(-1, self.max_tiles, self.patches, self.dim)
        return x + gate * tiles


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = config.attention_heads, config.head_dim
        d = config.hidden_size
        self.q_proj = Linear(d, d, bias=False)
        self.k_proj = Linear(d, d, bias=False)
        self.v_proj = Linear(d, d, bias=False)
        self.o_proj = Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        N, S, _ = x.shape
        q, k, v = (p(x).view(N, S, self.heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # (N, H, S, hd)
        return self.o_proj(pad_aware_attention(q, k, v, pad).transpose(1, 2).reshape(N, S, -1))


def pad_aware_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Attention with Mllama's mask, where only pad->pad pairs are masked (SPEC 2.2 quirk).

    q/k/v (N, H, S, hd); pad (N, S) bool. Real queries attend every key; pad queries attend real keys only.
    Computed as two unmasked attentions per pad pattern (no S x S mask): the same result as HF's additive
    mask at less than half the work when whole tiles are padding.
    """
    if not bool(pad.any()):
        return F.scaled_dot_product_attention(q, k, v)
    out = torch.empty_like(q)
    patterns, group = torch.unique(pad, dim=0, return_inverse=True)
    for g, pattern in enumerate(patterns):
        rows = (group == g).nonzero().squeeze(1)
        real, padded = (~pattern).nonzero().squeeze(1), pattern.nonzero().squeeze(1)
        qg, kg, vg = q[rows], k[rows], v[rows]
        out[rows[:, None], :, real] = F.scaled_dot_product_attention(qg[:, :, real], kg, vg).transpose(1, 2)
        out[rows[:, None], :, padded] = F.scaled_dot_product_attention(
            qg[:, :, padded], kg[:, :, real], vg[:, :, real]).transpose(1, 2)
    return out


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class VisionEncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig, gated: bool) -> None:
        super().__init__()
        self.self_attn = VisionAttention(config)
        self.mlp = VisionMLP(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.gated = gated
        if gated:
            self.gate_attn = nn.Parameter(torch.zeros(1))
            self.gate_ffn = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), pad)
        x = x + (self.gate_attn.tanh() * h if self.gated else h)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + (self.gate_ffn.tanh() * h if self.gated else h)


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig, num_layers: int, gated: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(config, gated) for _ in range(num_layers))


class MllamaVisionModel(nn.Module):
    """pixel_values [B, I, T, C, t, t] -> features [B, I, T, P, vision_output_dim] (P = patches + class token)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.patch_embedding = nn.Conv2d(config.num_channels, d, config.patch_size, config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(d))
        self.gated_positional_embedding = PrecomputedPositionEmbedding(config)
        self.pre_tile_positional_embedding = PrecomputedAspectRatioEmbedding(config)
        self.post_tile_positional_embedding = PrecomputedAspectRatioEmbedding(config)
        self.layernorm_pre = nn.LayerNorm(d)  # PyTorch's default eps (1e-5), as HF
        self.layernorm_post = nn.LayerNorm(d)
        self.transformer = VisionEncoder(config, config.num_hidden_layers, gated=False)
        self.global_transformer = VisionEncoder(config, config.num_global_layers, gated=True)

    def forward(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                aspect_ratio_mask: torch.Tensor) -> torch.Tensor:
        c = self.config
        B, n_img, T = pixel_values.shape[:3]
        N, P, Pp, D = B * n_img, c.num_patches, c.padded_patches, c.hidden_size
        ids = aspect_ratio_ids.reshape(N)
        w = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.reshape(N * T, *pixel_values.shape[3:]).to(w.device, w.dtype))
        x = x.flatten(2).transpose(1, 2)  # (N*T, P-1, D)
        x = self.pre_tile_positional_embedding(x.reshape(N, T, P - 1, D), ids)
        cls = self.class_embedding.to(x.dtype).expand(N * T, 1, D)
        x = torch.cat([cls, x.reshape(N * T, P - 1, D)], dim=1).reshape(N, T, P, D)
        x = self.layernorm_pre(self.gated_positional_embedding(x, ids))
        x = F.pad(x, (0, 0, 0, Pp - P)).reshape(N, T * Pp, D)  # zero tokens up to a multiple of 8 per tile

        # A token is padding if its tile is not a real tile or it is one of the added tokens; only pad->pad
        # pairs are masked (the padded tiles still run through every layer, as in HF and Meta).
        tile_pad = aspect_ratio_mask.reshape(N, T, 1).to(x.device) == 0
        token_pad = (torch.arange(Pp, device=x.device) >= P).view(1, 1, Pp)
        pad = (tile_pad | token_pad).reshape(N, T * Pp)

        keep = set(c.intermediate_layers_indices)
        states = {}
        for i, layer in enumerate(self.transformer.layers):
            if i in keep:  # the *input* of layer i, as Meta's reference (see MllamaForConditionalGeneration)
                states[i] = x
            x = layer(x, pad)
        x = self.layernorm_post(x)
        x = self.post_tile_positional_embedding(x.reshape(N, T, Pp, D), ids).reshape(N, T * Pp, D)
        for layer in self.global_transformer.layers:
            x = layer(x, pad)

        x = x.reshape(N, T, Pp, D)[:, :, :P]  # (N, T, P, D)
        # Interleaved: dim d of the j-th kept layer lands at D + d * k + j (stack on the last axis, flatten).
        inter = torch.stack([states[i] for i in c.intermediate_layers_indices], dim=-1)  # (N, T*Pp, D, k)
        inter = inter.reshape(N, T, Pp, -1)[:, :, :P]
        return torch.cat([x, inter], dim=-1).reshape(B, n_img, T, P, -1)

"""Llama 3.2 Vision (HF `MllamaForConditionalGeneration`, SPEC 2): the vision encoder, its projector, and a
Llama text trunk whose layers at `cross_attention_layers` are tanh-gated cross-attention blocks.

Images are encoded once per request: `model.set_images(cache, ...)` stores every cross layer's K/V and the
`<|image|>` spans in the cache, and each forward step reads them from there (text-only: cross layers skipped).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MllamaConfig, TextConfig
from ..engine.kv_cache import KVCache
from .llama import SMALL_QUERY, Linear, LlamaDecoderLayer, LlamaMLP, RMSNorm, _StepContext
from .mllama_vision import MllamaVisionModel
from .rope import RotaryEmbedding

CONFIG_CLASS = MllamaConfig
NO_END = torch.iinfo(torch.long).max  # an image span open to the end, generated tokens included


@dataclass
class CrossAttentionState:
    """The images of a batch as the text decoder sees them (computed once per request).

    keys/values: per cross layer, (B, KV, S, hd) with S = I * tiles * patches (k_norm already applied).
    starts/ends (B, I): token positions [start, end) that attend image i (NO_END: to the end; a padded image
    slot has start = end = NO_END). num_tiles (B, I): real tiles per image; padded tiles are never attended.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    starts: torch.Tensor
    ends: torch.Tensor
    num_tiles: torch.Tensor
    max_tiles: int
    patches: int

    def rows(self, index: torch.Tensor) -> CrossAttentionState:
        """The state of a subset of batch rows (continuous batching's `cache_rows`)."""
        pick = lambda t: t.index_select(0, index)  # noqa: E731
        return CrossAttentionState([pick(k) for k in self.keys], [pick(v) for v in self.values],
                                   pick(self.starts), pick(self.ends), pick(self.num_tiles), self.max_tiles,
                                   self.patches)

    def mask(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> (allowed (B, 1, T, S) bool, has_image (B, T, 1) float).

        A token attends the tiles of the image(s) whose span holds its position. A token that sees no image
        attends *every* vision token unmasked and its MLP branch is zeroed: HF's behaviour (Meta zeroes the
        attention output too; SPEC 2.3 point 5).
        """
        pos = positions[:, :, None]  # (B, T, 1)
        in_span = (self.starts[:, None] <= pos) & (pos < self.ends[:, None])  # (B, T, I)
        tiles = torch.arange(self.max_tiles, device=pos.device) < self.num_tiles[:, :, None]  # (B, I, tiles)
        allowed = (in_span[..., None] & tiles[:, None]).flatten(2)  # (B, T, I * tiles)
        has_image = allowed.any(-1, keepdim=True)  # (B, T, 1)
        allowed = allowed[..., None].expand(*allowed.shape, self.patches).flatten(2)  # (B, T, S)
        return (allowed | ~has_image)[:, None], has_image.to(self.keys[0].dtype)


@dataclass
class MllamaCache(KVCache):
    """KV cache of the self-attention layers plus the request's images (None: text only)."""

    vision: CrossAttentionState | None = None

    def copy_row(self, src: int, dst: int, length: int) -> None:
        super().copy_row(src, dst, length)
        v = self.vision
        if v is not None:
            for t in (*v.keys, *v.values, v.starts, v.ends, v.num_tiles):
                t[dst] = t[src]


class MllamaCrossAttention(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                  config.head_dim)
        d = config.hidden_size
        self.q_proj = Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = Linear(d, self.n_kv * self.head_dim, bias=False)
        self.v_proj = Linear(d, self.n_kv * self.head_dim, bias=False)
        self.o_proj = Linear(self.n_heads * self.head_dim, d, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def project(self, vision: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected vision tokens (B, S, D) -> this layer's K, V (B, KV, S, hd); no RoPE."""
        B, S, _ = vision.shape
        k = self.k_norm(self.k_proj(vision).view(B, S, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(vision).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)  # (B, H, T, hd)
        if T <= SMALL_QUERY:  # decode: two small matmuls beat SDPA's kernel ~10x against thousands of keys
            out = self._grouped_attention(q, k, v, allowed)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=self.n_heads != self.n_kv)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def _grouped_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           allowed: torch.Tensor) -> torch.Tensor:
        """q (B, H, T, hd) against k/v (B, KV, S, hd): the heads sharing a kv head in one matmul, fp32 softmax.
        Every row of `allowed` (B, 1, T, S) has at least one True, so no row is fully masked."""
        B, H, T, hd = q.shape
        G = H // self.n_kv
        scores = torch.matmul(q.reshape(B, self.n_kv, G * T, hd), k.transpose(-1, -2)) * hd**-0.5  # (B, KV, G*T, S)
        mask = allowed[:, :, None].expand(B, 1, G, T, allowed.shape[-1]).reshape(B, 1, G * T, -1)
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v).view(B, H, T, hd)


class MllamaCrossAttentionDecoderLayer(nn.Module):
    """x += tanh(g_attn) * xattn(norm x); x += tanh(g_mlp) * has_image * mlp(norm x)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.cross_attn = MllamaCrossAttention(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp = LlamaMLP(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, h: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                has_image: torch.Tensor) -> torch.Tensor:
        h = h + self.cross_attn_attn_gate.tanh() * self.cross_attn(self.input_layernorm(h), k, v, allowed)
        return h + self.cross_attn_mlp_gate.tanh() * (has_image * self.mlp(self.post_attention_layernorm(h)))


class MllamaTextModel(nn.Module):
    """Embeddings (vocab + 8 rows), self-attention Llama layers and cross-attention layers, final norm."""

    def __init__(self, config: MllamaConfig) -> None:
        super().__init__()
        text = config.text
        self.cross_layers = frozenset(config.cross_attention_layers)
        self.embed_tokens = nn.Embedding(text.vocab_size + 8, text.hidden_size)
        slots = {layer: slot for slot, layer in enumerate(config.self_attention_layers)}  # KV cache rows
        self.layers = nn.ModuleList(
            MllamaCrossAttentionDecoderLayer(text) if i in self.cross_layers else LlamaDecoderLayer(text, slots[i])
            for i in range(text.num_hidden_layers))
        self.norm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(text.head_dim, text.rope_theta, text.rope_scaling)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache | None,
                cache_rows: torch.Tensor | None, vision: CrossAttentionState | None) -> torch.Tensor:
        h = self.embed_tokens(input_ids)  # (B, T, D)
        cos, sin = self.rotary_emb(positions, h.dtype)
        ctx = _StepContext(positions, cache, cache_rows)
        if vision is not None:
            allowed, has_image = vision.mask(positions)
        cross = 0  # index of the next cross layer in vision.keys / values
        for i, layer in enumerate(self.layers):
            if i not in self.cross_layers:
                h = layer(h, cos, sin, ctx)
                continue
            if vision is not None:  # text only: cross layers are skipped entirely (HF and Meta)
                h = layer(h, vision.keys[cross], vision.values[cross], allowed, has_image)
            cross += 1
        return self.norm(h)


class MllamaLanguageModel(nn.Module):
    """`language_model.model.*` and `language_model.lm_head` (the classic HF checkpoint layout)."""

    def __init__(self, config: MllamaConfig) -> None:
        super().__init__()
        self.model = MllamaTextModel(config)
        self.lm_head = Linear(config.text.hidden_size, config.text.vocab_size, bias=False)


class MllamaForConditionalGeneration(nn.Module):
    """Llama 3.2 Vision with HF parameter names.

    `model(input_ids, positions, cache)` runs like the Llama model (the images come from `cache.vision`);
    without a cache, pass `vision=model.encode_images(...)`. Matches transformers with one deliberate
    exception: the intermediate vision features are the *inputs* of layers 3, 7, 15, 23, 30 (Meta's reference
    and transformers up to 4.5x); transformers 5.24 takes their outputs, one layer off.
    """

    accepts_images = True

    def __init__(self, config: MllamaConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = MllamaVisionModel(config.vision)
        self.multi_modal_projector = nn.Linear(config.vision.vision_output_dim, config.text.hidden_size)
        self.language_model = MllamaLanguageModel(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.model.norm.weight.dtype

    def make_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> MllamaCache:
        t = self.config.text
        ref = self.language_model.model.norm.weight
        return MllamaCache.allocate(len(self.config.self_attention_layers), batch_size, t.num_key_value_heads,
                                    max_len, t.head_dim, dtype or ref.dtype, ref.device)

    def image_features(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                       aspect_ratio_mask: torch.Tensor) -> torch.Tensor:
        """Tiles [B, I, T, C, t, t] -> projected vision tokens (B, I * T * P, text hidden)."""
        features = self.vision_model(pixel_values, aspect_ratio_ids, aspect_ratio_mask)  # (B, I, T, P, 7680)
        B = features.shape[0]
        return self.multi_modal_projector(features).reshape(B, -1, self.config.text.hidden_size)

    @torch.no_grad()
    def encode_images(self, images: Any, token_ids: Sequence[Sequence[int]] | torch.Tensor) -> CrossAttentionState:
        """`image_processing.ImageInputs` of a batch + each row's prompt ids -> the cross-attention state.

        Row b must hold one `<|image|>` (config.image_token_index) per image of sample b.
        """
        from ..image_processing import image_spans

        rows = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else [list(r) for r in token_ids]
        pv = images.pixel_values
        if len(rows) != pv.shape[0]:
            raise ValueError(f"{len(rows)} token rows but images for {pv.shape[0]} samples")
        n_img = pv.shape[1]
        starts = torch.full((len(rows), n_img), NO_END, dtype=torch.long)
        ends, tiles = starts.clone(), torch.zeros(len(rows), n_img, dtype=torch.long)
        for b, (ids, counts) in enumerate(zip(rows, images.num_tiles, strict=True)):
            spans = image_spans(ids, self.config.image_token_index)
            if len(spans) != len(counts):
                raise ValueError(f"prompt row {b} has {len(spans)} <|image|> tokens (id "
                                 f"{self.config.image_token_index}) but {len(counts)} images")
            for i, ((start, end), n) in enumerate(zip(spans, counts, strict=True)):
                starts[b, i], tiles[b, i] = start, n
                ends[b, i] = NO_END if end == -1 or end >= len(ids) else end
        device = self.language_model.model.norm.weight.device
        vision = self.image_features(pv, images.aspect_ratio_ids.to(device), images.aspect_ratio_mask)
        keys, values = [], []
        for i in sorted(self.language_model.model.cross_layers):
            k, v = self.language_model.model.layers[i].cross_attn.project(vision)
            keys.append(k)
            values.append(v)
        return CrossAttentionState(keys, values, starts.to(device), ends.to(device), tiles.to(device),
                                   self.config.vision.max_num_tiles, self.config.vision.num_patches)

    def set_images(self, cache: MllamaCache, images: Any, token_ids: Sequence[Sequence[int]] | torch.Tensor
                   ) -> None:
        """Encode the images once and keep their cross-attention K/V in `cache` for the whole generation."""
        cache.vision = self.encode_images(images, token_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, logits_at: torch.Tensor | None = None,
                cache_rows: torch.Tensor | None = None, *, vision: CrossAttentionState | None = None
                ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab); arguments as `LlamaForCausalLM.forward`.

        vision: the images (default: `cache.vision`; None there too = text only).
        """
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        if vision is None:
            vision = getattr(cache, "vision", None)
            if vision is not None and cache_rows is not None:
                vision = vision.rows(cache_rows)
        h = self.language_model.model(input_ids, positions, cache, cache_rows, vision)
        if logits_at is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logits_at][:, None]  # (B, 1, D)
        return self.language_model.lm_head(h)

    @classmethod
    def adapt_checkpoint(cls, checkpoint: Any) -> Any:
        """Newer transformers releases save `model.language_model.*`, `model.vision_model.*`,
        `model.multi_modal_projector.*` and a top-level `lm_head`; view those under the classic Hub names."""
        names = checkpoint.tensor_names()
        if not any(n.startswith("model.") or n.startswith("lm_head.") for n in names):
            return checkpoint
        return _RenamedCheckpoint(checkpoint, {_classic_name(n): n for n in names})


_NEW_TO_CLASSIC = (("model.language_model.", "language_model.model."), ("model.vision_model.", "vision_model."),
                   ("model.multi_modal_projector.", "multi_modal_projector."), ("lm_head.", "language_model.lm_head."))


def _classic_name(name: str) -> str:
    for new, classic in _NEW_TO_CLASSIC:
        if name.startswith(new):
            return classic + name[len(new):]
    return name


class _RenamedCheckpoint:
    """A Checkpoint seen under other tensor names; everything else is the wrapped checkpoint's."""

    def __init__(self, checkpoint: Any, names: dict[str, str]) -> None:
        self._inner, self._names = checkpoint, names  # shown name -> stored name

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._inner, attr)

    def tensor_names(self) -> list[str]:
        return list(self._names)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._inner.tensor_shape(self._names[name])

    def load_tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._inner.load_tensor(self._names[name], dtype)

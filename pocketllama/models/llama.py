"""Llama 3.x decoder (LlamaForCausalLM) with HF parameter names.

`model(input_ids, positions, cache)` runs a whole prompt, an incremental step against a static KV cache,
or a right-padded batch where every row keeps its own positions.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from ..engine.kv_cache import KVCache, round_up
from ..quant import kernels
from ..quant.kernels import SMALL_M, dense_mm
from ..quant.modules import Int4Linear, Int8Linear
from .fused import FusedProjection, fused_outputs, fusion_for
from .rope import RotaryEmbedding, apply_rotary

# Attend over the cache in windows of this many slots: keeps decode cost proportional to the context used
# while the number of distinct shapes (and compiled graphs) stays small.
KV_WINDOW = 256
# Up to this many new tokens per row, attention against the cache is two small matmuls (decode, speculative
# verification); longer chunks (prefill) take SDPA's fused kernel.
SMALL_QUERY = 16
# Decode-sized steps (at most SMALL_M rows) run each decoder layer as one C++ call (csrc/decode_layer.cpp)
# where its modules allow; tests switch it off to compare with the module-by-module path.
ONE_CALL_LAYERS = True


class Linear(nn.Linear):
    """nn.Linear whose decode-sized bfloat16 / float32 inputs take pocketllama's GEMV kernels
    (`quant.kernels.dense_mm`), which stream the weight at close to memory bandwidth where oneDNN's `linear`
    and `mv` do not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.bfloat16, torch.float32) and x.numel() <= SMALL_M * self.in_features:
            y = dense_mm(x.reshape(-1, self.in_features), self.weight, self.bias)  # (rows, N)
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Embedding):
    """nn.Embedding that can also project hidden states back onto the vocabulary (a tied output layer).
    Replacement tables (quant/) implement the same `attend`, so the model never looks inside the table."""

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., D) -> logits (..., vocab) = h @ weight.T."""
        w = self.weight
        if h.dtype in (torch.bfloat16, torch.float32) and h.numel() <= SMALL_M * h.shape[-1]:  # decode: see Linear
            return dense_mm(h.reshape(-1, h.shape[-1]), w).view(*h.shape[:-1], -1)
        return F.linear(h, w)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and (y := kernels.rms_norm(x, self.weight, self.eps)) is not None:
            return y
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                  config.head_dim)
        bias = config.attention_bias
        self.q_proj = Linear(config.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(config.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = Linear(config.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: _StepContext) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = fused_outputs(self, "_fused_qkv", [self.q_proj, self.k_proj, self.v_proj], x)  # (B, T, n*hd)
        rotated = not torch.is_grad_enabled() and kernels.rotary_([q, k], cos, sin, self.head_dim)  # in place
        if rotated and ctx.cache is not None and T <= SMALL_QUERY:  # decode: cache write + attention, one call
            out = kernels.decode_attention(q, k, v, ctx.cache.keys[self.layer_idx], ctx.cache.values[self.layer_idx],
                                           ctx.row_ids, ctx.positions, self.head_dim)  # (B, T, H*hd)
            if out is not None:
                return self.o_proj(out)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if not rotated:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        gqa = self.n_heads != self.n_kv
        if ctx.cache is None:
            # causal, or the caller's mask (packed training rows: block-diagonal causal)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=ctx.mask is None and T > 1,
                                                 enable_gqa=gqa)  # (B, H, T, hd)
        else:
            ctx.cache.update(self.layer_idx, ctx.rows, ctx.positions, k, v)
            keys = ctx.window(ctx.cache.keys[self.layer_idx])  # (B, KV, S, hd)
            values = ctx.window(ctx.cache.values[self.layer_idx])
            if T <= SMALL_QUERY:
                out = self._grouped_attention(q, keys, values, ctx.grouped_bias(self.n_heads // self.n_kv, q.dtype))
            else:
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=ctx.mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def _grouped_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           bias: torch.Tensor) -> torch.Tensor:
        """Few queries against the cache: the query heads that share a kv head are stacked into one matmul
        (no K/V repeat). q (B, H, T, hd), k/v (B, KV, S, hd), bias (B, 1, G*T, S) additive mask (0 / -inf).
        Softmax computes in fp32 internally and rounds once, as HF's eager softmax(dtype=float32).to(dtype)."""
        B, H, T, hd = q.shape
        qg = q.reshape(B, self.n_kv, H // self.n_kv * T, hd)  # heads of a group are consecutive (repeat_interleave)
        scores = torch.matmul(qg, k.transpose(-1, -2)).mul_(hd**-0.5).add_(bias)  # (B, KV, G*T, S)
        return torch.matmul(torch.softmax(scores, dim=-1), v).view(B, H, T, hd)


class LlamaMLP(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = fused_outputs(self, "_fused_gate_up", [self.gate_proj, self.up_proj], x)
        act = kernels.silu_mul(gate, up)  # one C++ pass where available (the same bits as decode_layer's)
        return self.down_proj(F.silu(gate) * up if act is None else act)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: _StepContext) -> torch.Tensor:
        if ctx.one_call(h, cos) and (out := self._one_call(h, cos, sin, ctx)) is not None:
            return out
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, ctx)
        return h + self.mlp(self.post_attention_layernorm(h))

    def decode_plan(self) -> _DecodePlan:
        """This layer's `_DecodePlan`, rebuilt when its modules or tensors changed."""
        plan = self.__dict__.get("_decode_plan")
        if plan is None or not plan.valid():
            plan = self.__dict__["_decode_plan"] = _DecodePlan(self)
        return plan

    def _one_call(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: _StepContext) -> torch.Tensor | None:
        """The whole layer as one C++ call (same ops and rounding as `forward`), or None where its modules do
        not allow it (LoRA wrappers, layouts the C++ kernels do not hold, unfusable projections)."""
        plan = self.decode_plan()
        if plan.tensors is None or plan.dtype != h.dtype:
            return None
        i, hd = self.self_attn.layer_idx, self.self_attn.head_dim
        return kernels.extension().decode_layer(h, cos, sin, ctx.cache.keys[i], ctx.cache.values[i], ctx.row_ids,
                                                ctx.positions, *plan.norms, plan.eps, plan.tensors, plan.kinds, hd,
                                                hd**-0.5)


def _projection(m: nn.Module) -> tuple[int, list[torch.Tensor | None]] | None:
    """(kind, [weight, scales, zeros, bias]) of a projection that csrc/decode_layer.cpp computes exactly as the
    module's forward does, else None."""
    if type(m) is Linear:
        return 0, [m.weight, None, None, m.bias]
    if type(m) is Int8Linear and m.layout == "interleaved":
        return 1, [m.weight, m.scales, None, m.bias]
    if type(m) is Int4Linear and m.layout in ("interleaved", "groups"):
        return (2 if m.layout == "interleaved" else 3), [m.weight, m.scales, m.zeros, m.bias]
    return None


class _DecodePlan:
    """The tensors `decode_layer` (C++) takes for one decoder layer (`tensors` None: the layer runs module by
    module), kept while the layer's module tree and tensors stay the same objects at the same addresses
    (quantization swaps, adapters, `.to()` and `param.data = ...` all rebuild it)."""

    def __init__(self, layer: LlamaDecoderLayer) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        self.tensors: list[torch.Tensor | None] | None = None
        if (type(attn) is LlamaAttention and type(mlp) is LlamaMLP and all(type(n) is RMSNorm for n in norms)
                and norms[0].eps == norms[1].eps and attn.head_dim % 16 == 0
                and attn.head_dim <= 256):
            qkv = fusion_for(attn, "_fused_qkv", [attn.q_proj, attn.k_proj, attn.v_proj])  # fuses first: the
            gate_up = fusion_for(mlp, "_fused_gate_up", [mlp.gate_proj, mlp.up_proj])  # originals become views
            projs = [_projection(m) for m in (getattr(qkv, "fused", None), attn.o_proj, getattr(gate_up, "fused", None),
                                                mlp.down_proj)]
            if isinstance(qkv, FusedProjection) and isinstance(gate_up, FusedProjection) and None not in projs:
                self.kinds = [kind for kind, _ in projs]
                self.tensors = [t for _, ts in projs for t in ts]
                self.norms, self.eps, self.dtype = [n.weight for n in norms], norms[0].eps, norms[0].weight.dtype
        watch: list[tuple[dict, str, object]] = []  # (container, key, the object found there)
        for owner, names in ((layer, ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")),
                             (attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                m = owner._modules[name]
                watch.append((owner._modules, name, m))
                if owner is not layer or name.endswith("norm"):
                    watch += [(d, k, t) for d in (m._parameters, m._buffers) for k, t in d.items()]
        self._dicts, self._keys, self._objects = zip(*watch, strict=True)
        self._tensors = [t for t in self._objects if isinstance(t, torch.Tensor)]
        self._ptrs = [t.data_ptr() for t in self._tensors]

    def valid(self) -> bool:
        """Checked every step, so written as C-level loops (~3 us per layer)."""
        return (all(map(operator.is_, map(dict.get, self._dicts, self._keys), self._objects))
                and list(map(torch.Tensor.data_ptr, self._tensors)) == self._ptrs)


class _TrunkPlan:
    """Several layers' `_DecodePlan`s as the flat lists of `decode_layers` (`tensors` None: not possible)."""

    def __init__(self, plans: list[_DecodePlan], head_dims: list[int]) -> None:
        self.plans, self.tensors = plans, None
        if plans and all(p.tensors is not None for p in plans):
            first = plans[0]
            if all((p.dtype, p.eps) == (first.dtype, first.eps) for p in plans) and len(set(head_dims)) == 1:
                self.tensors = [t for p in plans for t in p.tensors]
                self.kinds = [k for p in plans for k in p.kinds]
                self.norms = [n for p in plans for n in p.norms]
                self.dtype, self.eps, self.head_dim = first.dtype, first.eps, head_dims[0]


class _StepContext:
    """Per-call attention metadata, passed down explicitly (no hidden global state).

    `cache_rows` (B,) maps input rows to cache rows (continuous batching runs any subset of the cache's
    sequences); None means input row b is cache row b and the batch covers the whole cache.
    `attn_mask` (B, 1, T, T) bool replaces the causal mask of a whole-sequence forward (no cache).
    """

    def __init__(self, positions: torch.Tensor, cache: KVCache | None, cache_rows: torch.Tensor | None,
                 attn_mask: torch.Tensor | None = None) -> None:
        self.cache, self.positions = cache, positions
        self.rows = self.cache_rows = self.row_ids = None
        self._mask = attn_mask
        self._bias: tuple[tuple[int, torch.dtype], torch.Tensor] | None = None
        self._one_call: bool | None = None
        self.kv_len = 0
        if attn_mask is not None and cache is not None:
            raise ValueError("attn_mask applies to a whole-sequence forward; with a KV cache the mask comes from "
                             "positions (pass cache=None to use attn_mask)")
        if cache is not None:
            B = positions.shape[0]
            if cache_rows is None and B != cache.batch_size:
                raise ValueError(f"batch of {B} rows does not match the KV cache's {cache.batch_size} rows")
            if cache_rows is not None and cache_rows.shape != (B,):
                raise ValueError(f"cache_rows must have shape ({B},), got {tuple(cache_rows.shape)}")
            if torch.compiler.is_compiling():
                # Compiled decode step: no host sync, one shape. Attend over the whole (request-sized) cache.
                self.kv_len = cache.max_len
            else:
                top = int(positions.max()) + 1
                if top > cache.max_len or int(positions.min()) < 0:
                    raise ValueError(f"position {top - 1} is outside the KV cache (max_len {cache.max_len})")
                self.kv_len = min(round_up(top, KV_WINDOW), cache.max_len)
            self.row_ids = torch.arange(B, device=positions.device) if cache_rows is None else cache_rows  # (B,)
            self.rows, self.cache_rows = self.row_ids[:, None], cache_rows  # (B, 1)

    def one_call(self, h: torch.Tensor, cos: torch.Tensor) -> bool:
        """Whether this step's decoder layers may run as one C++ call each (decided on the first layer)."""
        if self._one_call is None:
            B, T, _ = h.shape
            ext = kernels.extension()
            self._one_call = bool(
                ONE_CALL_LAYERS and self.cache is not None and len(self.cache.keys) > 0 and T <= SMALL_QUERY and B * T <= SMALL_M
                and not torch.is_grad_enabled() and not torch.compiler.is_compiling() and h.device.type == "cpu"
                and h.dtype in (torch.float32, torch.bfloat16, torch.float16) and cos.dtype == h.dtype
                and self.cache.keys[0].dtype == h.dtype and self.positions.dtype == torch.long
                and self.positions.is_contiguous() and self.row_ids.dtype == torch.long
                and self.row_ids.is_contiguous() and ext is not None and hasattr(ext, "decode_layer"))
        return self._one_call

    @property
    def mask(self) -> torch.Tensor | None:
        """The caller's mask (no cache), or with a cache the causal mask by position (B, 1, T, S), built on
        first use (the one-call decode attention needs none)."""
        if self._mask is None and self.cache is not None:
            slots = torch.arange(self.kv_len, device=self.positions.device)
            self._mask = (slots <= self.positions[:, :, None])[:, None]
        return self._mask

    def grouped_bias(self, groups: int, dtype: torch.dtype) -> torch.Tensor:
        """The causal mask as an additive bias for `_grouped_attention`, built once per step: (B, 1, G*T, S)."""
        key = (groups, dtype)
        if self._bias is None or self._bias[0] != key:
            bias = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device)
            bias.masked_fill_(~self.mask, float("-inf"))
            self._bias = (key, bias.repeat(1, 1, groups, 1))
        return self._bias[1]

    def window(self, buf: torch.Tensor) -> torch.Tensor:
        """The attended slots of one cache buffer for the rows of this batch: (B, KV, S, hd)."""
        buf = buf[:, :, : self.kv_len]
        return buf if self.cache_rows is None else buf.index_select(0, self.cache_rows)


class LlamaModel(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache | None,
                cache_rows: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed_tokens(input_ids)  # (B, T, D)
        cos, sin = self.rotary_emb(positions, h.dtype)
        ctx = _StepContext(positions, cache, cache_rows, attn_mask)
        if ctx.one_call(h, cos) and (trunk := self._trunk_plan(h.dtype)) is not None:
            hd = trunk.head_dim  # every layer as one C++ call per step
            n = len(trunk.plans)  # layer i uses cache slot i (checked in _trunk_plan)
            h = kernels.extension().decode_layers(h, cos, sin, cache.keys[:n], cache.values[:n], ctx.row_ids,
                                                  ctx.positions, trunk.norms, trunk.eps, trunk.tensors, trunk.kinds, hd,
                                                  hd**-0.5)
        else:
            for layer in self.layers:
                h = layer(h, cos, sin, ctx)
        return self.norm(h)

    def _trunk_plan(self, dtype: torch.dtype) -> _TrunkPlan | None:
        """The layers' plans joined for `decode_layers` (None: some layer runs otherwise, or has hooks), kept
        while every layer's plan stays valid."""
        layers = self.layers._modules.values()
        if any(type(layer) is not LlamaDecoderLayer or layer._forward_hooks or layer._forward_pre_hooks
               or layer.self_attn.layer_idx != i for i, layer in enumerate(layers)):
            return None
        plans = [layer.decode_plan() for layer in layers]
        trunk = self.__dict__.get("_trunk")
        if trunk is None or trunk.plans != plans:
            trunk = self.__dict__["_trunk"] = _TrunkPlan(plans, [layer.self_attn.head_dim for layer in layers])
        return trunk if trunk.tensors is not None and trunk.dtype == dtype else None


class LlamaForCausalLM(nn.Module):
    """Llama 3.x causal LM. Tied models have no `lm_head`: logits use `model.embed_tokens.weight`."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def make_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        c = self.config
        ref = self.model.norm.weight
        return KVCache.allocate(c.num_hidden_layers, batch_size, c.num_key_value_heads, max_len, c.head_dim,
                                dtype or ref.dtype, ref.device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, logits_at: torch.Tensor | None = None,
                cache_rows: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab) in the model dtype.

        positions (B, T): absolute positions (default 0..T-1); with `cache`, K/V are written at those slots.
        logits_at (B,): compute logits only at this index of each row -> (B, 1, vocab) (prefill saves the
        vocab projection of every prompt token but the last).
        cache_rows (B,): which cache row each input row uses (default: row b <-> cache row b, all rows).
        attn_mask (B, 1, T, T) bool, True = may attend: replaces the causal mask when cache is None (packed
        training rows attend block-diagonally; finetune/data.py builds it).
        """
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        h = self.model(input_ids, positions, cache, cache_rows, attn_mask)
        if logits_at is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logits_at][:, None]  # (B, 1, D)
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.attend(h)
        return self.lm_head(h)

"""Memory planner: bytes for weights (per precision), KV cache, activations and runtime, computed from
metadata only (config + tensor types, the model built on the meta device); `check_fits` makes `load` refuse
a load that would not fit in MemAvailable, suggesting a recipe or a context that would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .kernels import FALLBACK_CHUNK_VALUES
from .recipe import QSpec, module_of

DEFAULT_CONTEXT = 4096
PREFILL_CHUNK = 512  # engine/generate.py's default prefill_step_size
RUNTIME_BYTES = 350 * 2**20  # Python + PyTorch + tokenizer; `import torch` alone measures ~220 MB RSS here
# Largest first; the first that fits is suggested. int4-g32-e4g128 keeps g32 linears (their accuracy) with an
# int4 g128 table (1B: 0.75 GB); int4-g64-e4 is the smallest (0.70 GB) at g64 linears' cost in quality.
SUGGESTED_RECIPES = ("int8", "int4-g32", "int4-g32-e4g128", "int4-g64-e4")
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
GB = 1e9


class NotEnoughMemoryError(MemoryError, ValueError):
    """The estimate for a load exceeds the memory available (MemAvailable)."""


@dataclass
class MemoryEstimate:
    weights: dict[str, int]  # precision label ("bf16", "int8", "int4-g32", ...) -> bytes
    kv_cache: int
    activations: int
    context: int
    dtype: torch.dtype
    description: str = ""
    runtime: int = RUNTIME_BYTES
    parameters: dict[str, int] = field(default_factory=dict)  # precision label -> number of weights
    cross_cache: int = 0  # Llama 3.2 Vision: the cross-attention K/V of one image (kept for a whole answer)

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def total(self) -> int:
        return self.weight_bytes + self.kv_cache + self.cross_cache + self.activations + self.runtime

    def table(self) -> str:
        rows = [(f"weights {label}", f"{self.parameters.get(label, 0) / 1e6:,.0f}M params", b)
                for label, b in sorted(self.weights.items(), key=lambda kv: -kv[1])]
        rows += [("weights total", "", self.weight_bytes),
                 ("KV cache", f"{self.context:,} tokens, {_DTYPE_NAMES.get(self.dtype, self.dtype)}", self.kv_cache),
                 *([("cross-attn cache", "one image, all tiles", self.cross_cache)] if self.cross_cache else []),
                 ("activations", f"prefill chunk {min(PREFILL_CHUNK, self.context)}", self.activations),
                 ("runtime", "Python, PyTorch, tokenizer", self.runtime),
                 ("total", "", self.total)]
        width = max(len(r[0]) for r in rows)
        lines = [self.description] if self.description else []
        lines += [f"  {name:<{width}}  {_gb(b):>9}  {note}".rstrip() for name, note, b in rows]
        return "\n".join(lines)


def _gb(n: int) -> str:
    return f"{n / GB:.2f} GB"


def _label(spec: QSpec) -> str:
    if spec.kind == "int4":
        return f"int4-g{spec.group_size}" + ("-sym" if spec.symmetric else "")
    return "int8" if spec.group_size is None else f"int8-g{spec.group_size}"


def weight_bytes(shapes: dict[str, tuple[int, ...]], plan: dict[str, QSpec], dtype: torch.dtype
                 ) -> tuple[dict[str, int], dict[str, int]]:
    """(precision -> bytes, precision -> parameter count) once loaded: quantized weights plus their scales
    (and zeros) in `dtype`, everything else in `dtype`."""
    size = torch.tensor([], dtype=dtype).element_size()
    out: dict[str, int] = {}
    count: dict[str, int] = {}
    for name, shape in shapes.items():
        module = module_of(name)
        numel = 1
        for s in shape:
            numel *= s
        if module in plan and name == f"{module}.weight":
            spec = plan[module]
            groups = 1 if spec.group_size is None else shape[1] // spec.group_size
            label = _label(spec)
            qbytes = numel if spec.kind == "int8" else numel // 2
            nbytes = qbytes + shape[0] * groups * size * (1 if spec.kind == "int8" or spec.symmetric else 2)
        else:
            label, nbytes = _DTYPE_NAMES.get(dtype, str(dtype)), numel * size
        out[label] = out.get(label, 0) + nbytes
        count[label] = count.get(label, 0) + numel
    return out, count


def kv_cache_bytes(config: Any, context: int, dtype: torch.dtype, batch: int = 1) -> int:
    config = getattr(config, "text", config)  # a vision model's text trunk holds the cache
    size = torch.tensor([], dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * batch * config.num_key_value_heads * context * config.head_dim * size


def cross_cache_bytes(config: Any, dtype: torch.dtype, batch: int = 1) -> int:
    """Llama 3.2 Vision: K and V of every cross-attention layer over one image's tokens (all tiles); 0 for a
    text model."""
    vision = getattr(config, "vision", None)
    if vision is None:
        return 0
    text, size = config.text, torch.tensor([], dtype=dtype).element_size()
    tokens = vision.max_num_tiles * vision.num_patches
    return 2 * len(config.cross_attention_layers) * batch * text.num_key_value_heads * tokens * text.head_dim * size


def vision_activation_bytes(config: Any, dtype: torch.dtype) -> int:
    """Peak transient memory of encoding one image (all tiles at once): the encoder's hidden states, its MLP
    and q/k/v, the stacked intermediate features and the projected output; attention runs in SDPA's fused
    kernel (no score matrix)."""
    vision = getattr(config, "vision", None)
    if vision is None:
        return 0
    e = torch.tensor([], dtype=dtype).element_size()
    tokens = vision.max_num_tiles * vision.num_patches
    per_token = 6 * vision.hidden_size + vision.intermediate_size + vision.vision_output_dim + config.text.hidden_size
    return tokens * per_token * e


def activation_bytes(config: Any, context: int, dtype: torch.dtype, batch: int = 1, quantized: bool = False) -> int:
    """Peak transient memory of one prefill chunk: hidden states, q/k/v, MLP, fp32 attention scores over
    the context, one row of fp32 logits, and a dequantized weight chunk when a fallback kernel runs."""
    vision_peak = vision_activation_bytes(config, dtype)
    config = getattr(config, "text", config)
    e = torch.tensor([], dtype=dtype).element_size()
    t, s = min(PREFILL_CHUNK, context), context
    h, kv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    per_row = (6 * t * config.hidden_size + t * (2 * h + 2 * kv) * hd + 3 * t * config.intermediate_size) * e
    scores = h * t * s * (e + 4)
    logits = 2 * config.vocab_size * 4
    text_peak = batch * (per_row + scores + logits) + (FALLBACK_CHUNK_VALUES * 4 if quantized else 0)
    return max(text_peak, vision_peak)  # an image is encoded before the prompt's prefill, not during it


def estimate(model: nn.Module, checkpoint: Any, *, quantize: Any = None, dtype: torch.dtype,
             context: int | None = None, batch: int = 1) -> MemoryEstimate:
    """Estimate a load of `checkpoint` into `model` (the float model built on meta) with `quantize`."""
    from .handler import choose_plan, model_shapes

    config = model.config
    context = min(context or DEFAULT_CONTEXT, getattr(config, "text", config).max_position_embeddings)
    if context < 1:
        raise ValueError(f"context must be >= 1 token, got {context}")
    lp = choose_plan(config, checkpoint, quantize, model_shapes(model))
    plan = lp.plan if lp.source != "dequantize" else {}
    weights, params = weight_bytes(model_shapes(model), plan, dtype)
    what = {"float": "as stored", "recorded": f"quantized checkpoint ({lp.recipe.name if lp.recipe else ''})",
            "gguf": "GGUF blocks kept quantized", "dequantize": "dequantized to float",
            "quantize": f"quantized while loading ({lp.recipe.name if lp.recipe else ''})"}[lp.source]
    return MemoryEstimate(weights, kv_cache_bytes(config, context, dtype, batch),
                          activation_bytes(config, context, dtype, batch, bool(plan)), context, dtype,
                          description=f"{Path(str(checkpoint.path)).name}: {_DTYPE_NAMES.get(dtype, dtype)}, {what}",
                          parameters=params, cross_cache=cross_cache_bytes(config, dtype, batch))


def plan_memory(source: Any = None, *, context: int | None = None, recipe: Any = None,
                dtype: str | torch.dtype | None = None, batch: int = 1) -> MemoryEstimate:
    """`pocketllama memory`: open `source` for its metadata only (config, tensor table), build the model on the
    meta device and estimate a load with `recipe` ("none" = float) at `context` tokens."""
    from ..config import parse_dtype
    from ..models import config_from_hf, model_class
    from ..sources import resolve
    from ..weights import open_checkpoint
    from ..weights.base import build_on_meta

    checkpoint = open_checkpoint(resolve(source))
    config = getattr(checkpoint, "config", None) or config_from_hf(checkpoint.hf_config())  # text or vision
    cls = model_class(config.model_type)
    if hasattr(cls, "adapt_checkpoint"):  # the model's other on-disk layouts (as load_model does)
        checkpoint = cls.adapt_checkpoint(checkpoint)
    target = parse_dtype(dtype) or checkpoint.native_dtype
    if target not in (torch.float32, torch.bfloat16, torch.float16):
        target = torch.float32
    quantize = False if isinstance(recipe, str) and recipe.lower() == "none" else recipe
    model = build_on_meta(cls, config)
    return estimate(model, checkpoint, quantize=quantize, dtype=target, context=context, batch=batch)


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits(model: nn.Module, checkpoint: Any, *, quantize: Any = None, dtype: torch.dtype,
               context: int | None = None, available: int | None = None) -> MemoryEstimate:
    """Raise NotEnoughMemoryError when the estimate exceeds `available` (default MemAvailable), naming a
    recipe and/or a context that would fit."""
    est = estimate(model, checkpoint, quantize=quantize, dtype=dtype, context=context)
    available = available if available is not None else available_bytes()
    if available is None or est.total <= available:
        return est
    hints = []
    for name in SUGGESTED_RECIPES:
        try:
            alt = estimate(model, checkpoint, quantize=name, dtype=dtype, context=est.context)
        except ValueError:  # an already quantized checkpoint cannot be re-quantized
            break
        if alt.weight_bytes < est.weight_bytes and alt.total <= available:
            hints.append(f"quantize={name!r} (CLI: --quantize {name}; ~{_gb(alt.total)})")
            break
    ctx = est.context
    while ctx > 256:
        ctx //= 2
        alt = estimate(model, checkpoint, quantize=quantize, dtype=dtype, context=ctx)
        if alt.total <= available:
            hints.append(f"context={ctx} (~{_gb(alt.total)})")
            break
    hint = " or ".join(hints) if hints else "a smaller model; nothing pocketllama can change fits"
    raise NotEnoughMemoryError(
        f"not enough memory to load {checkpoint.path}: the estimate is {_gb(est.total)} (weights "
        f"{_gb(est.weight_bytes)}, KV cache for {est.context:,} tokens {_gb(est.kv_cache + est.cross_cache)}, "
        f"activations "
        f"{_gb(est.activations)}, runtime {_gb(est.runtime)}) but only {_gb(available)} is available "
        f"(MemAvailable). Try {hint}; `pocketllama memory MODEL` shows the breakdown.")

"""The quantization handler: plan which modules are quantized, then its two verbs — quantize a state dict
(a stream of tensors, one module at a time) and swap modules on a meta-built model before loading.

`prepare_load` is the loader hook: it picks the plan from the checkpoint (a recipe recorded in config.json,
or GGUF Q8_0/Q4_0/Q4_1 blocks) or from `load(..., quantize=...)`, swaps the modules, and returns the
checkpoint seen through a view whose tensors are the canonical quantized buffers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .modules import Int4Embedding, Int4Linear, Int8Embedding, Int8Linear
from .primitives import GGML_BLOCK, quantize_int4, quantize_int8
from .recipe import INT4_ROW_MULTIPLE, QSpec, Recipe, module_of, parse_recipe, role
from .views import DequantizingCheckpoint, GGUFBlocksCheckpoint, QuantizingCheckpoint, part_shapes

Plan = dict[str, QSpec]  # module name (HF, without ".weight") -> storage


def plan_for_recipe(recipe: Recipe, shapes: dict[str, tuple[int, ...]], tied: bool) -> Plan:
    """Plan from a recipe; `shapes` maps tensor names to shapes (a checkpoint's or a model's state dict)."""
    plan: Plan = {}
    for name, shape in shapes.items():
        module = module_of(name)
        if module is not None and len(shape) == 2:
            spec = recipe.spec(module, (shape[0], shape[1]), tied)
            if spec is not None:
                plan[module] = spec
    return plan


def plan_for_gguf(checkpoint: Any) -> Plan:
    """Keep Q8_0 as int8 (group 32) and Q4_0 / Q4_1 as symmetric / asymmetric int4 (group 32); other types
    load as float."""
    from gguf import GGMLQuantizationType as QT

    plan: Plan = {}
    for name in checkpoint.tensor_names():
        module = module_of(name)
        shape = checkpoint.tensor_shape(name)
        if module is None or len(shape) != 2:
            continue
        kind = checkpoint.tensor_type(name)
        if kind == QT.Q8_0:
            plan[module] = QSpec("int8", GGML_BLOCK)
        elif kind in (QT.Q4_0, QT.Q4_1) and role(module) != "embedding" and shape[0] % INT4_ROW_MULTIPLE == 0:
            plan[module] = QSpec("int4", GGML_BLOCK, symmetric=kind == QT.Q4_0)  # Q4_0 has no offsets
    return plan


# ---- verb 1: quantize a state dict --------------------------------------------------------------------


QUANTIZE_CHUNK_VALUES = 16 * 1024 * 1024  # rows quantized at a time: bounds the fp32 temporaries (~64 MB)


def quantize_weight(w: torch.Tensor, spec: QSpec, scale_dtype: torch.dtype,
                    rows_done: Callable[[int, int], None] | None = None) -> dict[str, torch.Tensor]:
    """One float weight (N, K) -> its canonical parts {"weight", "scales"(, "zeros")}, a chunk of rows at a
    time so a 128k-row embedding never needs an fp32 copy of itself; `rows_done(r0, r1)` after each chunk
    (a memory-mapped source drops those rows' pages)."""
    n, k = w.shape
    rows = max(1, QUANTIZE_CHUNK_VALUES // k)
    out: dict[str, torch.Tensor] = {}
    for r0 in range(0, n, rows):
        chunk = w[r0:r0 + rows]
        if spec.kind == "int8":
            parts = dict(zip(("weight", "scales"), quantize_int8(chunk, spec.group_size, scale_dtype), strict=True))
        else:
            q, s, z = quantize_int4(chunk, spec.group_size, scale_dtype, spec.symmetric)
            parts = {"weight": q, "scales": s} if z is None else {"weight": q, "scales": s, "zeros": z}
        if rows_done is not None:
            rows_done(r0, min(n, r0 + rows))
        if rows >= n:
            return parts
        for name, t in parts.items():
            if name not in out:
                out[name] = torch.empty((n, *t.shape[1:]), dtype=t.dtype)
            out[name][r0:r0 + t.shape[0]] = t
    return out


def quantize_state_dict(tensors: Iterable[tuple[str, torch.Tensor]], plan: Plan,
                        scale_dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (name, tensor) -> (name, tensor) with planned weights replaced by their quantized parts.

    One weight is quantized at a time, so memory stays at the source plus one layer's buffers. Scales are
    stored in `scale_dtype` (default: the weight's own dtype).
    """
    for name, t in tensors:
        module = module_of(name)
        if module in plan:
            for part, value in quantize_weight(t, plan[module], scale_dtype or t.dtype).items():
                yield f"{module}.{part}", value
        else:
            yield name, t


# ---- verb 2: swap modules -----------------------------------------------------------------------------


def quantized_module(old: nn.Module, spec: QSpec) -> nn.Module:
    """An empty replacement for `old` (same device, e.g. meta) with the buffers `spec` needs."""
    device = old.weight.device
    if isinstance(old, nn.Embedding):  # a tied model's table also serves the output projection (`attend`)
        table = Int8Embedding if spec.kind == "int8" else Int4Embedding
        if spec.kind == "int8":
            return table(old.num_embeddings, old.embedding_dim, spec.group_size, device=device)
        return table(old.num_embeddings, old.embedding_dim, spec.group_size, device=device, symmetric=spec.symmetric)
    if not isinstance(old, nn.Linear):
        raise TypeError(f"cannot quantize a {type(old).__name__}; expected nn.Linear or nn.Embedding")
    bias = old.bias is not None
    if spec.kind == "int8":
        return Int8Linear(old.in_features, old.out_features, bias, spec.group_size, device=device)
    return Int4Linear(old.in_features, old.out_features, bias, spec.group_size, device=device,
                      symmetric=spec.symmetric)


def swap_modules(model: nn.Module, plan: Plan) -> nn.Module:
    """Replace every planned module of `model` (usually built on meta) with its quantized counterpart."""
    for name, spec in plan.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr, None)
        if old is None:
            raise ValueError(f"the model has no module '{name}' to quantize")
        setattr(parent, attr, quantized_module(old, spec))
    return model


def quantize_model(model: nn.Module, recipe: Recipe | str | dict) -> nn.Module:
    """Quantize a loaded float model in place (tests, notebooks); loading with `quantize=` streams instead."""
    recipe = parse_recipe(recipe)
    state = model.state_dict()
    plan = plan_for_recipe(recipe, {k: tuple(v.shape) for k, v in state.items()}, model.config.tie_word_embeddings)
    quantized = dict(quantize_state_dict(state.items(), plan))
    swap_modules(model, plan)
    model.load_state_dict(quantized, strict=True, assign=True)
    model.config = with_quantization(model.config, recipe.to_dict())
    return model


# ---- the loader hook ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoadPlan:
    """What a load will do: `source` is "float" (as stored), "recorded" (a quantized pocketllama checkpoint),
    "gguf" (blocks kept quantized), "quantize" (float weights quantized while loading) or "dequantize"."""

    plan: Plan
    source: str
    recipe: Recipe | None = None


def choose_plan(config: Any, checkpoint: Any, quantize: str | dict | Recipe | bool | None,
                shapes: dict[str, tuple[int, ...]]) -> LoadPlan:
    """Decide from metadata only (config, tensor types); `shapes` are the float model's tensor shapes.

    quantize: None = as stored (recorded recipe, GGUF blocks kept quantized, float otherwise);
    False / "none" = float weights (dequantizing if needed); a recipe = quantize float weights while loading.
    """
    tied = config.tie_word_embeddings
    off = quantize is False or (isinstance(quantize, str) and quantize.lower() in ("none", "float"))
    if config.quantization:
        stored = Recipe.from_dict(config.quantization)
        plan = plan_for_recipe(stored, shapes, tied)
        if off:
            return LoadPlan(plan, "dequantize")
        if quantize not in (None, True) and parse_recipe(quantize) != stored:
            raise ValueError(
                f"{checkpoint.path} is already quantized ({stored.name}); it cannot be re-quantized to "
                f"{parse_recipe(quantize).name}. Quantize from the original float checkpoint instead, or load "
                "it as stored (quantize=None)")
        return LoadPlan(plan, "recorded", stored)
    if off:
        return LoadPlan({}, "float")
    if quantize is None or quantize is True:
        if hasattr(checkpoint, "raw_tensor") and hasattr(checkpoint, "tensor_type"):
            plan = plan_for_gguf(checkpoint)
            if plan:
                return LoadPlan(plan, "gguf")
        return LoadPlan({}, "float")
    recipe = parse_recipe(quantize)
    return LoadPlan(plan_for_recipe(recipe, shapes, tied), "quantize", recipe)


def prepare_load(model: nn.Module, checkpoint: Any, quantize: str | dict | Recipe | bool | None,
                 dtype: torch.dtype) -> Any:
    """The loader hook: swap `model`'s modules (built on meta) per `choose_plan`; return the checkpoint to
    assign from (a view when tensors are produced on the fly) and record the recipe in `model.config`."""
    lp = choose_plan(model.config, checkpoint, quantize, model_shapes(model))
    if lp.source == "dequantize":
        model.config = with_quantization(model.config, None)
        return DequantizingCheckpoint(checkpoint, lp.plan)
    swap_modules(model, lp.plan)
    if lp.source == "gguf":
        return GGUFBlocksCheckpoint(checkpoint, lp.plan)
    if lp.source == "quantize":
        model.config = with_quantization(model.config, lp.recipe.to_dict())
        return QuantizingCheckpoint(checkpoint, lp.plan, dtype)
    return checkpoint


def with_quantization(config: Any, recipe: dict[str, Any] | None, **changes: Any) -> Any:
    """`config` with `quantization` (and `changes`) replaced; a vision config records it on its text trunk."""
    if any(f.name == "quantization" for f in dataclasses.fields(config)):
        return dataclasses.replace(config, quantization=recipe, **changes)
    return dataclasses.replace(config, text=with_quantization(config.text, recipe, **changes))


def model_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a (meta-built, float) model's state dict."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


__all__ = ["LoadPlan", "Plan", "choose_plan", "model_shapes", "part_shapes", "plan_for_gguf", "plan_for_recipe", "prepare_load", "quantize_model",
           "quantize_state_dict", "quantize_weight", "swap_modules"]

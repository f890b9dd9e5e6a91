"""LoRA as wrappers applied after the model is built: `LoRALinear.from_base(linear, r, alpha, dropout)`,
`apply_lora(model, targets, ...)` by module name, `merge_lora(model)`; frozen quantized bases (QLoRA) get an
input gradient through their dequantized weight. The model file knows nothing about any of it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

# The projections of a Llama block (self-attention, cross-attention in Llama 3.2 Vision, MLP).
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Targets = str | Sequence[str]


def is_quantized(module: nn.Module) -> bool:
    """A quant/ replacement module (int8 / int4 buffers, no float weight to train)."""
    from ..quant.modules import _QuantModule

    return isinstance(module, _QuantModule)


def is_linear(module: nn.Module) -> bool:
    from ..quant.modules import Int4Linear, Int8Linear

    return isinstance(module, (nn.Linear, Int8Linear, Int4Linear))


class LoRALinear(nn.Module):
    """y = base(x) + B(A(dropout(x))) * alpha / r, with the base frozen; PEFT's layout and names
    (`base_layer`, `lora_A.weight` (r, in), `lora_B.weight` (out, r)). A is Kaiming-uniform, B zero (PEFT's
    default), so a fresh wrapper changes nothing. The adapter is kept in fp32 whatever the base dtype."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.use_rslora = r, float(alpha), use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        device = _weight_of(base).device
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        for p in base.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_base(cls, linear: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                  use_rslora: bool = False) -> LoRALinear:
        """Wrap a float or quantized (`Int8Linear` / `Int4Linear`) linear layer."""
        if not is_linear(linear):
            raise TypeError(f"LoRA wraps linear layers; got a {type(linear).__name__}")
        return cls(linear, r, alpha, dropout, use_rslora)

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """B @ A * scaling: (out, in), the change the adapter makes to the base weight."""
        w = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        return w.to(dtype) if dtype is not None else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # (..., out), frozen
        a = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))  # (..., r)
        return y + (self.lora_B(a) * self.scaling).to(y.dtype)

    def merge(self) -> nn.Module:
        """The base layer with the adapter folded into its weight (float bases only; see `merge_lora`)."""
        base = self.base_layer
        if is_quantized(base):
            raise ValueError("cannot merge a LoRA adapter into quantized weights without losing it; load the "
                             "base in floating point (quantize=False), merge, then re-quantize (`pocketllama merge` "
                             "does this and checks the result)")
        with torch.no_grad():
            base.weight.add_(self.delta_weight(base.weight.dtype))
        return base

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}"


def _weight_of(module: nn.Module) -> torch.Tensor:
    w = getattr(module, "weight", None)
    if w is None:
        w = next(iter(module.buffers()))
    return w


# ---- choosing modules by name ------------------------------------------------------------------------


def matches(name: str, targets: Targets) -> bool:
    """PEFT's rule: a string is a regex that must match the whole module name; a list holds names that equal
    the module name or end it after a dot (`q_proj` matches `model.layers.0.self_attn.q_proj`)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def resolve_targets(targets: Targets | None) -> Targets:
    """`None` / "all-linear" -> every projection of the decoder blocks (not the output layer); a string
    without regex syntax is a comma list of names; any other string is a regex over full names."""
    if targets is None or targets == "all-linear":
        return list(LLAMA_LINEARS)
    if isinstance(targets, str) and not any(c in targets for c in "()[]{}\\*+?|^$"):
        return [t.strip() for t in targets.split(",") if t.strip()]  # "q_proj" or "q_proj,v_proj" (CLI)
    return targets


def target_names(model: nn.Module, targets: Targets | None, layers: Sequence[int] | None = None) -> list[str]:
    """Names of the linear modules `targets` selects (optionally only in decoder layers `layers`)."""
    targets = resolve_targets(targets)
    names = []
    for name, module in model.named_modules():
        if not is_linear(module) or isinstance(module, LoRALinear) or name.endswith(("lora_A", "lora_B")):
            continue
        if not matches(name, targets):
            continue
        if layers is not None:
            m = re.search(r"\.layers\.(\d+)\.", name)
            if m is None or int(m.group(1)) not in layers:
                continue
        names.append(name)
    if not names:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_linear(m)})
        raise ValueError(f"LoRA targets {targets!r} match no linear layer of the model; its linear layers are "
                         f"named {', '.join(leaves)} (or pass a regex over full names)")
    return names


def apply_lora(model: nn.Module, targets: Targets | None = None, r: int = 16, alpha: float = 32.0,
               dropout: float = 0.0, use_rslora: bool = False, layers: Sequence[int] | None = None,
               ranks: dict[str, int] | None = None, alphas: dict[str, float] | None = None) -> list[str]:
    """Freeze `model` and wrap the selected linear layers in `LoRALinear`; returns the wrapped names.

    ranks / alphas: per-module overrides (module name -> value), e.g. from a PEFT file's tensor shapes.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    names = target_names(model, targets, layers)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        rank = (ranks or {}).get(name, r)
        setattr(parent, attr, LoRALinear.from_base(getattr(parent, attr), rank, (alphas or {}).get(name, alpha),
                                                   dropout, use_rslora))
    if any(is_quantized(m) for m in model.modules()):
        enable_quantized_input_grads(model)
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain layers back (state dict names as loaded)."""
    for name, module in lora_modules(model).items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, module.merge())
    return model


def unwrap_lora(model: nn.Module) -> nn.Module:
    """Drop every adapter (no merge): the model as it was before `apply_lora`."""
    for name, module in lora_modules(model).items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, module.base_layer)
    return model


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters incl. quantized buffers counted as weights)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features for m in model.modules() if is_quantized(m))
    return trainable, total


# ---- QLoRA: gradients through frozen quantized layers --------------------------------------------------


class _FrozenQuantMatmul(torch.autograd.Function):
    """y = f(x) for a frozen quantized layer; the backward computes only dL/dx = dL/dy @ W, dequantizing W in
    row chunks (the quantized kernels have no backward, and saving a float W would undo QLoRA's memory win)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: nn.Module, fn: Any) -> torch.Tensor:
        ctx.module = module
        with torch.no_grad():
            return fn(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        module = ctx.module
        n = module.out_features
        g = grad.reshape(-1, n)  # (M, N)
        gx = torch.zeros(g.shape[0], module.in_features, dtype=grad.dtype, device=grad.device)
        rows = max(1, (4 * 1024 * 1024) // max(module.in_features, 1))
        dequant = _row_dequantizer(module, grad.dtype)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            gx.addmm_(g[:, r0:r1], dequant(r0, r1))  # (M, K)
        return gx.view(*grad.shape[:-1], module.in_features), None, None


def _row_dequantizer(module: nn.Module, dtype: torch.dtype) -> Any:
    """(r0, r1) -> float rows r0:r1 of a quantized layer's weight (N, K), through the module's own public,
    layout-aware methods (its in-memory layout belongs to quant/)."""
    from ..quant.modules import QUANT_EMBEDDINGS, Int4Linear
    from ..quant.primitives import dequantize_int4

    if isinstance(module, QUANT_EMBEDDINGS):  # the (tied) int8 / int4 vocabulary table: too big to dequantize whole
        device = next(module.buffers()).device
        return lambda r0, r1: module(torch.arange(r0, r1, device=device)).to(dtype)  # (rows, D)
    if isinstance(module, Int4Linear):  # canonical parts (a view or one unpack), then row chunks
        w, s, z = module.canonical()
        return lambda r0, r1: dequantize_int4(w[r0:r1], s[r0:r1], z[r0:r1], dtype)
    full = module.dequantize(dtype)  # int8: (N, K), transient for this backward
    return lambda r0, r1: full[r0:r1]


def enable_quantized_input_grads(model: nn.Module) -> None:
    """Let gradients flow through every frozen quantized layer of `model` to its input (QLoRA).

    Each quantized linear's `forward` (and a quantized tied table's `attend`) is replaced on the instance by
    one that keeps the fast kernel forward and adds `_FrozenQuantMatmul`'s backward when a gradient is needed.
    """
    from ..quant.modules import QUANT_EMBEDDINGS

    for module in model.modules():
        if not is_quantized(module) or getattr(module, "_input_grads", False):
            continue
        method = "attend" if isinstance(module, QUANT_EMBEDDINGS) else "forward"
        original = getattr(module, method)

        def differentiable(x: torch.Tensor, _m: nn.Module = module, _f: Any = original) -> torch.Tensor:
            if torch.is_grad_enabled() and x.requires_grad:
                return _FrozenQuantMatmul.apply(x, _m, _f)
            return _f(x)

        setattr(module, method, differentiable)
        module._input_grads = True


def full_finetune_params(model: nn.Module) -> int:
    """Unfreeze every floating-point parameter (full fine-tuning); refuses a quantized model."""
    if any(is_quantized(m) for m in model.modules()):
        raise ValueError("full fine-tuning needs floating-point weights, but this model has quantized layers; "
                         "load it with quantize=False (or fine-tune with LoRA / QLoRA instead)")
    n = 0
    for p in model.parameters():
        p.requires_grad_(True)
        n += p.numel()
    return n


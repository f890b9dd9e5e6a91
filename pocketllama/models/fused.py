"""Inference-time fusion of projections that read the same input (q/k/v, gate/up): one GEMV per layer and
step instead of three or two, which matters where decode is bound by per-call overhead (small models).

The fused weight is one tensor and the original modules' tensors become row views of it, so memory does not
grow and `state_dict`, saving and LoRA keep seeing the usual HF parameters. A fusion is rebuilt when any
original module or tensor is replaced (quantization swaps, adapters, `.to()`); weights that require grad
(full fine-tuning) are never fused, and no fusion runs with autograd on.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..quant.modules import Int4Linear, Int8Linear
from ..weights.hugepages import empty_huge


def _tensors(m: nn.Module) -> dict[str, torch.Tensor]:
    """The per-output-row tensors of a projection (weights, scales, zeros, bias), by attribute name."""
    out = {n: p for n, p in m._parameters.items() if p is not None}
    out.update((n, b) for n, b in m._buffers.items() if b is not None)
    return out


def _fusable(modules: list[nn.Module]) -> bool:
    """Same class (a float linear, or a quantized one with the same group, layout and tensor dtypes), rows
    stackable: everything except PyTorch's native int4 packing, whose 64-row blocks span modules."""
    first = modules[0]
    if any(type(m) is not type(first) for m in modules) or any(
            t.requires_grad for m in modules for t in _tensors(m).values()):  # trained weights stay apart
        return False
    if isinstance(first, nn.Linear):
        return True
    if not isinstance(first, (Int4Linear, Int8Linear)) or first.layout == "native":  # e.g. LoRA wrappers
        return False
    if any(getattr(m, "activations", None) != getattr(first, "activations", None) for m in modules):
        return False
    kinds = [{n: (t.dtype, t.shape[1:]) for n, t in _tensors(m).items()} for m in modules]
    return all(k == kinds[0] for k in kinds) and all(
        (getattr(m, "group_size", None), m.layout) == (getattr(first, "group_size", None), first.layout)
        for m in modules)


class FusedProjection:
    """Several projections of one input as one module; `__call__(x)` returns their outputs in order."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = list(modules)
        self.sizes = [m.out_features for m in modules]
        parts = [_tensors(m) for m in modules]
        fused = copy.copy(modules[0])  # same class and settings; its own tensor dicts below
        fused.__dict__ = dict(fused.__dict__)
        fused._parameters = dict.fromkeys(fused._parameters)  # absent ones (bias=None) stay None
        fused._buffers, fused._modules = dict.fromkeys(fused._buffers), {}
        for name, first in parts[0].items():
            rows = sum(p[name].shape[0] for p in parts)
            whole = empty_huge((rows, *first.shape[1:]), first.dtype)
            torch.cat([p[name].detach() for p in parts], out=whole)
            if isinstance(first, nn.Parameter):
                fused._parameters[name] = nn.Parameter(whole, requires_grad=False)
            else:
                fused._buffers[name] = whole
            r0 = 0
            for m, p in zip(modules, parts, strict=True):
                r1 = r0 + p[name].shape[0]
                if isinstance(first, nn.Parameter):
                    m._parameters[name].data = whole[r0:r1]  # same Parameter object, now a view
                else:
                    m._buffers[name] = whole[r0:r1]
                r0 = r1
        fused.out_features = sum(self.sizes)
        self.fused = fused
        self._ptrs = [[t.data_ptr() for t in _tensors(m).values()] for m in modules]
        self._mode = getattr(modules[0], "activations", None)  # int4 modules' activation mode (set later too)

    def valid_for(self, modules: list[nn.Module]) -> bool:
        return all(cur is m for cur, m in zip(modules, self.modules, strict=True)) and all(
            [t.data_ptr() for t in _tensors(m).values()] == ptrs for m, ptrs in zip(modules, self._ptrs, strict=True)
        ) and all(getattr(m, "activations", None) == self._mode for m in modules)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.fused(x).split(self.sizes, dim=-1))


def fusion_for(owner: nn.Module, attr: str, modules: list[nn.Module]) -> FusedProjection | _Unfused:
    """The fusion of `modules` cached on `owner` (in its __dict__ under `attr`, so outside its parameters and
    submodules), rebuilt when one of them changed; `_Unfused` where they cannot be fused."""
    fusion = owner.__dict__.get(attr)
    if fusion is None or not fusion.valid_for(modules):
        fusion = FusedProjection(modules) if _fusable(modules) else _Unfused(modules)
        owner.__dict__[attr] = fusion
    return fusion


def fused_outputs(owner: nn.Module, attr: str, modules: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of `modules` on `x`: through their fusion (`fusion_for`) when inference allows one, else module
    by module."""
    if torch.is_grad_enabled():
        return [m(x) for m in modules]
    return fusion_for(owner, attr, modules)(x)


class _Unfused:
    """The decision not to fuse these modules (e.g. LoRA wrappers), kept until one of them is replaced."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = list(modules)

    def valid_for(self, modules: list[nn.Module]) -> bool:
        return all(cur is m for cur, m in zip(modules, self.modules, strict=True))

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [m(x) for m in self.modules]

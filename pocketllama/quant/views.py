"""Checkpoint views (the `Checkpoint` protocol of weights/base.py over another checkpoint): float weights seen
as quantized parts (quantized on the fly, or GGUF blocks repacked without a float copy), or quantized
parts seen as float weights. Parts of one module are made together and handed out one at a time.
"""

from __future__ import annotations

from typing import Any

import torch

from .primitives import dequantize_int4, dequantize_int8, q4_0_to_int4, q4_1_to_int4, q8_0_to_int8
from .recipe import QSpec, module_of


def part_shapes(spec: QSpec, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Canonical parts of a quantized (N, K) weight and their shapes."""
    n, k = shape
    groups = 1 if spec.group_size is None else k // spec.group_size
    if spec.kind == "int8":
        return {"weight": (n, k), "scales": (n, groups)}
    parts = {"weight": (n, k // 2), "scales": (n, groups)}
    return parts if spec.symmetric else {**parts, "zeros": (n, groups)}


class _View:
    """Delegates everything to `base` except the tensors of planned modules."""

    def __init__(self, base: Any, plan: dict[str, QSpec]) -> None:
        self._base, self._plan = base, plan
        self.path = base.path
        self.native_dtype = base.native_dtype

    def __getattr__(self, name: str) -> Any:  # metadata, raw_tensor, close, ... of the base
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._base, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._base!r}, {len(self._plan)} quantized modules)"

    def hf_config(self) -> dict[str, Any]:
        return self._base.hf_config()

    def load_tokenizer(self):
        return self._base.load_tokenizer()

    def generation_config(self) -> dict[str, Any]:
        return self._base.generation_config()

    def chat_template(self) -> str | None:
        return self._base.chat_template()


class _QuantizedView(_View):
    """Float checkpoint -> planned weights appear as their canonical parts (`module.weight`, `.scales`, ...)."""

    def __init__(self, base: Any, plan: dict[str, QSpec]) -> None:
        super().__init__(base, plan)
        self._names: list[str] = []
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._owner: dict[str, tuple[str, str]] = {}  # part name -> (module, part)
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        for name in base.tensor_names():
            module = module_of(name)
            if module not in plan:
                self._names.append(name)
                continue
            for part, shape in part_shapes(plan[module], tuple(base.tensor_shape(name))).items():
                key = f"{module}.{part}"
                self._names.append(key)
                self._shapes[key], self._owner[key] = shape, (module, part)

    def _make(self, module: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def tensor_names(self) -> list[str]:
        return list(self._names)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name] if name in self._shapes else tuple(self._base.tensor_shape(name))

    def load_tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Integer parts come as stored; float parts (scales, zeros) in `dtype` when given."""
        if name not in self._owner:
            return self._base.load_tensor(name, dtype)
        module, part = self._owner[name]
        parts = self._pending.get(module)
        if parts is None:
            parts = self._pending[module] = self._make(module)
        t = parts.pop(part)
        if not parts:
            del self._pending[module]
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t


class QuantizingCheckpoint(_QuantizedView):
    """Quantizes each planned weight when it is first asked for (`load(..., quantize="int4-g32")`); scales in
    `scale_dtype` (the model's dtype, so PyTorch's native kernels apply)."""

    def __init__(self, base: Any, plan: dict[str, QSpec], scale_dtype: torch.dtype) -> None:
        super().__init__(base, plan)
        self.scale_dtype = scale_dtype

    def _make(self, module: str) -> dict[str, torch.Tensor]:
        from .handler import quantize_weight

        name = f"{module}.weight"
        view = getattr(self._base, "load_view", None)
        if view is not None:  # safetensors: no copy, and each chunk's file pages leave RSS once quantized
            parts = quantize_weight(view(name), self._plan[module], self.scale_dtype,
                                    rows_done=lambda r0, r1: self._base.release(name, rows=(r0, r1)))
        else:
            parts = quantize_weight(self._base.load_tensor(name), self._plan[module], self.scale_dtype)
        return parts


class GGUFBlocksCheckpoint(_QuantizedView):
    """GGUF Q8_0 / Q4_0 / Q4_1 blocks repacked into int8 / int4 parts, q/k rows reordered as whole rows of
    blocks (llama.cpp's RoPE permutation undone without dequantizing)."""

    def _make(self, module: str) -> dict[str, torch.Tensor]:
        from gguf import GGMLQuantizationType as QT

        name = f"{module}.weight"
        raw = self._base.raw_tensor(name, hf_row_order=True, copy=True)  # read, not mapped: RSS = this buffer
        convert = {QT.Q8_0: q8_0_to_int8, QT.Q4_0: q4_0_to_int4, QT.Q4_1: q4_1_to_int4}.get(raw.ggml_type)
        if convert is None:
            raise ValueError(f"{self.path}: tensor '{name}' is {raw.ggml_type.name}; only Q8_0, Q4_0 and Q4_1 "
                             "blocks load quantized")
        parts = zip(("weight", "scales", "zeros"), convert(raw.data), strict=False)  # Q4_0: zeros None
        return {part: t for part, t in parts if t is not None}


class DequantizingCheckpoint(_View):
    """A quantized pocketllama checkpoint seen as float weights (`load(..., quantize=False)`, export)."""

    def __init__(self, base: Any, plan: dict[str, QSpec]) -> None:
        super().__init__(base, plan)
        self._names: list[str] = []
        for name in base.tensor_names():
            module, _, part = name.rpartition(".")
            if not (module in plan and part in ("scales", "zeros")):
                self._names.append(name)

    def tensor_names(self) -> list[str]:
        return list(self._names)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(self._base.tensor_shape(name))
        module = name.rpartition(".")[0]
        if module in self._plan and self._plan[module].kind == "int4" and name.endswith(".weight"):
            return (shape[0], shape[1] * 2)
        return shape

    def load_tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        module = name.rpartition(".")[0]
        if module not in self._plan or not name.endswith(".weight"):
            return self._base.load_tensor(name, dtype)
        dtype = dtype or self.native_dtype
        weight, scales = self._base.load_tensor(name), self._base.load_tensor(f"{module}.scales")
        if self._plan[module].kind == "int8":
            return dequantize_int8(weight, scales, torch.float32).to(dtype)
        zeros = None if self._plan[module].symmetric else self._base.load_tensor(f"{module}.zeros")
        return dequantize_int4(weight, scales, zeros, torch.float32).to(dtype)

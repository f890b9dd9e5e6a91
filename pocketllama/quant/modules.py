"""Replacement modules holding quantized buffers: `Int8Linear`, `Int4Linear`, `Int8Embedding`,
`Int4Embedding`.

Their `state_dict()` is always the canonical layout of `primitives.py` (what checkpoints store); on load
they may repack into a kernel's layout (`layout`): "interleaved" rows for pocketllama's C++ kernels,
"groups" for int4 weights in the int8-activation mode (`set_int8_activations`), "native" for PyTorch's int4
CPU kernel (bfloat16, without the C++ kernels), else "canonical". Built on the
meta device by `handler.swap_modules`, then filled by the ordinary `load_state_dict(assign=True)`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..weights.hugepages import to_huge
from . import kernels
from .primitives import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8


def _take(module: nn.Module, state_dict: dict[str, Any], prefix: str, names: dict[str, tuple[tuple[int, ...], str]],
          missing_keys: list[str], error_msgs: list[str]) -> dict[str, torch.Tensor] | None:
    """Pop the expected tensors (name -> (shape, 'int8' | 'uint8' | 'float')) from `state_dict`, checking
    shape and dtype; report problems the way nn.Module does (missing_keys / error_msgs)."""
    out: dict[str, torch.Tensor] = {}
    for name, (shape, kind) in names.items():
        key = prefix + name
        if key not in state_dict:
            missing_keys.append(key)
            continue
        t = state_dict[key]
        ok_dtype = t.is_floating_point() if kind == "float" else t.dtype == getattr(torch, kind)
        if tuple(t.shape) != tuple(shape) or not ok_dtype:
            error_msgs.append(f"{key}: expected {kind} {tuple(shape)}, got {t.dtype} {tuple(t.shape)} "
                              f"(was the checkpoint quantized with a different recipe?)")
            continue
        out[name] = t
    return out if len(out) == len(names) else None


class _QuantModule(nn.Module):
    in_features: int
    out_features: int

    def _state_layout(self) -> dict[str, tuple[tuple[int, ...], str]]:
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        layout = self._state_layout()
        if getattr(self, "bias", None) is not None:
            layout["bias"] = ((self.out_features,), "float")
        got = _take(self, state_dict, prefix, layout, missing_keys, error_msgs)
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in layout)
        if got is not None:
            if "bias" in got:
                self.bias = nn.Parameter(got.pop("bias"), requires_grad=False)
            self._set(**got)

    def _set(self, **tensors: torch.Tensor) -> None:
        raise NotImplementedError

    def canonical_state(self) -> dict[str, torch.Tensor]:
        """The quantized buffers in the checkpoint layout (whatever layout the kernels hold in memory)."""
        raise NotImplementedError

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        for name, t in self.canonical_state().items():
            destination[prefix + name] = t
        if getattr(self, "bias", None) is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _int8_layout(self, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """Interleave for the C++ kernel where it applies (sets `layout`); else keep canonical."""
        n, k = weight.shape
        groups = scales.shape[1]
        if (weight.device.type == "cpu" and kernels.extension() is not None and kernels.can_interleave("int8", n, k)
                and (k // groups) % 16 == 0 and groups <= 1024):
            self.layout = "interleaved"
            return kernels.interleave(weight, "int8")
        self.layout = "canonical"
        return weight

    def _int8_weight(self) -> torch.Tensor:
        return kernels.deinterleave(self.weight, "int8") if self.layout == "interleaved" else self.weight

    def _store(self, **tensors: torch.Tensor | None) -> None:
        for name in [n for n in self._buffers if n != "bias"]:
            del self._buffers[name]
        for name, t in tensors.items():  # big CPU buffers move to huge pages: decode streams them faster
            self.register_buffer(name, to_huge(t) if t is not None and t.device.type == "cpu" else t)


class Int8Linear(_QuantModule):
    """y = x @ (weight * scales).T + bias; weight int8 (N, K), scales (N, K // group) (group None: (N, 1))."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = 1 if group_size is None else in_features // group_size
        self.layout = "canonical"
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=dtype or torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    def _state_layout(self):
        return {"weight": (tuple(self.weight.shape), "int8"), "scales": (tuple(self.scales.shape), "float")}

    def _set(self, weight: torch.Tensor, scales: torch.Tensor) -> None:
        self._store(weight=self._int8_layout(weight, scales), scales=scales)

    def canonical_state(self) -> dict[str, torch.Tensor]:
        return {"weight": self._int8_weight(), "scales": self.scales}

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int | None = None) -> Int8Linear:
        q, s = quantize_int8(linear.weight, group_size, scale_dtype=linear.weight.dtype)
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size,
                device=linear.weight.device, dtype=linear.weight.dtype)
        m._set(weight=q, scales=s)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return m

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_int8(self._int8_weight(), self.scales, dtype or self.scales.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kernels.int8_mm(x.reshape(-1, self.in_features), self.weight, self.scales,
                            self.layout == "interleaved")  # (B*T, N)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"layout={self.layout}")


class _Int4Module(_QuantModule):
    """Int4 groupwise buffers shared by `Int4Linear` and `Int4Embedding`: the checkpoint holds the canonical
    parts (weight uint8 (N, K/2), scales (N, K // group), zeros (N, K // group), no zeros when `symmetric`);
    memory may hold the C++ kernels' interleaved rows, their "groups" layout (int8 activations) or (where
    `_native_ok`) PyTorch's int4 CPU layout."""

    group_size: int
    symmetric = False  # w = (q - 8) * scales: no zeros (`zeros` is None)
    _native_ok = True  # PyTorch's packed layout cannot look rows up, so tables keep canonical rows instead
    # "int8": decode-sized inputs are quantized to int8 for the multiply (`set_int8_activations`); None: exact
    activations: str | None = None

    def _state_layout(self):
        n, k, g = self.out_features, self.in_features, self.in_features // self.group_size
        parts = {"weight": ((n, k // 2), "uint8"), "scales": ((n, g), "float")}
        return parts if self.symmetric else {**parts, "zeros": ((n, g), "float")}

    def _init_buffers(self, n: int, k: int, group_size: int, symmetric: bool, device, dtype) -> None:
        self.group_size, self.symmetric, self.layout = group_size, symmetric, "canonical"
        float_dtype = dtype or torch.float32
        self.register_buffer("weight", torch.empty(n, k // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(n, k // group_size, dtype=float_dtype, device=device))
        self.register_buffer("zeros", None if symmetric else
                             torch.empty(n, k // group_size, dtype=float_dtype, device=device))

    def _set(self, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None) -> None:
        if (zeros is None) != self.symmetric:
            raise ValueError(f"{type(self).__name__}: {'symmetric int4 takes no zeros' if self.symmetric else 'zeros missing'}")
        zeros = None if zeros is None else zeros.to(scales.dtype)
        cpu = weight.device.type == "cpu"
        n, k, groups = self.out_features, self.in_features, scales.shape[1]
        if (cpu and kernels.extension() is not None and kernels.can_interleave("int4", n, k)
                and (k // groups) % 32 == 0 and groups <= 1024):
            if self.activations == "int8" and kernels.has_int8_activations():
                self.layout = "groups"
                self._store(weight=kernels.interleave_groups(weight), scales=scales, zeros=zeros)
                return
            self.layout = "interleaved"
            self._store(weight=kernels.interleave(weight, "int4"), scales=scales, zeros=zeros)
        elif (cpu and self._native_ok and scales.dtype == torch.bfloat16 and kernels.extension() is None
              and kernels.has_native_int4()):
            self.layout = "native"
            self._store(weight=kernels.native_int4_pack(weight), scales_and_zeros=kernels.native_scales_and_zeros(
                scales, torch.zeros_like(scales) if zeros is None else zeros))
        else:
            self.layout = "canonical"
            self._store(weight=weight, scales=scales, zeros=zeros)

    def canonical(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(weight (N, K/2) uint8, scales (N, G), zeros (N, G) or None (symmetric)) in the checkpoint layout."""
        if self.layout == "canonical":
            return self.weight, self.scales, self.zeros
        if self.layout == "interleaved":
            return kernels.deinterleave(self.weight, "int4"), self.scales, self.zeros
        if self.layout == "groups":
            return kernels.deinterleave_groups(self.weight), self.scales, self.zeros
        sz = self.scales_and_zeros  # (G, N, 2)
        weight = kernels.native_int4_unpack(self.weight, self.out_features, self.in_features)
        return weight, sz[..., 0].T.contiguous(), None if self.symmetric else sz[..., 1].T.contiguous()

    def canonical_state(self) -> dict[str, torch.Tensor]:
        parts = dict(zip(("weight", "scales", "zeros"), self.canonical(), strict=True))
        return {k: v for k, v in parts.items() if v is not None}

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w, s, z = self.canonical()
        return dequantize_int4(w, s, z, dtype or s.dtype)


class Int4Linear(_Int4Module):
    """y = x @ ((q - 8) * scales + zeros).T + bias with int4 q in groups of `group_size` along K (no zeros
    when `symmetric`).

    The weight stays canonical for pocketllama's C++ kernel and the dequantize-then-matmul path; without the
    C++ kernel, bfloat16 scales repack it for PyTorch's vectorized int4 kernel (`layout == "native"`).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 32,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 symmetric: bool = False) -> None:
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"Int4Linear: in_features {in_features} is not a multiple of group_size {group_size}")
        self.in_features, self.out_features = in_features, out_features
        self._init_buffers(out_features, in_features, group_size, symmetric, device, dtype)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 32, symmetric: bool = False) -> Int4Linear:
        q, s, z = quantize_int4(linear.weight, group_size, scale_dtype=linear.weight.dtype, symmetric=symmetric)
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size,
                device=linear.weight.device, dtype=linear.weight.dtype, symmetric=symmetric)
        m._set(weight=q, scales=s, zeros=z)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (B*T, K)
        if self.layout == "native" and x2.dtype == self.scales_and_zeros.dtype:
            y = kernels.int4_mm_native(x2, self.weight, self.scales_and_zeros, self.group_size)
        elif self.layout in ("interleaved", "groups"):
            y = kernels.int4_mm(x2, self.weight, self.scales, self.zeros, layout=self.layout)
        else:
            y = kernels.int4_mm(x2, *self.canonical())
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"layout={self.layout}" + (", symmetric=True" if self.symmetric else "")
                + (f", activations={self.activations}" if self.activations else ""))


class Int8Embedding(_QuantModule):
    """Token table in int8 (V, D) with scales (V, D // group) (group None: one per row). `forward` looks rows
    up; `attend(h)` projects hidden states onto the vocabulary with the same table (tied output)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group_size: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.group_size = num_embeddings, embedding_dim, group_size
        self.in_features, self.out_features = embedding_dim, num_embeddings
        groups = 1 if group_size is None else embedding_dim // group_size
        self.layout = "canonical"
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(num_embeddings, groups, dtype=dtype or torch.float32,
                                                   device=device))

    def _state_layout(self):
        return {"weight": (tuple(self.weight.shape), "int8"), "scales": (tuple(self.scales.shape), "float")}

    def _set(self, weight: torch.Tensor, scales: torch.Tensor) -> None:
        self._store(weight=self._int8_layout(weight, scales), scales=scales)

    def canonical_state(self) -> dict[str, torch.Tensor]:
        return {"weight": self._int8_weight(), "scales": self.scales}

    @classmethod
    def from_float(cls, embedding: nn.Embedding, group_size: int | None = None) -> Int8Embedding:
        q, s = quantize_int8(embedding.weight, group_size, scale_dtype=embedding.weight.dtype)
        m = cls(embedding.num_embeddings, embedding.embedding_dim, group_size, device=embedding.weight.device,
                dtype=embedding.weight.dtype)
        m._set(weight=q, scales=s)
        return m

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_int8(self._int8_weight(), self.scales, dtype or self.scales.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.layout == "interleaved":
            rows = kernels.interleaved_rows(self.weight, "int8", ids)  # (..., D) int8
        else:
            rows = self.weight[ids]
        groups = self.scales.shape[1]
        w = rows.to(self.scales.dtype).unflatten(-1, (groups, -1)) * self.scales[ids][..., None]
        return w.flatten(-2)  # (..., D)

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., D) -> logits (..., V) = h @ table.T."""
        y = kernels.int8_mm(h.reshape(-1, self.embedding_dim), self.weight, self.scales, self.layout == "interleaved")
        return y.view(*h.shape[:-1], self.num_embeddings)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, group_size={self.group_size}"


class Int4Embedding(_Int4Module):
    """Token table in int4 groups along D: weight uint8 (V, D/2), scales and zeros (V, D // group; no zeros when
    `symmetric`). `forward`
    dequantizes only the looked-up rows; `attend(h)` projects hidden states onto the vocabulary with the same
    table (tied output) through the int4 kernels (the C++ GEMV for decode rows)."""

    _native_ok = False

    def __init__(self, num_embeddings: int, embedding_dim: int, group_size: int = 32,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 symmetric: bool = False) -> None:
        super().__init__()
        if embedding_dim % group_size:
            raise ValueError(f"Int4Embedding: embedding_dim {embedding_dim} is not a multiple of group_size "
                             f"{group_size}; choose a group size that divides it or an int8 table")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.in_features, self.out_features = embedding_dim, num_embeddings
        self._init_buffers(num_embeddings, embedding_dim, group_size, symmetric, device, dtype)

    @classmethod
    def from_float(cls, embedding: nn.Embedding, group_size: int = 32, symmetric: bool = False) -> Int4Embedding:
        q, s, z = quantize_int4(embedding.weight, group_size, scale_dtype=embedding.weight.dtype, symmetric=symmetric)
        m = cls(embedding.num_embeddings, embedding.embedding_dim, group_size, device=embedding.weight.device,
                dtype=embedding.weight.dtype, symmetric=symmetric)
        m._set(weight=q, scales=s, zeros=z)
        return m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.layout == "interleaved":
            rows = kernels.interleaved_rows(self.weight, "int4", ids)  # (..., D/2) uint8, canonical nibbles
        elif self.layout == "groups":
            rows = kernels.grouped_rows(self.weight, ids)
        else:
            rows = self.weight[ids]
        groups = self.scales.shape[1]
        zeros = None if self.zeros is None else self.zeros[ids].reshape(-1, groups)
        w = dequantize_int4(rows.reshape(-1, self.embedding_dim // 2), self.scales[ids].reshape(-1, groups),
                            zeros, torch.float32)  # (N, D), one rounding below
        return w.to(self.scales.dtype).view(*ids.shape, self.embedding_dim)  # (..., D)

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., D) -> logits (..., V) = h @ table.T."""
        y = kernels.int4_mm(h.reshape(-1, self.embedding_dim), self.weight, self.scales, self.zeros,
                            layout=self.layout)  # (M, V)
        return y.view(*h.shape[:-1], self.num_embeddings)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, group_size={self.group_size}, layout={self.layout}"
                + (", symmetric=True" if self.symmetric else ""))


def _int4_modules(model: nn.Module) -> list[_Int4Module]:
    return [m for m in model.modules() if isinstance(m, _Int4Module)]


def mark_int8_activations(model: nn.Module) -> int:
    """Put the int4 modules of a model whose weights are not assigned yet (built on meta) in the int8-activation
    mode, so each stores its weights in that mode's layout as they arrive; returns how many."""
    if not kernels.has_int8_activations():
        return 0
    targets = _int4_modules(model)
    for m in targets:
        m.activations = "int8"
    return len(targets)


def set_int8_activations(model: nn.Module, enabled: bool = True) -> int:
    """Switch every int4 module of `model` (linears, an int4 table's output projection) to int8 activations
    for decode-sized inputs (`kernels.int4_mm`), or back to the exact weight-only product; returns how many
    modules changed mode. A runtime choice, like the thread count: nothing in the weights changes."""
    targets = _int4_modules(model)
    if enabled and not targets:
        raise ValueError("int8 activations apply to int4 weights, and this model has none; load it with an int4 "
                         "recipe (quantize='int4-g32') or from a Q4_0 / Q4_1 GGUF")
    if enabled and not kernels.has_int8_activations():
        raise ValueError("int8 activations need pocketllama's C++ kernels on a CPU with AVX-512 VNNI, which this "
                         "machine or build lacks; load without int8_activations")
    mode = "int8" if enabled else None
    changed = 0
    for m in targets:
        if m.activations == mode:
            continue
        changed += 1
        m.activations = mode
        if m.layout in ("interleaved", "groups"):  # the weights take the mode's layout
            weight, scales, zeros = m.canonical()
            m._set(weight=weight, scales=scales, zeros=zeros)
    return changed


# The quantized token tables: `forward(ids)` looks rows up, `attend(h)` is the tied output projection.
QUANT_EMBEDDINGS = (Int8Embedding, Int4Embedding)

"""CPU kernels: matmuls for quantized weights (2-D activations x (M, K) -> (M, N) in x.dtype), the bf16 GEMV
for dense decode, and one-call RMSNorm / rotary for inference (decode overhead).

Decode-sized inputs (M <= SMALL_M) take, in order of preference: pocketllama's C++ GEMV (ext.py, AVX-512,
any activation dtype, weights in the canonical layout), PyTorch's native CPU ops — `aten._weight_int8pack_mm`
(int8, one scale per output row) and `aten._weight_int4pack_mm_for_cpu` (int4 groupwise, weights repacked by
`_convert_weight_to_int4pack_for_cpu`; vectorized only for bfloat16 on x86) — or the exact pure-torch
fallback. Larger inputs (prefill) dequantize row chunks and run the float GEMM, which is compute-bound anyway.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from ..weights.hugepages import empty_huge
from .primitives import pack_int4, unpack_int4

# Rows of dequantized weight per fallback chunk: bounds the temporary (2M fp32 values = 8 MB) when a
# large matrix (a 128k-row vocabulary) is dequantized for one matmul.
FALLBACK_CHUNK_VALUES = 2 * 1024 * 1024
SMALL_M = 8  # rows of x up to which the GEMV kernels beat dequantize + GEMM


def extension() -> Any | None:
    """The C++ kernels (`int8_gemv`, `int4_gemv`), or None; tests patch this to exercise the other paths."""
    from .ext import kernels

    return kernels()


def _native(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


def has_native_int8() -> bool:
    return _native("_weight_int8pack_mm")


@functools.cache
def has_native_int4() -> bool:
    """The CPU int4 ops exist and their packed layout is one `native_int4_unpack` can invert."""
    if not (_native("_convert_weight_to_int4pack_for_cpu") and _native("_weight_int4pack_mm_for_cpu")):
        return False
    probe = torch.randint(0, 16, (64 * 2 + 16 + 32, 64), generator=torch.Generator().manual_seed(0),
                          dtype=torch.uint8)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe.to(torch.int32), 1)
        return torch.equal(unpack_int4(native_int4_unpack(packed, probe.shape[0], probe.shape[1])), probe)
    except (RuntimeError, ValueError):
        return False


def native_int4_block_n() -> int:
    """Output rows per packed block in PyTorch's CPU int4 layout: 64 with AVX-512, 32 otherwise."""
    return 64 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 32


def native_int4_pack(weight: torch.Tensor) -> torch.Tensor:
    """Canonical packed int4 (N, K/2) -> PyTorch's CPU kernel layout (N, K/2) uint8."""
    q = unpack_int4(weight).to(torch.int32)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)


def native_int4_unpack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of `native_int4_pack`, from the layout in aten/src/ATen/native/cpu/int4mm_kernel.cpp:
    per block of `block_n` rows, for each k, byte j holds row j (low nibble) and row j + block_n/2 (high);
    a last partial block holds row pairs (2i low, 2i+1 high)."""
    block_n = native_int4_block_n()
    out = torch.empty(n, k, dtype=torch.uint8)
    full = n // block_n * block_n
    if full:
        b = packed[:full].reshape(n // block_n, k, block_n // 2)  # (NB, K, block_n/2)
        lo, hi = (b & 15).transpose(1, 2), (b >> 4).transpose(1, 2)  # (NB, block_n/2, K)
        out[:full] = torch.cat((lo, hi), dim=1).reshape(full, k)
    if n > full:
        rest = n - full
        b = packed[full:].reshape(k, rest // 2)  # (K, rest/2)
        out[full:] = torch.stack(((b & 15).T, (b >> 4).T), dim=1).reshape(rest, k)
    return pack_int4(out)


def native_scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """(N, G) scales and zeros -> (G, N, 2), the layout of the native kernel's qScaleAndZeros."""
    return torch.stack((scales, zeros), dim=-1).transpose(0, 1).contiguous()


# ---- row-interleaved layouts of the C++ kernels: blocks of ROWS rows stored chunk by chunk, so a block
# streams from memory as one sequential run (2x the bandwidth of ROWS separate row streams) -------------
INTERLEAVE = {"int8": (8, 64), "int4": (4, 32)}  # kind -> (rows per block, bytes per row per chunk)


def can_interleave(kind: str, n: int, k: int) -> bool:
    """The C++ kernels take an (N, K) weight of this kind: N a multiple of the block rows, K (values, not
    packed bytes) a multiple of 64."""
    rows, _ = INTERLEAVE[kind]
    return n % rows == 0 and k % 64 == 0


def interleave(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """Canonical (N, B) bytes -> (N/rows, B/chunk, rows, chunk), flattened to (N, B) (same shape, new order)."""
    rows, chunk = INTERLEAVE[kind]
    n, b = weight.shape
    out = empty_huge((n, b), weight.dtype)  # the kernels stream it: huge pages (weights/hugepages.py)
    out.view(n // rows, b // chunk, rows, chunk).copy_(weight.view(n // rows, rows, b // chunk, chunk).transpose(1, 2))
    return out


def deinterleave(weight: torch.Tensor, kind: str, r0: int = 0, r1: int | None = None) -> torch.Tensor:
    """Canonical rows r0..r1 (multiples of the block rows) of an interleaved weight."""
    rows, chunk = INTERLEAVE[kind]
    n, b = weight.shape
    r1 = n if r1 is None else r1
    blocks = weight.view(n // rows, b // chunk, rows, chunk)[r0 // rows: r1 // rows]
    return blocks.transpose(1, 2).reshape(r1 - r0, b)


def interleaved_rows(weight: torch.Tensor, kind: str, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (any shape) of an interleaved weight -> (*ids.shape, B) in canonical byte order."""
    rows, chunk = INTERLEAVE[kind]
    n, b = weight.shape
    blocks = weight.view(n // rows, b // chunk, rows, chunk)
    return blocks[ids // rows, :, ids % rows].flatten(-2)


def dense_mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ weight (N, K).T (+ bias) for a float weight. Decode-sized bfloat16 and float32 inputs take
    the C++ GEMVs (bf16: vdpbf16ps, ~1.5x the bandwidth of oneDNN's `linear` or `mv` for M = 1 on these CPUs;
    fp32: ~4x ATen's `mm`); everything else `F.linear`."""
    op = {torch.bfloat16: ("bf16_gemv", 32), torch.float32: ("f32_gemv", 16)}.get(x.dtype)
    if (op is not None and x.shape[0] <= SMALL_M and weight.dtype == x.dtype and x.shape[1] % op[1] == 0
            and weight.is_contiguous() and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):  # no autograd
        ext = extension()
        if ext is not None and hasattr(ext, op[0]):
            y = getattr(ext, op[0])(x, weight)
            return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def _glue_ext(*tensors: torch.Tensor) -> Any | None:
    """The C++ extension when these tensors may use its inference-only ops (CPU, no autograd, one dtype)."""
    t0 = tensors[0]
    if (t0.device.type != "cpu" or t0.dtype not in (torch.float32, torch.bfloat16, torch.float16)
            or any(t.dtype != t0.dtype for t in tensors)
            or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))):
        return None
    ext = extension()
    return ext if ext is not None and hasattr(ext, "rms_norm") else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """HF's RMSNorm of x (..., D) in one C++ call, or None (caller runs the eager ops)."""
    ext = _glue_ext(x, weight)
    if ext is None or x.stride(-1) != 1:
        return None
    return ext.rms_norm(x.reshape(-1, x.shape[-1]), weight, eps).view(x.shape)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """HF's silu(gate) * up of (..., I) inputs in one C++ pass (silu in fp32, rounded to the dtype, times up),
    or None (caller runs the eager ops)."""
    ext = _glue_ext(gate, up)
    if ext is None or not hasattr(ext, "silu_mul") or gate.stride(-1) != 1 or up.stride(-1) != 1:
        return None
    try:
        g, u = gate.view(-1, gate.shape[-1]), up.view(-1, up.shape[-1])  # row views of a fused output
    except RuntimeError:
        return None
    return ext.silu_mul(g, u).view(gate.shape)


def rotary_(xs: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> bool:
    """Rotate each x (B, T, heads * head_dim) of `xs` in place with cos/sin (B, T, head_dim), one C++ call per
    tensor (HF's rotate_half arithmetic, exact). All or none: False leaves every x untouched (the caller
    applies the eager rotation)."""
    ext = _glue_ext(*xs, cos, sin)
    if ext is None or any(x.stride(-1) != 1 for x in xs):
        return False
    try:
        rows = [x.view(-1, x.shape[-1]) for x in xs]  # views, so the rotation lands in each x
    except RuntimeError:
        return False
    cos, sin = cos.reshape(-1, head_dim).contiguous(), sin.reshape(-1, head_dim).contiguous()
    for r in rows:
        ext.rotary_(r, cos, sin, head_dim)
    return True


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor,
                     cache_v: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                     head_dim: int) -> torch.Tensor | None:
    """Write k/v (B, T, KV*hd) into the cache buffers (Bc, KV, S, hd) at `positions` (B, T) of cache `rows`
    (B,), then attend q (B, T, H*hd) causally by position -> (B, T, H*hd), in one C++ call; None (nothing
    written: the caller runs the eager path) where the kernel does not apply."""
    ext = _glue_ext(q, k, v, cache_k, cache_v)
    if (ext is None or not hasattr(ext, "decode_attention") or head_dim % 16 or head_dim > 256
            or torch.compiler.is_compiling()
            or any(t.stride(-1) != 1 for t in (q, k, v)) or not (cache_k.is_contiguous() and cache_v.is_contiguous())):
        return None
    return ext.decode_attention(q, k, v, cache_k, cache_v, rows.contiguous(), positions.contiguous(),
                                head_dim**-0.5)


def int8_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """x (M, K) @ (weight int8 (N, K) * scales (N, G)).T -> (M, N); `interleaved`: the C++ kernels' layout."""
    if x.shape[0] <= SMALL_M:
        if interleaved:
            return extension().int8_gemv(x, weight, scales)
        if scales.shape[1] == 1 and has_native_int8() and x.dtype == scales.dtype:
            return torch.ops.aten._weight_int8pack_mm(x.contiguous(), weight, scales.view(-1))
    return _fallback(x, weight.shape[0], _row_dequantizer("int8", weight, scales, None,
                                                          "interleaved" if interleaved else "canonical", x),
                     INTERLEAVE["int8"][0])


def int4_mm_native(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor,
                   group_size: int) -> torch.Tensor:
    """x (M, K) @ dequant(native-packed int4).T via PyTorch's kernel; x and scales share a dtype."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, group_size, scales_and_zeros)


# ---- the "groups" layout of int4 weights for int8 activations (csrc/int4_groups.cpp): per block of 4 rows,
# 512-column super-chunks (4 rows, 4 steps, 16 groups, 4 bytes) then a tail of the K % 512 columns, so each
# 32-bit lane of a load belongs to one group of 32 weights ----------------------------------------------
GROUP_ROWS = 4


def has_int8_activations() -> bool:
    """The int8-activation x int4-weight GEMVs (C++, AVX-512 VNNI) are available."""
    ext = extension()
    return ext is not None and hasattr(ext, "int4g_gemv_a8")


def _group_views(out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The (NB, S, R, t, g, b) main and (NB, R, t, gt, b) tail views of a groups-layout weight (N, K/2)."""
    n, b = out.shape
    full, tail = divmod(b, 256)
    blk = out.view(n // GROUP_ROWS, GROUP_ROWS * b)
    main = blk[:, :1024 * full].view(n // GROUP_ROWS, full, GROUP_ROWS, 4, 16, 4) if full else None
    rest = blk[:, 1024 * full:].view(n // GROUP_ROWS, GROUP_ROWS, 4, tail // 16, 4) if tail else None
    return main, rest


def interleave_groups(weight: torch.Tensor) -> torch.Tensor:
    """Canonical int4 (N, K/2) bytes -> the groups layout (same shape, new order); N % 4 == 0, K % 64 == 0."""
    n, b = weight.shape
    full = b // 256
    out = empty_huge((n, b), weight.dtype)  # the kernels stream it: huge pages (weights/hugepages.py)
    main, rest = _group_views(out)
    w = weight.view(n // GROUP_ROWS, GROUP_ROWS, b)
    if main is not None:  # canonical byte 256 S + 16 g + 4 t + b of row r -> (S, r, t, g, b)
        main.copy_(w[:, :, :256 * full].reshape(n // GROUP_ROWS, GROUP_ROWS, full, 16, 4, 4).permute(0, 2, 1, 4, 3, 5))
    if rest is not None:
        rest.copy_(w[:, :, 256 * full:].reshape(n // GROUP_ROWS, GROUP_ROWS, -1, 4, 4).permute(0, 1, 3, 2, 4))
    return out


def deinterleave_groups(weight: torch.Tensor, r0: int = 0, r1: int | None = None) -> torch.Tensor:
    """Canonical rows r0..r1 (multiples of 4) of a groups-layout weight."""
    n, b = weight.shape
    r1 = n if r1 is None else r1
    main, rest = _group_views(weight)
    parts = []
    if main is not None:  # (nb, S, R, t, g, b) -> (nb, R, S, g, t, b)
        parts.append(main[r0 // GROUP_ROWS: r1 // GROUP_ROWS].permute(0, 2, 1, 4, 3, 5).reshape(r1 - r0, -1))
    if rest is not None:
        parts.append(rest[r0 // GROUP_ROWS: r1 // GROUP_ROWS].permute(0, 1, 3, 2, 4).reshape(r1 - r0, -1))
    return torch.cat(parts, dim=1)


def grouped_rows(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (any shape) of a groups-layout weight -> (*ids.shape, K/2) in canonical byte order."""
    main, rest = _group_views(weight)
    blk, r = ids // GROUP_ROWS, ids % GROUP_ROWS
    parts = []
    if main is not None:  # (..., S, t, g, b) -> (..., S, g, t, b)
        parts.append(main[blk, :, r].transpose(-3, -2).flatten(-4))
    if rest is not None:  # (..., t, gt, b) -> (..., gt, t, b)
        parts.append(rest[blk, r].transpose(-3, -2).flatten(-3))
    return torch.cat(parts, dim=-1)


def int4_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
            layout: str = "canonical") -> torch.Tensor:
    """x (M, K) @ dequant(int4 weight (N, K/2), scales/zeros (N, G); zeros None: symmetric).T -> (M, N); weight in the `layout`
    "canonical", "interleaved" (the C++ kernels' row blocks) or "groups".

    "groups" is the int8-activation mode: decode-sized x is quantized to int8 per 32 values (llama.cpp's
    Q8_0) and multiplied in int8 x int4 (vpdpbusd; csrc/int4_groups.cpp): faster, ~0.5% relative error on
    each output. Larger inputs (prefill) take the exact weight-only path in every layout."""
    if x.shape[0] <= SMALL_M and layout != "canonical":
        ext = extension()
        if layout == "groups":
            return ext.int4g_gemv_a8(x, weight, scales, zeros)
        return ext.int4_gemv(x, weight, scales, zeros)
    return _fallback(x, weight.shape[0], _row_dequantizer("int4", weight, scales, zeros, layout, x),
                     INTERLEAVE["int4"][0])


def _row_dequantizer(kind: str, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                     layout: str, x: torch.Tensor):
    """(r0, r1) -> rows r0..r1 of the weight as x.dtype (canonical order): one C++ pass from the kernels'
    interleaved or groups layout (several times faster), else the torch ops."""
    ext = extension() if layout != "canonical" else None
    if ext is not None:
        def dequant(r0: int, r1: int) -> torch.Tensor:
            out = torch.empty(r1 - r0, x.shape[1], dtype=x.dtype)
            if kind == "int8":
                ext.int8_dequant(weight, scales, r0, r1, out)
            elif layout == "groups":
                ext.int4g_dequant(weight, scales, zeros, r0, r1, out)
            else:
                ext.int4_dequant(weight, scales, zeros, r0, r1, out)
            return out
        return dequant

    def dequant(r0: int, r1: int) -> torch.Tensor:
        w = (deinterleave_groups(weight, r0, r1) if layout == "groups" else
             deinterleave(weight, kind, r0, r1) if layout == "interleaved" else weight[r0:r1])
        if kind == "int8":
            return _deq_int8(w, scales[r0:r1], x.dtype)
        return _deq_int4(w, scales[r0:r1], None if zeros is None else zeros[r0:r1], x.dtype)
    return dequant


def _deq_int8(weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n, k = weight.shape
    g = scales.shape[1]
    return (weight.to(dtype).view(n, g, k // g) * scales.to(dtype)[..., None]).view(n, k)


def _deq_int4(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
              dtype: torch.dtype) -> torch.Tensor:
    q = unpack_int4(weight)
    n, k = q.shape
    g = scales.shape[1]
    if zeros is None:  # symmetric: one rounding, as the C++ fma with a zero addend
        return ((q.to(dtype).view(n, g, k // g) - 8) * scales.to(dtype)[..., None]).view(n, k)
    w = torch.addcmul(zeros.to(dtype)[..., None], q.to(dtype).view(n, g, k // g) - 8, scales.to(dtype)[..., None])
    return w.view(n, k)


def _fallback(x: torch.Tensor, n: int, dequant, multiple: int = 1) -> torch.Tensor:
    """Dequantize row chunks (a multiple of `multiple` rows) of the weight and matmul each; a single row takes
    the GEMV (`mv`) kernel."""
    k = x.shape[1]
    rows = max(multiple, min(n, FALLBACK_CHUNK_VALUES // max(k, 1)) // multiple * multiple)
    if rows >= n:
        w = dequant(0, n)
        return torch.mv(w, x[0]).unsqueeze(0) if x.shape[0] == 1 else F.linear(x, w)
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        w = dequant(r0, r1)
        if x.shape[0] == 1:
            torch.mv(w, x[0], out=out[0, r0:r1])
        else:
            out[:, r0:r1] = F.linear(x, w)
    return out

"""Quantization primitives on plain tensors: int8 (per channel or per group) and int4 groupwise, in the
canonical layouts that checkpoints store, plus llama.cpp Q8_0 / Q4_0 / Q4_1 blocks mapped onto them.

Canonical layouts (what `state_dict()` and saved checkpoints hold; kernels may repack in memory):
  int8: weight int8 (N, K), scales (N, K // group)            w = weight * scale
  int4: weight uint8 (N, K // 2), two values per byte (low nibble = even column), values 0..15,
        scales (N, K // group), zeros (N, K // group)         w = (q - 8) * scale + zero
        symmetric int4 (Meta's quantized Llama 3.2, llama.cpp's Q4_0) has no zeros:  w = (q - 8) * scale
"""

from __future__ import annotations

import numpy as np
import torch

INT4_GROUP_SIZES = (32, 64, 128, 256)
GGML_BLOCK = 32  # values per Q8_0 / Q4_0 / Q4_1 block


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K) -> (N, K // group, group) float32; checks that the rows split evenly."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"a row of {k} values does not split into groups of {group_size}")
    return w.detach().float().reshape(n, k // group_size, group_size)


def quantize_int8(w: torch.Tensor, group_size: int | None = None,
                  scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8: w (N, K) -> (weight int8 (N, K), scales (N, G)); group_size None = one scale per row.

    The scale is rounded to `scale_dtype` before the weights are rounded, so weight * scale is exactly what a
    kernel computes with the stored scale.
    """
    n, k = w.shape
    g = _groups(w, group_size or k)  # (N, G, g)
    scales = (g.abs().amax(-1) / 127).to(scale_dtype)  # (N, G)
    s = scales.float().clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(g / s[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(n, k), scales


def dequantize_int8(weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n, k = weight.shape
    groups = scales.shape[1]
    w = weight.to(dtype).view(n, groups, k // groups) * scales.to(dtype)[..., None]
    return w.view(n, k)


def quantize_int4(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.float32,
                  symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Groupwise int4: w (N, K) -> (weight uint8 (N, K/2), scales (N, G), zeros (N, G) or None).

    Asymmetric (min/max): q = round((w - min) / scale) in 0..15 and w ~ (q - 8) * scale + zero with
    zero = min + 8 * scale, the convention of PyTorch's int4 kernels.
    Symmetric (no zeros, 10% fewer bytes at group 32): w ~ (q - 8) * scale with scale = m / -8 where m is the
    group's value of largest magnitude, which lands exactly on q = 0 (llama.cpp's Q4_0 rounding).
    Scales and zeros are rounded to `scale_dtype` first.
    """
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size {group_size} is not supported; choose one of {INT4_GROUP_SIZES}")
    n, k = w.shape
    g = _groups(w, group_size)  # (N, G, g)
    if symmetric:
        m = g.gather(-1, g.abs().argmax(-1, keepdim=True))[..., 0]  # (N, G) signed value of largest magnitude
        scales = (m / -8).to(scale_dtype)
        s = scales.float()
        s = torch.where(s == 0, 1.0, s)  # an all-zero group: any scale, q = 8
        q = torch.round(g / s[..., None] + 8).clamp_(0, 15).to(torch.uint8)
        return pack_int4(q.reshape(n, k)), scales, None
    lo, hi = g.amin(-1), g.amax(-1)
    scales = ((hi - lo).clamp_min(1e-6) / 15).to(scale_dtype)  # (N, G)
    zeros = (lo + 8 * scales.float()).to(scale_dtype)
    s, z = scales.float(), zeros.float()
    q = torch.round((g - z[..., None]) / s[..., None] + 8).clamp_(0, 15).to(torch.uint8)
    return pack_int4(q.reshape(n, k)), scales, zeros


def dequantize_int4(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """zeros None: symmetric."""
    q = unpack_int4(weight)  # (N, K) uint8
    n, k = q.shape
    groups = scales.shape[1]
    w = (q.to(dtype).view(n, groups, k // groups) - 8) * scales.to(dtype)[..., None]
    if zeros is not None:
        w = w + zeros.to(dtype)[..., None]
    return w.view(n, k)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> (N, K/2) uint8, column 2j in the low nibble and 2j+1 in the high nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: (N, K/2) uint8 -> (N, K) uint8 in 0..15."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


# ---- llama.cpp blocks (one row of blocks per output row; q/k rows already in HF order) ----------------


def _block_rows(data: np.ndarray, type_size: int) -> np.ndarray:
    """(N, bytes per row) uint8 -> (N, blocks per row, type_size)."""
    return np.ascontiguousarray(data).reshape(data.shape[0], -1, type_size)


def _f16(blocks: np.ndarray, start: int) -> torch.Tensor:
    """The fp16 field at byte `start` of every block -> float32 (N, blocks)."""
    raw = np.ascontiguousarray(blocks[..., start:start + 2]).view(np.float16)[..., 0]
    return torch.from_numpy(raw.astype(np.float32))


def q8_0_to_int8(data: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 rows (N, K/32*34 bytes: fp16 d + 32 int8) -> int8 weight (N, K), scales (N, K/32): exact."""
    blocks = _block_rows(data, 34)
    n = blocks.shape[0]
    q = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(n, -1))
    return q, _f16(blocks, 0)


def _ggml_nibbles(qs: np.ndarray) -> torch.Tensor:
    """ggml 4-bit block payload (N, B, 16) -> values (N, B*32) 0..15: value j in the low nibble of byte j,
    value j+16 in its high nibble."""
    t = torch.from_numpy(np.ascontiguousarray(qs))
    return torch.cat((t & 15, t >> 4), dim=-1).reshape(t.shape[0], -1)


def q4_0_to_int4(data: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, None]:
    """Q4_0 rows (fp16 d + 16 bytes; w = d * (q - 8)) -> symmetric canonical int4 with group 32: exact."""
    blocks = _block_rows(data, 18)
    return pack_int4(_ggml_nibbles(blocks[..., 2:])), _f16(blocks, 0), None


def q4_1_to_int4(data: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 rows (fp16 d, fp16 m + 16 bytes; w = d * q + m) -> canonical int4, zero = m + 8 d (fp32)."""
    blocks = _block_rows(data, 20)
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    return pack_int4(_ggml_nibbles(blocks[..., 4:])), d, m + 8 * d

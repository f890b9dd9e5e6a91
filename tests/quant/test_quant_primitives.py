"""Quantization primitives: error bounds of int8/int4 rounding, nibble packing, PyTorch's int4 layout, and
GGUF Q8_0/Q4_0/Q4_1 blocks mapped onto int8/int4 exactly (same numbers as gguf's dequantizer)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from pocketllama.quant import kernels
from pocketllama.quant.primitives import (
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    q4_0_to_int4,
    q4_1_to_int4,
    q8_0_to_int8,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)


def _w(n: int = 96, k: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("group", [None, 32, 128])
def test_int8_rounding_error_is_at_most_half_a_step(group):
    w = _w()
    q, s = quantize_int8(w, group)
    assert q.dtype == torch.int8 and s.shape == (96, 1 if group is None else 256 // group)
    step = s.repeat_interleave(256 // s.shape[1], dim=1)
    assert ((dequantize_int8(q, s) - w).abs() <= step / 2 + 1e-6).all()
    assert q.abs().max() == 127  # the largest value of every group uses the full range


@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_int4_rounding_error_is_at_most_half_a_step(group):
    w = _w()
    packed, s, z = quantize_int4(w, group)
    assert packed.shape == (96, 128) and packed.dtype == torch.uint8 and s.shape == z.shape == (96, 256 // group)
    step = s.repeat_interleave(group, dim=1)
    assert ((dequantize_int4(packed, s, z) - w).abs() <= step / 2 + 1e-5).all()
    q = unpack_int4(packed)
    assert q.min() == 0 and q.max() == 15  # min/max quantization reaches both ends of the grid


def test_bf16_scales_are_rounded_before_the_weights():
    """The stored bf16 scale is the one the rounding used, so dequantization stays within half a step."""
    w = _w()
    packed, s, z = quantize_int4(w, 32, torch.bfloat16)
    assert s.dtype == z.dtype == torch.bfloat16
    step = s.float().repeat_interleave(32, dim=1)
    assert ((dequantize_int4(packed, s, z) - w).abs() <= step / 2 + 1e-2 * step).all()
    q, s8 = quantize_int8(w, None, torch.bfloat16)
    assert ((dequantize_int8(q, s8) - w).abs() <= s8.float() / 2 + 1e-6).all()


def test_int4_group_size_is_validated():
    with pytest.raises(ValueError, match="int4 group size 48 is not supported"):
        quantize_int4(_w(), 48)
    with pytest.raises(ValueError, match="a row of 96 values does not split into groups of 64"):
        quantize_int4(_w(16, 96), 64)


def test_pack_unpack_roundtrip_and_nibble_order():
    q = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = pack_int4(q)
    assert torch.equal(unpack_int4(packed), q)
    assert packed[0, 0] == q[0, 0] | (q[0, 1] << 4)  # even column low, odd column high


@pytest.mark.skipif(not kernels.has_native_int4(), reason="this torch has no CPU int4 kernel layout we can invert")
@pytest.mark.parametrize("n", [64, 160, 192, 48])
def test_native_int4_layout_unpacks_to_the_canonical_one(n):
    """`_convert_weight_to_int4pack_for_cpu` interleaves rows per block; our inverse recovers the input."""
    packed = pack_int4(torch.randint(0, 16, (n, 128), dtype=torch.uint8))
    native = kernels.native_int4_pack(packed)
    assert native.shape == packed.shape and not torch.equal(native, packed)
    assert torch.equal(kernels.native_int4_unpack(native, n, 128), packed)


# ---- GGUF blocks ----------------------------------------------------------------------------------------


def _blocks(w: torch.Tensor, qtype: QT) -> tuple[np.ndarray, torch.Tensor]:
    raw = gguf.quants.quantize(w.numpy(), qtype)  # (N, bytes per row)
    return raw, torch.from_numpy(np.asarray(gguf.quants.dequantize(raw, qtype))).reshape(w.shape)


def test_q8_0_blocks_map_onto_int8_groups_exactly():
    raw, ref = _blocks(_w(), QT.Q8_0)
    q, s = q8_0_to_int8(raw)
    assert q.shape == (96, 256) and s.shape == (96, 8)
    assert torch.equal(dequantize_int8(q, s), ref)


def test_q4_0_blocks_map_onto_int4_groups_exactly():
    raw, ref = _blocks(_w(), QT.Q4_0)
    packed, s, z = q4_0_to_int4(raw)
    assert packed.shape == (96, 128) and z is None  # symmetric: no zeros to store
    assert torch.equal(dequantize_int4(packed, s, z), ref)


def test_q4_1_blocks_map_onto_int4_groups():
    """w = d*q + m becomes (q-8)*d + (m+8d): equal up to one fp32 rounding of the zero."""
    raw, ref = _blocks(_w(), QT.Q4_1)
    packed, s, z = q4_1_to_int4(raw)
    torch.testing.assert_close(dequantize_int4(packed, s, z), ref, rtol=0, atol=1e-6)


def test_chunked_quantization_equals_whole_matrix(monkeypatch):
    from pocketllama.quant import handler
    from pocketllama.quant.recipe import QSpec

    w = _w(100, 64)
    for spec in (QSpec("int8"), QSpec("int4", 32)):
        whole = handler.quantize_weight(w, spec, torch.bfloat16)
        monkeypatch.setattr(handler, "QUANTIZE_CHUNK_VALUES", 64 * 7)  # 7 rows at a time, a ragged last chunk
        chunked = handler.quantize_weight(w, spec, torch.bfloat16)
        monkeypatch.undo()
        assert whole.keys() == chunked.keys() and all(torch.equal(whole[k], chunked[k]) for k in whole)

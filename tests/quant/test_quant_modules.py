"""Quantized modules against a float reference built from their own dequantized weights (fp32: tight;
bf16: bf16 tolerance), state-dict layout and load errors. Every test runs twice: with pocketllama's C++
kernels and with PyTorch's kernels plus the pure-torch fallback (the C++ kernels disabled)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pocketllama.quant import Int4Linear, Int8Embedding, Int8Linear, kernels


@pytest.fixture(autouse=True, params=["cpp", "torch"])
def backend(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(kernels, "extension", lambda: None)
    elif kernels.extension() is None:
        pytest.skip("pocketllama's C++ kernels cannot be built here (no AVX-512, compiler or ninja)")
    return request.param


def _linear(k: int = 256, n: int = 192, bias: bool = False, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


def _x(*shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)


def _ref(m, x: torch.Tensor) -> torch.Tensor:
    w = m.dequantize(torch.float32)
    return F.linear(x.float(), w, None if m.bias is None else m.bias.float())


@pytest.mark.parametrize("shape", [(1, 1, 256), (2, 5, 256), (7, 256)])
@pytest.mark.parametrize("group", [None, 32])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_matches_dequantized_reference_fp32(shape, group, bias):
    m = Int8Linear.from_float(_linear(bias=bias), group)
    x = _x(*shape)
    y = m(x)
    assert y.shape == (*shape[:-1], 192) and y.dtype == torch.float32
    torch.testing.assert_close(y, _ref(m, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1, 256), (3, 4, 256)])
@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("bias", [False, True])
def test_int4_linear_matches_dequantized_reference_fp32(shape, group, bias, backend):
    m = Int4Linear.from_float(_linear(bias=bias), group)
    # C++ kernels: rows interleaved; otherwise canonical (PyTorch's int4 kernel is bfloat16-only)
    assert m.layout == ("interleaved" if backend == "cpp" else "canonical")
    x = _x(*shape)
    torch.testing.assert_close(m(x), _ref(m, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("rows", [1, 6, 20])
def test_bf16_kernels_match_reference_within_bf16_rounding(group, rows, backend):
    """bf16 activations (C++ GEMV, PyTorch's packed kernels, or dequantize + bf16 GEMM for 20 rows): outputs
    are rounded to bf16 (2^-8 relative)."""
    lin = _linear().to(torch.bfloat16)
    x = _x(rows, 256, dtype=torch.bfloat16)
    for m in (Int8Linear.from_float(lin), Int4Linear.from_float(lin, group)):
        y = m(x)
        assert y.dtype == torch.bfloat16
        ref = _ref(m, x)
        assert ((y.float() - ref).abs() <= 2**-7 * ref.abs() + 0.02).all()
    native = backend == "torch" and kernels.has_native_int4()
    expected = "interleaved" if backend == "cpp" else "native" if native else "canonical"
    assert Int4Linear.from_float(lin, group).layout == expected
    assert Int8Linear.from_float(lin).layout == ("interleaved" if backend == "cpp" else "canonical")


def test_int4_state_dict_is_canonical_whatever_the_memory_layout():
    lin = _linear().to(torch.bfloat16)
    m = Int4Linear.from_float(lin, 32)
    sd = m.state_dict()
    assert set(sd) == {"weight", "scales", "zeros"}
    assert sd["weight"].shape == (192, 128) and sd["scales"].shape == (192, 8)
    fresh = Int4Linear(256, 192, group_size=32, device="meta")
    fresh.load_state_dict(sd, assign=True)
    x = _x(2, 256, dtype=torch.bfloat16)
    assert torch.equal(fresh(x), m(x))
    for a, b in zip(fresh.state_dict().values(), sd.values(), strict=True):
        assert torch.equal(a, b)


def test_int8_state_dict_is_canonical_whatever_the_memory_layout():
    m = Int8Linear.from_float(_linear(), 32)
    sd = m.state_dict()
    fresh = Int8Linear(256, 192, group_size=32, device="meta")
    fresh.load_state_dict(sd, assign=True)
    assert fresh.layout == m.layout and torch.equal(fresh.state_dict()["weight"], sd["weight"])
    assert torch.equal(sd["weight"], Int8Linear.from_float(_linear(), 32).canonical_state()["weight"])
    x = _x(1, 256)
    torch.testing.assert_close(fresh(x), x @ m.dequantize().T, rtol=1e-5, atol=1e-5)


def test_int8_embedding_lookup_and_tied_projection():
    torch.manual_seed(0)
    emb = nn.Embedding(96, 64)  # 96 rows: interleaved for the C++ kernels
    for group in (None, 32):
        m = Int8Embedding.from_float(emb, group)
        table = m.dequantize()
        ids = torch.tensor([[3, 95, 0], [7, 7, 1]])
        torch.testing.assert_close(m(ids), table[ids], rtol=0, atol=0)
        h = _x(2, 3, 64)
        torch.testing.assert_close(m.attend(h), h @ table.T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.attend(h[:1, :1]), h[:1, :1] @ table.T, rtol=1e-5, atol=1e-5)


def test_loading_a_mismatched_part_names_the_tensor_and_the_cause():
    m = Int4Linear(256, 192, group_size=32, device="meta")
    sd = Int4Linear.from_float(_linear(), 64).state_dict()  # group 64: scales (192, 4) instead of (192, 8)
    with pytest.raises(RuntimeError, match=r"scales: expected float \(192, 8\), got torch.float32 \(192, 4\)"):
        m.load_state_dict(sd, assign=True)
    sd = Int8Linear.from_float(_linear()).state_dict()
    sd["weight"] = sd["weight"].float()
    with pytest.raises(RuntimeError, match=r"weight: expected int8 \(192, 256\), got torch.float32"):
        Int8Linear(256, 192, device="meta").load_state_dict(sd, assign=True)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"zeros\""):
        sd = Int4Linear.from_float(_linear(), 32).state_dict()
        del sd["zeros"]
        Int4Linear(256, 192, group_size=32, device="meta").load_state_dict(sd, assign=True)


def test_int4_linear_rejects_groups_that_do_not_divide_the_row():
    with pytest.raises(ValueError, match="in_features 160 is not a multiple of group_size 64"):
        Int4Linear(160, 64, group_size=64)


@pytest.mark.parametrize("k", [576, 1536])
def test_int4_rows_whose_packed_width_is_not_a_multiple_of_64_bytes_still_take_the_cpp_kernel(k, backend):
    """SmolLM2's 576-wide rows pack into 288 bytes: the C++ kernel needs K % 64 == 0 in values, not bytes."""
    m = Int4Linear.from_float(_linear(k=k, n=64), 32)
    assert m.layout == ("interleaved" if backend == "cpp" else "canonical")
    x = _x(1, k)
    torch.testing.assert_close(m(x), _ref(m, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 8, 9])
@pytest.mark.parametrize("n", [64, 203])
def test_dense_bf16_gemv_matches_float_reference_within_bf16_rounding(rows, n, backend):
    """`dense_mm` (C++ bf16 GEMV for <= 8 rows, N not a multiple of its 8-row blocks included; else
    F.linear) equals the fp32 product of the same bf16 values up to the bf16 rounding of the output."""
    w = _x(n, 512, dtype=torch.bfloat16)
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    bias = torch.randn(n).to(torch.bfloat16)
    ref = F.linear(x.float(), w.float(), bias.float())
    with torch.inference_mode():
        y = kernels.dense_mm(x, w, bias)
    assert y.shape == (rows, n) and y.dtype == torch.bfloat16
    assert ((y.float() - ref).abs() <= 2**-7 * ref.abs() + 0.05).all()

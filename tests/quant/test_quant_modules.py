"""Quantized modules against a float reference built from their own dequantized weights (fp32: tight;
bf16: bf16 tolerance), state-dict layout and load errors. Every test runs twice: with pocketllama's C++
kernels and with PyTorch's kernels plus the pure-torch fallback (the C++ kernels disabled)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pocketllama.quant import Int4Embedding, Int4Linear, Int8Embedding, Int8Linear, kernels
from pocketllama.quant.primitives import quantize_int4


@pytest.fixture(autouse=True)
def _both_backends(backend):  # every test here runs on both (tests/conftest.py `backend`)
    return backend


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



def _table(v: int, d: int, dtype=torch.float32) -> nn.Embedding:
    torch.manual_seed(0)
    return nn.Embedding(v, d).to(dtype)


@pytest.mark.parametrize("v,d,group", [(96, 128, 32), (96, 128, 64), (96, 256, 128), (90, 64, 32)])
def test_int4_embedding_lookup_and_tied_projection(v, d, group, backend):
    """Lookups dequantize the looked-up rows exactly as the whole table dequantizes (fp32, bit for bit);
    `attend` is h @ table.T for decode rows (the C++ GEMV) and prefill rows (dequantize + GEMM)."""
    m = Int4Embedding.from_float(_table(v, d), group)
    # 96 rows of 64k values interleave for the C++ kernels; 90 rows (not a multiple of 4) stay canonical
    assert m.layout == ("interleaved" if backend == "cpp" and v % 4 == 0 else "canonical")
    table = m.dequantize()  # (V, D) fp32
    assert table.shape == (v, d)
    ids = torch.tensor([[3, v - 1, 0], [7, 7, 1]])
    got = m(ids)
    assert got.shape == (2, 3, d) and got.dtype == torch.float32
    torch.testing.assert_close(got, table[ids], rtol=0, atol=0)
    torch.testing.assert_close(m(torch.tensor(5)), table[5], rtol=0, atol=0)  # a 0-d id: one row (D,)
    for shape in ((1, 1, d), (1, d), (2, 3, d), (12, d)):  # 1 and 6 rows: GEMV; 12 rows: prefill path
        h = _x(*shape)
        y = m.attend(h)
        assert y.shape == (*shape[:-1], v)
        # N(0, 1) table and h: logits ~ sqrt(D) = 8..16, so 1e-4 is fp32 summation-order noise
        torch.testing.assert_close(y, h @ table.T, rtol=1e-5, atol=1e-4)


def test_int4_embedding_is_close_to_the_float_table():
    """The quantization itself: a row's error is at most half a step (scale / 2) per value."""
    emb = _table(96, 128)
    m = Int4Embedding.from_float(emb, 32)
    err = (m.dequantize() - emb.weight.detach()).abs().view(96, 4, 32)  # (V, groups, 32)
    assert (err <= m.canonical()[1][..., None] / 2 + 1e-6).all()
    assert err.max() > 0  # 4 bits cannot hold a random table exactly


@pytest.mark.parametrize("rows", [1, 6, 20])
def test_int4_embedding_bf16_within_bf16_rounding_and_never_natively_packed(rows, backend):
    """bf16: lookups round the fp32 dequantized value once; PyTorch's packed int4 layout (which cannot look
    rows up) is never used for a table, even where Int4Linear would use it."""
    m = Int4Embedding.from_float(_table(96, 128, torch.bfloat16), 32)
    assert m.layout == ("interleaved" if backend == "cpp" else "canonical")
    table = m.dequantize(torch.float32)
    ids = torch.arange(rows) * 5
    assert torch.equal(m(ids), table[ids].to(torch.bfloat16))
    h = _x(rows, 128, dtype=torch.bfloat16)
    y = m.attend(h)
    ref = h.float() @ table.T
    # bf16 dot-product bound: weights (prefill dequantizes in bf16) and outputs rounded at 2^-9 relative each
    bound = 2**-7 * (h.float().abs() @ table.abs().T)
    assert y.dtype == torch.bfloat16 and ((y.float() - ref).abs() <= bound).all()


def test_int4_embedding_state_dict_is_canonical_and_loads_back():
    m = Int4Embedding.from_float(_table(96, 128, torch.bfloat16), 32)
    sd = m.state_dict()
    assert set(sd) == {"weight", "scales", "zeros"}
    q, s, z = quantize_int4(_table(96, 128, torch.bfloat16).weight, 32, scale_dtype=torch.bfloat16)
    assert sd["weight"].dtype == torch.uint8 and torch.equal(sd["weight"], q)  # (V, D/2), whatever the layout
    assert torch.equal(sd["scales"], s) and torch.equal(sd["zeros"], z) and s.shape == (96, 4)
    fresh = Int4Embedding(96, 128, group_size=32, device="meta")
    fresh.load_state_dict(sd, assign=True)
    assert fresh.layout == m.layout
    ids = torch.tensor([0, 95, 17])
    h = _x(2, 128, dtype=torch.bfloat16)
    assert torch.equal(fresh(ids), m(ids)) and torch.equal(fresh.attend(h), m.attend(h))


def test_int4_embedding_errors_name_the_cause():
    with pytest.raises(ValueError, match="embedding_dim 80 is not a multiple of group_size 32"):
        Int4Embedding(96, 80, group_size=32)
    sd = Int4Embedding.from_float(_table(96, 128), 64).state_dict()  # group 64: scales (96, 2), not (96, 4)
    with pytest.raises(RuntimeError, match=r"scales: expected float \(96, 4\), got torch.float32 \(96, 2\)"):
        Int4Embedding(96, 128, group_size=32, device="meta").load_state_dict(sd, assign=True)


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


@pytest.mark.parametrize("rows", [2, 3, 4, 5, 8])
def test_bf16_gemv_rows_together_equal_rows_alone(rows, backend):
    """Verification feeds k + 1 rows through the multi-row tiles; each output must be the bits a single-row
    decode step computes (same accumulation order), N not a multiple of the 4-row tiles included."""
    ext = kernels.extension()
    if ext is None or not hasattr(ext, "bf16_gemv"):
        pytest.skip("needs the C++ bf16 GEMV (AVX-512 BF16)")
    w = _x(203, 512, dtype=torch.bfloat16)
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    together = ext.bf16_gemv(x, w)
    assert torch.equal(together, torch.cat([ext.bf16_gemv(x[i:i + 1], w) for i in range(rows)]))


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


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9])
@pytest.mark.parametrize("n", [64, 203])
def test_dense_fp32_gemv_matches_linear_and_rows_together_equal_rows_alone(rows, n, backend):
    """`dense_mm` on float32 decode rows (C++ fp32 GEMV for <= 8 rows, N not a multiple of its 4-row blocks
    included; else F.linear): F.linear's values up to summation order, and each row of a batch the bits that
    row alone gives (speculative verification equals decode)."""
    w = _x(n, 576)
    x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(2))
    bias = torch.randn(n)
    with torch.inference_mode():
        y = kernels.dense_mm(x, w, bias)
        alone = torch.cat([kernels.dense_mm(x[i:i + 1], w, bias) for i in range(rows)])
    assert y.shape == (rows, n) and y.dtype == torch.float32
    torch.testing.assert_close(y, F.linear(x, w, bias), rtol=1e-5, atol=1e-4)
    ext = kernels.extension()
    if backend == "cpp" and rows <= 8:  # decode rows take the C++ kernel (ATen's own order may vary with M)
        assert torch.equal(y, alone) and torch.equal(y, ext.f32_gemv(x, w) + bias)
    with torch.enable_grad():  # training keeps F.linear (autograd)
        wg = w.clone().requires_grad_()
        kernels.dense_mm(x[:1], wg).sum().backward()
        assert wg.grad is not None

"""One-call RMSNorm, SiLU x up and rotary ops (quant/kernels.py, C++): HF's arithmetic, inference only."""

from __future__ import annotations

import pytest
import torch

from pocketllama.models.llama import RMSNorm
from pocketllama.models.rope import apply_rotary
from pocketllama.quant import kernels

pytestmark = pytest.mark.skipif(kernels.extension() is None, reason="pocketllama's C++ kernels cannot be built here")


def _eager_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_hf_arithmetic(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 4, 576, generator=g) * 3).to(dtype)
    w = (torch.rand(576, generator=g) + 0.5).to(dtype)
    with torch.inference_mode():
        y = kernels.rms_norm(x, w, 1e-5)
    assert y.shape == x.shape and y.dtype == dtype
    # fp32: summation order only (~1 ulp); bf16: the fp32 result rounds to the same bf16 values
    torch.testing.assert_close(y, _eager_norm(x, w, 1e-5), rtol=2e-6 if dtype == torch.float32 else 0,
                               atol=1e-6 if dtype == torch.float32 else 0)


def test_rms_norm_module_takes_the_kernel_only_without_autograd():
    norm = RMSNorm(64, 1e-5)
    x = torch.randn(2, 64, requires_grad=True)
    y = norm(x)
    y.sum().backward()  # the eager path: differentiable
    assert x.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(norm(x), y.detach(), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_silu_mul_matches_hf_mlp_arithmetic(dtype):
    """silu(gate) * up on row views of a fused gate|up output (1000 columns: a 16-lane tail), against ATen:
    bf16 / fp16 give the same values (the fp32 silu rounds to them alike), fp32 agrees to an ulp (exp
    implementations differ in the last bit)."""
    g = torch.Generator().manual_seed(0)
    gu = (torch.randn(2, 3, 2000, generator=g) * 6).to(dtype)
    gate, up = gu[..., :1000], gu[..., 1000:]
    with torch.inference_mode():
        y = kernels.silu_mul(gate, up)
    want = torch.nn.functional.silu(gate) * up
    assert y.shape == want.shape and y.dtype == dtype
    torch.testing.assert_close(y, want, rtol=2e-7 if dtype == torch.float32 else 0,
                               atol=1e-6 if dtype == torch.float32 else 0)
    edge = torch.tensor([-200.0, -88.0, 0.0, 100.0, float("inf"), float("-inf"), float("nan")]).to(dtype)
    with torch.inference_mode():
        got = kernels.silu_mul(edge[None], torch.ones_like(edge)[None])[0]
    torch.testing.assert_close(got, torch.nn.functional.silu(edge), equal_nan=True, rtol=0, atol=0)
    with torch.enable_grad():  # training keeps the eager ops (autograd)
        assert kernels.silu_mul(gate.float().requires_grad_(), up.float()) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_in_place_is_exactly_hf_rotate_half(dtype):
    g = torch.Generator().manual_seed(1)
    B, T, H, hd = 2, 3, 5, 64
    fused = torch.randn(B, T, (H + 2) * hd, generator=g).to(dtype)  # q | k as split views of one output
    q, k = fused.split([H * hd, 2 * hd], dim=-1)
    cos, sin = torch.randn(B, T, hd, generator=g).to(dtype), torch.randn(B, T, hd, generator=g).to(dtype)
    want_q = apply_rotary(q.reshape(B, T, H, hd).transpose(1, 2), cos, sin)
    want_k = apply_rotary(k.reshape(B, T, 2, hd).transpose(1, 2), cos, sin)
    with torch.inference_mode():
        assert kernels.rotary_([q, k], cos, sin, hd)
    assert torch.equal(q.view(B, T, H, hd).transpose(1, 2), want_q)
    assert torch.equal(k.view(B, T, 2, hd).transpose(1, 2), want_k)


def test_rotary_is_all_or_nothing():
    hd = 8
    q = torch.randn(2, 3, 2 * hd)
    k = torch.randn(3, 2, 2 * hd).transpose(0, 1)  # (2, 3, 16) that no (6, 16) view can cover
    before_q, before_k = q.clone(), k.clone()
    cos, sin = torch.randn(2, 3, hd), torch.randn(2, 3, hd)
    with torch.inference_mode():
        assert not kernels.rotary_([q, k], cos, sin, hd)
    assert torch.equal(q, before_q) and torch.equal(k, before_k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [32, 128])
def test_cpp_dequantization_equals_the_torch_path_exactly(dtype, group):
    """Prefill's one-pass C++ dequantization (interleaved layout -> canonical float rows) gives bit-identical
    weights to the pure-torch path, for whole weights and block-aligned row ranges."""
    from torch import nn

    from pocketllama.quant import Int4Linear, Int8Linear

    torch.manual_seed(0)
    lin = nn.Linear(256, 96).to(dtype)
    m4, m8 = Int4Linear.from_float(lin, group), Int8Linear.from_float(lin, group)
    assert m4.layout == m8.layout == "interleaved"
    ext = kernels.extension()
    want4 = kernels._deq_int4(kernels.deinterleave(m4.weight, "int4"), m4.scales, m4.zeros, dtype)
    want8 = kernels._deq_int8(kernels.deinterleave(m8.weight, "int8"), m8.scales, dtype)
    for r0, r1 in [(0, 96), (8, 40)]:
        out4, out8 = torch.empty(r1 - r0, 256, dtype=dtype), torch.empty(r1 - r0, 256, dtype=dtype)
        ext.int4_dequant(m4.weight, m4.scales, m4.zeros, r0, r1, out4)
        ext.int8_dequant(m8.weight, m8.scales, r0, r1, out8)
        assert torch.equal(out4, want4[r0:r1]) and torch.equal(out8, want8[r0:r1])
    x = torch.randn(20, 256).to(dtype)  # > SMALL_M rows: the prefill path through these kernels
    with torch.inference_mode():
        tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-2}  # bf16 outputs: blocking + rounding
        torch.testing.assert_close(m4(x), torch.nn.functional.linear(x, want4, m4.bias), **tol)


def _reference_attention(q, k, v, cache_k, cache_v, rows, positions, hd):
    """The eager ops: index_put into the cache, then HF's eager attention with a causal-by-position mask."""
    B, T, _ = q.shape
    KV, S = cache_k.shape[1], cache_k.shape[2]
    H = q.shape[-1] // hd
    cache_k[rows[:, None], :, positions] = k.view(B, T, KV, hd)
    cache_v[rows[:, None], :, positions] = v.view(B, T, KV, hd)
    Q = q.reshape(B, T, H, hd).transpose(1, 2)
    K, V = cache_k[rows].repeat_interleave(H // KV, 1), cache_v[rows].repeat_interleave(H // KV, 1)
    scores = (Q @ K.transpose(-1, -2)) * hd**-0.5
    allowed = torch.arange(S)[None, None, None, :] <= positions[:, None, :, None]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1, dtype=torch.float32).to(q.dtype)
    return (probs @ V).transpose(1, 2).reshape(B, T, H * hd)


@pytest.mark.parametrize("hd", [64, 128, 32])  # the kernel's two fixed head sizes and its general path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_attention_writes_the_cache_and_matches_eager_attention(dtype, hd):
    g = torch.Generator().manual_seed(2)
    B, T, H, KV, S = 2, 3, 8, 2, 80
    fused = torch.randn(B, T, (H + 2 * KV) * hd, generator=g).to(dtype)  # q | k | v as views of one output
    q, k, v = fused.split([H * hd, KV * hd, KV * hd], dim=-1)
    cache_k, cache_v = torch.randn(3, KV, S, hd, generator=g).to(dtype), torch.randn(3, KV, S, hd, generator=g).to(dtype)
    ref_k, ref_v = cache_k.clone(), cache_v.clone()
    # later queries see earlier ones; 6-8 keys take the one-key tail, 66-68 four 16-key blocks and the tail
    rows, positions = torch.tensor([2, 0]), torch.tensor([[5, 6, 7], [65, 66, 67]])
    with torch.inference_mode():
        out = kernels.decode_attention(q, k, v, cache_k, cache_v, rows, positions, hd)
    want = _reference_attention(q, k, v, ref_k, ref_v, rows, positions, hd)
    assert torch.equal(cache_k, ref_k) and torch.equal(cache_v, ref_v)  # same slots written, others untouched
    assert out.shape == (B, T, H * hd) and out.dtype == dtype
    torch.testing.assert_close(out, want, rtol=1e-5 if dtype == torch.float32 else 1e-2,
                               atol=1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("hd", [64, 128, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_never_reads_slots_past_the_query(dtype, hd):
    """Slots after a query's position may hold anything (here NaN): an odd number of keys (the bf16 kernel
    pairs keys) and a partial 16-key block must not let them in."""
    g = torch.Generator().manual_seed(3)
    H, KV, S = 4, 2, 64
    cache_k = torch.full((1, KV, S, hd), float("nan")).to(dtype)
    cache_v = cache_k.clone()
    for n in (1, 17, 19):  # keys 0..n-1 written one step at a time (positions 0, 1, ...)
        ref_k, ref_v = cache_k.nan_to_num(0.0), cache_v.nan_to_num(0.0)  # the reference masks them, times 0
        ref_k[:, :, :n - 1] = cache_k[:, :, :n - 1] = torch.randn(1, KV, n - 1, hd, generator=g).to(dtype)
        ref_v[:, :, :n - 1] = cache_v[:, :, :n - 1] = torch.randn(1, KV, n - 1, hd, generator=g).to(dtype)
        q, k, v = (torch.randn(1, 1, w * hd, generator=g).to(dtype) for w in (H, KV, KV))
        rows, positions = torch.tensor([0]), torch.tensor([[n - 1]])
        with torch.inference_mode():
            out = kernels.decode_attention(q, k, v, cache_k, cache_v, rows, positions, hd)
        assert not out.isnan().any()
        want = _reference_attention(q, k, v, ref_k, ref_v, rows, positions, hd)
        torch.testing.assert_close(out, want, rtol=1e-5 if dtype == torch.float32 else 1e-2,
                                   atol=1e-6 if dtype == torch.float32 else 1e-2)


def test_decode_attention_refuses_a_position_outside_the_cache():
    hd = 16
    q, k, v = torch.randn(1, 1, 2 * hd), torch.randn(1, 1, hd), torch.randn(1, 1, hd)
    cache = torch.zeros(1, 1, 8, hd)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="position 8 is outside the KV cache"):
        kernels.decode_attention(q, k, v, cache, cache.clone(), torch.tensor([0]), torch.tensor([[8]]), hd)
    assert kernels.decode_attention(q[..., :24], k[..., :12], v[..., :12], cache[..., :12].contiguous(),
                                    cache[..., :12].contiguous(), torch.tensor([0]), torch.tensor([[1]]), 12) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_decode_is_the_same_with_and_without_the_attention_kernel(dtype, monkeypatch):
    from pocketllama.config import TextConfig
    from pocketllama.models.llama import LlamaForCausalLM

    cfg = TextConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    ids = torch.randint(0, 64, (2, 9))

    def decode() -> torch.Tensor:
        cache = model.make_cache(2, 32)
        with torch.inference_mode():
            model(ids[:, :6], cache=cache)
            steps = [model(ids[:, 6:8], positions=torch.tensor([[6, 7], [6, 7]]), cache=cache),  # verification
                     model(ids[:, 8:], positions=torch.tensor([[8], [8]]), cache=cache)]
        return torch.cat(steps, dim=1)

    fast = decode()
    monkeypatch.setattr(kernels, "decode_attention", lambda *a, **k: None)
    torch.testing.assert_close(fast, decode(), rtol=1e-5 if dtype == torch.float32 else 2e-2,
                               atol=1e-5 if dtype == torch.float32 else 2e-2)

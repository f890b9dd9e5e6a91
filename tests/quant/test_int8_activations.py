"""int8 activations x int4 weights (csrc/int4_groups.cpp via quant.kernels.int4_mm and set_int8_activations)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pocketllama.quant import Int4Linear, kernels
from pocketllama.quant.modules import Int8Linear, set_int8_activations
from pocketllama.quant.primitives import pack_int4

pytestmark = pytest.mark.skipif(not kernels.has_int8_activations(),
                                reason="needs pocketllama's C++ kernels on a CPU with AVX-512 VNNI")


def _algorithm(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, gs: int) -> torch.Tensor:
    """The kernel's arithmetic in torch: x quantized to int8 per 32 values (scale max|x| / 127, round half to
    even), times (q - 8) * s per group, plus z times the exact group sums of x."""
    M, K = x.shape
    N, G = q.shape[0], K // gs
    xb = x.float().view(M, K // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    xq = torch.where(amax > 0, torch.round(xb * (127 / amax)), torch.zeros_like(xb)) * (amax / 127)
    w8 = ((q.float() - 8).view(N, G, gs) * s.float()[..., None]).view(N, K)
    return xq.view(M, K) @ w8.T + x.float().view(M, G, gs).sum(-1) @ z.float().T


def _exact(x, q, s, z, gs):
    N, K = q.shape
    w = ((q.float().view(N, -1, gs) - 8) * s.float()[..., None] + z.float()[..., None]).view(N, K)
    return x.float() @ w.T


@pytest.mark.parametrize("n,k,gs", [(64, 576, 32), (96, 1536, 64), (32, 2048, 128), (16, 512, 256), (16, 960, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_computes_the_q8_activation_algorithm(n, k, gs, dtype):
    g = torch.Generator().manual_seed(n + k)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    s = (torch.rand(n, k // gs, generator=g) * 0.02 + 1e-3).to(dtype)
    z = (torch.randn(n, k // gs, generator=g) * 0.01).to(dtype)
    x = torch.randn(3, k, generator=g).to(dtype)
    y = kernels.int4_mm(x, kernels.interleave_groups(pack_int4(q)), s, z, layout="groups")
    assert y.shape == (3, n) and y.dtype == dtype
    want = _algorithm(x, q, s, z, gs)
    scale = want.abs().max()
    # fp32: summation order only; bf16: the output's rounding
    assert (y.float() - want).abs().max() <= (1e-5 if dtype == torch.float32 else 8e-3) * scale
    assert (y.float() - _exact(x, q, s, z, gs)).abs().max() <= 0.02 * scale  # what the quantized x costs


def test_each_row_is_computed_as_if_alone():
    """Verification batches (speculative decoding) must see exactly what one-row decode computes."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (64, 1024), dtype=torch.uint8, generator=g)
    w = kernels.interleave_groups(pack_int4(q))
    s, z = torch.rand(64, 32, generator=g).bfloat16() * 0.01, torch.randn(64, 32, generator=g).bfloat16() * 0.01
    x = torch.randn(5, 1024, generator=g).bfloat16()
    batch = kernels.int4_mm(x, w, s, z, layout="groups")
    for i in range(5):
        assert torch.equal(kernels.int4_mm(x[i:i + 1], w, s, z, layout="groups")[0], batch[i])


@pytest.mark.parametrize("k", [512, 576, 960, 2048])
def test_groups_layout_round_trips_and_prefill_dequantizes_exactly(k):
    g = torch.Generator().manual_seed(k)
    q = torch.randint(0, 16, (16, k), dtype=torch.uint8, generator=g)
    w = pack_int4(q)
    grouped = kernels.interleave_groups(w)
    assert not torch.equal(grouped, w)
    assert torch.equal(kernels.deinterleave_groups(grouped), w)
    assert torch.equal(kernels.deinterleave_groups(grouped, 4, 12), w[4:12])
    ids = torch.tensor([[0, 5], [15, 6]])
    assert torch.equal(kernels.grouped_rows(grouped, ids), w[ids])  # table lookups
    s, z = torch.rand(16, k // 32, generator=g).bfloat16(), torch.randn(16, k // 32, generator=g).bfloat16()
    x = torch.randn(20, k, generator=g).bfloat16()  # prefill-sized: the exact weight-only path
    assert torch.equal(kernels.int4_mm(x, grouped, s, z, layout="groups"), kernels.int4_mm(x, w, s, z))


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(Int4Linear.from_float(nn.Linear(256, 128), 32), Int8Linear.from_float(nn.Linear(128, 64)))


def test_switch_changes_decode_rows_only_and_switches_back():
    model = _model()
    x1, prefill = torch.randn(1, 256), torch.randn(20, 256)
    with torch.inference_mode():
        exact1, exact_prefill = model(x1), model(prefill)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        assert set_int8_activations(model) == 1  # the one int4 module
        assert "activations=int8" in repr(model[0]) and model[0].layout == "groups"
        assert "activations" not in repr(model[1])  # the int8 linear has no such mode
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # checkpoint layout unchanged
        fast1 = model(x1)
        assert not torch.equal(fast1, exact1)
        torch.testing.assert_close(fast1, exact1, rtol=0.05, atol=0.02 * exact1.abs().max().item())
        assert torch.equal(model(prefill), exact_prefill)  # prefill keeps the exact path
        assert set_int8_activations(model, False) == 1 and model[0].layout == "interleaved"
        assert torch.equal(model(x1), exact1)


def test_switch_refuses_a_model_without_int4_weights():
    with pytest.raises(ValueError, match="int8 activations apply to int4 weights"):
        set_int8_activations(nn.Sequential(nn.Linear(4, 4)))


def test_fused_projections_follow_the_switch(tmp_path):
    from pocketllama.config import TextConfig
    from pocketllama.models.llama import LlamaForCausalLM
    from pocketllama.quant.handler import quantize_model

    cfg = TextConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    model = quantize_model(LlamaForCausalLM(cfg).eval(), "int4-g32")
    ids = torch.randint(0, 64, (1, 8))

    def step() -> torch.Tensor:
        cache = model.make_cache(1, 16)
        with torch.inference_mode():
            model(ids[:, :7], cache=cache)
            return model(ids[:, 7:], positions=torch.tensor([[7]]), cache=cache)

    exact = step()  # builds the q/k/v and gate/up fusions in the exact mode
    set_int8_activations(model)
    fast = step()
    assert not torch.equal(fast, exact)  # the fusions were rebuilt in the new mode
    torch.testing.assert_close(fast, exact, rtol=0.05, atol=0.05 * exact.abs().max().item())
    set_int8_activations(model, False)
    assert torch.equal(step(), exact)


def test_load_switches_a_real_int4_model_which_still_answers():
    """SmolLM2's Q4_1 GGUF loads as int4; with int8 activations the real model still answers correctly."""
    from conftest import smollm2_gguf_path

    import pocketllama

    llm = pocketllama.load(smollm2_gguf_path(), int8_activations=True)
    modes = {m.activations for m in llm.model.modules() if isinstance(m, Int4Linear)}
    assert modes == {"int8"}
    answer = llm.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=12, temperature=0)
    assert "Paris" in answer["content"]
    with pytest.raises(ValueError, match="int8 activations apply to int4 weights"):
        pocketllama.load(smollm2_gguf_path(), quantize=False, int8_activations=True)


def test_load_model_stores_int4_linears_in_the_groups_layout_directly(tiny_llama_dir):
    from pocketllama.llm import load_model

    path, _ = tiny_llama_dir
    exact, _ = load_model(path, quantize="int4-g32")
    fast, _ = load_model(path, quantize="int4-g32", int8_activations=True)
    layouts = {m.layout for m in fast.modules() if isinstance(m, Int4Linear) and m.in_features % 64 == 0}
    assert layouts == {"groups"}
    assert all(torch.equal(v, exact.state_dict()[k]) for k, v in fast.state_dict().items())  # same weights
    ids = torch.arange(1, 13)[None]  # 12 rows: more than SMALL_M, the prefill path
    with torch.inference_mode():  # prefill rows: the exact path in both layouts
        assert torch.equal(fast(ids), exact(ids))

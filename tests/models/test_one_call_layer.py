"""Decoder layers as one C++ call for decode-sized steps (models/llama.py `_DecodePlan`, csrc/decode_layer.cpp),
and the whole trunk as one call when every layer allows it (`_TrunkPlan`, `decode_layers`): the same bits as the
module-by-module path for every projection kind, and a plan that follows the modules (rebuilt when weights
change, skipped for LoRA wrappers, layer hooks and prefill-sized steps)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from pocketllama.finetune.lora import apply_lora, unwrap_lora
from pocketllama.llm import load_model
from pocketllama.models import llama
from pocketllama.quant import kernels, quantize_model
from pocketllama.quant.modules import set_int8_activations
from tests.conftest import save_tiny_llama

pytestmark = pytest.mark.skipif(
    kernels.extension() is None or not hasattr(kernels.extension(), "decode_layer"),
    reason="needs pocketllama's C++ CPU kernels (AVX-512)")


@pytest.fixture(scope="module")
def wide_llama_dir(tmp_path_factory):
    """Widths the C++ quantized kernels take (K a multiple of 64), GQA, head_dim 32."""
    path = tmp_path_factory.mktemp("wide_llama")
    save_tiny_llama(path, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    return path


class _Counter:
    """Counts the layers the C++ ops run (`calls`) and the whole-trunk calls (`trunks`) while delegating every op
    to the real extension."""

    def __init__(self, ext) -> None:
        self.ext, self.calls, self.trunks = ext, 0, 0

    def __getattr__(self, name):
        op = getattr(self.ext, name)
        if name not in ("decode_layer", "decode_layers"):
            return op

        def counted(*args):
            if name == "decode_layers":
                self.trunks += 1
                self.calls += len(args[3])  # one K cache per layer
            else:
                self.calls += 1
            return op(*args)
        return counted


@pytest.fixture
def counted(monkeypatch):
    counter = _Counter(kernels.extension())
    monkeypatch.setattr(kernels, "extension", lambda: counter)
    return counter


@contextlib.contextmanager
def _layers(one_call: bool):
    """Decode with the C++ layer (True) or module by module (False), restoring the default afterwards."""
    llama.ONE_CALL_LAYERS = one_call
    try:
        yield
    finally:
        llama.ONE_CALL_LAYERS = True


def _steps(model, one_call: bool, rows: int = 2, widths=(1, 2, 1, 3)) -> list[torch.Tensor]:
    """Prefill 9 tokens per row, then decode steps of `widths` tokens; logits of every step."""
    with _layers(one_call), torch.inference_mode():
        cache = model.make_cache(rows, 64)
        g = torch.Generator().manual_seed(0)
        out, pos = [], 9
        model(torch.randint(0, 320, (rows, 9), generator=g), cache=cache)
        for w in widths:
            ids = torch.randint(0, 320, (rows, w), generator=g)
            out.append(model(ids, torch.arange(pos, pos + w).expand(rows, -1).contiguous(), cache))
            pos += w
        return out


def _assert_same(model) -> None:
    one, modules = _steps(model, True), _steps(model, False)
    for a, b in zip(one, modules, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_float_layers_give_the_same_bits(wide_llama_dir, dtype, counted):
    model, _ = load_model(wide_llama_dir, dtype=dtype)
    _assert_same(model)
    assert counted.calls == 4 * 2  # 4 decode steps x 2 layers; prefill and the module path make none
    assert counted.trunks == 4  # each step: both layers in one call


def test_a_layer_hook_keeps_the_layers_apart_and_fires(wide_llama_dir, counted):
    model, _ = load_model(wide_llama_dir, dtype="bfloat16")
    seen = []
    handle = model.model.layers[1].register_forward_hook(lambda m, args, out: seen.append(out.shape))
    _assert_same(model)
    assert counted.trunks == 0 and counted.calls == 8  # still one call per layer
    assert len(seen) == 2 * (1 + 4)  # both paths: prefill + 4 steps
    handle.remove()
    _steps(model, True)
    assert counted.trunks == 4


@pytest.mark.parametrize("recipe,a8", [("int8", False), ("int4-g32", False), ("int4-g32", True),
                                       ("int4-g32-sym", False), ("int4-g32-e4g128-sym", True)])
def test_quantized_layers_give_the_same_bits(wide_llama_dir, recipe, a8, counted):
    model, _ = load_model(wide_llama_dir, dtype="bfloat16", quantize=recipe, int8_activations=a8)
    assert model.model.layers[0].self_attn.q_proj.layout == ("groups" if a8 else "interleaved")
    _assert_same(model)
    assert counted.calls == 8


def test_batched_rows_of_a_larger_cache(wide_llama_dir):
    """cache_rows: a step over some of the cache's sequences (continuous batching) takes the C++ layer too."""
    model, _ = load_model(wide_llama_dir, dtype="float32")
    outs = []
    for flag in (True, False):
        with _layers(flag), torch.inference_mode():
            cache = model.make_cache(3, 32)
            model(torch.arange(30).view(3, 10) + 5, cache=cache)
            rows = torch.tensor([2, 0])
            outs.append(model(torch.tensor([[7], [8]]), torch.tensor([[10], [10]]), cache, cache_rows=rows))
            outs.append(cache.keys[1][:, :, :11].clone())
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])


def test_prefill_and_autograd_steps_stay_module_by_module(wide_llama_dir, counted):
    model, _ = load_model(wide_llama_dir, dtype="float32")
    cache = model.make_cache(1, 64)
    with torch.inference_mode():
        model(torch.arange(20)[None], cache=cache)  # 20 tokens: more than SMALL_QUERY
        model(torch.arange(9)[None] + 20, torch.arange(20, 29)[None], cache)  # 9 rows > SMALL_M
    cache = model.make_cache(1, 64)
    model(torch.tensor([[3]]), torch.tensor([[0]]), cache)  # autograd on
    assert counted.calls == 0


def test_the_plan_follows_replaced_weights_and_lora(wide_llama_dir, counted):
    model, _ = load_model(wide_llama_dir, dtype="float32")
    before = _steps(model, True)
    with torch.no_grad():
        v = model.model.layers[1].self_attn.v_proj
        v.weight.data = torch.randn_like(v.weight) * 0.1  # a new tensor: plan and fusion are stale
    changed = _steps(model, True)
    assert not torch.equal(changed[0], before[0])
    assert all(torch.equal(a, b) for a, b in zip(changed, _steps(model, False), strict=True))

    apply_lora(model, ["o_proj"], r=2, alpha=4)
    for m in model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B.weight)
    calls = counted.calls
    lora = _steps(model, True)
    assert counted.calls == calls  # LoRA wrappers: module by module
    assert not torch.equal(lora[0], changed[0])

    unwrap_lora(model)
    assert all(torch.equal(a, b) for a, b in zip(_steps(model, True), changed, strict=True))
    assert counted.calls > calls


def test_switching_int8_activations_rebuilds_the_plan(wide_llama_dir):
    model, _ = load_model(wide_llama_dir, dtype="bfloat16", quantize="int4-g32")
    exact = _steps(model, True)
    assert model.model.layers[0].__dict__["_decode_plan"].kinds == [2, 2, 2, 2]
    set_int8_activations(model, True)
    approx = _steps(model, True)
    assert model.model.layers[0].__dict__["_decode_plan"].kinds == [3, 3, 3, 3]
    assert all(torch.equal(a, b) for a, b in zip(approx, _steps(model, False), strict=True))
    assert not torch.equal(approx[0], exact[0])


def test_quantize_after_load_runs_the_new_modules(wide_llama_dir):
    model, _ = load_model(wide_llama_dir, dtype="bfloat16")
    _steps(model, True)
    quantize_model(model, "int8")
    assert model.model.layers[0].mlp.down_proj.layout == "interleaved"
    _assert_same(model)
    assert model.model.layers[0].__dict__["_decode_plan"].kinds == [1, 1, 1, 1]

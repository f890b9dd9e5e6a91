"""finetune/lora.py: LoRA wrappers (zero-init changes nothing, merged equals unmerged), targets by name,
QLoRA gradients through frozen int4 / int8 layers, gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pocketllama.finetune.lora import (
    LoRALinear,
    apply_lora,
    full_finetune_params,
    lora_modules,
    merge_lora,
    target_names,
    unwrap_lora,
)
from pocketllama.llm import load_model

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 8, 61], [7, 7, 120, 33, 2, 18, 90, 4]])


@pytest.fixture
def model(tiny_llama_dir):
    return load_model(tiny_llama_dir[0], dtype="float32")[0]


def randomize(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.2)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.2)


def test_zero_init_lora_leaves_logits_unchanged(model):
    with torch.no_grad():
        before = model(IDS)
    names = apply_lora(model, "all-linear", r=4, alpha=8)
    assert len(names) == 2 * 7  # 2 layers x q k v o gate up down; not the output projection
    assert all(m.lora_A.weight.abs().sum() > 0 for m in lora_modules(model).values())  # A random, B zero
    with torch.no_grad():
        after = model(IDS)
    assert torch.equal(before, after)


def test_merged_equals_unmerged(model):
    with torch.no_grad():
        base = model(IDS)
    apply_lora(model, ["q_proj", "v_proj", "down_proj"], r=4, alpha=16)
    randomize(model)
    with torch.no_grad():
        adapted = model(IDS)
        assert (adapted - base).abs().max() > 1e-2  # the adapter matters
        merge_lora(model)
        merged = model(IDS)
    assert not lora_modules(model)
    assert set(model.state_dict()) == set(load_model_keys(model))
    torch.testing.assert_close(merged, adapted, atol=2e-5, rtol=1e-5)


def load_model_keys(model: nn.Module) -> list[str]:
    return [k for k in model.state_dict() if "lora" not in k and "base_layer" not in k]


def test_lora_math_and_names():
    base = nn.Linear(6, 5)
    m = LoRALinear.from_base(base, r=2, alpha=6, dropout=0.0)
    nn.init.normal_(m.lora_B.weight)
    x = torch.randn(3, 6)
    want = x @ (base.weight + 3.0 * m.lora_B.weight @ m.lora_A.weight).T + base.bias
    torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)
    assert sorted(k for k in m.state_dict()) == ["base_layer.bias", "base_layer.weight", "lora_A.weight",
                                                  "lora_B.weight"]
    assert not base.weight.requires_grad and m.lora_A.weight.requires_grad
    rs = LoRALinear.from_base(nn.Linear(6, 5), r=4, alpha=8, use_rslora=True)
    assert rs.scaling == 4.0  # alpha / sqrt(r)


@pytest.mark.parametrize("call, message", [
    (lambda: LoRALinear.from_base(nn.Embedding(4, 4), 2, 4), "LoRA wraps linear layers; got a Embedding"),
    (lambda: LoRALinear.from_base(nn.Linear(4, 4), 0, 4), "LoRA rank r must be >= 1, got 0"),
    (lambda: LoRALinear.from_base(nn.Linear(4, 4), 2, 4, dropout=1.0), "LoRA dropout must be in \\[0, 1\\)"),
])
def test_wrapper_errors(call, message):
    with pytest.raises((TypeError, ValueError), match=message):
        call()


def test_targets_by_name_regex_and_layers(model):
    assert target_names(model, ["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert target_names(model, r"model\.layers\.1\.mlp\.(up|down)_proj") == ["model.layers.1.mlp.up_proj",
                                                                            "model.layers.1.mlp.down_proj"]
    assert target_names(model, "k_proj") == target_names(model, ["k_proj"])  # a plain name, as on the CLI
    assert target_names(model, "q_proj,o_proj", layers=[1]) == ["model.layers.1.self_attn.q_proj",
                                                               "model.layers.1.self_attn.o_proj"]
    with pytest.raises(ValueError, match="LoRA targets \\['qkv'\\] match no linear layer of the model; its linear "
                                         "layers are named down_proj, gate_proj, k_proj, o_proj, q_proj"):
        target_names(model, ["qkv"])


def test_unwrap_restores_the_plain_model(model):
    with torch.no_grad():
        base = model(IDS)
    apply_lora(model, "all-linear", r=2, alpha=2)
    randomize(model)
    unwrap_lora(model)
    with torch.no_grad():
        assert torch.equal(model(IDS), base)


@pytest.mark.parametrize("recipe", ["int4-g32", "int8", "int4-g32-e4"])
def test_qlora_gradients_match_the_dequantized_float_model(model, recipe):
    """The quantized kernels have no backward; `_FrozenQuantMatmul` gives each frozen quantized layer the
    input gradient of its dequantized weight, so the adapters of layer 0 learn through layer 1 and the
    (int8 or int4, tied) output table exactly as in a float model holding the dequantized weights."""
    import copy

    from pocketllama.quant import quantize_model
    from pocketllama.quant.modules import QUANT_EMBEDDINGS, Int4Linear, Int8Linear

    quantized = quantize_model(model, recipe)
    floating = copy.deepcopy(quantized)
    for name, m in list(floating.named_modules()):  # the same (dequantized) weights as float modules
        if isinstance(m, (Int4Linear, Int8Linear)):
            lin = nn.Linear(m.in_features, m.out_features, bias=False)
            lin.weight.data = m.dequantize(torch.float32)
            parent, _, attr = name.rpartition(".")
            setattr(floating.get_submodule(parent), attr, lin)
        elif isinstance(m, QUANT_EMBEDDINGS):
            floating.model.embed_tokens = _float_embedding(m.dequantize(torch.float32))
    grads = []
    for net in (quantized, floating):
        torch.manual_seed(0)
        apply_lora(net, ["q_proj", "v_proj"], r=4, alpha=8, layers=[0])
        randomize(net)
        loss = net(IDS).float().logsumexp(-1).mean()
        loss.backward()
        grads.append({n: m.lora_A.weight.grad.clone() for n, m in lora_modules(net).items()})
    table = quantized.model.embed_tokens  # the tied table (int4 in int4-g32-e4): attend() too
    assert type(table).__name__ == ("Int4Embedding" if recipe.endswith("-e4") else "Int8Embedding")
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-4, rtol=1e-3)


def _float_embedding(table: torch.Tensor) -> nn.Module:
    from pocketllama.models.llama import Embedding

    emb = Embedding(*table.shape)
    emb.weight.data = table
    emb.weight.requires_grad_(False)
    return emb


def test_full_finetuning_refuses_quantized_layers(model):
    from pocketllama.quant import quantize_model

    assert full_finetune_params(model) == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="full fine-tuning needs floating-point weights"):
        full_finetune_params(quantize_model(model, "int8"))


def test_merging_into_quantized_weights_is_refused(model):
    from pocketllama.quant import quantize_model

    quantize_model(model, "int4-g32")
    apply_lora(model, ["q_proj"], r=2, alpha=2)
    with pytest.raises(ValueError, match="cannot merge a LoRA adapter into quantized weights without losing it"):
        merge_lora(model)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_llama_dir):
    from pocketllama.finetune.trainer import enable_gradient_checkpointing

    grads = []
    for checkpointed in (False, True):
        model = load_model(tiny_llama_dir[0], dtype="float32")[0]
        torch.manual_seed(0)
        apply_lora(model, "all-linear", r=4, alpha=8)
        randomize(model)
        if checkpointed:
            assert enable_gradient_checkpointing(model) == 2
        model(IDS).float().logsumexp(-1).mean().backward()
        grads.append([m.lora_A.weight.grad for m in lora_modules(model).values()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("packed", [True, False])
def test_input_gradient_of_a_bfloat16_int4_layer(packed, monkeypatch):
    """bf16 int4 weights live in PyTorch's packed int4 layout (when the C++ GEMV extension is not used) or the
    canonical one; either way the backward must give x's gradient through the dequantized weight."""
    from pocketllama.finetune.lora import enable_quantized_input_grads
    from pocketllama.quant import kernels
    from pocketllama.quant.modules import Int4Linear

    if packed:
        monkeypatch.setattr(kernels, "extension", lambda: None)
    torch.manual_seed(0)
    lin = Int4Linear.from_float(nn.Linear(64, 96, bias=False).to(torch.bfloat16), group_size=32)
    if packed and kernels.has_native_int4():
        assert lin.layout == "native"
    holder = nn.Sequential(lin)
    enable_quantized_input_grads(holder)
    x = torch.randn(5, 64, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(5, 96, dtype=torch.bfloat16)
    holder(x).backward(g)
    want = g.float() @ lin.dequantize(torch.float32)
    torch.testing.assert_close(x.grad.float(), want, atol=0.05, rtol=0.02)
    with torch.no_grad():  # the forward is the kernel's own
        torch.testing.assert_close(holder(x), Int4Linear.forward(lin, x))

"""Inference-time q/k/v and gate/up fusion (models/fused.py): same logits, no extra memory, HF names kept,
rebuilt or skipped whenever the projections change."""

from __future__ import annotations

import torch

from pocketllama.finetune.lora import apply_lora
from pocketllama.llm import load_model
from pocketllama.models.fused import FusedProjection
from pocketllama.quant import quantize_model

IDS = torch.tensor([[1, 17, 42, 99, 5, 250, 3]])


def _logits(model, grad: bool) -> torch.Tensor:
    with torch.set_grad_enabled(grad):
        return model(IDS).detach()


def test_fused_inference_equals_unfused_and_keeps_parameters_as_views(tiny_llama_dir):
    model, _ = load_model(tiny_llama_dir[0], dtype="float32")
    names = [n for n, _ in model.named_parameters()]
    unfused = _logits(model, grad=True)  # autograd on: module by module
    fused = _logits(model, grad=False)
    attn = model.model.layers[0].self_attn
    fusion = attn.__dict__["_fused_qkv"]
    assert isinstance(fusion, FusedProjection) and isinstance(model.model.layers[1].mlp.__dict__["_fused_gate_up"],
                                                              FusedProjection)
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
    whole = fusion.fused.weight
    assert attn.k_proj.weight.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
    assert [n for n, _ in model.named_parameters()] == names  # the fusion is not a submodule
    assert set(model.state_dict()) == {n for n in names}


def test_replaced_weights_rebuild_the_fusion(tiny_llama_dir):
    model, _ = load_model(tiny_llama_dir[0], dtype="float32")
    _logits(model, grad=False)
    with torch.no_grad():
        v = model.model.layers[0].self_attn.v_proj
        v.weight.data = torch.randn_like(v.weight)  # a new tensor: the old fusion is stale
    torch.testing.assert_close(_logits(model, grad=False), _logits(model, grad=True), rtol=1e-5, atol=1e-5)


def test_lora_wrappers_are_not_fused_and_their_update_counts(tiny_llama_dir):
    model, _ = load_model(tiny_llama_dir[0], dtype="float32")
    before = _logits(model, grad=False)
    apply_lora(model, ["q_proj", "up_proj"], r=2, alpha=4)
    for m in model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B.weight)
    after = _logits(model, grad=False)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, _logits(model, grad=True), rtol=1e-5, atol=1e-5)


def test_quantized_projections_fuse_with_identical_logits(tiny_llama_dir):
    model, _ = load_model(tiny_llama_dir[0], dtype="float32")
    quantize_model(model, "int4-g32")
    unfused = _logits(model, grad=True)
    fused = _logits(model, grad=False)
    assert isinstance(model.model.layers[0].self_attn.__dict__["_fused_qkv"], FusedProjection)
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
    assert all(k.endswith(("weight", "scales", "zeros")) for k in model.state_dict() if "q_proj" in k)

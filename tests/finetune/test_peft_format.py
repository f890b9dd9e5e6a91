"""finetune/peft_format.py: adapters we save load in peft + transformers with equal logits, adapters PEFT saves
load into pocketllama with equal logits, and the error paths of reading an adapter folder."""

from __future__ import annotations

import json

import peft  # dev extra: the reference implementation of the adapter format
import pytest
import torch
from test_lora import IDS, randomize

from pocketllama.finetune.lora import apply_lora, lora_modules
from pocketllama.finetune.peft_format import load_adapter, read_adapter, save_adapter
from pocketllama.llm import load_model


def hf_model(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_our_adapter_loads_in_peft(tiny_llama_dir, tmp_path):
    path = tiny_llama_dir[0]
    model = load_model(path, dtype="float32")[0]
    apply_lora(model, ["q_proj", "v_proj", "gate_proj", "down_proj"], r=4, alpha=16)
    randomize(model)
    save_adapter(model, tmp_path / "adapter", base_model=str(path))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "gate_proj", "q_proj", "v_proj"]
    assert config["r"] == 4 and config["lora_alpha"] == 16 and config["peft_type"] == "LORA"
    _, tensors = read_adapter(tmp_path / "adapter")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    with torch.no_grad():
        ours = model(IDS)
    ref = peft.PeftModel.from_pretrained(hf_model(path), tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = ref(IDS).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # and the adapter really changes the model
        assert (hf_model(path)(IDS).logits - theirs).abs().max() > 1e-2


def test_peft_adapter_loads_into_pocketllama(tiny_llama_dir, tmp_path):
    path = tiny_llama_dir[0]
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj", "up_proj"],
                             init_lora_weights=False, rank_pattern={"up_proj": 2}, alpha_pattern={"o_proj": 3})
    ref = peft.get_peft_model(hf_model(path), config).eval()
    ref.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        theirs = ref(IDS).logits
    model = load_model(path, dtype="float32")[0]
    names = load_adapter(model, tmp_path / "peft")
    assert len(names) == 6
    modules = lora_modules(model)
    assert modules["model.layers.0.mlp.up_proj"].r == 2 and modules["model.layers.1.self_attn.o_proj"].alpha == 3
    with torch.no_grad():
        ours = model(IDS)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_only_some_layers_round_trip_as_a_regex(tiny_llama_dir, tmp_path):
    path = tiny_llama_dir[0]
    model = load_model(path, dtype="float32")[0]
    apply_lora(model, ["q_proj"], r=2, alpha=4, layers=[1])
    randomize(model)
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_modules"] == r"(model\.layers\.1\.self_attn\.q_proj)"
    with torch.no_grad():
        ours = model(IDS)
        theirs = peft.PeftModel.from_pretrained(hf_model(path), tmp_path / "a").eval()(IDS).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def _adapter(tmp_path, model, **config_changes):
    save_adapter(model, tmp_path / "x")
    cfg_path = tmp_path / "x" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(config_changes)
    cfg_path.write_text(json.dumps(cfg))
    return tmp_path / "x"


def test_adapter_errors(tiny_llama_dir, tmp_path):
    path = tiny_llama_dir[0]
    model = load_model(path, dtype="float32")[0]
    apply_lora(model, ["q_proj"], r=2, alpha=4)
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json; is it a PEFT LoRA adapter folder"):
        read_adapter(tmp_path)
    with pytest.raises(ValueError, match="use_dora=True is not supported by pocketllama's LoRA"):
        read_adapter(_adapter(tmp_path, model, use_dora=True))
    with pytest.raises(ValueError, match="peft_type 'IA3' is not supported"):
        read_adapter(_adapter(tmp_path, model, peft_type="IA3"))
    (tmp_path / "x" / "adapter_config.json").write_text("{")
    with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):
        read_adapter(tmp_path / "x")
    # an adapter for a deeper model: its layer 5 does not exist here
    from safetensors.torch import save_file

    folder = _adapter(tmp_path, model)
    save_file({"base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64),
               "base_model.model.model.layers.5.self_attn.q_proj.lora_B.weight": torch.zeros(64, 2)},
              str(folder / "adapter_model.safetensors"))
    fresh = load_model(path, dtype="float32")[0]
    with pytest.raises(ValueError, match="lacks, e.g. 'model.layers.5.self_attn.q_proj'; was it trained for another"):
        load_adapter(fresh, folder)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 48),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 2)},
              str(folder / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="q_proj.lora_A has shape \\(2, 48\\), the model needs \\(2, 64\\)"):
        load_adapter(load_model(path, dtype="float32")[0], folder)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)},
              str(folder / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="is not a LoRA A/B weight"):
        load_adapter(load_model(path, dtype="float32")[0], folder)
    with pytest.raises(ValueError, match="the model has no LoRA adapters to save"):
        save_adapter(load_model(path, dtype="float32")[0], tmp_path / "empty")

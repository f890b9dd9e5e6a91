"""TextConfig from HF config.json and Meta params.json; invalid values name the field."""

from __future__ import annotations

import pytest

from pocketllama.config import RopeScaling, TextConfig, ffn_hidden_dim, parse_dtype

LLAMA_32_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 128256,
    "some_future_key": {"ignored": True},
}


def test_from_hf_llama_32_1b():
    c = TextConfig.from_hf(LLAMA_32_1B)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (2048, 16, 32, 8)
    assert c.head_dim == 64 and c.num_kv_groups == 4 and c.tie_word_embeddings
    assert c.rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192)
    assert c.eos_token_ids == (128001, 128008, 128009) and c.bos_token_id == 128000
    assert c.torch_dtype == "bfloat16"
    again = TextConfig.from_hf(c.to_hf())
    assert again == c


def test_from_hf_transformers5_rope_parameters():
    d = {k: v for k, v in LLAMA_32_1B.items() if k not in ("rope_scaling", "rope_theta")}
    d["rope_parameters"] = {**LLAMA_32_1B["rope_scaling"], "rope_theta": 500000.0}
    d["eos_token_id"] = 128001
    c = TextConfig.from_hf(d)
    assert c.rope_theta == 500000.0 and c.rope_scaling.factor == 32.0 and c.eos_token_ids == (128001,)


def test_head_dim_defaults_to_hidden_over_heads():
    d = dict(LLAMA_32_1B)
    del d["head_dim"]
    assert TextConfig.from_hf(d).head_dim == 64


def test_from_meta_params_1b():
    params = {"dim": 2048, "ffn_dim_multiplier": 1.5, "multiple_of": 256, "n_heads": 32, "n_kv_heads": 8,
              "n_layers": 16, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
              "vocab_size": 128256}
    c = TextConfig.from_meta(params)
    assert c.intermediate_size == 8192 and c.head_dim == 64 and c.rope_scaling.factor == 32.0


def test_ffn_formula_matches_spec():
    assert ffn_hidden_dim(2048, 256, 1.5) == 8192
    assert ffn_hidden_dim(3072, 256, 1.0) == 8192
    assert ffn_hidden_dim(4096, 1024, 1.3) == 14336
    assert ffn_hidden_dim(8192, 4096, 1.3) == 28672


def test_meta_8b_uses_factor_8():
    params = {"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32, "n_kv_heads": 8,
              "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True}
    assert TextConfig.from_meta(params).rope_scaling.factor == 8.0


@pytest.mark.parametrize("field,value,message", [
    ("num_key_value_heads", 5, r"num_attention_heads \(32\) must be divisible by num_key_value_heads \(5\)"),
    ("hidden_size", 0, "config field hidden_size must be a positive integer"),
    ("vocab_size", "big", "config field vocab_size must be a positive integer"),
    ("rms_norm_eps", -1.0, "config field rms_norm_eps must be a positive number"),
    ("head_dim", 63, "config field head_dim must be even"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_type 'yarn' is not supported"),
    ("rope_scaling", {"rope_type": "llama3"}, "rope_scaling.factor is missing"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0},
     "high_freq_factor must be greater than low_freq_factor"),
    ("model_type", "mistral", "model_type 'mistral' is not supported"),
])
def test_invalid_config_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        TextConfig.from_hf({**LLAMA_32_1B, field: value})


def test_missing_required_fields():
    with pytest.raises(ValueError, match="missing required field.*hidden_size"):
        TextConfig.from_hf({"vocab_size": 10})
    with pytest.raises(ValueError, match="params.json is missing required field.*n_layers"):
        TextConfig.from_meta({"dim": 64, "n_heads": 4})


def test_parse_dtype():
    import torch

    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float32") is torch.float32
    assert parse_dtype(None) is None
    with pytest.raises(ValueError, match="dtype 'int8' is not supported; use one of float32, bfloat16, float16"):
        parse_dtype("int8")

"""VisionConfig / MllamaConfig from HF config.json (Llama 3.2 11B Vision values, SPEC 2.1); invalid values."""

from __future__ import annotations

import copy

import pytest

from pocketllama.config import MllamaConfig, VisionConfig
from pocketllama.models import config_from_hf

ROPE = {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0, "original_max_position_embeddings": 8192,
        "rope_type": "llama3"}
VISION_11B_INSTRUCT = {
    "architectures": ["MllamaForConditionalGeneration"], "image_token_index": 128256, "model_type": "mllama",
    "torch_dtype": "bfloat16",
    "text_config": {
        "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38], "dropout": 0, "eos_token_id": [128001, 128008, 128009],
        "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 131072,
        "model_type": "mllama_text_model", "num_attention_heads": 32, "num_hidden_layers": 40,
        "num_key_value_heads": 8, "pad_token_id": 128004, "rms_norm_eps": 1e-05, "rope_scaling": ROPE,
        "rope_theta": 500000.0, "tie_word_embeddings": False, "vocab_size": 128256, "bos_token_id": 128000,
    },
    "vision_config": {
        "attention_heads": 16, "hidden_act": "gelu", "hidden_size": 1280, "image_size": 560,
        "intermediate_layers_indices": [3, 7, 15, 23, 30], "intermediate_size": 5120, "max_num_tiles": 4,
        "model_type": "mllama_vision_model", "norm_eps": 1e-05, "num_channels": 3, "num_global_layers": 8,
        "num_hidden_layers": 32, "patch_size": 14,
        "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
        "vision_output_dim": 7680,
    },
}


def test_11b_vision_instruct():
    c = config_from_hf(VISION_11B_INSTRUCT)
    assert isinstance(c, MllamaConfig)
    assert c.vision.num_patches == 1601 and c.vision.padded_patches == 1608 and c.vision.head_dim == 80
    assert c.vision.max_aspect_ratio_id == 8 and c.vision.supported_aspect_ratios[5] == (2, 2)
    assert len(c.self_attention_layers) == 32 and 3 not in c.self_attention_layers
    assert c.text.head_dim == 128 and c.text.rope_scaling.factor == 8.0 and c.text.torch_dtype == "bfloat16"
    # the text trunk's fields read through, as from a text model's config
    assert c.max_position_embeddings == 131072 and c.eos_token_ids == (128001, 128008, 128009)
    assert c.num_key_value_heads == 8 and c.vocab_size == 128256 and c.tie_word_embeddings is False
    with pytest.raises(AttributeError, match="'MllamaConfig' object has no attribute 'nonsense'"):
        c.nonsense  # noqa: B018


def test_448_tiles_and_num_attention_heads_alias():
    d = copy.deepcopy(VISION_11B_INSTRUCT)
    d["vision_config"]["image_size"] = 448
    d["vision_config"]["num_attention_heads"] = d["vision_config"].pop("attention_heads")
    c = MllamaConfig.from_hf(d)
    assert c.vision.num_patches == 1025 and c.vision.padded_patches == 1032 and c.vision.attention_heads == 16


@pytest.mark.parametrize(
    "where, key, value, message",
    [
        ("vision_config", "hidden_size", 1000, r"hidden_size \(1000\) must be divisible by attention_heads"),
        ("vision_config", "image_size", 500, r"image_size \(500\) must be a multiple of patch_size \(14\)"),
        ("vision_config", "intermediate_layers_indices", [3, 40], r"intermediate_layers_indices \[40\] are outside"),
        ("vision_config", "vision_output_dim", 4096, "vision_output_dim must be hidden_size x .* = 7680, got 4096"),
        ("vision_config", "hidden_act", "relu", "hidden_act 'relu' is not supported"),
        ("vision_config", "patch_size", 0, "vision_config field patch_size must be a positive integer"),
        ("vision_config", "supported_aspect_ratios", [[1, 1], [3, 2]], "exceed max_num_tiles 4"),
        ("text_config", "cross_attention_layers", [3, 40], r"cross_attention_layers \[3, 40\] must be distinct"),
        ("text_config", "cross_attention_layers", [3, 3], r"cross_attention_layers \[3, 3\] must be distinct"),
        ("text_config", "tie_word_embeddings", True, "untied lm_head; tie_word_embeddings must be false"),
        ("text_config", "cross_attention_layers", None, "text_config is missing cross_attention_layers"),
        (None, "image_token_index", 128000, "image_token_index 128000 must be one of the 8 rows"),
        (None, "vision_config", None, "needs a vision_config object"),
        (None, "model_type", "llava", "model_type 'llava' is not 'mllama'"),
    ],
)
def test_invalid(where, key, value, message):
    d = copy.deepcopy(VISION_11B_INSTRUCT)
    target = d[where] if where else d
    if value is None:
        del target[key]
    else:
        target[key] = value
    with pytest.raises(ValueError, match=message):
        MllamaConfig.from_hf(d)


def test_vision_config_defaults_are_11b():
    assert VisionConfig() == MllamaConfig.from_hf(VISION_11B_INSTRUCT).vision

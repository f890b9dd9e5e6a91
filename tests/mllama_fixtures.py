"""Tiny random Llama 3.2 Vision checkpoints made with transformers, and the oracle's intermediate-layer fix."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from pocketllama.image_processing import CLIP_MEAN, CLIP_STD

IMAGE = 300  # image_token_index of the tiny models: the first of the 8 extra embedding rows
TILE = 28  # 2 x 2 patches of 14 + a class token = 5 tokens per tile, padded to 8


def tiny_mllama_config(vocab_size: int = 300, vision_overrides: dict | None = None, **text_overrides):
    from transformers import MllamaConfig

    text = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=96, cross_attention_layers=[1, 4],
                max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                                 "rope_theta": 500000.0})
    text.update(text_overrides)
    vision = dict(hidden_size=32, num_hidden_layers=5, num_global_layers=2, attention_heads=4, intermediate_size=64,
                  vision_output_dim=32 * 4, image_size=TILE, patch_size=14, intermediate_layers_indices=[1, 3, 4])
    vision.update(vision_overrides or {})
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=vocab_size)


def random_mllama(seed: int = 0, **overrides):
    """A random `MllamaForConditionalGeneration` whose gates, norms and tile tables all matter: HF initialises
    the cross-attention gates to 0 (the image would change nothing) and the embeddings to tiny values."""
    from transformers import MllamaForConditionalGeneration

    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(tiny_mllama_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:
                p.uniform_(-1.5, 1.5)
            elif "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif "embedding" in name or "norm" in name:
                p.normal_(0, 0.5)
            elif name.startswith("model.vision_model") or "projector" in name:
                p.normal_(0, 0.15)
    return model


def save_mllama(path: Path, seed: int = 0, **overrides):
    """Save a random tiny model (transformers writes the classic Hub names) plus its preprocessor config."""
    from transformers import MllamaImageProcessorPil

    model = random_mllama(seed, **overrides)
    model.save_pretrained(path)
    MllamaImageProcessorPil(size={"height": TILE, "width": TILE}, image_mean=list(CLIP_MEAN),
                            image_std=list(CLIP_STD), max_image_tiles=4).save_pretrained(path)
    return model


@contextlib.contextmanager
def released_intermediate_layers():
    """Make transformers 5.24 take the *input* of each intermediate vision layer, as Meta's reference and the
    transformers releases the Hub weights were converted and checked with (4.45-4.5x). 5.24 records each
    layer's output, one layer off; `test_transformers_5_24_intermediate_layers_are_one_off` pins that down."""
    from transformers.modeling_outputs import BaseModelOutput
    from transformers.models.mllama import modeling_mllama

    original = modeling_mllama.MllamaVisionEncoder.forward

    def forward(self, hidden_states, attention_mask=None):
        states = ()
        for layer in self.layers:
            states += (hidden_states,)
            hidden_states = layer(hidden_states=hidden_states, attention_mask=attention_mask)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=states + (hidden_states,))

    modeling_mllama.MllamaVisionEncoder.forward = forward
    try:
        yield
    finally:
        modeling_mllama.MllamaVisionEncoder.forward = original


def save_vision_checkpoint(path: Path, seed: int = 0):
    """A tiny random vision model with the real Llama 3 vocabulary (128256 + `<|image|>` = 128256), its
    tokenizer.model and preprocessor config: a complete folder for `pocketllama.load`, the CLI and the server."""
    import shutil

    from conftest import llama3_tokenizer_path

    model = save_mllama(path, seed, vocab_size=128256, hidden_size=32, intermediate_size=64, bos_token_id=128000,
                        eos_token_id=[128001, 128008, 128009], pad_token_id=128004)
    shutil.copy(llama3_tokenizer_path(), path / "tokenizer.model")
    return model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread, and far faster on a loaded machine (no thread wake-ups per op)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

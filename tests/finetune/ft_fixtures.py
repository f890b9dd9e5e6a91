"""Fine-tuning test helpers: a tiny Llama checkpoint with the real Llama 3 tokenizer, and small JSONL data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch


def save_tiny_llama3(path: Path, seed: int = 0, **overrides):
    """A random 2-layer transformers Llama with the Llama 3 vocabulary and tokenizer.model: a complete folder
    for `pocketllama.load` (hidden 32, so the 128256-row table stays small)."""
    from conftest import llama3_tokenizer_path, save_tiny_llama

    kw = dict(vocab_size=128256, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
              bos_token_id=128000, eos_token_id=[128001, 128008, 128009])
    kw.update(overrides)
    model = save_tiny_llama(path, seed, **kw)
    shutil.copy(llama3_tokenizer_path(), path / "tokenizer.model")
    return model


def write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def chat(question: str, answer: str, system: str | None = None) -> dict:
    head = [{"role": "system", "content": system}] if system else []
    return {"messages": head + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread, and far faster on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""A tiny HF Llama checkpoint with the real Llama 3 vocabulary (128256) and tokenizer.model whose next token
depends only on the current one (`chain[src] = next`): guard and tool-calling tests run the real load ->
prompt -> forward -> decode path with a known answer, in well under a second.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from conftest import LLAMA3_ROPE_32, llama3_tokenizer_path


def save_scripted_llama(path: Path, chain: dict[int, int], *, scale: float = 10.0, hidden: int = 16, seed: int = 0):
    """Save and return a `transformers.LlamaForCausalLM` in which token `src` is followed by `chain[src]` with
    logit `scale * sqrt(hidden)` (every other logit of a chain token is 0): attention and MLP outputs are
    zeroed, so the last hidden state is the normed embedding of the last token, a one-hot per chain source."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if len(chain) > hidden:
        raise ValueError(f"{len(chain)} chain entries need hidden >= {len(chain)}")
    config = LlamaConfig(vocab_size=128256, hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE_32), tie_word_embeddings=False,
                         bos_token_id=128000, eos_token_id=[128001, 128008, 128009])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight  # (V, H) each
        head.zero_()
        for k, (src, dst) in enumerate(chain.items()):
            emb[src] = 0.0
            emb[src, k] = 1.0
            head[dst, k] += scale
    model.save_pretrained(path)
    (path / "original").mkdir(exist_ok=True)
    shutil.copy(llama3_tokenizer_path(), path / "original" / "tokenizer.model")
    return model

"""Our Llama decoder against transformers on tiny random checkpoints loaded from disk."""

from __future__ import annotations

import pytest
import torch
from conftest import LLAMA3_ROPE_8, save_tiny_llama

from pocketllama.llm import load_model

ATOL = RTOL = 1e-4


def _ids(vocab: int, shape=(2, 37), seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=g)


CASES = {
    "gqa_tied_rope32": {},
    "mha_untied": {"num_key_value_heads": 4, "tie_word_embeddings": False},
    "rope8_untied": {"rope_scaling": dict(LLAMA3_ROPE_8), "tie_word_embeddings": False},
    "explicit_head_dim": {"head_dim": 32},
    "no_rope_scaling_bias": {"rope_scaling": None, "attention_bias": True, "mlp_bias": True},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    ref = save_tiny_llama(tmp_path, **CASES[case])
    model, _ = load_model(tmp_path, dtype=torch.float32)
    ids = _ids(ref.config.vocab_size)
    with torch.no_grad():
        expected = ref(ids).logits
        got = model(ids)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


def test_long_positions_exercise_scaled_band(tmp_path):
    """Positions past original_max_position_embeddings (64 here) make the scaled rope bands matter."""
    ref = save_tiny_llama(tmp_path)
    model, _ = load_model(tmp_path, dtype=torch.float32)
    ids = _ids(ref.config.vocab_size, shape=(1, 300))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, atol=ATOL, rtol=RTOL)


def test_sharded_checkpoint(tmp_path):
    ref = save_tiny_llama(tmp_path, max_shard_size="100KB", tie_word_embeddings=False)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model, _ = load_model(tmp_path, dtype=torch.float32)
    ids = _ids(ref.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, atol=ATOL, rtol=RTOL)


def test_bf16_close_to_reference_bf16(tmp_path):
    """bf16: same arithmetic order as HF, so both round alike; compare to HF in bf16 (not fp32), where the
    residual difference comes from kernel accumulation order only. 8 bf16 ulps at the logit scale (~0.06)."""
    ref = save_tiny_llama(tmp_path)
    model, _ = load_model(tmp_path, dtype="bfloat16")
    assert model.model.norm.weight.dtype == torch.bfloat16
    ref = ref.to(torch.bfloat16)
    ids = _ids(ref.config.vocab_size)
    with torch.no_grad():
        got, expected = model(ids).float(), ref(ids).logits.float()
    torch.testing.assert_close(got, expected, atol=6e-2, rtol=2e-2)
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


def test_default_dtype_is_checkpoint_dtype(tmp_path):
    ref = save_tiny_llama(tmp_path)
    ref.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model, _ = load_model(tmp_path / "bf16")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_incremental_decode_equals_full_forward(tiny_llama_dir):
    path, ref = tiny_llama_dir
    model, _ = load_model(path, dtype=torch.float32)
    ids = _ids(ref.config.vocab_size, shape=(1, 40))
    with torch.no_grad():
        full = model(ids)
        cache = model.make_cache(1, 64)
        chunks = [model(ids[:, :25], torch.arange(25)[None], cache)]
        for t in range(25, 40):  # one token at a time
            chunks.append(model(ids[:, t:t + 1], torch.tensor([[t]]), cache))
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=ATOL, rtol=RTOL)


def test_padded_batch_equals_single_runs(tiny_llama_dir):
    """Right-padded rows of different lengths, then decode steps at each row's own position."""
    path, ref = tiny_llama_dir
    model, _ = load_model(path, dtype=torch.float32)
    lengths = [9, 23, 15]
    prompts = [_ids(ref.config.vocab_size, shape=(1, n), seed=10 + i)[0] for i, n in enumerate(lengths)]
    T = max(lengths)
    batch = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, : len(p)] = p
    positions = torch.arange(T).expand(len(prompts), T)
    nxt = torch.tensor([[5], [6], [7]])
    with torch.no_grad():
        cache = model.make_cache(len(prompts), 64)
        logits = model(batch, positions, cache)
        step = model(nxt, torch.tensor(lengths)[:, None], cache)
        for i, p in enumerate(prompts):
            alone = ref(torch.cat([p, nxt[i]])[None]).logits[0]
            torch.testing.assert_close(logits[i, : len(p)], alone[:-1], atol=ATOL, rtol=RTOL)
            torch.testing.assert_close(step[i, 0], alone[-1], atol=ATOL, rtol=RTOL)


def test_logits_at_selects_rows(tiny_llama_dir):
    path, ref = tiny_llama_dir
    model, _ = load_model(path, dtype=torch.float32)
    ids = _ids(ref.config.vocab_size, shape=(2, 12))
    with torch.no_grad():
        full = model(ids)
        last = model(ids, logits_at=torch.tensor([11, 4]))
    assert last.shape == (2, 1, ref.config.vocab_size)
    torch.testing.assert_close(last[:, 0], torch.stack([full[0, 11], full[1, 4]]))


def test_greedy_32_tokens_equals_transformers_generate(tiny_llama_dir):
    path, ref = tiny_llama_dir
    model, _ = load_model(path, dtype=torch.float32)
    prompt = _ids(ref.config.vocab_size, shape=(1, 7), seed=3)
    with torch.no_grad():
        expected = ref.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                max_new_tokens=32, min_new_tokens=32, eos_token_id=None, pad_token_id=0)
        expected = expected[0, 7:].tolist()
        cache = model.make_cache(1, 64)
        logits = model(prompt, torch.arange(7)[None], cache)
        out = []
        for pos in range(7, 7 + 32):
            tok = int(logits[0, -1].argmax())
            out.append(tok)
            logits = model(torch.tensor([[tok]]), torch.tensor([[pos]]), cache)
    assert out == expected


def test_cache_position_outside_raises(tiny_llama_dir):
    path, _ = tiny_llama_dir
    model, _ = load_model(path, dtype=torch.float32)
    cache = model.make_cache(1, 8)
    with pytest.raises(ValueError, match=r"position 8 is outside the KV cache \(max_len 8\)"):
        model(torch.tensor([[1]]), torch.tensor([[8]]), cache)


def test_cache_rows_run_a_subset_of_sequences(tiny_llama_dir):
    """Continuous batching: sequences live in cache rows 0..3; a step may run any subset, in any order."""
    path, ref = tiny_llama_dir
    model, _ = load_model(path, dtype=torch.float32)
    a, b = _ids(ref.config.vocab_size, (1, 10), seed=5)[0], _ids(ref.config.vocab_size, (1, 6), seed=6)[0]
    with torch.no_grad():
        cache = model.make_cache(4, 64)
        model(a[None], torch.arange(10)[None], cache, cache_rows=torch.tensor([2]))
        model(b[None], torch.arange(6)[None], cache, cache_rows=torch.tensor([0]))
        step = model(torch.tensor([[7], [8]]), torch.tensor([[6], [10]]), cache, cache_rows=torch.tensor([0, 2]))
        torch.testing.assert_close(step[0, 0], ref(torch.cat([b, torch.tensor([7])])[None]).logits[0, -1],
                                   atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(step[1, 0], ref(torch.cat([a, torch.tensor([8])])[None]).logits[0, -1],
                                   atol=ATOL, rtol=RTOL)

"""Tests for engine/prefix_cache.py: a reused prefix gives the same logits as a cold run (session cache,
block-hash prefix cache), LRU eviction under a byte budget, prompt-cache files round-trip and foreign ones
are refused."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from conftest import save_tiny_llama

from pocketllama.engine.generate import prefill, stream_generate
from pocketllama.engine.prefix_cache import (
    PrefixCache,
    SessionCache,
    common_prefix,
    load_prompt_cache,
    save_prompt_cache,
    tokenizer_fingerprint,
)
from pocketllama.engine.sampling import SamplingParams
from pocketllama.llm import load_model

PROMPT = [1, 17, 99, 203, 5, 64, 8, 41, 77, 12, 300, 4]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class IdTokenizer:
    vocab_size, bos_id, eos_id, add_bos, special_tokens = 320, 1, 2, True, {}
    stop_ids = frozenset({2})

    def encode(self, text, *, add_bos=False, allow_special=False):
        return [1] * add_bos + [int(w[1:]) for w in text.split()]

    def token_bytes(self, i: int) -> bytes:
        return b"t%d " % i

    def detokenizer(self):
        return SimpleNamespace(add=lambda i: f"t{i} ", flush=lambda: "")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("pc")
    save_tiny_llama(path, seed=0, tie_word_embeddings=False)
    return load_model(path)[0]


def cold(model, prompt, n=6, **params):
    return list(stream_generate(model, IdTokenizer(), prompt, SamplingParams(max_tokens=n, logprobs=True,
                                                                             ignore_eos=True, **params)))


def full_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, -1].float().log_softmax(-1)


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2 and common_prefix([], [1]) == 0


# --- session cache (multi-turn) ------------------------------------------------------------------------------


def test_second_turn_reuses_the_prefix_with_the_same_logits(model):
    session = SessionCache(model)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    first = list(session.stream(IdTokenizer(), PROMPT, params))
    assert first[-1].cached_tokens == 0
    answer = [r.token for r in first]
    assert session.tokens == PROMPT + answer[:-1]  # the last token was never fed
    turn2 = PROMPT + answer + [9, 10, 11]
    second = list(session.stream(IdTokenizer(), turn2, params.replace(logprobs=True, top_logprobs=3)))
    assert second[-1].cached_tokens == len(PROMPT) + len(answer) - 1
    ref = cold(model, turn2)
    assert [r.token for r in second] == [r.token for r in ref]
    # the first token's logprobs are the logits after the prompt: cached prefix vs a cold full forward
    expected = full_logits(model, turn2)
    got = torch.tensor([lp for _, lp in second[0].top_logprobs])
    torch.testing.assert_close(got, expected.topk(3).values, atol=1e-5, rtol=1e-5)
    assert [r.logprob for r in second] == pytest.approx([r.logprob for r in ref], abs=1e-5)


def test_an_adapter_loaded_between_turns_invalidates_the_session(tmp_path):
    """K/V computed with the old weights are not reused once `load_adapter` wraps the model's layers."""
    import copy

    from pocketllama.finetune.lora import apply_lora, lora_modules

    path = tmp_path / "m"
    save_tiny_llama(path, seed=1)
    model = load_model(path)[0]
    session = SessionCache(model)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    answer = [r.token for r in session.stream(IdTokenizer(), PROMPT, params)]
    apply_lora(model, r"model\.layers\.\d+\.self_attn\.[qv]_proj", r=4, alpha=8)
    with torch.no_grad():
        for m in lora_modules(model).values():  # a trained adapter: B != 0 changes the outputs
            m.lora_B.weight.normal_(0, 0.5)
    turn2 = PROMPT + answer + [9, 10]
    second = list(session.stream(IdTokenizer(), turn2, params))
    assert second[-1].cached_tokens == 0
    assert [r.token for r in second] == [r.token for r in cold(copy.deepcopy(model), turn2, 4)]


def test_a_longer_turn_grows_the_cache_and_keeps_the_prefix(model):
    session = SessionCache(model)
    list(session.stream(IdTokenizer(), PROMPT, SamplingParams(max_tokens=2, ignore_eos=True)))
    small = session.cache.max_len
    longer = PROMPT + list(range(20, 20 + small))  # no longer fits
    out = list(session.stream(IdTokenizer(), longer, SamplingParams(max_tokens=3, ignore_eos=True, logprobs=True)))
    assert session.cache.max_len > small and out[-1].cached_tokens == len(PROMPT)
    assert [r.token for r in out] == [r.token for r in cold(model, longer, 3)]


def test_an_abandoned_stream_leaves_a_valid_record(model):
    session = SessionCache(model)
    stream = session.stream(IdTokenizer(), PROMPT, SamplingParams(max_tokens=20, ignore_eos=True))
    got = [next(stream).token for _ in range(3)]
    stream.close()
    assert session.tokens == PROMPT + got[:2] and not session.busy
    turn2 = PROMPT + got + [5]
    out = list(session.stream(IdTokenizer(), turn2, SamplingParams(max_tokens=4, ignore_eos=True)))
    assert out[-1].cached_tokens == len(PROMPT) + 2
    assert [r.token for r in out] == [r.token for r in cold(model, turn2, 4)]


def test_a_concurrent_stream_gets_its_own_cache(model):
    session = SessionCache(model)
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    a = session.stream(IdTokenizer(), PROMPT, params)
    first = next(a)
    b = list(session.stream(IdTokenizer(), PROMPT[:6], params))  # must not touch a's cache
    rest = [first.token] + [r.token for r in a]
    assert rest == [r.token for r in cold(model, PROMPT, 5)]
    assert [r.token for r in b] == [r.token for r in cold(model, PROMPT[:6], 5)]
    assert b[-1].cached_tokens == 0


def test_speculative_decoding_on_a_session_records_only_committed_ids(model):
    from pocketllama.engine.drafters import PromptLookupDrafter

    session = SessionCache(model)
    prompt = PROMPT + PROMPT[1:]
    out = list(session.stream(IdTokenizer(), prompt, SamplingParams(max_tokens=12, ignore_eos=True),
                              drafter=PromptLookupDrafter(), num_draft=4))
    answer = [r.token for r in out]
    assert answer == [r.token for r in cold(model, prompt, 12)]
    assert session.tokens == prompt + answer[:-1]
    turn2 = prompt + answer + [3]
    again = list(session.stream(IdTokenizer(), turn2, SamplingParams(max_tokens=4, ignore_eos=True)))
    assert [r.token for r in again] == [r.token for r in cold(model, turn2, 4)]


# --- block-hash prefix cache (server) ------------------------------------------------------------------------


def row_logits_after(model, cache, row_prompt, start):
    """Prefill row 0 of `cache` from `start` and return the last logits (log-softmax)."""
    with torch.no_grad():
        return prefill(model, row_prompt, cache, start, 512)[0].log_softmax(-1)


def test_prefix_cache_reuses_blocks_with_the_same_logits(model):
    pc = PrefixCache(max_bytes=1 << 30, block_size=4)
    system = PROMPT  # 12 tokens = 3 blocks
    cache = model.make_cache(1, 64)
    row_logits_after(model, cache, system + [7, 8], 0)
    assert pc.insert(cache, 0, system + [7, 8]) == 3  # full blocks only
    assert pc.insert(cache, 0, system + [7, 8]) == 0  # already there
    fresh = model.make_cache(1, 64)
    request = system + [30, 31, 32]
    n = pc.load(fresh, 0, request)
    assert n == 12
    got = row_logits_after(model, fresh, request, n)
    torch.testing.assert_close(got, full_logits(model, request), atol=1e-5, rtol=1e-5)
    assert (pc.stats.lookups, pc.stats.hits, pc.stats.hit_tokens) == (1, 1, 12)
    # a prompt that is exactly the cached blocks still leaves its last token to prefill
    assert pc.load(model.make_cache(1, 64), 0, system) == 8
    # a different first block shares nothing, even with equal later blocks
    assert pc.load(model.make_cache(1, 64), 0, [2] + system[1:]) == 0


def test_prefix_cache_evicts_least_recently_used_leaves_first(model):
    cache = model.make_cache(1, 64)
    block_bytes = sum(t[0, :, :4].numel() * t.element_size() for t in (*cache.keys, *cache.values))
    pc = PrefixCache(max_bytes=4 * block_bytes, block_size=4)
    a, b = PROMPT[:8], [1, 2, 3, 4, 5, 6, 7, 8]
    for seq in (a, b):
        row_logits_after(model, cache, seq + [0], 0)
        pc.insert(cache, 0, seq)
    assert len(pc) == 4 and pc.nbytes == 4 * block_bytes
    assert pc.load(model.make_cache(1, 64), 0, a + [9]) == 8  # a is now the most recent
    c = [1, 2, 3, 4, 9, 9, 9, 9]  # shares b's first block
    row_logits_after(model, cache, c + [0], 0)
    pc.insert(cache, 0, c)  # one new block: evicts b's second block (the LRU leaf), not b's first
    assert len(pc) == 4 and pc.stats.evicted_blocks == 1
    assert pc.load(model.make_cache(1, 64), 0, b + [9]) == 4
    assert pc.load(model.make_cache(1, 64), 0, c + [9]) == 8
    assert pc.load(model.make_cache(1, 64), 0, a + [9]) == 8
    tiny = PrefixCache(max_bytes=block_bytes - 1, block_size=4)
    assert tiny.insert(cache, 0, c) == 0 and len(tiny) == 0


def test_prefix_cache_arguments():
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        PrefixCache(1024, block_size=0)
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        PrefixCache(-1)


# --- prompt-cache files --------------------------------------------------------------------------------------


def test_prompt_cache_file_round_trips(model, tmp_path):
    path = save_prompt_cache(tmp_path / "p.kv", model, IdTokenizer(), PROMPT, metadata={"model": "tiny"})
    loaded = load_prompt_cache(path, model, IdTokenizer())
    assert loaded.tokens == PROMPT and loaded.metadata["n_tokens"] == str(len(PROMPT))
    cache = model.make_cache(1, 32)
    row_logits_after(model, cache, PROMPT, 0)
    for t, ref in zip((*loaded.keys, *loaded.values), (*cache.keys, *cache.values), strict=True):
        torch.testing.assert_close(t, ref[0, :, :len(PROMPT)])
    session = SessionCache(model)
    loaded.install(session)
    request = PROMPT + [50, 51]
    out = list(session.stream(IdTokenizer(), request, SamplingParams(max_tokens=5, ignore_eos=True)))
    assert out[-1].cached_tokens == len(PROMPT)
    assert [r.token for r in out] == [r.token for r in cold(model, request, 5)]


def test_foreign_prompt_cache_files_are_refused(model, tmp_path):
    path = save_prompt_cache(tmp_path / "p.kv", model, IdTokenizer(), PROMPT, metadata={"model": "tiny-a"})
    save_tiny_llama(tmp_path / "b", seed=1, tie_word_embeddings=False)  # same architecture, other weights
    other = load_model(tmp_path / "b")[0]
    with pytest.raises(ValueError, match=r"was made for another model \(made with tiny-a\): its model weights "
                                         r"fingerprint differs .* remake it with `pocketllama cache-prompt"):
        load_prompt_cache(path, other, IdTokenizer())
    wider = SimpleNamespace(config=dataclasses.replace(model.config, num_hidden_layers=3))
    with pytest.raises(ValueError, match="its model architecture fingerprint differs"):
        load_prompt_cache(path, wider, IdTokenizer())

    class OtherTokenizer(IdTokenizer):
        def token_bytes(self, i):
            return b"u%d" % i

    with pytest.raises(ValueError, match="its tokenizer fingerprint differs"):
        load_prompt_cache(path, model, OtherTokenizer())
    assert tokenizer_fingerprint(IdTokenizer()) != tokenizer_fingerprint(OtherTokenizer())


def test_prompt_cache_file_errors(model, tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="prompt cache .*missing.kv does not exist; make one with"):
        load_prompt_cache(tmp_path / "missing.kv", model, IdTokenizer())
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="is not a pocketllama prompt cache"):
        load_prompt_cache(tmp_path / "plain.safetensors", model, IdTokenizer())
    save_file({"x": torch.zeros(2)}, str(tmp_path / "v9.kv"),
              metadata={"format": "pocketllama-prompt-cache", "version": "9"})
    with pytest.raises(ValueError, match="has format version '9'; this pocketllama reads version 1"):
        load_prompt_cache(tmp_path / "v9.kv", model, IdTokenizer())
    (tmp_path / "junk.kv").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(ValueError, match="is not a readable prompt cache"):
        load_prompt_cache(tmp_path / "junk.kv", model, IdTokenizer())
    with pytest.raises(ValueError, match="cannot cache an empty prompt"):
        save_prompt_cache(tmp_path / "e.kv", model, IdTokenizer(), [])
    with pytest.raises(ValueError, match="the prompt has 1024 tokens but the model's context holds 1024"):
        save_prompt_cache(tmp_path / "e.kv", model, IdTokenizer(), [1] * 1024)


def test_batch_engine_reuses_a_shared_prefix_across_requests(model):
    from pocketllama.engine.batching import BatchEngine

    system = [1] + list(range(100, 140))  # 41 tokens: two 16-token blocks
    pc = PrefixCache(max_bytes=1 << 26, block_size=16)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    with BatchEngine(model, IdTokenizer(), max_concurrency=2, prefill_chunk=16, prefix_cache=pc) as engine:
        first = list(engine.submit(system + [7, 8], params))
        second = list(engine.submit(system + [9, 10, 11], params))
        stats = engine.stats()
    assert first[-1].cached_tokens == 0 and second[-1].cached_tokens == 32
    assert [r.token for r in second] == [r.token for r in cold(model, system + [9, 10, 11])]
    assert (stats.prefix_cache_hits, stats.prefix_cache_hit_tokens) == (1, 32) and stats.prefix_cache_bytes > 0

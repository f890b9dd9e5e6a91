"""Tests for engine/generate.py against a mock model (logits = a function of the whole cached prefix, so
cache plumbing mistakes change the output) and a fake byte-level tokenizer with multi-byte UTF-8 split
over tokens; then greedy parity with transformers on a tiny random Llama."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pocketllama.engine.generate import (
    CACHE_ROUND,
    GenerationResponse,
    cache_length,
    generate,
    generate_step,
    stream_generate,
)
from pocketllama.engine.sampling import SamplingParams, greedy, make_logits_processors

# --- fakes ------------------------------------------------------------------------------------------------

BOS, EOS, EOT = 0, 1, 2
PIECES = [b"", b"<eos>", b"<eot>", b"a", b"b", b"c", b" ", b"\n", b"</", b"s>",
          b"\xc3", b"\xa9",  # e-acute split over two tokens
          b"\xe2", b"\x82", b"\xac",  # euro sign over three
          b"\xf0\x9f", b"\x98\x80",  # grinning face over two
          b"hello", b"world", b"<", b"/s", b">"]
PIECES += [f"x{i}".encode() for i in range(len(PIECES), 32)]
A, B_, C, SPACE, LT, SLASH_S, GT = 3, 4, 5, 6, 19, 20, 21
SPECIAL = {BOS, EOS, EOT}


class FakeDetokenizer:
    def __init__(self) -> None:
        self.buf = b""

    def add(self, token: int) -> str:
        if token in SPECIAL:
            return ""
        self.buf += PIECES[token]
        for cut in range(len(self.buf), max(len(self.buf) - 4, -1), -1):  # longest valid UTF-8 prefix
            try:
                text = self.buf[:cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
            self.buf = self.buf[cut:]
            return text
        text, self.buf = self.buf.decode("utf-8", "replace"), b""
        return text

    def flush(self) -> str:
        text, self.buf = self.buf.decode("utf-8", "replace"), b""
        return text


class FakeTokenizer:
    vocab_size = len(PIECES)
    bos_id, eos_id, pad_id = BOS, EOS, None
    stop_ids = frozenset({EOS, EOT})
    add_bos = True

    def encode(self, text: str, *, add_bos: bool = False, allow_special: bool = False) -> list[int]:
        data, ids = text.encode(), [BOS] if add_bos else []
        while data:  # greedy longest match over the non-special pieces
            best = max((i for i in range(3, len(PIECES)) if data.startswith(PIECES[i])),
                       key=lambda i: len(PIECES[i]))
            ids.append(best)
            data = data[len(PIECES[best]):]
        return ids

    def decode(self, ids, *, skip_special: bool = False) -> str:
        return b"".join(PIECES[i] for i in ids if i not in SPECIAL).decode("utf-8", "replace")

    def detokenizer(self) -> FakeDetokenizer:
        return FakeDetokenizer()


class MockCache:
    def __init__(self, batch_size: int, max_len: int) -> None:
        self.tokens = torch.full((batch_size, max_len), -1, dtype=torch.long)  # what sits in each slot

    @property
    def max_len(self) -> int:
        return self.tokens.shape[1]


class MockLM(nn.Module):
    """logits[b, t] = f(all tokens at positions 0..positions[b, t]). With `script`, the token after
    position p is script[p - script_from] (one-hot logits), falling back to `a` after the script ends."""

    def __init__(self, vocab: int = len(PIECES), context: int = 64, script: list[int] | None = None,
                 script_from: int = 0) -> None:
        super().__init__()
        self.config = SimpleNamespace(max_position_embeddings=context, vocab_size=vocab)
        self.anchor = nn.Parameter(torch.zeros(()))
        self.script, self.script_from = script, script_from
        self.calls: list[tuple[tuple[int, ...], int]] = []  # (input shape, first position)
        self.caches: list[MockCache] = []

    def make_cache(self, batch_size: int, max_len: int) -> MockCache:
        self.caches.append(MockCache(batch_size, max_len))
        return self.caches[-1]

    def prefix_logits(self, prefix: list[int]) -> torch.Tensor:
        assert min(prefix) >= 0, f"a slot before position {len(prefix) - 1} was never written"
        if self.script is not None:
            i = len(prefix) - 1 - self.script_from
            target = self.script[i] if 0 <= i < len(self.script) else A
            return torch.nn.functional.one_hot(torch.tensor(target), self.config.vocab_size).float() * 10
        h = sum((i + 1) * t for i, t in enumerate(prefix)) % 1009
        v = torch.arange(self.config.vocab_size, dtype=torch.float32)
        return 3 * torch.cos(0.37 * (v + 1) * (h + 1))

    def forward(self, input_ids, positions=None, cache=None, logits_at=None):
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T).expand(B, T)
        self.calls.append((tuple(input_ids.shape), int(positions[0, 0])))
        if cache is None:
            history = input_ids
        else:
            if int(positions.max()) >= cache.max_len:
                raise ValueError("position outside the cache")
            cache.tokens[torch.arange(B)[:, None], positions] = input_ids
            history = cache.tokens
        out = torch.stack([torch.stack([self.prefix_logits(history[b, : int(positions[b, t]) + 1].tolist())
                                        for t in range(T)]) for b in range(B)])  # (B, T, V)
        if logits_at is not None:
            out = out[torch.arange(B), logits_at][:, None]
        return out + self.anchor


def reference_tokens(model: MockLM, prompt: list[int], n: int, processors=()) -> list[int]:
    """Greedy by full forwards without a cache: the ground truth for the cached engine."""
    seq, out = list(prompt), []
    for _ in range(n):
        logits = model(torch.tensor([seq]))[:, -1]
        for p in processors:
            logits = p(torch.tensor([out], dtype=torch.long).view(1, -1), logits)
        out.append(int(greedy(logits)))
        seq.append(out[-1])
    return out


def scripted(prompt: list[int], tokens: list[int], **kw) -> MockLM:
    return MockLM(script=tokens, script_from=len(prompt) - 1, **kw)


def run(model, prompt, **params) -> list[GenerationResponse]:
    return list(stream_generate(model, FakeTokenizer(), prompt, SamplingParams(**params)))


PROMPT = [BOS, A, B_, C, A, SPACE]

# --- generate_step ----------------------------------------------------------------------------------------


def test_greedy_cached_decode_equals_full_forward_reference():
    model = MockLM()
    got = [t for t, _ in generate_step(model, PROMPT, max_tokens=12)]
    assert got == reference_tokens(MockLM(), PROMPT, 12)


def test_logprobs_are_skipped_when_not_wanted():
    with_lp = list(generate_step(MockLM(), PROMPT, max_tokens=6))
    without = list(generate_step(MockLM(), PROMPT, max_tokens=6, logprobs=False))
    assert [t for t, _ in without] == [t for t, _ in with_lp] and all(lp is None for _, lp in without)
    assert all(lp.shape == (len(PIECES),) and math.isclose(float(lp.exp().sum()), 1, rel_tol=1e-5)
               for _, lp in with_lp)


def test_chunked_prefill_then_fixed_shape_steps():
    model = MockLM()
    prompt = PROMPT + [B_, C]  # 8 tokens
    got = [t for t, _ in generate_step(model, prompt, max_tokens=4, prefill_step_size=3)]
    assert model.calls == [((1, 3), 0), ((1, 3), 3), ((1, 2), 6), ((1, 1), 8), ((1, 1), 9), ((1, 1), 10)]
    assert got == reference_tokens(MockLM(), prompt, 4)
    assert model.caches[0].tokens[0, :11].tolist() == prompt + got[:3]  # every token fed back in place


def test_cache_is_sized_to_prompt_plus_max_tokens_rounded_and_capped():
    model = MockLM(context=1024)
    list(generate_step(model, PROMPT, max_tokens=5))
    assert model.caches[0].max_len == CACHE_ROUND
    small = MockLM(context=100)
    list(generate_step(small, PROMPT, max_tokens=5))
    assert small.caches[0].max_len == 100


def test_cache_length_rounds_to_few_shapes():
    assert [cache_length(n, 4096) for n in (1, 256, 257, 4000)] == [256, 256, 512, 4096]
    assert [cache_length(n, 4096, compile=True) for n in (1, 257, 700, 1025, 4000)] == [256, 512, 1024,
                                                                                          2048, 4096]
    assert cache_length(300, 260, compile=True) == 260


def test_processors_see_the_generated_ids():
    params = SamplingParams(frequency_penalty=2.0, repetition_penalty=1.5)
    got = [t for t, _ in generate_step(MockLM(), PROMPT, max_tokens=10,
                                       logits_processors=make_logits_processors(params, PROMPT))]
    assert got == reference_tokens(MockLM(), PROMPT, 10, make_logits_processors(params, PROMPT))
    assert got != reference_tokens(MockLM(), PROMPT, 10)  # the penalties changed something


def test_cached_prefix_is_reused_and_not_prefilled_again():
    model = MockLM()
    cache = model.make_cache(1, 64)
    list(generate_step(model, PROMPT[:4], max_tokens=3, cache=cache))  # fills slots 0..3 (+ 4, 5 generated)
    model.calls.clear()
    got = [t for t, _ in generate_step(model, PROMPT, max_tokens=5, cache=cache, cached_tokens=4)]
    assert model.calls[0] == ((1, 2), 4)  # only the two new prompt tokens
    assert got == reference_tokens(MockLM(), PROMPT, 5)
    model.calls.clear()  # a fully cached prompt still re-runs its last token to get logits
    again = [t for t, _ in generate_step(model, PROMPT, max_tokens=5, cache=cache, cached_tokens=len(PROMPT))]
    assert model.calls[0] == ((1, 1), len(PROMPT) - 1) and again == got


def test_cache_and_cached_tokens_errors():
    model = MockLM()
    with pytest.raises(ValueError, match=r"cached_tokens=2 needs the cache that holds them"):
        generate_step(model, PROMPT, cached_tokens=2)
    with pytest.raises(ValueError, match=r"cached_tokens 9 must be in \[0, 6\]"):
        generate_step(model, PROMPT, cache=model.make_cache(1, 64), cached_tokens=9)
    with pytest.raises(ValueError, match=r"the given KV cache holds 6 tokens, too few for the 6-token prompt"):
        generate_step(model, PROMPT, cache=model.make_cache(1, 6))
    with pytest.raises(ValueError, match="prefill_step_size must be >= 1"):
        generate_step(model, PROMPT, prefill_step_size=0)
    with pytest.raises(ValueError, match=r"prompt_ids must be 1-D \(or \[1, T\]\); got shape \(2, 3\)"):
        generate_step(model, torch.zeros(2, 3, dtype=torch.long))


def test_given_cache_caps_the_budget():
    model = MockLM()
    got = list(generate_step(model, PROMPT, max_tokens=50, cache=model.make_cache(1, 10)))
    assert len(got) == 4


# --- context limit ----------------------------------------------------------------------------------------


def test_prompt_too_long_names_both_numbers():
    with pytest.raises(ValueError, match=r"prompt has 70 tokens but the context holds 64 .*at most 63 tokens "
                                         r"or pass truncate='left'"):
        generate_step(MockLM(context=64), [A] * 70)
    with pytest.raises(ValueError, match="prompt has 6 tokens but the context holds 6"):
        list(stream_generate(MockLM(), FakeTokenizer(), PROMPT, max_len=6))
    with pytest.raises(ValueError, match=r"max_len 100 must be in \[2, 64\]"):
        generate_step(MockLM(context=64), PROMPT, max_len=100)
    with pytest.raises(ValueError, match="prompt is empty"):
        generate_step(MockLM(), [])
    with pytest.raises(ValueError, match="truncate must be 'error' or 'left', got 'right'"):
        generate_step(MockLM(), PROMPT, truncate="right")


def test_truncate_left_keeps_the_last_tokens():
    prompt = [A, B_, C] * 30  # 90 tokens, context 64, max_tokens 10 -> keep the last 54
    responses = list(stream_generate(MockLM(), FakeTokenizer(), prompt, SamplingParams(max_tokens=10),
                                     truncate="left"))
    assert responses[-1].prompt_tokens == 54
    assert [r.token for r in responses] == reference_tokens(MockLM(), prompt[-54:], 10)
    with pytest.raises(ValueError, match=r"truncate='left' dropped 36 prompt tokens, so the 4 cached tokens"):
        generate_step(MockLM(), prompt, max_tokens=10, truncate="left", cached_tokens=4,
                      cache=MockCache(1, 64))


def test_generation_stops_with_length_at_the_context_limit():
    responses = run(MockLM(context=64), [A] * 60, max_tokens=10, ignore_eos=True)
    assert len(responses) == 4 and responses[-1].finish_reason == "length"
    assert run(MockLM(context=64), [A] * 60, max_tokens=None, ignore_eos=True)[-1].generation_tokens == 4


# --- stream_generate: stopping ----------------------------------------------------------------------------


def test_max_tokens_finishes_with_length():
    responses = run(MockLM(), PROMPT, max_tokens=5, ignore_eos=True)
    assert [r.finish_reason for r in responses] == [None] * 4 + ["length"]
    assert [r.generation_tokens for r in responses] == [1, 2, 3, 4, 5]


def test_tokenizer_stop_id_ends_generation_without_its_text():
    model = scripted(PROMPT, [A, B_, EOT, C])
    responses = run(model, PROMPT, max_tokens=10)
    assert [(r.text, r.token, r.finish_reason) for r in responses] == [("a", A, None), ("b", B_, None),
                                                                      ("", EOT, "stop")]


def test_params_stop_token_ids_and_ignore_eos():
    model = scripted(PROMPT, [A, EOS, B_, C, A])
    assert [r.token for r in run(model, PROMPT, max_tokens=10, stop_token_ids=[C])] == [A, EOS]
    responses = run(model, PROMPT, max_tokens=10, stop_token_ids=[C], ignore_eos=True)
    assert [r.token for r in responses] == [A, EOS, B_, C] and responses[-1].finish_reason == "stop"
    assert [r.token for r in run(model, PROMPT, max_tokens=4, ignore_eos=True)] == [A, EOS, B_, C]


def test_stop_string_spanning_tokens_is_never_emitted():
    model = scripted(PROMPT, [A, LT, SLASH_S, GT, B_])  # "a" "<" "/s" ">" "b"
    responses = run(model, PROMPT, max_tokens=10, stop=["</s>"])
    assert [r.text for r in responses] == ["a", "", "", ""]
    assert responses[-1].finish_reason == "stop" and responses[-1].token == GT


def test_stop_string_inside_a_token_emits_the_text_before_it():
    model = scripted(PROMPT, [A, 17, B_])  # "a" "hello"
    assert [r.text for r in run(model, PROMPT, max_tokens=10, stop=["ll"])] == ["a", "he"]


def test_held_back_text_is_released_when_no_stop_string_forms():
    model = scripted(PROMPT, [A, LT, B_, LT, EOT])
    responses = run(model, PROMPT, max_tokens=10, stop=["</s>"])
    assert [r.text for r in responses] == ["a", "", "<b", "", "<"]
    assert responses[-1].finish_reason == "stop"
    at_length = run(scripted(PROMPT, [A, LT]), PROMPT, max_tokens=2, stop=["</s>"])
    assert [r.text for r in at_length] == ["a", "<"] and at_length[-1].finish_reason == "length"


# --- stream_generate: text, sampling, usage ---------------------------------------------------------------


def test_utf8_characters_split_over_tokens_give_whole_character_deltas():
    model = scripted(PROMPT, [10, 11, 12, 13, 14, 15, 16, EOT])
    responses = run(model, PROMPT, max_tokens=20)
    assert [r.text for r in responses] == ["", "é", "", "", "€", "", "😀", ""]
    cut = run(scripted(PROMPT, [A, 12, 13]), PROMPT, max_tokens=3)  # ends mid-character: flushed as U+FFFD
    assert "".join(r.text for r in cut) == "a\ufffd"


def test_seeded_sampling_is_reproducible():
    def tokens(seed: int | None) -> list[int]:
        return generate(MockLM(), FakeTokenizer(), PROMPT, SamplingParams(temperature=1.0, top_p=0.95,
                                                                          seed=seed, max_tokens=20)).tokens

    assert tokens(5) == tokens(5)
    assert tokens(5) != tokens(6)
    assert tokens(5) != generate(MockLM(), FakeTokenizer(), PROMPT, SamplingParams(max_tokens=20)).tokens


def test_usage_counts_and_timings():
    responses = run(scripted(PROMPT, [A, B_, C, EOT]), PROMPT, max_tokens=10)
    last = responses[-1]
    assert (last.prompt_tokens, last.generation_tokens, last.finish_reason) == (6, 4, "stop")
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.prompt_time > 0
    assert last.peak_memory is not None and last.peak_memory > 0
    assert responses[0].generation_tps == 0.0  # no decode step yet


def test_logprobs_are_raw_model_logprobs_with_top_alternatives():
    model = MockLM()
    responses = run(model, PROMPT, max_tokens=3, temperature=0.7, frequency_penalty=1.0, seed=0,
                    logprobs=True, top_logprobs=3)
    seq = list(PROMPT)
    for r in responses:
        raw = MockLM()(torch.tensor([seq]))[0, -1].detach().log_softmax(-1)
        assert r.logprob == pytest.approx(float(raw[r.token]), abs=1e-5)
        assert [t for t, _ in r.top_logprobs] == raw.topk(3).indices.tolist()
        seq.append(r.token)
    assert run(model, PROMPT, max_tokens=1)[0].logprob is None


def test_generate_joins_the_stream_and_accepts_text_prompts():
    model = scripted([BOS, 17, SPACE, 18], [A, 17, EOT])
    result = generate(model, FakeTokenizer(), "hello world", SamplingParams(max_tokens=10, logprobs=True))
    assert (result.text, result.tokens, result.finish_reason) == ("ahello", [A, 17, EOT], "stop")
    assert (result.prompt_tokens, result.generation_tokens) == (4, 3)
    assert len(result.logprobs) == 3 and all(lp <= 0 and math.isfinite(lp) for lp in result.logprobs)
    assert result.top_logprobs is None


# --- the real model ---------------------------------------------------------------------------------------


def test_greedy_matches_transformers_generate(tiny_llama_dir):
    from pocketllama.llm import load_model

    path, hf_model = tiny_llama_dir
    model, _ = load_model(path)
    prompt = [1, 17, 99, 203, 5, 64, 8]
    expected = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32,
                                 min_new_tokens=32, pad_token_id=0)[0, len(prompt):].tolist()
    got = [t for t, _ in generate_step(model, prompt, max_tokens=32, prefill_step_size=4)]
    assert got == expected



def test_real_model_reuses_a_cached_prefix(tiny_llama_dir):
    from pocketllama.llm import load_model

    model, _ = load_model(tiny_llama_dir[0])
    prompt = [1, 17, 99, 203, 5, 64, 8, 41, 300]
    fresh = [t for t, _ in generate_step(model, prompt, max_tokens=8)]
    cache = model.make_cache(1, 256)
    list(generate_step(model, prompt[:5], max_tokens=6, cache=cache))  # leaves stale K/V in slots 5..9
    reused = [t for t, _ in generate_step(model, prompt, max_tokens=8, cache=cache, cached_tokens=5)]
    assert reused == fresh


@pytest.mark.slow
def test_compiled_decode_step_matches_eager(tiny_llama_dir):
    from pocketllama.llm import load_model

    model, _ = load_model(tiny_llama_dir[0])
    prompt = [1, 17, 99, 203]
    eager = [t for t, _ in generate_step(model, prompt, max_tokens=4)]
    compiled = [t for t, _ in generate_step(model, prompt, max_tokens=4, compile=True)]
    assert compiled == eager

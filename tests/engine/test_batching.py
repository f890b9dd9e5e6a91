"""Continuous batching engine: batched outputs equal single-sequence `stream_generate` outputs (greedy, seeded
sampling, penalties, stops, logprobs) on a tiny random Llama; rows are reused, prefill is chunked and
interleaved with decode steps, cancellation frees a row at once, admission control and failures are clean."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from pocketllama.config import TextConfig
from pocketllama.engine.batching import (
    BatchEngine,
    ContextLengthError,
    EngineClosedError,
    QueueFullError,
)
from pocketllama.engine.generate import stream_generate
from pocketllama.engine.sampling import SamplingParams
from pocketllama.models.llama import LlamaForCausalLM

BOS, EOS = 0, 1


class CharTokenizer:
    """ids 2..95 are the printable ASCII characters 32..125; 0 is BOS, 1 is EOS."""

    vocab_size = 96
    bos_id, eos_id, pad_id = BOS, EOS, None
    stop_ids = frozenset({EOS})
    add_bos = True

    def encode(self, text: str, *, add_bos: bool = False, allow_special: bool = False) -> list[int]:
        return ([BOS] if add_bos else []) + [ord(c) - 30 for c in text]

    def decode(self, ids, *, skip_special: bool = False) -> str:
        return "".join(chr(i + 30) for i in ids if i > EOS)

    def detokenizer(self):
        tok = self

        class Detok:
            def add(self, token: int) -> str:
                return tok.decode([token])

            def flush(self) -> str:
                return ""

        return Detok()


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = TextConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                        tie_word_embeddings=True, bos_token_id=BOS, eos_token_ids=(EOS,))
    m = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return m


TOK = CharTokenizer()
PROMPTS = [TOK.encode(t, add_bos=True) for t in (
    "Hello there", "A much longer prompt that will need several prefill chunks to get through", "x",
    "The quick brown fox jumps", "12345", "Lorem ipsum dolor sit amet, consectetur", "ok", "What now?")]


def single(model, prompt: list[int], params: SamplingParams) -> list:
    return list(stream_generate(model, TOK, prompt, params))


def batched(engine: BatchEngine, prompts: list[list[int]], params: list[SamplingParams]) -> list[list]:
    handles = [engine.submit(p, sp) for p, sp in zip(prompts, params, strict=True)]
    return [list(h) for h in handles]


def summary(responses: list) -> tuple:
    return ([r.token for r in responses], "".join(r.text for r in responses), responses[-1].finish_reason,
            responses[-1].prompt_tokens, responses[-1].generation_tokens)


def test_greedy_batch_equals_single_sequence_outputs(model):
    """8 prompts through 3 rows (queueing, row reuse), 16-token prefill chunks (chunked + grouped prefill)."""
    params = [SamplingParams(max_tokens=20 + 3 * i) for i in range(len(PROMPTS))]
    with BatchEngine(model, TOK, max_concurrency=3, max_queue=8, prefill_chunk=16) as engine:
        outs = batched(engine, PROMPTS, params)
        assert engine.stats().running == 0 and engine.stats().waiting == 0
    for prompt, sp, out in zip(PROMPTS, params, outs, strict=True):
        assert summary(out) == summary(single(model, prompt, sp))
    assert {out[-1].finish_reason for out in outs} <= {"stop", "length"}


def test_seeded_sampling_penalties_bias_and_logprobs_match_single_sequence(model):
    params = [
        SamplingParams(temperature=0.9, top_p=0.9, seed=1, max_tokens=24),
        SamplingParams(temperature=1.2, top_k=10, seed=2, max_tokens=24, presence_penalty=1.0,
                       frequency_penalty=0.5),
        SamplingParams(max_tokens=24, repetition_penalty=1.3, logit_bias={5: 4.0, EOS: -100}),
        SamplingParams(max_tokens=24, logprobs=True, top_logprobs=3),
        SamplingParams(temperature=0.7, min_p=0.1, seed=3, max_tokens=24, logprobs=True),
    ]
    prompts = PROMPTS[: len(params)]
    with BatchEngine(model, TOK, max_concurrency=8, prefill_chunk=32) as engine:
        outs = batched(engine, prompts, params)
    for prompt, sp, out in zip(prompts, params, outs, strict=True):
        ref = single(model, prompt, sp)
        assert summary(out) == summary(ref)
        if sp.logprobs:
            torch.testing.assert_close([r.logprob for r in out], [r.logprob for r in ref], atol=1e-4, rtol=1e-4)
        if sp.top_logprobs:
            assert [[t for t, _ in r.top_logprobs] for r in out] == [[t for t, _ in r.top_logprobs] for r in ref]


def test_stop_strings_stop_ids_and_length_finish_like_stream_generate(model):
    ref = single(model, PROMPTS[0], SamplingParams(max_tokens=30, ignore_eos=True))
    text = "".join(r.text for r in ref)
    stop = text[10:13]  # a stop string that certainly occurs
    stop_id = ref[5].token
    params = [SamplingParams(max_tokens=30, stop=(stop,), ignore_eos=True),
              SamplingParams(max_tokens=30, stop_token_ids=(stop_id,), ignore_eos=True),
              SamplingParams(max_tokens=7, ignore_eos=True)]
    with BatchEngine(model, TOK, max_concurrency=2) as engine:
        outs = batched(engine, [PROMPTS[0]] * 3, params)
    for sp, out in zip(params, outs, strict=True):
        assert summary(out) == summary(single(model, PROMPTS[0], sp))
    assert "".join(r.text for r in outs[0]) == text[:10 + text[10:].index(stop)]
    assert outs[0][-1].finish_reason == "stop" and outs[2][-1].finish_reason == "length"
    assert len(outs[2]) == 7


class Recorder:
    """Wraps the model to record each forward's input shape and the decode-row count."""

    def __init__(self, model, delay: float = 0.0) -> None:
        self.model, self.delay, self.calls = model, delay, []
        self.config = model.config

    def parameters(self):
        return self.model.parameters()

    def make_cache(self, *a, **kw):
        return self.model.make_cache(*a, **kw)

    def __call__(self, ids, **kw):
        self.calls.append(tuple(ids.shape))
        time.sleep(self.delay)
        return self.model(ids, **kw)


def test_long_prefill_is_chunked_and_interleaved_with_running_decodes(model):
    rec = Recorder(model)
    with BatchEngine(rec, TOK, max_concurrency=2, prefill_chunk=8) as engine:
        first = engine.submit(PROMPTS[4], SamplingParams(max_tokens=60, ignore_eos=True))
        it = iter(first)
        for _ in range(3):
            next(it)  # the first sequence is decoding now
        long_prompt = [BOS] + [5 + i % 50 for i in range(100)]
        second = engine.submit(long_prompt, SamplingParams(max_tokens=2, ignore_eos=True))
        list(second)
        rest = list(it)
    assert len(rest) == 57 and rest[-1].finish_reason == "length"
    assert max(t for _, t in rec.calls) <= 8  # no forward longer than one chunk
    after = rec.calls[rec.calls.index((1, 8)):]  # from the long prompt's first chunk on
    prefills = [i for i, c in enumerate(after) if c[1] > 1]
    assert len(prefills) >= 101 // 8
    # between two prefill chunks of the long prompt there is a decode step for the running sequence
    assert all(any(c[1] == 1 for c in after[a + 1:b]) for a, b in zip(prefills, prefills[1:], strict=False))


def test_cancel_frees_the_row_at_once_and_admits_the_waiting_sequence(model):
    rec = Recorder(model, delay=0.01)
    with BatchEngine(rec, TOK, max_concurrency=1, max_queue=1) as engine:
        a = engine.submit(PROMPTS[0], SamplingParams(max_tokens=400, ignore_eos=True))
        b = engine.submit(PROMPTS[1], SamplingParams(max_tokens=3, ignore_eos=True))
        it = iter(a)
        next(it)
        assert (engine.stats().running, engine.stats().waiting) == (1, 1)
        with pytest.raises(QueueFullError, match=r"at capacity: 1 sequences running and 1 waiting.*max_concurrency 1"):
            engine.submit(PROMPTS[2], SamplingParams(max_tokens=3))
        a.cancel()
        a.cancel()  # idempotent
        out = list(b)  # b gets the row as soon as a is gone
        assert len(out) == 3
        deadline = time.monotonic() + 5
        while engine.stats().running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats().running == 0
        steps = engine.stats().decode_steps
    assert steps < 50  # a's 400 tokens were never generated


def test_cancel_a_waiting_sequence_removes_it_from_the_queue(model):
    with BatchEngine(Recorder(model, delay=0.01), TOK, max_concurrency=1, max_queue=2) as engine:
        a = engine.submit(PROMPTS[0], SamplingParams(max_tokens=30, ignore_eos=True))
        b = engine.submit(PROMPTS[1], SamplingParams(max_tokens=30, ignore_eos=True))
        b.cancel()
        assert len(list(a)) == 30
        assert engine.stats().waiting == 0 and engine.stats().running == 0


def test_context_and_vocabulary_errors_name_the_limit(model):
    with BatchEngine(model, TOK, max_model_len=64) as engine:
        assert engine.max_model_len == 64 and engine.cache.max_len == 64
        with pytest.raises(ContextLengthError, match=r"maximum context length is 64 tokens .*prompt has 64 tokens"):
            engine.submit([BOS] * 64)
        with pytest.raises(ContextLengthError, match=r"needs 70 \(60 in the prompt, 10 in max_tokens\).*at most 4"):
            engine.submit([BOS] * 60, SamplingParams(max_tokens=10))
        with pytest.raises(ValueError, match=r"token id 96 is outside the vocabulary \(0..95\)"):
            engine.submit([BOS, 96])
        with pytest.raises(ValueError, match=r"token id 500 is outside"):
            engine.submit([BOS], SamplingParams(logit_bias={500: 1.0}))
        with pytest.raises(ValueError, match="prompt is empty"):
            engine.submit([])
        # max_tokens None: until the context is full
        out = list(engine.submit([BOS] * 60, SamplingParams(max_tokens=None, ignore_eos=True)))
        assert len(out) == 4 and out[-1].finish_reason == "length"
    with pytest.raises(ValueError, match=r"max_len 4096 must be in \[2, 512\]"):
        BatchEngine(model, TOK, max_model_len=4096)
    with pytest.raises(ValueError, match="max_concurrency must be >= 1"):
        BatchEngine(model, TOK, max_concurrency=0)


class Flaky(Recorder):
    """Decode steps raise while `broken` is set."""

    broken = True

    def __call__(self, ids, **kw):
        if self.broken and ids.shape[1] == 1:
            raise RuntimeError("decode exploded")
        return self.model(ids, **kw)


def test_a_failing_step_fails_its_sequences_and_the_engine_keeps_serving(model):
    flaky = Flaky(model)
    with BatchEngine(flaky, TOK) as engine:
        with pytest.raises(RuntimeError, match="decode exploded"):
            list(engine.submit(PROMPTS[0], SamplingParams(max_tokens=5)))
        assert engine.stats().running == 0 and engine.stats().alive
        flaky.broken = False
        assert len(list(engine.submit(PROMPTS[0], SamplingParams(max_tokens=5, ignore_eos=True)))) == 5


def test_a_bad_consumer_or_processor_fails_only_its_own_sequence(model):
    events = []
    with BatchEngine(model, TOK) as engine:
        def gone(event):
            raise RuntimeError("event loop closed")

        engine.submit(PROMPTS[0], SamplingParams(max_tokens=50, ignore_eos=True), on_event=gone)
        ok = engine.submit(PROMPTS[1], SamplingParams(max_tokens=10, ignore_eos=True), on_event=events.append)
        with pytest.raises(RuntimeError, match="submitted with on_event"):
            next(iter(ok))
        deadline = time.monotonic() + 10
        while (not events or events[-1].finish_reason is None) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(events) == 10
        time.sleep(0.05)
        assert engine.stats().running == 0  # the sequence with the broken consumer was cancelled


def test_close_fails_queued_and_running_sequences(model):
    engine = BatchEngine(Recorder(model, delay=0.02), TOK, max_concurrency=1).start()
    a = engine.submit(PROMPTS[0], SamplingParams(max_tokens=400, ignore_eos=True))
    b = engine.submit(PROMPTS[1], SamplingParams(max_tokens=400, ignore_eos=True))
    next(iter(a))
    threading.Timer(0.05, engine.close).start()
    for handle in (a, b):
        with pytest.raises(EngineClosedError, match="shut down before this request finished"):
            list(handle)
    with pytest.raises(EngineClosedError, match="shutting down"):
        engine.submit(PROMPTS[2])
    assert not engine.stats().alive


def test_extra_logits_processors_run_per_sequence(model):
    class Force:
        """Stateful per-sequence processor: forces token `t` until it has been generated twice."""

        def __init__(self, t: int) -> None:
            self.t = t

        def __call__(self, generated, logits):
            if int((generated == self.t).sum()) >= 2:
                return logits
            out = torch.full_like(logits, -1e9)
            out[:, self.t] = 0
            return out

    params = SamplingParams(max_tokens=6, ignore_eos=True)
    with BatchEngine(model, TOK) as engine:
        a = engine.submit(PROMPTS[0], params, logits_processors=[Force(7)])
        b = engine.submit(PROMPTS[1], params, logits_processors=[Force(9)])
        c = engine.submit(PROMPTS[2], params)
        out_a, out_b, out_c = list(a), list(b), list(c)
    assert [r.token for r in out_a][:2] == [7, 7] and [r.token for r in out_b][:2] == [9, 9]
    ref = single(model, PROMPTS[0], params)
    assert summary(out_c) == summary(single(model, PROMPTS[2], params))
    forced = list(stream_generate(model, TOK, PROMPTS[0], params, logits_processors=[Force(7)]))
    assert summary(out_a) == summary(forced) and summary(out_a) != summary(ref)

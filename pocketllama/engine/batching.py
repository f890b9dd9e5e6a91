"""Continuous batching for the server: one engine thread owns the model and a KV cache with one row per running
sequence; sequences join and leave the running batch between decode steps, and prompts are prefilled in
chunks interleaved with decode steps so running streams never wait for more than one chunk.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .generate import GenerationResponse, context_limit, peak_memory_gb
from .sampling import (
    LogitsProcessor,
    Sampler,
    SamplingParams,
    greedy,
    make_generator,
    make_logits_processors,
    sampler_from_params,
    token_logprobs,
    top_logprobs,
)
from .stops import TokenStopper, stop_ids_for

log = logging.getLogger("pocketllama.batching")

Event = GenerationResponse | BaseException  # what a sequence's consumer receives, in order


class QueueFullError(RuntimeError):
    """Raised by `BatchEngine.submit` when running + waiting sequences would exceed the engine's capacity."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ContextLengthError(ValueError):
    """A prompt (plus the requested max_tokens) does not fit in the engine's max_model_len."""


class EngineClosedError(RuntimeError):
    """The engine is shut down (or shutting down) and takes no more work."""


class SequenceHandle:
    """One submitted sequence. Consume its events either through the `on_event` callback given to `submit`
    (called on the engine thread) or, without a callback, by iterating the handle (blocking). `cancel()`
    frees its KV cache row before the next step; it is safe to call from any thread, more than once."""

    def __init__(self, engine: BatchEngine, seq: _Sequence) -> None:
        self._engine, self._seq = engine, seq

    @property
    def prompt_tokens(self) -> int:
        return len(self._seq.prompt)

    @property
    def max_tokens(self) -> int:
        return self._seq.budget

    def cancel(self) -> None:
        self._engine._cancel(self._seq)

    def __iter__(self) -> Iterator[GenerationResponse]:
        """Yield GenerationResponses until the one with a finish_reason; an engine error is raised."""
        events = self._seq.events
        if events is None:
            raise RuntimeError("this sequence was submitted with on_event; its events go to that callback")
        while True:
            event = events.get()
            if isinstance(event, BaseException):
                raise event
            yield event
            if event.finish_reason is not None:
                return


@dataclass
class EngineStats:
    """A snapshot for /metrics and /health."""

    running: int
    waiting: int
    max_concurrency: int
    max_queue: int
    max_model_len: int
    kv_cache_bytes: int
    decode_steps: int
    prefill_tokens: int
    alive: bool
    prefix_cache_hits: int = 0  # prefix cache (engine/prefix_cache.py): requests that reused cached blocks,
    prefix_cache_hit_tokens: int = 0  # the prompt tokens they did not prefill,
    prefix_cache_bytes: int = 0  # and the bytes its blocks hold


class _Sequence:
    """Engine-side state of one sequence: its cache row, progress, sampler, processors and stop rules."""

    def __init__(self, prompt: list[int], params: SamplingParams, budget: int, tokenizer: Any,
                 on_event: Callable[[Event], None] | None, device: torch.device,
                 extra_processors: Sequence[LogitsProcessor] = ()) -> None:
        self.prompt, self.params, self.budget = prompt, params, budget
        self.events: queue.SimpleQueue[Event] | None = None
        if on_event is None:
            self.events = queue.SimpleQueue()
            on_event = self.events.put
        self.on_event = on_event
        self.sampler: Sampler = sampler_from_params(params, make_generator(params.seed, device))
        self.processors: list[LogitsProcessor] = [*make_logits_processors(params, prompt), *extra_processors]
        # ids generated so far for the processors: a fixed buffer viewed as [1, n] (no per-step concat)
        self.history = torch.zeros(1, budget, dtype=torch.long, device=device) if self.processors else None
        self.plain_greedy = params.greedy and not self.processors and not params.logprobs
        self.stopper = TokenStopper(tokenizer, params.stop, stop_ids_for(params, tokenizer), budget)
        self.row = -1
        self.prefilled = 0  # prompt tokens already in the cache
        self.cached = 0  # of which copied from the prefix cache
        self.generated = 0
        self.next_token = -1  # the last sampled token: the input of the next decode step
        self.cancelled = self.done = False
        self.submitted = time.perf_counter()
        self.started = self.first = 0.0

    @property
    def position(self) -> int:
        """Cache slot of `next_token`."""
        return len(self.prompt) + self.generated - 1

    def pick(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """Sample this sequence's next token from its logits row [1, V] -> (id, raw logprobs [V] or None)."""
        logprobs = token_logprobs(logits)[0] if self.params.logprobs else None
        for proc in self.processors:
            logits = proc(self.history[:, : self.generated], logits)
        return int(self.sampler(logits)), logprobs

    def accept(self, token: int, logprobs: torch.Tensor | None, device: torch.device) -> GenerationResponse:
        """Fold one sampled token in: detokenize, apply the stop rules (as `stream_generate`), build its response."""
        now = time.perf_counter()
        n = self.generated
        if n == 0:
            self.first = now
        if self.history is not None:
            self.history[0, n] = token
        self.generated = n + 1
        self.next_token = token
        text, finish = self.stopper.step(token, n)
        lp = tops = None
        if logprobs is not None:
            lp = float(logprobs[token])
            if self.params.top_logprobs:
                tops = top_logprobs(logprobs, self.params.top_logprobs)
        prompt_time = self.first - self.started
        gen_time = now - self.first
        return GenerationResponse(
            text=text, token=token, logprob=lp, top_logprobs=tops, finish_reason=finish,
            prompt_tokens=len(self.prompt), generation_tokens=n + 1, cached_tokens=self.cached,
            prompt_tps=(len(self.prompt) - self.cached) / prompt_time if prompt_time > 0 else 0.0,
            generation_tps=n / gen_time if gen_time > 0 else 0.0,
            prompt_time=prompt_time, generation_time=gen_time, peak_memory=peak_memory_gb(device),
        )


class BatchEngine:
    """Continuous batching over one model: `submit` prompts from any thread; one engine thread runs them.

    Each engine iteration: drop cancelled sequences, admit waiting ones into free cache rows, run one
    prefill forward of at most `prefill_chunk` (padded) prompt tokens, then one decode step for every
    sequence that has a token to feed. A sequence's events are GenerationResponses (as `stream_generate`
    yields: text delta, token, logprobs, finish_reason, usage), or one exception if the engine failed it.

    max_concurrency: KV cache rows (sequences decoding together). max_queue: sequences that may wait for a
    row; `submit` beyond running + waiting = max_concurrency + max_queue raises QueueFullError.
    max_model_len: tokens per sequence (prompt + generated); sizes the KV cache, at most the model's context.
    prefix_cache: a `PrefixCache` shared across requests: a prompt starting with cached blocks (a common system
    prompt) copies their K/V into its row instead of prefilling them; every prefilled prompt is offered to it.
    Speculative decoding is not used here: a batched decode step already amortises each weight read over the
    running rows, which is the same bandwidth saving drafting buys for one sequence, and rows accept drafts
    of different lengths; batch-1 speculation is `stream_generate(drafter=...)` (CLI, `LLM`).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_concurrency: int = 8, max_queue: int = 64,
                 max_model_len: int | None = None, prefill_chunk: int = 256, prefix_cache: Any = None) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model, self.tokenizer = model, tokenizer
        self.max_concurrency, self.max_queue, self.prefill_chunk = max_concurrency, max_queue, prefill_chunk
        self.prefix_cache = prefix_cache
        self.max_model_len = context_limit(model, max_model_len)
        self.vocab_size = int(model.config.vocab_size)
        param = next(model.parameters())
        self.device = param.device
        self.cache = model.make_cache(max_concurrency, self.max_model_len)
        self._lock = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._cancelled: list[_Sequence] = []
        self._running: dict[int, _Sequence] = {}  # cache row -> sequence
        self._free_rows = list(range(max_concurrency))
        self._closing = False
        self._decode_steps = self._prefill_tokens = 0
        self._thread = threading.Thread(target=self._run, name="pocketllama-engine", daemon=True)

    # ---- public API (any thread) ------------------------------------------------------------------------

    def start(self) -> BatchEngine:
        self._thread.start()
        return self

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the engine thread; sequences still queued or running get an EngineClosedError."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def __enter__(self) -> BatchEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_fits(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """The generation budget for a prompt, or ContextLengthError naming max_model_len."""
        limit = self.max_model_len
        if prompt_tokens < 1:
            raise ValueError("prompt is empty: generation needs at least one prompt token")
        if prompt_tokens >= limit:
            raise ContextLengthError(
                f"this server's maximum context length is {limit} tokens (max_model_len), but the prompt has "
                f"{prompt_tokens} tokens; shorten the prompt to at most {limit - 1} tokens")
        if max_tokens is not None and prompt_tokens + max_tokens > limit:
            raise ContextLengthError(
                f"this server's maximum context length is {limit} tokens (max_model_len), but the request "
                f"needs {prompt_tokens + max_tokens} ({prompt_tokens} in the prompt, {max_tokens} in "
                f"max_tokens); lower max_tokens to at most {limit - prompt_tokens} or shorten the prompt")
        return limit - prompt_tokens if max_tokens is None else max_tokens

    def check_capacity(self, n: int = 1) -> None:
        """QueueFullError if `n` more sequences would not fit in running + waiting."""
        with self._lock:
            self._check_capacity(n)

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *,
               on_event: Callable[[Event], None] | None = None,
               logits_processors: Sequence[LogitsProcessor] = ()) -> SequenceHandle:
        """Queue one sequence. max_tokens None means "until max_model_len". Raises ContextLengthError,
        ValueError (bad token ids), QueueFullError or EngineClosedError; never blocks on the model.
        `logits_processors` (stateful, one set per sequence) run after the ones `params` asks for."""
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt_ids]
        bad = [t for t in (*prompt, *params.logit_bias) if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        budget = self.check_fits(len(prompt), params.max_tokens)
        seq = _Sequence(prompt, params, budget, self.tokenizer, on_event, self.device, logits_processors)
        with self._lock:
            if self._closing:
                raise EngineClosedError("the engine is shutting down")
            self._check_capacity(1)
            self._waiting.append(seq)
            self._lock.notify_all()
        return SequenceHandle(self, seq)

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(running=len(self._running), waiting=len(self._waiting),
                               max_concurrency=self.max_concurrency, max_queue=self.max_queue,
                               max_model_len=self.max_model_len, kv_cache_bytes=self.cache.nbytes,
                               decode_steps=self._decode_steps, prefill_tokens=self._prefill_tokens,
                               alive=self._thread.is_alive() and not self._closing, **self._prefix_stats())

    def _prefix_stats(self) -> dict[str, int]:
        pc = self.prefix_cache
        if pc is None:
            return {}
        return {"prefix_cache_hits": pc.stats.hits, "prefix_cache_hit_tokens": pc.stats.hit_tokens,
                "prefix_cache_bytes": pc.nbytes}

    # ---- internals ----------------------------------------------------------------------------------------

    def _check_capacity(self, n: int) -> None:
        running, waiting = len(self._running), len(self._waiting)
        if running + waiting + n > self.max_concurrency + self.max_queue:
            raise QueueFullError(
                f"the server is at capacity: {running} sequences running and {waiting} waiting (max_concurrency "
                f"{self.max_concurrency}, max_queue {self.max_queue}); retry shortly", retry_after=1.0)

    def _cancel(self, seq: _Sequence) -> None:
        with self._lock:
            if seq.cancelled or seq.done:
                return
            seq.cancelled = True
            self._cancelled.append(seq)
            self._lock.notify_all()

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not (self._closing or self._waiting or self._running or self._cancelled):
                        self._lock.wait()
                    if self._closing:
                        break
                    self._reap_cancelled()
                    self._admit()
                    running = [self._running[r] for r in sorted(self._running)]
                try:
                    self._iteration(running)
                except Exception as e:  # never let the engine thread die; fail what was running
                    log.exception("engine iteration failed")
                    for seq in running:
                        self._fail(seq, e)
        with self._lock:
            left = list(self._waiting) + list(self._running.values())
            self._waiting.clear()
        for seq in left:
            self._fail(seq, EngineClosedError("the server shut down before this request finished"))

    def _reap_cancelled(self) -> None:  # under the lock
        for seq in self._cancelled:
            if seq in self._waiting:
                self._waiting.remove(seq)
            self._release(seq)
        self._cancelled.clear()

    def _admit(self) -> None:  # under the lock
        while self._waiting and self._free_rows:
            seq = self._waiting.popleft()
            seq.row = self._free_rows.pop(0)
            seq.started = time.perf_counter()
            self._running[seq.row] = seq
            if self.prefix_cache is not None:  # (the engine thread: the prefix cache is not thread-safe)
                seq.prefilled = seq.cached = self.prefix_cache.load(self.cache, seq.row, seq.prompt)

    def _release(self, seq: _Sequence) -> None:
        """Give the sequence's row back (callers hold the lock, or take it here)."""
        seq.done = True
        if seq.row >= 0 and self._running.get(seq.row) is seq:
            del self._running[seq.row]
            self._free_rows.append(seq.row)
            self._free_rows.sort()
        seq.row = -1

    def _finish(self, seq: _Sequence) -> None:
        with self._lock:
            self._release(seq)

    def _fail(self, seq: _Sequence, error: BaseException) -> None:
        if seq.done:
            return
        self._finish(seq)
        self._emit(seq, error)

    def _emit(self, seq: _Sequence, event: Event) -> None:
        try:
            seq.on_event(event)
        except Exception:  # a consumer that went away (closed event loop): treat as a cancellation
            log.debug("dropping an event for a consumer that is gone", exc_info=True)
            self._cancel(seq)

    def _iteration(self, running: list[_Sequence]) -> None:
        live = [s for s in running if not s.cancelled]
        prefill = [s for s in live if s.prefilled < len(s.prompt)]
        if prefill:
            self._prefill(prefill)
        decode = [s for s in live if s.prefilled == len(s.prompt) and s.generated and not s.done
                  and not s.cancelled]
        if decode:
            self._decode(decode)

    def _prefill(self, seqs: list[_Sequence]) -> None:
        """One forward over the next prompt pieces of the oldest prefilling sequences, right-padded to the
        first one's piece length T, keeping B * T <= prefill_chunk. Padded positions are clamped to the last
        cache slot, which no prompt token ever uses and the last decode step never reads."""
        first = seqs[0]
        T = min(len(first.prompt) - first.prefilled, self.prefill_chunk)
        group = [first]
        for s in seqs[1:]:
            if (len(group) + 1) * T > self.prefill_chunk:
                break
            group.append(s)
        B, dev = len(group), self.device
        ids = torch.zeros(B, T, dtype=torch.long)
        positions = torch.empty(B, T, dtype=torch.long)
        last = torch.empty(B, dtype=torch.long)
        pieces = []
        for b, s in enumerate(group):
            n = min(len(s.prompt) - s.prefilled, T)
            ids[b, :n] = torch.tensor(s.prompt[s.prefilled: s.prefilled + n])
            positions[b] = torch.arange(s.prefilled, s.prefilled + T).clamp_(max=self.max_model_len - 1)
            last[b] = n - 1
            pieces.append(n)
        rows = torch.tensor([s.row for s in group], dtype=torch.long, device=dev)
        try:
            logits = self.model(ids.to(dev), positions=positions.to(dev), cache=self.cache,
                                logits_at=last.to(dev), cache_rows=rows)[:, -1].float()  # (B, V)
        except Exception as e:
            log.exception("prefill failed")
            for s in group:
                self._fail(s, e)
            return
        self._prefill_tokens += sum(pieces)
        done = []
        for b, (s, n) in enumerate(zip(group, pieces, strict=True)):
            s.prefilled += n
            if s.prefilled == len(s.prompt):
                done.append(b)
                if self.prefix_cache is not None:
                    self.prefix_cache.insert(self.cache, s.row, s.prompt)
        if done:
            self._sample([group[b] for b in done], logits[done])

    def _decode(self, seqs: list[_Sequence]) -> None:
        """One decode step: next_token [B, 1] at each sequence's own position, against its cache row."""
        dev = self.device
        ids = torch.tensor([[s.next_token] for s in seqs], dtype=torch.long, device=dev)  # (B, 1)
        positions = torch.tensor([[s.position] for s in seqs], dtype=torch.long, device=dev)  # (B, 1)
        row_ids = [s.row for s in seqs]
        # the whole cache in row order needs no gather of K/V rows
        rows = None if row_ids == list(range(self.max_concurrency)) else torch.tensor(row_ids, device=dev)
        try:
            logits = self.model(ids, positions=positions, cache=self.cache, cache_rows=rows)[:, -1].float()
        except Exception as e:
            log.exception("decode step failed")
            for s in seqs:
                self._fail(s, e)
            return
        self._decode_steps += 1
        self._sample(seqs, logits)

    def _sample(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        """Pick a token for every sequence from its logits row (B, V), then emit and retire finished ones.
        Plain greedy rows share one argmax; the others use their own sampler and processors, row by row."""
        tokens: list[int | None] = [None] * len(seqs)
        lps: list[torch.Tensor | None] = [None] * len(seqs)
        fast = [i for i, s in enumerate(seqs) if s.plain_greedy]
        if fast:
            for i, t in zip(fast, greedy(logits[fast]).tolist(), strict=True):
                tokens[i] = t
        for i, s in enumerate(seqs):
            if tokens[i] is None:
                try:
                    tokens[i], lps[i] = s.pick(logits[i: i + 1])
                except Exception as e:  # a bad request (e.g. a processor rejecting its input) fails alone
                    log.warning("sampling failed for one sequence: %s", e)
                    self._fail(s, e)
        for s, token, lp in zip(seqs, tokens, lps, strict=True):
            if token is None or s.done:
                continue
            response = s.accept(token, lp, self.device)
            if response.finish_reason is not None:
                self._finish(s)
            self._emit(s, response)

"""Token generation, layered as in mlx-lm: `generate_step` (prefill + fixed-shape decode steps, yields token
ids) -> `stream_generate` (detokenizing, stop rules, timings; yields `GenerationResponse`) -> `generate`.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .kv_cache import round_up
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

# The KV cache is sized to prompt + max_tokens rounded up to this (then capped at the context): few
# distinct cache shapes, so a compiled step is reused across requests; matches the model's attention window.
CACHE_ROUND = 256

FinishReason = Literal["stop", "length"]
Truncate = Literal["error", "left"]


# ---------------------------------------------------------------------------------------------------------
# Context budget


def context_limit(model: nn.Module, max_len: int | None = None) -> int:
    """Tokens the sequence may hold: `max_len` if given (at most the model's), else max_position_embeddings."""
    model_max = int(model.config.max_position_embeddings)
    if max_len is None:
        return model_max
    if not 1 < max_len <= model_max:
        raise ValueError(f"max_len {max_len} must be in [2, {model_max}] (the model's max_position_embeddings)")
    return max_len


def fit_prompt(prompt_ids: list[int], context: int, max_tokens: int | None, truncate: Truncate = "error"
               ) -> list[int]:
    """Check that the prompt leaves room for at least one generated token in `context`.

    truncate="error": a prompt of `context` tokens or more raises ValueError. truncate="left" (opt-in)
    drops the oldest tokens instead, keeping the last `context - min(max_tokens, context // 2)` (room for
    max_tokens, but never less than half the context for the prompt). Dropping from the left loses the BOS
    token and the start of any chat template: a caller that cares re-renders a shorter conversation.
    """
    if truncate not in ("error", "left"):
        raise ValueError(f"truncate must be 'error' or 'left', got {truncate!r}")
    if not prompt_ids:
        raise ValueError("prompt is empty: generation needs at least one prompt token (e.g. BOS)")
    if len(prompt_ids) < context:
        return prompt_ids
    if truncate == "left":
        reserve = min(max_tokens or context, context // 2)
        return prompt_ids[len(prompt_ids) - (context - reserve):]
    raise ValueError(f"prompt has {len(prompt_ids)} tokens but the context holds {context} (prompt + generated); "
                     f"shorten the prompt to at most {context - 1} tokens or pass truncate='left'")


def _fit_cached_prompt(prompt_ids: list[int], context: int, max_tokens: int | None, truncate: Truncate,
                       cached_tokens: int) -> list[int]:
    fitted = fit_prompt(prompt_ids, context, max_tokens, truncate)
    if cached_tokens and len(fitted) != len(prompt_ids):
        raise ValueError(f"truncate='left' dropped {len(prompt_ids) - len(fitted)} prompt tokens, so the "
                         f"{cached_tokens} cached tokens no longer match the prompt; pass cached_tokens=0")
    return fitted


def generation_budget(prompt_len: int, max_tokens: int | None, context: int, cache: Any = None) -> int:
    """How many tokens can be generated: max_tokens, capped by the context and a given cache's length."""
    room = context - prompt_len
    if cache is not None:
        room = min(room, cache.max_len - prompt_len)
    return room if max_tokens is None else min(max_tokens, room)


def cache_length(tokens: int, context: int, compile: bool = False) -> int:
    """KV cache slots for a request of `tokens`: a multiple of CACHE_ROUND, or with compile a power of two
    (>= CACHE_ROUND) so that at most ~10 cache shapes, each one compiled graph, cover any request; capped
    at the context."""
    if compile:
        return min(max(CACHE_ROUND, 1 << (tokens - 1).bit_length()), context)
    return min(round_up(tokens, CACHE_ROUND), context)


# ---------------------------------------------------------------------------------------------------------
# Decode step


class DecodeStep:
    """One fixed-shape decode step: token [B, 1] at positions [B, 1] -> float32 logits [B, V].

    With compile=True the step (not the loop) goes through torch.compile; `DecodeStep.for_model(model,
    compile=True)` keeps that compiled step on the model (attribute `_pocketllama_compiled_step`, so it
    lives and dies with the model) and reuses its graphs across requests.
    """

    def __init__(self, model: nn.Module, compile: bool = False) -> None:
        self.model = model
        self.compiled = compile
        self._fn = torch.compile(self._forward, dynamic=False) if compile else self._forward

    @classmethod
    def for_model(cls, model: nn.Module, compile: bool = False) -> DecodeStep:
        if not compile:
            return cls(model)
        step = getattr(model, "_pocketllama_compiled_step", None)
        if step is None:
            step = cls(model, compile=True)
            object.__setattr__(model, "_pocketllama_compiled_step", step)  # plain attribute, not a submodule
        return step

    def _forward(self, token: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        return self.model(token, positions=positions, cache=cache)[:, -1].float()  # (B, V)

    def __call__(self, token: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        return self._fn(token, positions, cache)


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _as_id_list(prompt_ids: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() == 2 and prompt_ids.shape[0] == 1:
            prompt_ids = prompt_ids[0]
        if prompt_ids.dim() != 1:
            raise ValueError(f"prompt_ids must be 1-D (or [1, T]); got shape {tuple(prompt_ids.shape)}; "
                             "batches go through engine.batching")
        return prompt_ids.tolist()
    return [int(t) for t in prompt_ids]


def generate_step(
    model: nn.Module,
    prompt_ids: Sequence[int] | torch.Tensor,
    *,
    sampler: Sampler | None = None,
    logits_processors: Iterable[LogitsProcessor] = (),
    max_tokens: int | None = 256,
    cache: Any = None,
    cached_tokens: int = 0,
    prefill_step_size: int = 512,
    max_len: int | None = None,
    truncate: Truncate = "error",
    compile: bool = False,
    logprobs: bool = True,
) -> Iterator[tuple[int, torch.Tensor | None]]:
    """Prefill the prompt, then decode one token per step; yields (token id, raw logprobs [V], or None with
    logprobs=False, which saves a log-softmax over the vocabulary per token).

    The prompt is prefilled in chunks of `prefill_step_size` into a static KV cache sized to prompt +
    max_tokens (see `cache_length`). Each decode step has fixed shapes (input [1, 1], positions [1, 1]);
    the only host sync is `.item()` on the token that leaves. compile=True runs the step through
    torch.compile (compiled once per model and cache length; the first call pays the compile time).
    Stops after max_tokens (None: when the context is full); stop rules live in `stream_generate`.

    Prompt caching: pass `cache` (batch 1) already holding the K/V of the first `cached_tokens` ids of
    `prompt_ids` (the full prompt); only the rest is prefilled. Arguments are checked on call, not on the
    first `next()`. Logprobs are the model's raw distribution (before processors and temperature).
    """
    prompt, budget, cache, start = prepare_request(model, prompt_ids, max_tokens=max_tokens, cache=cache,
                                                   cached_tokens=cached_tokens, prefill_step_size=prefill_step_size,
                                                   max_len=max_len, truncate=truncate, compile=compile)
    step = DecodeStep.for_model(model, compile)
    return _steps(model, step, prompt, sampler or greedy, list(logits_processors), budget, cache, start,
                  prefill_step_size, logprobs)


def prepare_request(model: nn.Module, prompt_ids: Sequence[int] | torch.Tensor, *, max_tokens: int | None,
                    cache: Any, cached_tokens: int, prefill_step_size: int, max_len: int | None,
                    truncate: Truncate, compile: bool = False) -> tuple[list[int], int, Any, int]:
    """Check a request and size its cache: (prompt ids, token budget, KV cache, first position to prefill).
    Shared by `generate_step` and `speculative.speculative_generate_step`."""
    if prefill_step_size < 1:
        raise ValueError(f"prefill_step_size must be >= 1, got {prefill_step_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 (or None), got {max_tokens}")
    context = context_limit(model, max_len)
    prompt = _fit_cached_prompt(_as_id_list(prompt_ids), context, max_tokens, truncate, cached_tokens)
    if not 0 <= cached_tokens <= len(prompt):
        raise ValueError(f"cached_tokens {cached_tokens} must be in [0, {len(prompt)}] (the prompt length)")
    if cached_tokens and cache is None:
        raise ValueError(f"cached_tokens={cached_tokens} needs the cache that holds them (cache=None)")
    if cache is not None and cache.max_len <= len(prompt):
        raise ValueError(f"the given KV cache holds {cache.max_len} tokens, too few for the {len(prompt)}-token "
                         "prompt plus one generated token; allocate a longer one with model.make_cache")
    budget = generation_budget(len(prompt), max_tokens, context, cache)
    if cache is None:
        cache = model.make_cache(1, cache_length(len(prompt) + budget, context, compile))
    return prompt, budget, cache, min(cached_tokens, len(prompt) - 1)


def prefill(model: nn.Module, prompt: list[int], cache: Any, start: int, chunk: int) -> torch.Tensor:
    """Write the K/V of prompt[start:] into `cache` in chunks; returns the float32 logits [1, V] of the last
    prompt token. Call under torch.no_grad()."""
    device = _device(model)
    ids = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
    logits = None
    for s in range(start, len(prompt), chunk):
        e = min(s + chunk, len(prompt))
        positions = torch.arange(s, e, device=device)[None]  # (1, e - s)
        last = torch.tensor([e - s - 1], device=device)  # only the last row's logits are needed
        logits = model(ids[:, s:e], positions=positions, cache=cache, logits_at=last)[:, -1].float()
    assert logits is not None  # start < len(prompt) always
    return logits


def _steps(model: nn.Module, step: DecodeStep, prompt: list[int], sampler: Sampler,
           processors: list[LogitsProcessor], budget: int, cache: Any, start: int, chunk: int,
           want_logprobs: bool = True) -> Iterator[tuple[int, torch.Tensor | None]]:
    device = _device(model)
    # Ids generated so far, for the processors: a fixed buffer viewed as [1, n] (no per-step concat).
    generated = torch.zeros(1, budget, dtype=torch.long, device=device) if processors else None

    def pick(logits: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        logprobs = token_logprobs(logits) if want_logprobs else None  # (1, V), raw model distribution
        for proc in processors:
            logits = proc(generated[:, :n], logits)
        return sampler(logits), logprobs  # (1,), (1, V)

    with torch.no_grad():
        logits = prefill(model, prompt, cache, start, chunk)
        y, logprobs = pick(logits, 0)
        position = torch.full((1, 1), len(prompt), dtype=torch.long, device=device)  # (1, 1), bumped on device

    for n in range(budget):
        yield int(y.item()), None if logprobs is None else logprobs[0]  # the one host sync per token
        if n + 1 == budget:
            return
        with torch.no_grad():
            if generated is not None:
                generated[:, n] = y
            logits = step(y.view(1, 1), position, cache)  # (1, V)
            position += 1
            y, logprobs = pick(logits, n + 1)


# ---------------------------------------------------------------------------------------------------------
# Streaming with detokenizing and stop rules


@dataclass
class GenerationResponse:
    """One generated token. `text` is the new text it makes safe to emit (may be ""); the last response
    has finish_reason "stop" (stop token or stop string) or "length" (max_tokens or the context)."""

    text: str
    token: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: FinishReason | None
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    prompt_time: float
    generation_time: float
    peak_memory: float | None = None  # GB: CUDA max allocated, or the process's peak RSS on CPU
    cached_tokens: int = 0
    draft_tokens: int = 0  # speculative decoding: drafted tokens the target checked so far ...
    accepted_tokens: int = 0  # ... and how many of them it kept

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9


def _encode_prompt(tokenizer: Any, prompt: str | Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_bos=getattr(tokenizer, "add_bos", True))
    return _as_id_list(prompt)


def stream_generate(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | Sequence[int] | torch.Tensor,
    params: SamplingParams | None = None,
    *,
    cache: Any = None,
    cached_tokens: int = 0,
    max_len: int | None = None,
    truncate: Truncate = "error",
    prefill_step_size: int = 512,
    compile: bool = False,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    drafter: Any = None,
    num_draft: int = 7,
) -> Iterator[GenerationResponse]:
    """Generate for one prompt (ids, or text encoded with the tokenizer's BOS convention) under `params`.

    Stops at any of tokenizer.stop_ids (unless params.ignore_eos) or params.stop_token_ids -- the stop
    token's text is not emitted -- at a stop string (held back until it can no longer start one; the text
    before it is emitted, the stop string and anything after it never are), or after max_tokens / at the
    context limit ("length"). `sampler` / `logits_processors` override the ones built from params.

    drafter (see engine/drafters.py): speculative decoding with up to `num_draft` tokens per round; the same
    tokens under greedy decoding, the same distribution under sampling (it draws from params, so it takes no
    `sampler`). Responses then count draft_tokens / accepted_tokens.
    """
    params = params or SamplingParams()
    device = _device(model)
    context = context_limit(model, max_len)
    prompt_ids = _fit_cached_prompt(_encode_prompt(tokenizer, prompt), context, params.max_tokens, truncate,
                                    cached_tokens)
    if drafter is not None and sampler is not None:
        raise ValueError("speculative decoding draws from the distribution SamplingParams describe; pass params "
                         "(temperature, top_p, ...) instead of a sampler, or drop the drafter")
    if logits_processors is None:
        logits_processors = make_logits_processors(params, prompt_ids)
    tic = time.perf_counter()
    spec = None
    if drafter is not None:
        from .speculative import speculative_generate_step

        steps: Any = speculative_generate_step(
            model, prompt_ids, drafter, params=params, logits_processors=logits_processors,
            generator=make_generator(params.seed, device), max_tokens=params.max_tokens, cache=cache,
            cached_tokens=cached_tokens, prefill_step_size=prefill_step_size, max_len=context, compile=compile,
            num_draft=num_draft)
        spec = steps.stats
    else:
        if sampler is None:
            sampler = sampler_from_params(params, make_generator(params.seed, device))
        steps = generate_step(model, prompt_ids, sampler=sampler, logits_processors=logits_processors,
                              max_tokens=params.max_tokens, cache=cache, cached_tokens=cached_tokens,
                              prefill_step_size=prefill_step_size, max_len=context, compile=compile,
                              logprobs=bool(params.logprobs))
    budget = generation_budget(len(prompt_ids), params.max_tokens, context, cache)
    stopper = TokenStopper(tokenizer, params.stop, stop_ids_for(params, tokenizer), budget)
    prefilled = len(prompt_ids) - min(cached_tokens, len(prompt_ids) - 1)
    prompt_time, first = 0.0, tic

    for n, (token, logprobs) in enumerate(steps):
        now = time.perf_counter()
        if n == 0:
            prompt_time, first = now - tic, now
        text, finish = stopper.step(token, n)
        lp = tops = None
        if params.logprobs:
            lp = float(logprobs[token])
            if params.top_logprobs:
                tops = top_logprobs(logprobs, params.top_logprobs)
        gen_time = now - first
        yield GenerationResponse(
            text=text, token=token, logprob=lp, top_logprobs=tops, finish_reason=finish,
            prompt_tokens=len(prompt_ids), generation_tokens=n + 1,
            prompt_tps=prefilled / prompt_time if prompt_time > 0 else 0.0,
            generation_tps=n / gen_time if gen_time > 0 else 0.0,
            prompt_time=prompt_time, generation_time=gen_time,
            peak_memory=peak_memory_gb(device), cached_tokens=len(prompt_ids) - prefilled,
            draft_tokens=spec.drafted if spec else 0, accepted_tokens=spec.accepted if spec else 0,
        )
        if finish is not None:
            break


@dataclass
class GenerationResult:
    """A finished generation: the joined text, the token ids (including a final stop token), usage, timings."""

    text: str
    tokens: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    prompt_time: float
    generation_time: float
    peak_memory: float | None = None
    cached_tokens: int = 0
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = field(default=None)
    draft_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    @classmethod
    def join(cls, responses: Iterable[GenerationResponse], params: SamplingParams) -> GenerationResult:
        """Join a stream of responses (from `stream_generate` under `params`) into one result."""
        texts: list[str] = []
        tokens: list[int] = []
        lps: list[float] = []
        tops: list[list[tuple[int, float]]] = []
        last: GenerationResponse | None = None
        for last in responses:
            texts.append(last.text)
            tokens.append(last.token)
            if last.logprob is not None:
                lps.append(last.logprob)
            if last.top_logprobs is not None:
                tops.append(last.top_logprobs)
        assert last is not None and last.finish_reason is not None  # the budget is always >= 1
        return cls(
            text="".join(texts), tokens=tokens, finish_reason=last.finish_reason,
            prompt_tokens=last.prompt_tokens, generation_tokens=last.generation_tokens,
            prompt_tps=last.prompt_tps, generation_tps=last.generation_tps, prompt_time=last.prompt_time,
            generation_time=last.generation_time, peak_memory=last.peak_memory, cached_tokens=last.cached_tokens,
            logprobs=lps if params.logprobs else None, top_logprobs=tops if params.top_logprobs else None,
            draft_tokens=last.draft_tokens, accepted_tokens=last.accepted_tokens,
        )


def generate(model: nn.Module, tokenizer: Any, prompt: str | Sequence[int] | torch.Tensor,
             params: SamplingParams | None = None, **kwargs: Any) -> GenerationResult:
    """Run `stream_generate` to the end and join it; kwargs go to stream_generate."""
    params = params or SamplingParams()
    return GenerationResult.join(stream_generate(model, tokenizer, prompt, params, **kwargs), params)

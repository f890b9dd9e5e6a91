"""Sampling: `SamplingParams`, samplers made once by `make_sampler(...)`, and logits processors
(repetition / presence / frequency penalties, logit bias). Everything is batch-shaped: logits are [B, V].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

Sampler = Callable[[torch.Tensor], torch.Tensor]  # logits [B, V] -> token ids [B]
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (generated [B, n], logits [B, V]) -> logits


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Defaults are greedy decoding of up to 256 tokens.

    temperature 0 means greedy (argmax; top_p/top_k/min_p are then ignored). top_k 0 (or -1) and top_p 1.0
    and min_p 0.0 disable those filters. Penalties follow HF (repetition_penalty, over prompt + generated
    tokens) and OpenAI (presence/frequency, over generated tokens only). logit_bias maps token id -> value
    added to the logits. max_tokens None generates until the context is full (the KV cache is then sized
    to the whole context). stop strings are never part of the returned text. stop_token_ids end generation
    like the tokenizer's stop ids; ignore_eos drops the tokenizer's stop ids (benchmarks) but keeps
    stop_token_ids. logprobs/top_logprobs report the model's raw distribution (see `token_logprobs`).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict, hash=False)
    seed: int | None = None
    max_tokens: int | None = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # Normalize containers so params are immutable and callers may pass lists / a single string.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in (self.stop_token_ids or ())))
        object.__setattr__(self, "logit_bias", {int(k): float(v) for k, v in (self.logit_bias or {}).items()})
        if self.top_k == -1:  # vLLM's spelling of "disabled"
            object.__setattr__(self, "top_k", 0)
        _check_filters(self.temperature, self.top_p, self.top_k, self.min_p)
        if not self.repetition_penalty > 0 or not math.isfinite(self.repetition_penalty):
            raise ValueError(f"repetition_penalty must be > 0 (1.0 disables it), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2] (0 disables it), got {value}")
        for tok, bias in self.logit_bias.items():
            if tok < 0 or math.isnan(bias):
                raise ValueError(f"logit_bias entry {tok}: {bias} needs a token id >= 0 and a number")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 (or None for 'until the context is full'), got {self.max_tokens}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must hold non-empty strings, got {list(self.stop)!r}")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids >= 0, got {list(self.stop_token_ids)}")
        if self.top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError(f"top_logprobs={self.top_logprobs} needs logprobs=True")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_generation_config(cls, gen_cfg: Mapping[str, Any] | None, **overrides: Any) -> SamplingParams:
        """Defaults from a generation_config.json dict, then `overrides` (None values are ignored).

        do_sample true -> its temperature/top_p/top_k/min_p/repetition_penalty (Llama 3.2 Instruct:
        temperature 0.6, top_p 0.9); otherwise greedy, as in HF. HF's implicit top_k=50 is not applied: a
        top_k counts only when the file sets it (Meta's reference samples with top_p alone). Stop ids come
        from the tokenizer, not from this dict.
        """
        gen_cfg = gen_cfg or {}
        values: dict[str, Any] = {}
        if gen_cfg.get("do_sample"):
            values["temperature"] = float(gen_cfg.get("temperature", 1.0))
            for key, cast in (("top_p", float), ("top_k", int), ("min_p", float)):
                if gen_cfg.get(key) is not None:
                    values[key] = cast(gen_cfg[key])
        if gen_cfg.get("repetition_penalty") is not None:
            values["repetition_penalty"] = float(gen_cfg["repetition_penalty"])
        if gen_cfg.get("max_new_tokens") is not None:
            values["max_tokens"] = int(gen_cfg["max_new_tokens"])
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown sampling parameter(s) {unknown}; known: {sorted(known)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> SamplingParams:
        return replace(self, **changes)


def _check_filters(temperature: float, top_p: float, top_k: int, min_p: float) -> None:
    if not temperature >= 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {top_k!r}")
    if not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1] (0 disables it), got {min_p}")


# ---------------------------------------------------------------------------------------------------------
# Filters: logits [B, V] -> logits [B, V] with removed tokens at -inf. Applied after temperature.


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties with the k-th value are kept, as in HF)."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, -math.inf)


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter with Meta's `sample_top_p` semantics: sort descending, drop every token whose
    preceding cumulative probability already exceeds p. The top token is always kept."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    drop = probs.cumsum(dim=-1) - probs > p
    sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens with p >= min_p * p_max, i.e. logit >= max logit + log(min_p) (no softmax needed)."""
    threshold = logits.amax(dim=-1, keepdim=True) + math.log(min_p)  # (B, 1)
    return logits.masked_fill(logits < threshold, -math.inf)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """Argmax per row: [B, V] -> [B] (first index of the maximum, NaN counting as the maximum, as torch).
    float32 CPU rows go through NumPy, whose vectorized argmax takes ~10 us for a 128k vocabulary where
    torch's takes ~110 us (once per decoded token)."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and not x.requires_grad
            and not torch.compiler.is_compiling()):
        return torch.from_numpy(x.numpy().argmax(axis=-1))
    return x.argmax(dim=-1)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Argmax per row: [B, V] -> [B]."""
    return argmax_rows(logits)


def categorical(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample one id per row from softmax(logits): [B, V] -> [B].

    Exponential race (gpt-fast): argmax(p / E) with E ~ Exp(1) is an exact categorical draw, needs no
    host sync and compiles. E is clamped away from 0 so a removed token (p = 0) can never win via 0/0.
    """
    probs = logits.float().softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return argmax_rows(probs / race.clamp_min_(torch.finfo(probs.dtype).tiny))


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                 generator: torch.Generator | None = None) -> Sampler:
    """A sampler closure: logits [B, V] (already through the logits processors) -> ids [B].

    temperature 0 -> argmax. Otherwise logits / temperature -> top-k -> top-p -> min-p -> categorical
    draw from `generator` (same generator seed, same tokens). The order follows HF and vLLM.
    """
    if top_k == -1:
        top_k = 0
    _check_filters(temperature, top_p, top_k, min_p)
    if temperature == 0:
        return greedy
    filters: list[Callable[[torch.Tensor], torch.Tensor]] = []
    if top_k > 0:
        filters.append(lambda x: apply_top_k(x, top_k))
    if top_p < 1.0:
        filters.append(lambda x: apply_top_p(x, top_p))
    if min_p > 0.0:
        filters.append(lambda x: apply_min_p(x, min_p))

    def sample(logits: torch.Tensor) -> torch.Tensor:
        x = logits.float() / temperature
        for f in filters:
            x = f(x)
        return categorical(x, generator)

    return sample


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A torch.Generator seeded with `seed` on `device`, or None (torch's global RNG) when seed is None."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def sampler_from_params(params: SamplingParams, generator: torch.Generator | None = None) -> Sampler:
    return make_sampler(params.temperature, params.top_p, params.top_k, params.min_p, generator)


# ---------------------------------------------------------------------------------------------------------
# Logits processors: called once per step, before the sampler, with the ids generated so far [B, n]
# (n grows by one each step) and the float32 logits [B, V]. Stateful ones keep per-token tensors and fold
# in only the ids they have not seen yet, so a step costs O(B) updates, not O(n) recounting.


def _as_rows(ids: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor) -> torch.Tensor:
    """Prompt ids as LongTensor [B, T]; negative ids are padding and are ignored."""
    t = ids if isinstance(ids, torch.Tensor) else torch.tensor(list(ids), dtype=torch.long)
    t = t.long()
    return t[None] if t.dim() == 1 else t


class _TokenCounts:
    """counts [B, V] float32 of the ids folded in so far; `update` folds in the new tail of `generated`."""

    def __init__(self, initial: torch.Tensor | None = None) -> None:
        self.initial = initial  # [B, T] ids to count up front (the prompt), or None
        self.counts: torch.Tensor | None = None
        self.seen = 0

    def update(self, generated: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.counts is None:
            self.counts = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
            if self.initial is not None and self.initial.numel():
                ids = self.initial.to(logits.device)
                self.counts.scatter_add_(1, ids.clamp_min(0), (ids >= 0).float())
        n = generated.shape[1]
        if n > self.seen:
            new = generated[:, self.seen:n].to(logits.device)  # (B, n - seen)
            self.counts.scatter_add_(1, new.clamp_min(0), (new >= 0).float())
            self.seen = n
        return self.counts


class RepetitionPenalty:
    """HF semantics over prompt + generated ids: a seen token's logit is divided by the penalty if
    positive, multiplied if negative."""

    def __init__(self, penalty: float, prompt_ids: torch.Tensor) -> None:
        self.penalty = penalty
        self.counts = _TokenCounts(prompt_ids)

    def __call__(self, generated: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        seen = self.counts.update(generated, logits) > 0
        penalized = torch.where(logits > 0, logits / self.penalty, logits * self.penalty)
        return torch.where(seen, penalized, logits)


class PresenceFrequencyPenalty:
    """OpenAI semantics over generated ids only: logit -= presence * (count > 0) + frequency * count."""

    def __init__(self, presence: float, frequency: float) -> None:
        self.presence, self.frequency = presence, frequency
        self.counts = _TokenCounts()

    def __call__(self, generated: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        counts = self.counts.update(generated, logits)
        return logits - self.presence * (counts > 0).float() - self.frequency * counts


class LogitBias:
    """Adds bias[token] to every row's logits; the dense bias vector is built once, on the first call."""

    def __init__(self, bias: Mapping[int, float]) -> None:
        self.bias = dict(bias)
        self.vector: torch.Tensor | None = None

    def __call__(self, generated: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.vector is None:
            vocab = logits.shape[-1]
            bad = sorted(t for t in self.bias if t >= vocab)
            if bad:
                raise ValueError(f"logit_bias token id(s) {bad} are outside the vocabulary (size {vocab})")
            vector = torch.zeros(vocab, dtype=torch.float32, device=logits.device)
            vector[list(self.bias)] = torch.tensor(list(self.bias.values()), dtype=torch.float32,
                                                   device=logits.device)
            self.vector = vector
        return logits + self.vector


def make_logits_processors(params: SamplingParams,
                           prompt_ids: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor = ()
                           ) -> list[LogitsProcessor]:
    """The processors `params` asks for, in HF/vLLM order: penalties, then logit bias. Empty when none.

    prompt_ids: list[int] or LongTensor [B, T] (negative = padding); only the repetition penalty uses it.
    Processors are stateful (per-token counts): make one list per request.
    """
    processors: list[LogitsProcessor] = []
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenalty(params.repetition_penalty, _as_rows(prompt_ids)))
    if params.presence_penalty or params.frequency_penalty:
        processors.append(PresenceFrequencyPenalty(params.presence_penalty, params.frequency_penalty))
    if params.logit_bias:
        processors.append(LogitBias(params.logit_bias))
    return processors


# ---------------------------------------------------------------------------------------------------------
# Logprobs


def token_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """Raw model log-probabilities [B, V]: log_softmax of the model's logits before penalties, bias and
    temperature -- vLLM's default and OpenAI's meaning of `logprobs` (what the model believes, independent
    of how we sample from it)."""
    return logits.float().log_softmax(dim=-1)


def top_logprobs(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The k most likely (id, logprob) pairs of one row's logprobs [V], most likely first."""
    if k <= 0:
        return []
    values, ids = torch.topk(logprobs, min(k, logprobs.shape[-1]))
    return list(zip(ids.tolist(), values.tolist(), strict=True))

"""Speculative decoding: a drafter proposes k tokens and the target checks them all in one forward of k + 1
tokens. Greedy output equals the target alone; sampled output follows the target's processed distribution
exactly (accept draft d with probability min(1, p(d) / q(d)), else draw from max(0, p - q) renormalised).
k follows a cost model fed by measured step times, and drafting pauses while it does not pay.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from .generate import DecodeStep, Truncate, _device, prefill, prepare_request
from .sampling import (
    LogitsProcessor,
    SamplingParams,
    apply_min_p,
    apply_top_k,
    apply_top_p,
    token_logprobs,
)

# Verification feeds k + 1 tokens; up to models.llama.SMALL_QUERY (16) queries take the grouped attention path.
MAX_DRAFT = 15
# Default k: a verification of 7 + 1 rows stays on the GEMV kernels of a quantized target (quant.kernels.SMALL_M).
DEFAULT_DRAFT = 7
PROBE_AFTER = 16  # plain tokens before drafting is tried again, doubled after each failed try ...
MAX_PAUSE = 256  # ... up to this many


@dataclass
class SpeculativeStats:
    """Counters of one request: drafted = proposals the target checked, accepted = those it kept."""

    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    plain_steps: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None


# ---------------------------------------------------------------------------------------------------------
# The request's token choice, made explicit


class Distribution:
    """What `sampler_from_params` samples from, as tensors: temperature -> top-k -> top-p -> min-p -> softmax
    on logits that went through the request's processors. Target and drafter use the same one, so "the
    target's distribution" is the processed one that plain sampling draws from."""

    def __init__(self, params: SamplingParams, generator: torch.Generator | None = None) -> None:
        self.greedy = params.greedy
        self.temperature, self.top_k, self.top_p, self.min_p = (params.temperature, params.top_k, params.top_p,
                                                                params.min_p)
        self.generator = generator

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Processed logits [N, V] -> float32 probabilities [N, V] (sampling only)."""
        x = logits.float() / self.temperature
        if self.top_k > 0:
            x = apply_top_k(x, self.top_k)
        if self.top_p < 1.0:
            x = apply_top_p(x, self.top_p)
        if self.min_p > 0.0:
            x = apply_min_p(x, self.min_p)
        return x.softmax(dim=-1)

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """One id per row of probs [N, V] -> [N] (exponential race, as `sampling.categorical`)."""
        race = torch.empty_like(probs).exponential_(1.0, generator=self.generator)
        return (probs / race.clamp_min_(torch.finfo(probs.dtype).tiny)).argmax(dim=-1)

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """Processed logits [N, V] -> ids [N] as plain decoding picks them."""
        return logits.argmax(dim=-1) if self.greedy else self.draw(self.probs(logits))

    def uniform(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.rand(n, generator=self.generator, device=device)


class _Fork:
    """Processors running ahead over drafted ids; `seen` = the longest generated prefix they folded in."""

    def __init__(self, processors: list[LogitsProcessor]) -> None:
        self.processors, self.seen = processors, 0

    def __call__(self, logits: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        self.seen = max(self.seen, generated.shape[1])
        for proc in self.processors:
            logits = proc(generated, logits)
        return logits


class Processors:
    """A request's stateful logits processors (they fold generated ids in append-only). Work over drafted
    ids happens on a deep-copied fork; the fork becomes the committed state only if every id it folded in
    is still in place after verification, otherwise the committed state catches up from the ids later."""

    def __init__(self, processors: Sequence[LogitsProcessor]) -> None:
        self.committed = list(processors)

    def fork(self) -> _Fork:
        return _Fork(copy.deepcopy(self.committed) if self.committed else [])

    def settle(self, fork: _Fork | None, intact: int) -> None:
        """`intact`: how many generated ids are unchanged since the fork folded them in."""
        if fork is not None and fork.processors and fork.seen <= intact:
            self.committed = fork.processors


# ---------------------------------------------------------------------------------------------------------
# Drafters (engine/drafters.py has the implementations)


class Drafter(Protocol):
    """Proposes tokens; the target decides. `catchup` = tokens the last `propose` fed to catch up (cost)."""

    name: str
    catchup: int

    def start(self, prompt: list[int], total_len: int, processors: list[LogitsProcessor]) -> None:
        """A new request: `total_len` = prompt + budget; `processors` a fresh copy for the draft's own use."""

    def propose(self, seq: list[int], k: int, dist: Distribution, generated: torch.Tensor, g: int
                ) -> tuple[list[int], torch.Tensor | None]:
        """Up to k ids continuing `seq` (committed ids; the last is not yet verified) and the draft
        distributions they were drawn from, q [n, V] (None: deterministic proposals, q is one-hot).
        Writes the ids into generated[0, g:g + n] (the buffer the processors read)."""

    def settle(self, intact: int) -> None:
        """After verification: generated[:intact] is unchanged since the last `propose`."""


# ---------------------------------------------------------------------------------------------------------
# Cost model


class _Controller:
    """Chooses k each round: maximise expected tokens per second E(k) / (k t_draft + t_verify(k)) where
    E(k) = (1 - a^(k+1)) / (1 - a) for a per-token acceptance a (decayed counts), t_draft the measured cost
    of one draft token and t_verify(k) = v0 + v1 (k + 1) fitted to measured verifications. When the best
    rate is below the measured plain step's, it returns 0 (plain decoding) for a pause that doubles after
    each failed try.

    Drafting starts, and restarts after each pause, with a probe: one round of a single draft, the cheapest
    that measures anything. It forgets the old acceptance and takes a cheaper measured draft cost at once,
    so one slow or unlucky round cannot stop drafting for the rest of a request, and a draft that never
    agrees costs one single-token round per pause. Slower measurements only blend in, and one verification
    counts at most as 1.5x the fitted cost: a load burst on a shared machine does not stop a paying draft."""

    PRIOR = (0.8, 1.0)  # (accepted, tested): a = 0.8, worth one token: a probe's outcome decides
    DECAY = 0.9

    def __init__(self, k_max: int, adaptive: bool) -> None:
        self.k_max, self.adaptive = k_max, adaptive
        self.acc, self.tested = self.PRIOR
        self.t_plain: float | None = None
        self.plain_samples = 0
        self.t_draft: float | None = None
        self.fit = [0.0] * 5  # decayed sums: n, x, y, xx, xy of (k + 1, verify seconds)
        self.pause, self.backoff = 0, PROBE_AFTER
        self.rounds = 0  # rounds since the last pause
        self.probing = True  # the next round is a probe (start of a request, end of a pause)

    @property
    def alpha(self) -> float:
        return min(self.acc / self.tested, 0.999)

    def choose(self) -> int:
        if not self.adaptive:
            return self.k_max
        if self.plain_samples < 2:
            return 0  # measure plain steps first (the first one is warm-up): the yardstick
        if self.pause > 0:
            self.pause -= 1
            if self.pause == 0:
                self.acc, self.tested = self.PRIOR  # old evidence is stale after a pause
                self.probing = True
            return 0
        if self.probing or self.fit[0] == 0 or self.t_draft is None:
            return 1  # a probe (or its catch-up): one draft token measures the draft's cost and acceptance
        k, rate = self.best()
        # A verification of 0 drafts is a plain step: the fit guards against a stale, slow plain measurement.
        if rate < 1.0 / min(self.t_plain or math.inf, self.verify_cost(0)):
            self.pause, self.backoff, self.rounds = self.backoff, min(2 * self.backoff, MAX_PAUSE), 0
            return 0
        if self.rounds >= 4:  # drafting has paid for a while (not just the probe): pauses start short again
            self.backoff = PROBE_AFTER
        return k

    def verify_cost(self, k: int) -> float:
        n, x, y, xx, xy = self.fit
        var = n * xx - x * x
        slope = max((n * xy - x * y) / var, 0.0) if var > 1e-9 * max(n * xx, 1e-30) else 0.0
        base = max((y - slope * x) / n, 0.0)
        return base + slope * (k + 1)

    def best(self) -> tuple[int, float]:
        a = self.alpha
        rates = [(expected_tokens(a, k) / (k * (self.t_draft or 0.0) + self.verify_cost(k)), k)
                 for k in range(1, self.k_max + 1)]
        rate, k = max(rates)
        return k, rate

    def record_plain(self, seconds: float) -> None:
        self.plain_samples += 1
        if self.plain_samples == 1 or self.t_plain is None:
            self.t_plain = seconds  # (replaced by the second sample: the first step warms up)
        elif self.plain_samples == 2:
            self.t_plain = min(self.t_plain, seconds)
        else:
            self.t_plain = 0.8 * self.t_plain + 0.2 * seconds

    def record_round(self, k: int, accepted: int, draft_seconds: float | None, verify_seconds: float) -> None:
        self.rounds += 1
        self.acc = self.DECAY * self.acc + accepted
        self.tested = self.DECAY * self.tested + accepted + (accepted < k)  # drafts after a rejection are untested
        if draft_seconds is not None:
            per = draft_seconds / k
            if self.t_draft is None:
                self.t_draft = per
            else:  # a probe that finds the draft cheaper replaces a stale estimate; a dearer one only blends in
                blended = 0.8 * self.t_draft + 0.2 * per
                self.t_draft = min(per, blended) if self.probing else blended
            self.probing = False
        x = k + 1.0
        if self.fit[0] >= 2:  # one burst (a neighbour, a page fault) counts at most as a 1.5x slower round
            verify_seconds = min(verify_seconds, 1.5 * self.verify_cost(k))
        self.fit = [self.DECAY * s + v for s, v in zip(self.fit, (1.0, x, verify_seconds, x * x, x * verify_seconds),
                                                       strict=True)]


# ---------------------------------------------------------------------------------------------------------
# Verification


def verify(dist: Distribution, drafted: torch.Tensor, p_logits: torch.Tensor, q: torch.Tensor | None
           ) -> tuple[int, torch.Tensor]:
    """Decide one round. drafted [k]; p_logits [k + 1, V] processed target logits after each fed token;
    q [k, V] the draft probabilities (None: one-hot on the drafts). Returns (accepted count j, next id []):
    the correction drawn at the first rejection, or the bonus token from p[k] when all k were accepted."""
    k = drafted.shape[0]
    rows = torch.arange(k, device=drafted.device)
    if dist.greedy:
        best = p_logits.argmax(dim=-1)  # (k + 1,)
        ok = best[:k] == drafted
        j = k if bool(ok.all()) else int((~ok).int().argmax())
        return j, best[j]
    p = dist.probs(p_logits)  # (k + 1, V)
    p_d = p[rows, drafted]
    q_d = q[rows, drafted] if q is not None else torch.ones_like(p_d)
    ok = dist.uniform(k, p.device) * q_d < p_d  # accept with probability min(1, p/q)
    j = k if bool(ok.all()) else int((~ok).int().argmax())
    if j == k:
        return k, dist.draw(p[k:])[0]
    if q is not None:
        residual = (p[j] - q[j]).clamp_min(0)
    else:
        residual = p[j].clone()
        residual[drafted[j]] = 0
    total = residual.sum()
    if not total > 0:  # only if p == q in floating point: then p itself is the residual's limit
        residual, total = p[j], p[j].sum()
    return j, dist.draw((residual / total)[None])[0]


class SpeculativeSteps:
    """Iterator of (token id, raw logprobs [V]), like `generate_step`; `stats` fills in as it runs."""

    def __init__(self, iterator: Iterator[tuple[int, torch.Tensor]], stats: SpeculativeStats) -> None:
        self._it, self.stats = iterator, stats

    def __iter__(self) -> SpeculativeSteps:
        return self

    def __next__(self) -> tuple[int, torch.Tensor]:
        return next(self._it)

    def close(self) -> None:
        self._it.close()  # type: ignore[attr-defined]


def speculative_generate_step(
    model: nn.Module,
    prompt_ids: Sequence[int] | torch.Tensor,
    drafter: Drafter,
    *,
    params: SamplingParams | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    generator: torch.Generator | None = None,
    max_tokens: int | None = 256,
    cache: Any = None,
    cached_tokens: int = 0,
    prefill_step_size: int = 512,
    max_len: int | None = None,
    truncate: Truncate = "error",
    compile: bool = False,
    num_draft: int = DEFAULT_DRAFT,
    adaptive: bool = True,
) -> SpeculativeSteps:
    """`generate_step` with a drafter: same arguments and yields, same tokens under greedy decoding, the same
    distribution under sampling (`params` gives temperature / top-k / top-p / min-p; `generator` the RNG).

    num_draft: the most tokens drafted per round (<= 15). adaptive=False drafts num_draft every round
    (tests, measurements); otherwise `_Controller` picks k and pauses drafting while it does not pay.
    Plain decode steps (the first after the prompt, and pauses) use `DecodeStep` (compiled with compile=True).
    """
    if not 1 <= num_draft <= MAX_DRAFT:
        raise ValueError(f"num_draft must be in [1, {MAX_DRAFT}] (verification feeds num_draft + 1 tokens), "
                         f"got {num_draft}")
    params = params or SamplingParams()
    processors = list(logits_processors)
    draft_processors = copy.deepcopy(processors)  # fresh state, before the target's copy folds anything in
    prompt, budget, cache, start = prepare_request(model, prompt_ids, max_tokens=max_tokens, cache=cache,
                                                   cached_tokens=cached_tokens, prefill_step_size=prefill_step_size,
                                                   max_len=max_len, truncate=truncate, compile=compile)
    stats = SpeculativeStats()
    run = _Run(model, drafter, prompt, budget, cache, Distribution(params, generator), Processors(processors),
               _Controller(num_draft, adaptive), stats, DecodeStep.for_model(model, compile))
    return SpeculativeSteps(run.steps(start, prefill_step_size, draft_processors), stats)


class _Run:
    def __init__(self, model: nn.Module, drafter: Drafter, prompt: list[int], budget: int, cache: Any,
                 dist: Distribution, processors: Processors, controller: _Controller, stats: SpeculativeStats,
                 step: DecodeStep) -> None:
        self.model, self.drafter, self.prompt, self.budget, self.cache = model, drafter, prompt, budget, cache
        self.dist, self.processors, self.ctl, self.stats, self.step = dist, processors, controller, stats, step
        self.device = _device(model)

    def steps(self, start: int, chunk: int, draft_processors: list[LogitsProcessor]
              ) -> Iterator[tuple[int, torch.Tensor]]:
        seq = list(self.prompt)
        # Generated ids for the processors: committed ones, then the drafts of the current round.
        gen = torch.zeros(1, self.budget + MAX_DRAFT + 1, dtype=torch.long, device=self.device)
        with torch.no_grad():
            logits = prefill(self.model, seq, self.cache, start, chunk)  # (1, V)
            y = self.dist.pick(self._processed(logits, gen[:, :0]))
        token = int(y.item())
        yield token, token_logprobs(logits)[0]
        seq.append(token)
        gen[0, 0] = token
        g = 1
        self.drafter.start(self.prompt, len(self.prompt) + self.budget, draft_processors)
        while g < self.budget:
            with torch.no_grad():
                out = self._round(seq, gen, g)
            for tok, logprobs in out:
                yield tok, logprobs
                seq.append(tok)
                gen[0, g] = tok
                g += 1

    def _round(self, seq: list[int], gen: torch.Tensor, g: int) -> list[tuple[int, torch.Tensor]]:
        k = min(self.ctl.choose(), self.budget - g - 1)  # a round emits up to k + 1 tokens
        drafted: list[int] = []
        q = None
        tic = time.perf_counter()
        if k > 0:
            if getattr(self.drafter, "shares_kv", False):  # a self-draft takes the target's K/V (drafters.py)
                self.drafter.adopt(self.cache, seq)
            drafted, q = self.drafter.propose(seq, k, self.dist, gen, g)
        if not drafted:
            return [self._plain(seq, gen, g)]
        k = len(drafted)
        draft_seconds = time.perf_counter() - tic if self.drafter.catchup <= 2 else None  # not a catch-up prefill
        tic = time.perf_counter()
        L = len(seq) - 1  # position of the last committed id, not yet fed to the target
        ids = torch.tensor([[seq[-1], *drafted]], dtype=torch.long, device=self.device)  # (1, k + 1)
        positions = torch.arange(L, L + k + 1, device=self.device)[None]
        raw = self.model(ids, positions=positions, cache=self.cache)[0].float()  # (k + 1, V)
        fork = self.processors.fork()
        processed = raw
        if fork.processors:
            processed = torch.cat([fork(raw[i:i + 1], gen[:, :g + i]) for i in range(k + 1)])
        d = ids[0, 1:]
        j, nxt = verify(self.dist, d, processed, q)
        tokens = [*drafted[:j], int(nxt.item())]
        self.processors.settle(fork, g + j)
        self.drafter.settle(g + j)
        self.ctl.record_round(k, j, draft_seconds, time.perf_counter() - tic)
        self.stats.rounds += 1
        self.stats.drafted += k
        self.stats.accepted += j
        logprobs = token_logprobs(raw[: j + 1])  # (j + 1, V): raw target distribution at each emitted token
        return list(zip(tokens, logprobs, strict=True))

    def _processed(self, logits: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        for proc in self.processors.committed:  # no drafts involved: the committed state itself folds them in
            logits = proc(generated, logits)
        return logits

    def _plain(self, seq: list[int], gen: torch.Tensor, g: int) -> tuple[int, torch.Tensor]:
        tic = time.perf_counter()
        position = torch.full((1, 1), len(seq) - 1, dtype=torch.long, device=self.device)
        token = torch.full((1, 1), seq[-1], dtype=torch.long, device=self.device)
        logits = self.step(token, position, self.cache)  # (1, V)
        tok = int(self.dist.pick(self._processed(logits, gen[:, :g])).item())
        self.ctl.record_plain(time.perf_counter() - tic)
        self.stats.plain_steps += 1
        return tok, token_logprobs(logits)[0]


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a round yields on average when each draft is accepted independently with probability alpha."""
    return k + 1.0 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)

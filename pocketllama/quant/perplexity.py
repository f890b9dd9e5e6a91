"""Perplexity over a text with a sliding window (HF's strided evaluation), to show what a recipe costs in
quality: each token is scored once, with at least `window - stride` tokens of prior context (with
stride == window, a window's first token has no context in the window and is not scored).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens scored
    windows: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


@torch.no_grad()
def perplexity(model: nn.Module, ids: list[int], *, window: int = 512, stride: int | None = None) -> PerplexityResult:
    """exp(mean NLL) of `ids` under `model`; windows of `window` tokens advance by `stride` (default window/2),
    each scoring only tokens no earlier window scored."""
    stride = stride or max(1, window // 2)
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    if len(ids) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {len(ids)}; use a longer text")
    limit = model.config.max_position_embeddings
    if window > limit:
        raise ValueError(f"window {window} exceeds the model's context ({limit} tokens); use --window {limit}")
    start = time.perf_counter()
    data = torch.tensor(ids, dtype=torch.long)
    nll, scored, windows, done = 0.0, 0, 0, 1  # the first token has no context and is never scored
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        chunk = data[begin:end][None]  # (1, T)
        logits = model(chunk)[0, :-1].float()  # (T-1, V): predictions of tokens begin+1 .. end-1
        targets = chunk[0, 1:]
        new = end - max(done, begin + 1)  # tokens not scored by an earlier window
        if new > 0:
            logp = torch.log_softmax(logits[-new:], dim=-1)
            nll -= float(logp.gather(-1, targets[-new:, None]).sum())
            scored += new
        done, windows = end, windows + 1
        if end == len(ids):
            break
    mean = nll / scored
    return PerplexityResult(math.exp(mean), mean, scored, windows, time.perf_counter() - start)

"""Stopping rules over a stream of tokens: stop ids, stop strings and the token budget. Text that could
still become a stop string is held back, and a stop string (which may span token boundaries) is never
emitted. `TokenStopper` is the one implementation every generation loop (plain, batched) applies.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal


class StopStringMatcher:
    """Feed text deltas; get back the text that is safe to emit and whether a stop string was hit.

    Invariant: emitted text never ends in a proper prefix of a stop string, so any stop string that is
    still to appear starts inside the held-back `pending` text and a search there is enough.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.pending = ""
        self.stopped: str | None = None  # the stop string that matched

    def feed(self, text: str) -> tuple[str, bool]:
        """Add a delta -> (text to emit now, stopped). After a stop, the rest of the text is dropped."""
        if self.stopped is not None:
            return "", True
        if not self.stops:
            return text, False
        self.pending += text
        hit, cut = None, len(self.pending)
        for stop in self.stops:  # earliest occurrence wins; at equal starts the longer string
            i = self.pending.find(stop)
            if i != -1 and (i < cut or (i == cut and len(stop) > len(hit or ""))):
                hit, cut = stop, i
        if hit is not None:
            out, self.pending, self.stopped = self.pending[:cut], "", hit
            return out, True
        keep = self._partial_suffix(self.pending)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out, False

    def flush(self) -> str:
        """The held-back text at the end of generation (it never became a stop string)."""
        out, self.pending = ("" if self.stopped is not None else self.pending), ""
        return out

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        for k in range(min(len(text), self.longest - 1), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0


def stop_ids_for(params: Any, tokenizer: Any) -> set[int]:
    """The ids that end a sequence: the request's own plus the model's (unless `ignore_eos`)."""
    return set(params.stop_token_ids) | (set() if params.ignore_eos else set(tokenizer.stop_ids))


class TokenStopper:
    """Per sequence: `step(token, n)` -> (text delta to emit, finish reason or None) for the n-th (0-based)
    generated token. A stop id ends the sequence without emitting its own text (what was held back is
    released); reaching `budget` tokens finishes with "length" unless the flushed tail hits a stop string."""

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str], stop_ids: Iterable[int], budget: int) -> None:
        self.detok = tokenizer.detokenizer()
        self.matcher = StopStringMatcher(stop_strings)
        self.stop_ids = set(stop_ids)
        self.budget = budget

    def step(self, token: int, n: int) -> tuple[str, Literal["stop", "length"] | None]:
        if token in self.stop_ids:
            text, _ = self.matcher.feed(self.detok.flush())
            return text + self.matcher.flush(), "stop"
        text, hit = self.matcher.feed(self.detok.add(token))
        if hit:
            return text, "stop"
        if n + 1 == self.budget:
            tail, hit = self.matcher.feed(self.detok.flush())
            return text + tail + self.matcher.flush(), "stop" if hit else "length"
        return text, None

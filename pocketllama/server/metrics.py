"""Prometheus text exposition for the server, written by hand (no client library): request counts by status,
token counters, time-to-first-token and inter-token latency histograms, and the engine's queue gauges.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter

from ..engine.batching import EngineStats

TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics: bucket le=x counts observations <= x)."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # last one: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for le, c in zip((*map(_fmt, self.buckets), "+Inf"), self.counts, strict=True):
            total += c
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        return [*out, f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]


def _fmt(x: float) -> str:
    return repr(float(x))


class Metrics:
    """Counters and histograms updated by the HTTP layer (thread-safe); `render` adds the engine gauges."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (route, status) -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)

    def request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] += 1

    def tokens(self, prompt: int, generated: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.generation_tokens += generated

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        with self._lock:
            self.itl.observe(seconds)

    def render(self, stats: EngineStats) -> str:
        with self._lock:
            lines = [
                "# HELP pocketllama_requests_total HTTP requests by route and status code.",
                "# TYPE pocketllama_requests_total counter",
            ]
            for (route, status), n in sorted(self.requests.items()):
                lines.append(f'pocketllama_requests_total{{route="{route}",status="{status}"}} {n}')
            lines += [
                "# HELP pocketllama_prompt_tokens_total Prompt tokens of admitted requests.",
                "# TYPE pocketllama_prompt_tokens_total counter",
                f"pocketllama_prompt_tokens_total {self.prompt_tokens}",
                "# HELP pocketllama_generation_tokens_total Generated tokens.",
                "# TYPE pocketllama_generation_tokens_total counter",
                f"pocketllama_generation_tokens_total {self.generation_tokens}",
                "# HELP pocketllama_time_to_first_token_seconds From request arrival to its first token.",
                "# TYPE pocketllama_time_to_first_token_seconds histogram",
                *self.ttft.lines("pocketllama_time_to_first_token_seconds"),
                "# HELP pocketllama_inter_token_latency_seconds Time between consecutive tokens of a sequence.",
                "# TYPE pocketllama_inter_token_latency_seconds histogram",
                *self.itl.lines("pocketllama_inter_token_latency_seconds"),
            ]
        gauges = [
            ("queue_depth", "Sequences waiting for a KV cache row.", stats.waiting),
            ("running_sequences", "Sequences holding a KV cache row (prefilling or decoding).", stats.running),
            ("max_concurrency", "KV cache rows (--max-concurrency).", stats.max_concurrency),
            ("max_queue", "Waiting sequences allowed before 429 (--max-queue).", stats.max_queue),
            ("max_model_len", "Tokens per sequence (--max-model-len).", stats.max_model_len),
            ("kv_cache_bytes", "Bytes held by the KV cache.", stats.kv_cache_bytes),
            ("engine_decode_steps", "Batched decode steps run by the engine.", stats.decode_steps),
            ("engine_prefill_tokens", "Prompt tokens prefilled by the engine.", stats.prefill_tokens),
            ("engine_prefix_cache_hits", "Requests whose prompt reused prefix-cache blocks.", stats.prefix_cache_hits),
            ("engine_prefix_cache_hit_tokens", "Prompt tokens copied from the prefix cache instead of prefilled.",
             stats.prefix_cache_hit_tokens),
            ("prefix_cache_bytes", "Bytes held by the prefix cache (--prefix-cache-mb).", stats.prefix_cache_bytes),
        ]
        for name, help_, value in gauges:
            kind = "counter" if name.startswith("engine_") else "gauge"
            full = f"pocketllama_{name}" + ("_total" if kind == "counter" else "")
            lines += [f"# HELP {full} {help_}", f"# TYPE {full} {kind}", f"{full} {value}"]
        return "\n".join(lines) + "\n"

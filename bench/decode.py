"""Decode tokens/s and time to first token: pocketllama vs transformers vs llama-cpp-python, side by side.

64 greedy tokens after a 128-token prompt (no early stop), 2 threads. Each engine loads once in its own process
and stays loaded; rounds then alternate the engines seconds apart (`--repeat`), so the machine's drifting memory
bandwidth hits them alike, and each ratio is the median of the per-round ratios.
Models: SmolLM2-135M GGUF (Q4_1; the default model), Llama-3.2-1B-shaped random checkpoint (bf16, fp32).

    python bench/decode.py [--models smollm2,1b-bf16,1b-fp32] [--threads 2] [--no-peers] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RSS_HELPERS, Worker, has_module, random_checkpoint, save, table  # noqa: E402

PROMPT_TOKENS, NEW_TOKENS = 128, 64

POCKETLLAMA = RSS_HELPERS + '''
import torch
torch.set_num_threads(int(sys.argv[3]))
import pocketllama
from pocketllama.engine.generate import generate
from pocketllama.engine.sampling import SamplingParams
llm = pocketllama.load(sys.argv[1], dtype=None if sys.argv[2] == "auto" else sys.argv[2])
text = "The history of the city begins with a small settlement on the river. " * 40
ids = llm.tokenizer.encode(text)[:PROMPT]
params = SamplingParams(max_tokens=NEW, ignore_eos=True)
with torch.inference_mode():
    generate(llm.model, llm.tokenizer, ids[:16], params.replace(max_tokens=8))  # warm-up
def measure():
    with torch.inference_mode():
        r = generate(llm.model, llm.tokenizer, ids, params)
    return {"ttft_s": r.prompt_time, "decode_tps": r.generation_tps, "prefill_tps": r.prompt_tps,
            "tokens": r.generation_tokens, "rss_mb": rss_mb()}
serve(measure)
'''

TRANSFORMERS = RSS_HELPERS + '''
import torch
torch.set_num_threads(int(sys.argv[3]))
from transformers import AutoModelForCausalLM
path, dtype = sys.argv[1], {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16}[sys.argv[2]]
if path.endswith(".gguf"):
    import os
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype)
else:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
model.eval()
ids = torch.randint(100, 1000, (1, PROMPT), generator=torch.Generator().manual_seed(0))
def run(n):
    t = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                   pad_token_id=0)
    return time.perf_counter() - t
with torch.inference_mode():
    run(2)  # warm-up
def measure():
    with torch.inference_mode():
        t1 = run(1)
        tn = run(NEW)
    return {"ttft_s": t1, "decode_tps": (NEW - 1) / (tn - t1), "prefill_tps": PROMPT / t1, "tokens": NEW,
            "rss_mb": rss_mb()}
serve(measure)
'''

LLAMA_CPP = RSS_HELPERS + '''
import numpy as np
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=512, n_threads=int(sys.argv[3]), n_batch=512, verbose=False)
ids = list(np.random.default_rng(0).integers(100, 1000, PROMPT))
eos = [llm.token_eos()]
def no_eos(_, logits):
    logits[eos] = -np.inf
    return logits
def run(n):
    llm.reset()
    t = time.perf_counter()
    first = None
    count = 0
    for _ in llm.generate(ids, temp=0.0, logits_processor=[no_eos]):
        count += 1
        if first is None:
            first = time.perf_counter() - t
        if count == n:
            break
    return first, time.perf_counter() - t
run(4)  # warm-up
def measure():
    first, total = run(NEW)
    return {"ttft_s": first, "decode_tps": (NEW - 1) / (total - first), "prefill_tps": PROMPT / first,
            "tokens": NEW, "rss_mb": rss_mb()}
serve(measure)
'''


def smollm2() -> Path:
    from pocketllama.sources import resolve

    return resolve("smollm2-135m")


def f16_gguf(src: Path) -> Path | None:
    """llama.cpp needs a GGUF: export the random checkpoint with our own exporter, if present."""
    out = src / "model-f16.gguf"
    if out.is_file():
        return out
    import subprocess

    r = subprocess.run([sys.executable, "-m", "pocketllama", "export-gguf", str(src), "-o", str(out),
                        "--type", "f16"], capture_output=True, text=True)
    return out if r.returncode == 0 and out.is_file() else None


def summarize(name: str, runs: dict[str, list[dict]]) -> list[dict]:
    """One row per engine: median decode / prefill over the rounds, and pocketllama's ratio to it (median of
    the per-round ratios, each taken from runs seconds apart, with their range)."""
    import statistics

    def med(rs: list[dict], key: str) -> float | None:
        vals = [r[key] for r in rs if key in r]
        return statistics.median(vals) if vals else None

    ours = runs["pocketllama"]
    rows = []
    for engine, rs in runs.items():
        good = [r for r in rs if "decode_tps" in r]
        row = {"model": name, "engine": engine, "rounds": len(good), **(good[-1] if good else rs[-1])}
        row.update({k: med(good, k) for k in ("decode_tps", "prefill_tps", "ttft_s")} if good else {})
        row["decode_runs"] = [round(r["decode_tps"], 1) for r in good]
        pairs = [(o["decode_tps"] / t["decode_tps"], o["prefill_tps"] / t["prefill_tps"])
                 for o, t in zip(ours, rs, strict=True) if "decode_tps" in o and "decode_tps" in t]
        if pairs:
            row["ours/this decode"] = statistics.median(p[0] for p in pairs)
            row["decode ratio range"] = f"{min(p[0] for p in pairs):.2f}-{max(p[0] for p in pairs):.2f}"
            row["ours/this prefill"] = statistics.median(p[1] for p in pairs)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,1b-bf16,1b-fp32")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--repeat", type=int, default=5,
                    help="rounds of every engine, interleaved (this machine's memory bandwidth drifts with its "
                         "neighbours): medians, and the range of the per-round ratios")
    args = ap.parse_args()
    os.environ["BENCH_THREADS"] = args.threads
    consts = f"PROMPT, NEW = {PROMPT_TOKENS}, {NEW_TOKENS}\n"
    rows = []
    for name in args.models.split(","):
        if name == "smollm2":
            path, dtype, gguf = smollm2(), "auto", smollm2()
        else:
            path, dtype = random_checkpoint(), {"1b-bf16": "bfloat16", "1b-fp32": "float32"}[name]
            gguf = None if args.no_peers or not has_module("llama_cpp") or dtype != "bfloat16" else f16_gguf(path)
        engines = [("pocketllama", POCKETLLAMA)]
        if not args.no_peers:
            engines.append(("transformers", TRANSFORMERS))
            if gguf is not None:
                engines.append(("llama.cpp" + (" F16" if name != "smollm2" else " Q4_1"), LLAMA_CPP))
        workers = {}
        for engine, code in engines:  # each engine loads once and stays loaded through the rounds
            print(f"[{name}] loading {engine} ...", file=sys.stderr, flush=True)
            target = gguf if engine.startswith("llama.cpp") else path
            workers[engine] = Worker(consts + code, str(target), dtype, args.threads)
        runs: dict[str, list[dict]] = {engine: [] for engine in workers}
        try:
            for rnd in range(args.repeat):
                print(f"[{name}] round {rnd + 1}/{args.repeat}: {', '.join(workers)}", file=sys.stderr, flush=True)
                for engine, worker in workers.items():
                    runs[engine].append(worker.run())
        finally:
            for worker in workers.values():
                worker.close()
        rows.extend(summarize(name, runs))
        if not has_module("llama_cpp") and not args.no_peers:
            print(f"[{name}] llama-cpp-python is not installed: its column is skipped", file=sys.stderr)
    cols = ["model", "engine", "rounds", "decode_tps", "decode_runs", "ttft_s", "prefill_tps", "rss_mb",
            "ours/this decode", "decode ratio range", "ours/this prefill", "error"]
    print(table(rows, cols))
    print(f"\nwritten {save('decode', rows)}")


if __name__ == "__main__":
    main()

"""Quantized decode and memory: pocketllama bf16 / int8 / int4-g32 beside llama.cpp F16 / Q8_0 / Q4_0 of the same
random Llama-3.2-shaped checkpoint, and beside the release table's memory figures (SPEC 8). A variant ending in
"+a8" loads with int8_activations=True (int4 x int8 decode, as llama.cpp computes Q4 blocks).

Per variant, in its own process (loaded once, then `--repeat` rounds alternating with its llama.cpp peer,
seconds apart): resident weight bytes, peak RSS of load + generation, load time, decode tokens/s (64 greedy
tokens after a 128-token prompt, no early stop), prefill tokens/s, and CPU milliseconds per decoded token
(process CPU time: with --threads 1 a fair cost when the machine is shared; with more threads it includes the
pool's spin-waiting).

    python bench/quant.py [--shapes 1b,3b] [--variants bf16,int8,int4-g32,int4-g32+a8,...] [--threads 2] [--no-peers]
                          [--repeat 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LLAMA_32_1B, LLAMA_32_3B, RSS_HELPERS, Worker, has_module, random_checkpoint, save, table  # noqa: E402

PROMPT_TOKENS, NEW_TOKENS = 128, 64
RELEASE_GB = {"1b": {"bf16": 2.5, "int8": 1.25, "int4": 0.75},  # HF blog: BF16 / FP8 / INT4 columns (SPEC 8)
              "3b": {"bf16": 6.5, "int8": 3.2, "int4": 1.75}}
PEER_OF = {"bf16": "F16", "int8": "Q8_0", "int4": "Q4_0"}  # by kind: every int4 recipe faces Q4_0


def kind_of(variant: str) -> str:
    """"int4-g32-e4g128+a8" -> "int4": the release-table column and llama.cpp peer of a variant."""
    return variant.split("-")[0].removesuffix("+a8")


POCKETLLAMA = RSS_HELPERS + '''
import torch
torch.set_num_threads(int(sys.argv[3]))
import pocketllama
from pocketllama.engine.generate import generate
from pocketllama.engine.sampling import SamplingParams
from pocketllama.quant import kernels
kernels.extension()  # build / load the C++ kernels before timing anything
base = rss_mb()
reset_peak()
t = time.perf_counter()
recipe, a8 = sys.argv[2].removesuffix("+a8"), sys.argv[2].endswith("+a8")
llm = pocketllama.load(sys.argv[1], dtype="bfloat16", quantize=None if recipe == "bf16" else recipe, int8_activations=a8)
load_s = time.perf_counter() - t
weights = sum(x.numel() * x.element_size() for x in (*llm.model.parameters(), *llm.model.buffers()))
ids = torch.randint(100, 1000, (PROMPT,), generator=torch.Generator().manual_seed(0)).tolist()
params = SamplingParams(max_tokens=NEW, ignore_eos=True)
with torch.inference_mode():
    generate(llm.model, llm.tokenizer, ids[:16], params.replace(max_tokens=8))  # warm-up
def measure():
    with torch.inference_mode():
        c = time.process_time()
        generate(llm.model, llm.tokenizer, ids, params.replace(max_tokens=1))
        c1 = time.process_time() - c
        c = time.process_time()
        r = generate(llm.model, llm.tokenizer, ids, params)
        cpu_ms = (time.process_time() - c - c1) / (NEW - 1) * 1e3
    return {"decode_tps": r.generation_tps, "cpu_ms_per_token": cpu_ms, "prefill_tps": r.prompt_tps,
            "load_s": load_s, "weights_gb": weights / 1e9, "peak_rss_gb": (peak_mb() - base) / 1e3,
            "ext": kernels.extension() is not None}
serve(measure)
'''

LLAMA_CPP = RSS_HELPERS + '''
import numpy as np
base = rss_mb()
from llama_cpp import Llama
t = time.perf_counter()
llm = Llama(model_path=sys.argv[1], n_ctx=512, n_threads=int(sys.argv[3]), n_batch=512, verbose=False,
            use_mmap=False)
load_s = time.perf_counter() - t
ids = list(np.random.default_rng(0).integers(100, 1000, PROMPT))
eos = [llm.token_eos()]
def no_eos(_, logits):
    logits[eos] = -np.inf
    return logits
def run(n):
    llm.reset()
    t = time.perf_counter()
    first, count, cpu = None, 0, 0.0
    for _ in llm.generate(ids, temp=0.0, logits_processor=[no_eos]):
        count += 1
        if first is None:
            first, cpu = time.perf_counter() - t, time.process_time()
        if count == n:
            break
    return first, time.perf_counter() - t, time.process_time() - cpu
run(4)  # warm-up
def measure():
    first, total, cpu = run(NEW)
    return {"decode_tps": (NEW - 1) / (total - first), "cpu_ms_per_token": cpu / (NEW - 1) * 1e3,
            "prefill_tps": PROMPT / first, "load_s": load_s, "weights_gb": os.path.getsize(sys.argv[1]) / 1e9,
            "peak_rss_gb": (peak_mb() - base) / 1e3}
serve(measure)
'''.replace("import numpy as np", "import os\nimport numpy as np")


def gguf_of(src: Path, qtype: str) -> Path | None:
    """The checkpoint exported by our own `export-gguf` (cached next to it)."""
    out = src / f"model-{qtype.lower()}.gguf"
    if not out.is_file():
        print(f"  exporting {out.name} ...", file=sys.stderr, flush=True)
        r = subprocess.run([sys.executable, "-m", "pocketllama", "export-gguf", str(src), "-o", str(out),
                            "--type", qtype.lower()], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"  export failed: {r.stderr.strip()[-300:]}", file=sys.stderr)
            return None
    return out


def median_row(runs: list[dict]) -> dict:
    """The median of each number over the runs that worked (the last error otherwise), and the decode runs."""
    good = [r for r in runs if "decode_tps" in r]
    if not good:
        return runs[-1] if runs else {}
    keys = [k for k, v in good[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {**good[-1], **{k: statistics.median(r[k] for r in good) for k in keys},
            "decode_runs": [round(r["decode_tps"], 1) for r in good]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1b")
    ap.add_argument("--variants", default="bf16,int8,int4-g32,int4-g32+a8,int4-g32-e4g128,int4-g32-e4g128+a8")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--repeat", type=int, default=4,
                    help="rounds of every engine, alternating with its llama.cpp peer (medians)")
    args = ap.parse_args()
    os.environ["BENCH_THREADS"] = args.threads
    consts = f"PROMPT, NEW = {PROMPT_TOKENS}, {NEW_TOKENS}\n"
    peers = not args.no_peers and has_module("llama_cpp")
    if not args.no_peers and not peers:
        print("llama-cpp-python is not installed: the llama.cpp rows are skipped", file=sys.stderr)
    rows = []
    for shape in args.shapes.split(","):
        path = random_checkpoint(f"llama-3.2-{shape}", {"1b": LLAMA_32_1B, "3b": LLAMA_32_3B}[shape])
        variants = args.variants.split(",")
        needed = dict.fromkeys(PEER_OF[kind_of(v)] for v in variants if kind_of(v) in PEER_OF)
        ggufs = {p: gguf_of(path, p) for p in needed} if peers else {}
        ours: dict[str, list[dict]] = {v: [] for v in variants}
        theirs: dict[str, list[dict]] = {p: [] for p, g in ggufs.items() if g is not None}
        groups: dict[str | None, list[str]] = {}  # the variants compared with one peer load together
        for v in variants:
            groups.setdefault(PEER_OF.get(kind_of(v)), []).append(v)
        for peer, members in groups.items():
            workers = {}
            for variant in members:  # each engine loads once and stays loaded through the rounds
                print(f"[{shape}] loading pocketllama {variant} ...", file=sys.stderr, flush=True)
                workers[variant] = (ours[variant], Worker(consts + POCKETLLAMA, str(path), variant, args.threads))
            if peer in theirs:
                print(f"[{shape}] loading llama.cpp {peer} ...", file=sys.stderr, flush=True)
                workers[peer] = (theirs[peer], Worker(consts + LLAMA_CPP, str(ggufs[peer]), peer, args.threads))
            try:
                for rnd in range(args.repeat):  # rounds alternate the engines seconds apart: bandwidth drifts
                    print(f"[{shape}] round {rnd + 1}/{args.repeat}: {', '.join(workers)}", file=sys.stderr,
                          flush=True)
                    for runs, worker in workers.values():
                        runs.append(worker.run())
            finally:
                for _, worker in workers.values():
                    worker.close()
        for variant, runs in ours.items():
            row = {"shape": shape, "engine": "pocketllama", "variant": variant, **median_row(runs),
                   "release_gb": RELEASE_GB[shape].get(kind_of(variant))}
            peer_runs = theirs.get(PEER_OF.get(kind_of(variant)), [])
            ratios = [o["decode_tps"] / t["decode_tps"] for o, t in zip(runs, peer_runs, strict=False)
                      if "decode_tps" in o and "decode_tps" in t]
            if ratios:  # each round's ratio, from runs seconds apart
                row["vs llama.cpp"] = statistics.median(ratios)
                row["ratio range"] = f"{min(ratios):.2f}-{max(ratios):.2f}"
            rows.append(row)
        rows += [{"shape": shape, "engine": "llama.cpp", "variant": p, **median_row(r)} for p, r in theirs.items()]
    cols = ["shape", "engine", "variant", "decode_tps", "decode_runs", "vs llama.cpp", "ratio range",
            "cpu_ms_per_token", "prefill_tps", "weights_gb", "release_gb", "peak_rss_gb", "load_s", "error"]
    print(table(rows, cols))
    print(f"\nwritten {save('quant', rows, {'threads': args.threads, 'prompt': PROMPT_TOKENS, 'new': NEW_TOKENS})}")


if __name__ == "__main__":
    main()

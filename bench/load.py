"""Load time and peak RSS of a Llama-3.2-1B-shaped bf16 checkpoint: pocketllama vs transformers.

Each load runs in a fresh process; peak RSS counts from just before the load (after imports).

    python bench/load.py [--dtype bfloat16|float32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RSS_HELPERS, random_checkpoint, run_json, save, table  # noqa: E402

POCKETLLAMA = RSS_HELPERS + '''
import torch
from pocketllama.llm import load_model
base = rss_mb(); reset_peak()
t = time.perf_counter()
model, _ = load_model(sys.argv[1], dtype=sys.argv[2])
with torch.no_grad():
    sum(float(p.view(-1)[::4096].float().sum()) for p in model.parameters())  # weights usable
print(json.dumps({"load_s": time.perf_counter() - t, "peak_mb": peak_mb() - base, "rss_mb": rss_mb() - base}))
'''

TRANSFORMERS = RSS_HELPERS + '''
import torch
from transformers import AutoModelForCausalLM
base = rss_mb(); reset_peak()
t = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
with torch.no_grad():
    sum(float(p.view(-1)[::4096].float().sum()) for p in model.parameters())
print(json.dumps({"load_s": time.perf_counter() - t, "peak_mb": peak_mb() - base, "rss_mb": rss_mb() - base}))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    path = random_checkpoint()
    size_mb = (path / "model.safetensors").stat().st_size / 2**20
    rows = []
    for engine, code in (("pocketllama", POCKETLLAMA), ("transformers", TRANSFORMERS)):
        print(f"{engine} ...", file=sys.stderr, flush=True)
        rows.append({"engine": engine, "dtype": args.dtype, "file_mb": size_mb,
                     **run_json(code, str(path), args.dtype)})
    base = rows[0]
    for r in rows:
        if "load_s" in r and "load_s" in base:
            r["ours/this time"] = base["load_s"] / r["load_s"]
            r["peak/file"] = r["peak_mb"] / size_mb
    print(table(rows, ["engine", "dtype", "file_mb", "load_s", "peak_mb", "rss_mb", "peak/file", "ours/this time",
                       "error"]))
    print(f"\nwritten {save('load', rows)}")


if __name__ == "__main__":
    main()

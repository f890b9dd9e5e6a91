"""Load time and peak RSS: pocketllama vs transformers (vs llama-cpp-python for GGUF, when installed).

Models: a Llama-3.2-1B-shaped bf16 checkpoint (random weights) and the SmolLM2-135M Q4_1 GGUF. Each load
runs in a fresh process; peak RSS counts from just before the load (after imports).

    python bench/load.py [--models 1b,smollm2] [--dtype bfloat16|float32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RSS_HELPERS, has_module, random_checkpoint, run_json, save, table  # noqa: E402

POCKETLLAMA = RSS_HELPERS + '''
import torch
from pocketllama.llm import load_model
base = rss_mb(); reset_peak()
t = time.perf_counter()
model, _ = load_model(sys.argv[1], dtype=None if sys.argv[2] == "auto" else sys.argv[2])
with torch.no_grad():
    sum(float(p.view(-1)[::4096].float().sum()) for p in model.parameters())  # weights usable
print(json.dumps({"load_s": time.perf_counter() - t, "peak_mb": peak_mb() - base, "rss_mb": rss_mb() - base}))
'''

TRANSFORMERS = RSS_HELPERS + '''
import torch
from transformers import AutoModelForCausalLM
base = rss_mb(); reset_peak()
t = time.perf_counter()
import os
path, dtype = sys.argv[1], getattr(torch, "float32" if sys.argv[2] == "auto" else sys.argv[2])
if path.endswith(".gguf"):
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype)
else:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
with torch.no_grad():
    sum(float(p.view(-1)[::4096].float().sum()) for p in model.parameters())
print(json.dumps({"load_s": time.perf_counter() - t, "peak_mb": peak_mb() - base, "rss_mb": rss_mb() - base}))
'''

LLAMA_CPP = RSS_HELPERS + '''
from llama_cpp import Llama
base = rss_mb(); reset_peak()
t = time.perf_counter()
llm = Llama(model_path=sys.argv[1], n_ctx=512, n_threads=2, verbose=False)
llm.eval([1, 2, 3])  # weights usable
print(json.dumps({"load_s": time.perf_counter() - t, "peak_mb": peak_mb() - base, "rss_mb": rss_mb() - base}))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", help="dtype for the 1B checkpoint")
    ap.add_argument("--models", default="1b,smollm2")
    args = ap.parse_args()
    from pocketllama.sources import resolve

    rows = []
    for name in args.models.split(","):
        if name == "1b":
            path, dtype = random_checkpoint(), args.dtype
            size_mb = (path / "model.safetensors").stat().st_size / 2**20
            engines = [("pocketllama", POCKETLLAMA), ("transformers", TRANSFORMERS)]
        else:
            path, dtype = resolve("smollm2-135m"), "auto"
            size_mb = path.stat().st_size / 2**20
            engines = [("pocketllama", POCKETLLAMA), ("transformers", TRANSFORMERS)]
            if has_module("llama_cpp"):
                engines.append(("llama.cpp", LLAMA_CPP))
            else:
                print("llama-cpp-python is not installed: its row is skipped", file=sys.stderr)
        group = []
        for engine, code in engines:
            print(f"[{name}] {engine} ...", file=sys.stderr, flush=True)
            group.append({"model": name, "engine": engine, "dtype": dtype, "file_mb": size_mb,
                          **run_json(code, str(path), dtype)})
        for r in group:
            if "load_s" in r and "load_s" in group[0]:
                r["ours/this time"] = group[0]["load_s"] / r["load_s"]
                r["peak/file"] = r["peak_mb"] / size_mb
        rows += group
    print(table(rows, ["model", "engine", "dtype", "file_mb", "load_s", "peak_mb", "rss_mb", "peak/file", "ours/this time",
                       "error"]))
    print(f"\nwritten {save('load', rows)}")


if __name__ == "__main__":
    main()

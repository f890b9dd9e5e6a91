"""Prefill tokens/s for a 512-token prompt on a Llama-3.2-1B-shaped checkpoint: pocketllama vs transformers.

One forward over the whole prompt (logits of the last token only, as generation does), best of 3, in a
fresh process per engine, 2 threads.

    python bench/forward.py [--dtype bfloat16] [--tokens 512] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RSS_HELPERS, random_checkpoint, run_json, save, table  # noqa: E402

POCKETLLAMA = RSS_HELPERS + '''
import torch
torch.set_num_threads(int(sys.argv[4]))
from pocketllama.llm import load_model
model, _ = load_model(sys.argv[1], dtype=sys.argv[2])
n = int(sys.argv[3])
ids = torch.randint(100, 1000, (1, n), generator=torch.Generator().manual_seed(0))
best = 1e9
with torch.inference_mode():
    for _ in range(3):
        cache = model.make_cache(1, n + 64)
        t = time.perf_counter()
        model(ids, torch.arange(n)[None], cache, logits_at=torch.tensor([n - 1]))
        best = min(best, time.perf_counter() - t)
print(json.dumps({"prefill_s": best, "prefill_tps": n / best}))
'''

TRANSFORMERS = RSS_HELPERS + '''
import torch
torch.set_num_threads(int(sys.argv[4]))
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2])).eval()
n = int(sys.argv[3])
ids = torch.randint(100, 1000, (1, n), generator=torch.Generator().manual_seed(0))
best = 1e9
with torch.inference_mode():
    for _ in range(3):
        t = time.perf_counter()
        model(ids, logits_to_keep=1)
        best = min(best, time.perf_counter() - t)
print(json.dumps({"prefill_s": best, "prefill_tps": n / best}))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", default="512")
    ap.add_argument("--threads", default="2")
    args = ap.parse_args()
    os.environ["BENCH_THREADS"] = args.threads
    path = random_checkpoint()
    rows = []
    for engine, code in (("pocketllama", POCKETLLAMA), ("transformers", TRANSFORMERS)):
        print(f"{engine} ...", file=sys.stderr, flush=True)
        rows.append({"engine": engine, "dtype": args.dtype, "tokens": int(args.tokens),
                     **run_json(code, str(path), args.dtype, args.tokens, args.threads)})
    for r in rows:
        if "prefill_tps" in r and "prefill_tps" in rows[0]:
            r["ours/this"] = rows[0]["prefill_tps"] / r["prefill_tps"]
    print(table(rows, ["engine", "dtype", "tokens", "prefill_s", "prefill_tps", "ours/this", "error"]))
    print(f"\nwritten {save('forward', rows)}")


if __name__ == "__main__":
    main()

"""Fine-tuning speed and memory on a Llama-3.2-1B-shaped checkpoint: tokens/s of training steps (forward +
backward + AdamW) and peak RSS, for LoRA and QLoRA, pocketllama beside transformers + peft, same data.

Each engine runs in a fresh process: load, one warm-up step, then `--steps` timed steps on one 512-token row
(every token a target, as `labels=input_ids`), LoRA r=16 / alpha 32 on q,k,v,o,gate,up,down, bf16 base with
fp32 adapters. QLoRA: pocketllama's int4-g32 base (PyTorch's CPU int4 kernels); transformers + peft has no CPU
4-bit path without bitsandbytes (and bitsandbytes' CPU backend is not in this environment), so that row says so.

    python bench/finetune.py [--steps 2] [--seq 512] [--threads 2] [--engines ours-lora,ours-qlora,hf-lora]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RSS_HELPERS, has_module, random_checkpoint, run_json, save, table  # noqa: E402

SETUP = RSS_HELPERS + '''
import torch
path, method, seq, steps, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
torch.manual_seed(0)
ids = torch.randint(100, 120000, (1, seq + 1), generator=torch.Generator().manual_seed(0))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

def measure(step):
    step()  # warm-up (allocations, kernel selection)
    times, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t)
    best = min(times)
    print(json.dumps({"step_s": best, "tokens_per_s": seq / best, "peak_rss_mb": peak_mb(),
                      "loss": losses[-1]}))
'''

POCKETLLAMA = SETUP + '''
from pocketllama.llm import load_model
from pocketllama.finetune.lora import apply_lora
from pocketllama.finetune.trainer import CausalLMLoss
model, _ = load_model(path, dtype="bfloat16", quantize="int4-g32" if method == "qlora" else False)
apply_lora(model, TARGETS, r=16, alpha=32, dropout=0.0)
model.train()
net = CausalLMLoss(model)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
x, y = ids[:, :-1], ids[:, 1:]
pos = torch.arange(seq)[None]

def step():
    loss = net(x, y, pos) / seq
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)

measure(step)
'''

TRANSFORMERS = SETUP + '''
from transformers import AutoModelForCausalLM
from peft import LoraConfig, get_peft_model
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                         task_type="CAUSAL_LM"))
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
x = ids[:, :-1]
labels = ids[:, :-1].clone()  # HF shifts labels inside: the same targets as ids[:, 1:] for positions 0..seq-2

def step():
    out = model(input_ids=x, labels=labels)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(out.loss)

measure(step)
'''

ENGINES = {
    "ours-lora": ("pocketllama", "lora", POCKETLLAMA),
    "ours-qlora": ("pocketllama", "qlora", POCKETLLAMA),
    "hf-lora": ("transformers+peft", "lora", TRANSFORMERS),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="2", help="timed steps per engine (best is reported)")
    ap.add_argument("--seq", default="512", help="tokens per training row")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {', '.join(ENGINES)}")
    args = ap.parse_args()
    os.environ["BENCH_THREADS"] = args.threads
    path = random_checkpoint()
    rows = []
    for key in args.engines.split(","):
        engine, method, code = ENGINES[key]
        print(f"{engine} {method} ...", file=sys.stderr, flush=True)
        if engine == "transformers+peft" and not has_module("peft"):
            rows.append({"engine": engine, "method": method, "error": "peft is not installed"})
            continue
        rows.append({"engine": engine, "method": method, "seq": int(args.seq),
                     **run_json(code, str(path), method, args.seq, args.steps, args.threads, timeout=3600)})
    rows.append({"engine": "transformers+peft", "method": "qlora",
                 "error": "no CPU 4-bit base without bitsandbytes (not installed)"})
    print(table(rows, ["engine", "method", "seq", "step_s", "tokens_per_s", "peak_rss_mb", "loss", "error"]))
    print(f"\nwritten {save('finetune', rows, {'steps': int(args.steps), 'load': os.getloadavg()})}")


if __name__ == "__main__":
    main()

"""`pocketllama finetune`: supervised fine-tuning (LoRA, QLoRA or full) on a JSONL file of conversations.

    pocketllama finetune -m MODEL --data train.jsonl -o out/                 # LoRA; adapter in out/
    pocketllama finetune -m MODEL --data train.jsonl -o out/ --method qlora  # LoRA over an int4 base
    pocketllama finetune -m MODEL --data train.jsonl -o out/ --resume        # continue a killed run
    torchrun --nproc-per-node 4 -m pocketllama finetune -m MODEL --data train.jsonl -o out/
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        -m pocketllama finetune ...      # several machines; keep out/ on shared storage for --resume

Under torchrun, LoRA runs DDP and full fine-tuning FSDP2 (gloo on CPU, NCCL on GPU); rank 0 logs and saves.

Data: one JSON object per line, either {"messages": [{"role": "user", "content": ...}, {"role": "assistant",
"content": ...}, ...]} (optional "images": [path] for Llama 3.2 Vision) or {"prompt": ..., "completion": ...}.
The loss covers the assistant turns only. Output: a PEFT adapter (adapter_config.json +
adapter_model.safetensors; use it with `pocketllama chat --adapter out/` or `pocketllama merge`), or with
--method full an HF checkpoint folder; checkpoints in out/checkpoints/, the loss log in out/log.jsonl.
"""

from __future__ import annotations

import argparse

from .common import cli_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pocketllama finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=None,
                   help="base model: folder (HF or Meta), .gguf file, HF repo id in the local cache, or alias "
                        "(default: smollm2-135m)")
    p.add_argument("--data", required=True, metavar="JSONL", help="training data (see above)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder (adapter or model, logs, "
                   "checkpoints)")
    p.add_argument("--method", choices=["lora", "qlora", "full"], default="lora",
                   help="lora: adapters on a frozen float model (default); qlora: adapters on a frozen int4/int8 "
                        "model (less memory); full: every weight (small models; FSDP2 under torchrun)")

    d = p.add_argument_group("data")
    d.add_argument("--val-data", default=None, metavar="JSONL", help="validation file (default: a split of --data)")
    d.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of --data held out for validation when there is no --val-data (default 0.05)")
    d.add_argument("--max-len", type=int, default=1024, help="longest example in tokens (default 1024)")
    d.add_argument("--too-long", choices=["truncate", "drop"], default="truncate",
                   help="longer examples: cut to --max-len, or leave out (default truncate); both are reported")
    d.add_argument("--packing", action="store_true",
                   help="pack several examples into each --max-len row (attention never crosses examples)")
    d.add_argument("--bad-lines", choices=["skip", "error"], default="skip",
                   help="a malformed line: report it with its number and skip it, or stop (default skip)")
    d.add_argument("--raw-completions", action="store_true",
                   help="prompt/completion strings as plain text + EOS (default: a user and an assistant turn)")
    d.add_argument("--date", dest="date_string", default=None,
                   help="date in the Llama 3 system block, e.g. '26 Jul 2024' (default: today)")

    lo = p.add_argument_group("LoRA / QLoRA")
    lo.add_argument("-r", "--lora-r", type=int, default=16, help="adapter rank (default 16)")
    lo.add_argument("--lora-alpha", type=float, default=32.0, help="adapter scale alpha; update = alpha/r * B@A "
                    "(default 32)")
    lo.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the adapter input (default 0.05)")
    lo.add_argument("--targets", default="all-linear",
                    help="layers to adapt: 'all-linear' (q,k,v,o,gate,up,down; default), a comma list of names "
                         "such as 'q_proj,v_proj', or a regex over full module names")
    lo.add_argument("--lora-layers", default=None, metavar="I,J,..",
                    help="adapt only these decoder layers, e.g. '20,21,22,23' (default: all)")
    lo.add_argument("--quantize", default=None, metavar="RECIPE",
                    help="QLoRA base recipe: int4-g32 (default), int4-g64, int8, ...; a model that is already "
                         "quantized trains as stored")

    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=1, help="passes over the data (default 1)")
    o.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps "
                   "(overrides --epochs)")
    o.add_argument("--batch-size", type=int, default=1, help="rows per forward, per process (default 1)")
    o.add_argument("--grad-accum", type=int, default=8, help="forwards accumulated per optimizer step (default 8); "
                   "global batch = batch-size x grad-accum x processes")
    o.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-4 LoRA, 2e-5 full)")
    o.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine",
                   help="decay after warmup (default cosine)")
    o.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps (default: --warmup-ratio)")
    o.add_argument("--warmup-ratio", type=float, default=0.03, help="warmup as a share of all steps (default 0.03)")
    o.add_argument("--min-lr-ratio", type=float, default=0.0, help="final learning rate / peak (default 0)")
    o.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    o.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm; 0 = off (default 1)")
    o.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weights and compute (default bfloat16 on a GPU, float32 on a CPU); adapters stay float32")
    o.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward: less memory, ~30%% more compute")
    o.add_argument("--seed", type=int, default=0, help="seed for data order, adapter init and dropout (default 0)")

    b = p.add_argument_group("evaluation, checkpoints, hardware")
    b.add_argument("--eval-every", type=int, default=50, help="validation loss every N steps (and at the end; "
                   "0 = only at the end)")
    b.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (0 = off); written "
                   "atomically to out/checkpoints/step-N")
    b.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept (default 2)")
    b.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --output (same settings; same loss curve)")
    b.add_argument("--device", default="auto", help="auto (this rank's GPU if any, else CPU), cpu, cuda")
    b.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    return p


def config_from_args(args: argparse.Namespace):
    from ..finetune.trainer import FinetuneConfig

    layers = None
    if args.lora_layers:
        try:
            layers = [int(x) for x in args.lora_layers.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--lora-layers {args.lora_layers!r} must be a comma list of layer numbers") from None
    return FinetuneConfig(
        data=args.data, output=args.output, model=args.model, method=args.method, val_data=args.val_data,
        val_fraction=args.val_fraction, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, targets=args.targets, lora_layers=layers, quantize=args.quantize,
        max_len=args.max_len, too_long=args.too_long, packing=args.packing, bad_lines=args.bad_lines,
        raw_completions=args.raw_completions, date_string=args.date_string, epochs=args.epochs,
        max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        weight_decay=args.weight_decay, schedule=args.schedule, warmup_steps=args.warmup_steps,
        warmup_ratio=args.warmup_ratio, min_lr_ratio=args.min_lr_ratio, max_grad_norm=args.max_grad_norm or None,
        dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
        eval_every=args.eval_every, save_every=args.save_every, save_total_limit=args.save_total_limit,
        resume=args.resume, device=args.device, threads=args.threads, progress=not args.no_progress)


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..finetune.trainer import finetune

    result = finetune(config_from_args(args))
    last = result.history[-1]["loss"] if result.history else float("nan")
    evals = f", eval loss {result.evals[-1]['eval_loss']:.4f}" if result.evals else ""
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {result.steps} steps, train loss {last:.4f}{evals}; output in {result.output}")
    return 0

"""`pocketllama merge BASE ADAPTER -o DIR`: fold a LoRA adapter (PEFT format) into its base model and write a
full HF checkpoint folder that `pocketllama`, transformers and `pocketllama export-gguf` load.

A quantized base is merged through float weights and re-quantized with its own recipe (or --quantize), then
checked on a probe prompt: a re-quantization that would wash out the adapter is refused (--no-check skips).
"""

from __future__ import annotations

import argparse

from .common import cli_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pocketllama merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", help="base model: folder, .gguf file, HF cache id or alias (e.g. smollm2-135m)")
    p.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="new folder for the merged checkpoint")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the written weights (default: the base's own)")
    p.add_argument("--quantize", default="auto", metavar="RECIPE",
                   help="auto (default): as the base was stored; none: float weights; or a recipe (int8, int4-g32)")
    p.add_argument("--no-check", action="store_true", help="write a re-quantized model even if it lost the adapter")
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..finetune.merge import merge_adapter

    report = merge_adapter(args.base, args.adapter, args.output, dtype=args.dtype, quantize=args.quantize,
                           check=not args.no_check)
    print(report.summary())
    return 0

"""`pocketllama quantize SRC -o DIR --recipe int4-g32`: write a quantized safetensors checkpoint whose
config.json records the recipe; `pocketllama.load(DIR)` rebuilds the quantized modules."""

from __future__ import annotations

import argparse
import sys
import time

from .common import cli_errors


def build_parser() -> argparse.ArgumentParser:
    from ..quant.recipe import NAMED_RECIPES

    p = argparse.ArgumentParser(prog="pocketllama quantize", description=__doc__)
    p.add_argument("source", help="float model: HF or Meta folder, .gguf file, HF repo id in the cache, or alias")
    p.add_argument("-o", "--output", required=True, help="new folder for the quantized checkpoint")
    p.add_argument("--recipe", default="int4-g32",
                   help=f"{', '.join(NAMED_RECIPES)}, or a JSON object like "
                        '\'{"linear": "int4", "group_size": 32, "embedding": "int8", "lm_head": "int8"}\' '
                        "(default: int4-g32, Meta's scheme: int4 linears, int8 token table; the -e4 recipes make "
                        "the table (and tied output) int4 too, e.g. int4-g64-e4: a 1B in 0.70 GB; "
                        "int4-g32-e4g128 keeps g32 linears with a g128 int4 table: a 1B in 0.75 GB; in JSON the "
                        "table's group is \"embedding_group_size\"; any int4 name + -sym, e.g. "
                        "int4-g32-e4g128-sym, stores symmetric int4 without zeros (\"symmetric\": true; Meta's and "
                        "llama.cpp Q4_0's rounding, 10%% fewer bytes at g32); any name + -v8, e.g. int4-g32-e4g128-v8, also makes a "
                        "Llama 3.2 Vision encoder's linears int8: \"vision\": \"int8\")")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the float tensors, scales and zeros (default: the source's own)")
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..quant.save import quantize_checkpoint

    start = time.perf_counter()
    out = quantize_checkpoint(args.source, args.output, args.recipe, args.dtype)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB, recipe {args.recipe}) in {time.perf_counter() - start:.1f}s",
          file=sys.stderr)
    return 0

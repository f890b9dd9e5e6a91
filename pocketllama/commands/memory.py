"""`pocketllama memory MODEL [--context N] [--recipe R]`: how much memory a load needs — weights per
precision, KV cache, activations, runtime — from metadata alone (nothing is loaded)."""

from __future__ import annotations

import argparse

from .common import cli_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pocketllama memory", description=__doc__)
    p.add_argument("model", nargs="?", default=None,
                   help="folder, .gguf, HF repo id in the cache, or alias (default: smollm2-135m)")
    p.add_argument("--context", type=int, default=None, help="tokens of KV cache (default: min(4096, model's))")
    p.add_argument("--recipe", default=None,
                   help="quantize while loading: int8, int4-g32, ... or 'none' (default: as stored)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="compute dtype (default: the checkpoint's own)")
    p.add_argument("--batch", type=int, default=1, help="sequences sharing the model (KV cache per sequence)")
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    from ..quant.memory import available_bytes, plan_memory

    est = plan_memory(args.model, context=args.context, recipe=args.recipe, dtype=args.dtype, batch=args.batch)
    print(est.table())
    available = available_bytes()
    if available is not None:
        verdict = "fits" if est.total <= available else "does NOT fit"
        print(f"  available now: {available / 1e9:.2f} GB (MemAvailable) -> {verdict}")
    return 0

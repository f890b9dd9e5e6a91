"""`pocketllama export-gguf SRC -o out.gguf --type f16|q8_0|q4_0`: write a GGUF that llama.cpp loads (Llama 3
tokenizer as `llama-bpe`, chat template, llama3 RoPE `rope_freqs`, tied output without `output.weight`)."""

from __future__ import annotations

import argparse
import sys
import time

from .common import cli_errors


def build_parser() -> argparse.ArgumentParser:
    from ..quant.gguf_export import EXPORT_TYPES

    p = argparse.ArgumentParser(prog="pocketllama export-gguf", description=__doc__)
    p.add_argument("source", help="model: HF or Meta folder, .gguf, quantized pocketllama folder, repo id, alias")
    p.add_argument("-o", "--output", required=True, help="the .gguf file to write")
    p.add_argument("--type", default="f16", type=str.lower, choices=EXPORT_TYPES,
                   help="tensor type of the matrices (norms stay F32; default f16)")
    p.add_argument("--pre", default=None,
                   help="llama.cpp pre-tokenizer name for vocabularies other than Llama 3 (e.g. smollm)")
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pathlib import Path

    from ..quant.gguf_export import export_gguf

    out = Path(args.output)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new file name")
    start = time.perf_counter()
    export_gguf(args.source, out, args.type, pre=args.pre)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {args.type.upper()}) in "
          f"{time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0

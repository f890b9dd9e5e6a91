"""`pocketllama perplexity MODEL --file text.txt`: perplexity over a text with a sliding window, so you see
what a quantization recipe costs in quality (compare `--quantize int8`, `--quantize int4-g32`)."""

from __future__ import annotations

import argparse
import json

from .common import cli_errors, quantize_arg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pocketllama perplexity", description=__doc__)
    p.add_argument("model", nargs="?", default=None,
                   help="folder, .gguf, HF repo id in the cache, or alias (default: smollm2-135m)")
    p.add_argument("-f", "--file", required=True, help="UTF-8 text file to score")
    p.add_argument("--quantize", default=None, help="recipe applied while loading (int8, int4-g32, ..., none)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="compute dtype (default: the checkpoint's own)")
    p.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--stride", type=int, default=None, help="tokens between windows (default window/2)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the text")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pathlib import Path

    import torch

    from ..llm import load
    from ..quant.perplexity import perplexity

    text = Path(args.file).read_text(encoding="utf-8")
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = load(args.model, dtype=args.dtype, quantize=quantize_arg(args.quantize), context=args.window)
    ids = llm.tokenizer.encode(text, add_bos=llm.tokenizer.add_bos and llm.tokenizer.bos_id is not None)
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    r = perplexity(llm.model, ids, window=args.window, stride=args.stride)
    recipe = llm.config.quantization
    if args.json:
        print(json.dumps({"perplexity": r.perplexity, "nll": r.nll, "tokens": r.tokens, "windows": r.windows,
                          "seconds": r.seconds, "quantization": recipe, "dtype": str(llm.dtype)}))
    else:
        print(f"perplexity {r.perplexity:.4f} (mean NLL {r.nll:.4f} nats) over {r.tokens} tokens in {r.windows} "
              f"windows of {args.window}; {r.tokens_per_second:.0f} tok/s")
    return 0

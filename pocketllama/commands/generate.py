"""`pocketllama generate -m MODEL -p TEXT`: stream a plain completion (no chat format)."""

from __future__ import annotations

import argparse
import sys

from .common import add_model_args, add_sampling_args, cli_errors, load_from_args, sampling_kwargs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pocketllama generate", description=__doc__)
    add_model_args(p)
    p.add_argument("-p", "--prompt", default=None, help="prompt text (default: read stdin)")
    add_sampling_args(p)
    p.add_argument("--stats", action="store_true", help="print token counts and tokens/s to stderr")
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise ValueError("empty prompt: pass -p TEXT or pipe text on stdin")
    llm = load_from_args(args)
    last = None
    for last in llm.stream(prompt, compile=args.compile, **sampling_kwargs(args)):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats and last is not None:
        print(stats_line(last), file=sys.stderr)
    return 0


def stats_line(r) -> str:
    return (f"[{r.prompt_tokens} prompt tokens at {r.prompt_tps:.1f} tok/s, {r.generation_tokens} generated at "
            f"{r.generation_tps:.1f} tok/s, finish: {r.finish_reason}]")

"""`pocketllama generate -m MODEL -p TEXT`: stream a plain completion (no chat format).

    pocketllama generate -m MODEL --draft-model self-int4 -p TEXT     # speculative decoding, same output
    pocketllama generate -m MODEL --prompt-cache doc.kv -p "Summary:"  # continue a prefix saved by cache-prompt
"""

from __future__ import annotations

import argparse
import sys

from .common import (
    add_model_args,
    add_sampling_args,
    add_speculation_args,
    cli_errors,
    load_from_args,
    sampling_kwargs,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pocketllama generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("-p", "--prompt", default=None,
                   help="prompt text (default: read stdin); with --prompt-cache, the text after the cached prefix")
    add_sampling_args(p)
    add_speculation_args(p)
    p.add_argument("--stats", action="store_true", help="print token counts and tokens/s to stderr")
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt and not args.prompt_cache:
        raise ValueError("empty prompt: pass -p TEXT or pipe text on stdin")
    llm = load_from_args(args)
    if args.prompt_cache:  # the prompt continues the cached prefix
        cached = llm.load_prompt_cache(args.prompt_cache)
        prompt = cached.tokens + llm.tokenizer.encode(prompt)
    last = None
    for last in llm.stream(prompt, compile=args.compile, **sampling_kwargs(args)):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats and last is not None:
        print(stats_line(last), file=sys.stderr)
    return 0


def stats_line(r) -> str:
    cached = f" ({r.cached_tokens} cached)" if getattr(r, "cached_tokens", 0) else ""
    draft = ""
    if getattr(r, "draft_tokens", 0):
        draft = f", draft: {r.accepted_tokens}/{r.draft_tokens} accepted ({r.accepted_tokens / r.draft_tokens:.0%})"
    return (f"[{r.prompt_tokens} prompt tokens{cached} at {r.prompt_tps:.1f} tok/s, {r.generation_tokens} generated "
            f"at {r.generation_tps:.1f} tok/s{draft}, finish: {r.finish_reason}]")

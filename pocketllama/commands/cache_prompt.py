"""`pocketllama cache-prompt`: prefill a long prompt once and save its KV cache, bound to the model and tokenizer.

    pocketllama cache-prompt -m MODEL --file doc.txt -o doc.kv
    pocketllama generate -m MODEL --prompt-cache doc.kv -p "Summary:"      # continues doc.txt; no re-prefill
    pocketllama cache-prompt -m MODEL --file rules.txt --system -o rules.kv
    pocketllama chat -m MODEL --prompt-cache rules.kv                    # rules.txt as the system prompt
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .common import add_model_args, cli_errors, load_from_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pocketllama cache-prompt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--file", required=True, help="the prompt text ('-' reads stdin)")
    p.add_argument("-o", "--output", required=True, help="the cache file to write (e.g. prompt.kv)")
    p.add_argument("--system", action="store_true",
                   help="the text is a system prompt: cache its chat-formatted block for `chat --prompt-cache`")
    p.add_argument("--date", default=None,
                   help="with --system: date for the Llama 3.2 system block (default: today; chat reuses it)")
    return p


def prompt_ids(llm, text: str, system: bool, date: str | None) -> tuple[list[int], dict[str, str]]:
    """The ids to cache and the metadata that says how to reuse them."""
    if not system:
        return llm.tokenizer.encode(text, add_bos=llm.tokenizer.add_bos), {"kind": "text"}
    from ..chat_format import today_string
    from ..engine.prefix_cache import common_prefix

    date = date or today_string()
    head = [{"role": "system", "content": text}]
    alone = llm.apply_chat_template(head, add_generation_prompt=False, date_string=date)
    # Only the part every conversation under this system prompt starts with: the template may render a
    # lone system message differently from one followed by a user turn.
    turn = llm.apply_chat_template([*head, {"role": "user", "content": "."}], date_string=date)
    return alone[:common_prefix(alone, turn)], {"kind": "system", "system": text, "date": date}


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{args.file} is empty: nothing to cache")
    llm = load_from_args(args)
    from ..engine.prefix_cache import save_prompt_cache

    ids, meta = prompt_ids(llm, text, args.system, args.date)
    tic = time.perf_counter()
    path = save_prompt_cache(args.output, llm.model, llm.tokenizer, ids,
                             metadata={**meta, "model": Path(str(llm.source)).name})
    seconds = time.perf_counter() - tic
    print(f"cached {len(ids)} tokens of {args.file} in {seconds:.1f} s -> {path} "
          f"({path.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
    return 0

"""`pocketllama guard -m MODEL "text"`: Llama Guard 3 moderation of one prompt (or, with --response, one answer),
or of a JSONL batch (`--input conv.jsonl --output verdicts.jsonl`, resumable: an interrupted run continues).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .common import add_model_args, cli_errors, load_from_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pocketllama guard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="JSONL input: one object per line with 'messages' (alternating user/assistant) "
                                       "or 'prompt' (+ 'response'), and an optional unique 'id' (default: the line "
                                       "number). Output: one verdict per line, appended and synced as it is made.")
    add_model_args(p)
    p.add_argument("text", nargs="?", default=None, help="the user prompt to classify (default: stdin)")
    p.add_argument("--response", default=None, help="classify this assistant answer to TEXT instead of TEXT")
    p.add_argument("--exclude", default="", help="category codes to leave out, e.g. S6,S7 (others keep their codes)")
    p.add_argument("--categories", type=Path, default=None,
                   help="YAML file mapping codes to descriptions, replacing the built-in list ('S1: My rule. ...')")
    p.add_argument("--image", type=Path, default=None, help="an image with the prompt (vision guard only)")
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")
    p.add_argument("--max-tokens", type=int, default=20, help="most tokens of the assessment (default 20)")
    p.add_argument("--input", type=Path, default=None, help="batch mode: JSONL file of conversations")
    p.add_argument("--output", type=Path, default=None, help="batch mode: JSONL verdicts (appended; resumable)")
    p.add_argument("--limit", type=int, default=None, help="batch mode: check at most N more conversations")
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    exclude = [c.strip().upper() for c in args.exclude.split(",") if c.strip()]
    categories = read_categories(args.categories) if args.categories else None
    if args.input is not None or args.output is not None:
        if args.input is None or args.output is None:
            raise ValueError("batch mode needs both --input FILE.jsonl and --output FILE.jsonl")
        if args.text is not None or args.response is not None or args.image is not None:
            raise ValueError("batch mode takes conversations from --input; drop TEXT, --response and --image")
        records = read_records(args.input)
        guard = _load(args)
        run_batch(guard, records, args.output, categories=categories, exclude=exclude, limit=args.limit,
                  max_tokens=args.max_tokens)
        return 0
    text = args.text if args.text is not None else sys.stdin.read()
    if not text.strip():
        raise ValueError("nothing to classify: pass TEXT (or pipe it on stdin), or --input FILE.jsonl")
    content: Any = text
    if args.image is not None:
        if not args.image.is_file():
            raise FileNotFoundError(f"--image {args.image}: no such file")
        content = [{"type": "image", "image": str(args.image)}, {"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    if args.response is not None:
        messages.append({"role": "assistant", "content": args.response})
    guard = _load(args)
    verdict = guard.check(messages, categories=categories, exclude=exclude, max_tokens=args.max_tokens)
    if args.json:
        print(json.dumps(verdict.to_dict(), ensure_ascii=False))
    else:
        print("safe" if verdict.safe else "unsafe")
        for code, name in zip(verdict.categories, verdict.category_names, strict=True):
            print(f"{code}: {name}")
        print(f"p_unsafe: {verdict.p_unsafe:.4f} (vs safe only: {verdict.p_unsafe_binary:.4f})", file=sys.stderr)
    return 0


def _load(args: argparse.Namespace):
    from ..guard import Guard

    return Guard(load_from_args(args))


def read_categories(path: Path) -> dict[str, str]:
    """A YAML mapping `S1: description` (printed verbatim after `S1: ` in the prompt)."""
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"--categories {path}: no such file")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not data or not all(isinstance(v, str) for v in data.values()):
        raise ValueError(f"--categories {path} must map codes to descriptions, e.g. 'S1: Violent Crimes.'")
    return {str(k): v for k, v in data.items()}


def read_records(path: Path) -> list[tuple[Any, list[dict[str, Any]] | str]]:
    """(id, conversation) per line of a JSONL file; ids must be unique (they make the run resumable)."""
    if not path.is_file():
        raise FileNotFoundError(f"--input {path}: no such file")
    records, seen = [], set()
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{n}: each line must be a JSON object with 'messages' or 'prompt'")
            rid = obj.get("id", n)
            key = _key(rid)
            if key in seen:
                raise ValueError(f"{path}:{n}: id {rid!r} appears twice; ids must be unique to resume safely")
            seen.add(key)
            if "messages" in obj:
                conv = obj["messages"]
            elif isinstance(obj.get("prompt"), str):
                conv = [{"role": "user", "content": obj["prompt"]}]
                if isinstance(obj.get("response"), str):
                    conv.append({"role": "assistant", "content": obj["response"]})
            else:
                raise ValueError(f"{path}:{n}: needs 'messages' (a list) or 'prompt' (a string)")
            records.append((rid, conv))
    return records


def _key(rid: Any) -> str:
    return json.dumps(rid, sort_keys=True)


def done_ids(path: Path) -> set[str]:
    """Ids already in the output. A last line cut by a crash (no newline or not JSON) is removed."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    good = data.rfind(b"\n") + 1  # bytes up to the last complete line
    done: set[str] = set()
    for line in data[:good].splitlines():
        if line.strip():
            done.add(_key(json.loads(line)["id"]))
    if good != len(data):
        with path.open("r+b") as f:
            f.truncate(good)
    return done


def run_batch(guard: Any, records: list[tuple[Any, Any]], output: Path, *, categories: dict[str, str] | None,
              exclude: list[str], limit: int | None = None, max_tokens: int = 20) -> tuple[int, int]:
    """Check every record not yet in `output`, appending one line per verdict (flushed and fsynced before the
    next). A conversation the guard cannot read gets an `error` line instead. Returns (checked now, unsafe)."""
    from tqdm import tqdm

    if limit is not None and limit < 0:
        raise ValueError(f"--limit must be >= 0, got {limit}")
    done = done_ids(output)
    pending = [(rid, conv) for rid, conv in records if _key(rid) not in done]
    todo = pending[:limit] if limit is not None else pending
    checked = unsafe = 0
    output.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(records), initial=len(records) - len(pending), desc="guard", unit="conv",
               file=sys.stderr, disable=None)
    with output.open("a", encoding="utf-8") as out:
        for rid, conv in todo:
            try:
                row = {"id": rid, **guard.check(conv, categories=categories, exclude=exclude,
                                                max_tokens=max_tokens).to_dict()}
            except ValueError as e:  # a conversation the guard cannot read: recorded, the run goes on
                row = {"id": rid, "error": str(e)}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
            checked += 1
            unsafe += row.get("safe") is False
            bar.update(1)
    bar.close()
    left = len(pending) - checked
    print(f"guard: checked {checked} conversation(s), {unsafe} unsafe; {len(records) - len(pending)} were "
          f"already in {output}"
          + (f"; {left} left (run again to continue)" if left else ""), file=sys.stderr)
    return checked, unsafe

"""Supervised fine-tuning data: JSONL chat (`{"messages": [...]}`, optional `images`) or prompt/completion
records -> token ids with a per-token loss mask (assistant tokens only), length limits, a train/validation
split, sequence packing, and padded batches (block-diagonal causal masks for packed rows).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

IGNORE = -100  # target id that contributes no loss (F.cross_entropy's ignore_index)
TooLong = Literal["truncate", "drop"]
OnError = Literal["skip", "error"]


@dataclass
class Example:
    """One training conversation: ids, which of them are targets (assistant tokens), and where it came from."""

    ids: list[int]
    trained: list[bool]  # per token: True = the model learns to produce this token
    line: int  # 1-based line in the JSONL file
    image: Any = None  # vision: the image (path / bytes) its `<|image|>` token stands for

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_targets(self) -> int:
        return sum(self.trained[1:])  # the first token is never predicted


@dataclass
class DataReport:
    """What happened to every line of a data file."""

    path: str
    lines: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)
    truncated: list[int] = field(default_factory=list)
    dropped: list[tuple[int, str]] = field(default_factory=list)
    examples: int = 0
    tokens: int = 0
    targets: int = 0

    def summary(self) -> str:
        parts = [f"{self.path}: {self.lines} line(s) -> {self.examples} example(s), {self.tokens} tokens "
                 f"({self.targets} trained)"]
        if self.bad:
            parts.append(f"  skipped {len(self.bad)} bad line(s): " + "; ".join(f"line {n}: {r}" for n, r in
                                                                               self.bad[:10])
                         + (" ..." if len(self.bad) > 10 else ""))
        if self.truncated:
            parts.append(f"  truncated {len(self.truncated)} example(s) to the length limit: lines "
                         + ", ".join(map(str, self.truncated[:20])) + (" ..." if len(self.truncated) > 20 else ""))
        if self.dropped:
            parts.append(f"  dropped {len(self.dropped)} example(s): " + "; ".join(f"line {n}: {r}" for n, r in
                                                                                 self.dropped[:10])
                         + (" ..." if len(self.dropped) > 10 else ""))
        return "\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "lines": self.lines, "examples": self.examples, "tokens": self.tokens,
                "targets": self.targets, "bad": [list(b) for b in self.bad], "truncated": self.truncated,
                "dropped": [list(d) for d in self.dropped]}


# ---- conversations -> ids + loss mask -------------------------------------------------------------------


def encode_chat(fmt: Any, tokenizer: Any, messages: list[dict[str, Any]], *, train: Sequence[int] | None = None,
                date_string: str | None = None) -> tuple[list[int], list[bool]]:
    """A conversation in the model's chat format, with `trained` True exactly on the assistant turns' tokens
    (content and end-of-turn marker; not the assistant header). `train`: indices of the assistant messages
    to learn (default: all). Turns after the last trained one are left out (nothing to learn there).

    The prompt before each trained turn is the format's own generation prompt, so training sees the ids that
    chat inference will see: Llama 3 formats compare ids, Jinja templates compare rendered text (then each
    piece is tokenized on its own, as at inference where the answer is generated after the prompt).
    """
    assistant = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    train = assistant if train is None else sorted(train)
    if not train:
        raise ValueError("the conversation has no assistant message to learn from")
    for i in train:
        if messages[i].get("role") != "assistant":
            raise ValueError(f"message {i} is a {messages[i].get('role')!r} message; only assistant turns are trained")
    by_ids = hasattr(fmt, "encode_header")  # the Llama 3 format as code: exact ids, no re-tokenization
    if by_ids and date_string is None:  # one date for every render of this conversation
        from ..chat_format import today_string

        date_string = today_string()
    render = fmt.encode if by_ids else fmt.render
    pieces: list[tuple[Any, bool]] = []  # (ids or text, trained)
    done: Any = [] if by_ids else ""
    for i in train:
        prompt = render(messages[:i], add_generation_prompt=True, date_string=date_string)
        full = render(messages[: i + 1], add_generation_prompt=False, date_string=date_string)
        if full[: len(prompt)] != prompt or prompt[: len(done)] != done:
            raise ValueError(f"the chat format does not render message {i} after the conversation before it "
                             "(it rewrites earlier turns); train on the last assistant turn only")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    ids: list[int] = []
    trained: list[bool] = []
    for piece, is_target in pieces:
        piece_ids = piece if by_ids else tokenizer.encode(piece, allow_special=True)
        ids += piece_ids
        trained += [is_target] * len(piece_ids)
    return ids, trained


def encode_raw(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[bool]]:
    """Plain completion (no chat format): BOS (model convention) + prompt + completion + EOS; trained on the
    completion and EOS."""
    p = tokenizer.encode(prompt, add_bos=tokenizer.add_bos)
    c = tokenizer.encode(completion)
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    return p + c + eos, [False] * len(p) + [True] * (len(c) + len(eos))


def record_to_messages(record: Any, where: str = "record") -> tuple[list[dict], list[int] | None, Any]:
    """A JSONL record -> (messages, assistant indices to train (None = all), image or None).

    Chat: {"messages": [...], "images": [img]?}; prompt/completion: {"prompt": str | [messages],
    "completion": str | [messages]} (a string pair becomes one user turn and one assistant turn; a message
    pair trains only the completion's assistant turns, as TRL). Images: one per example, either an image
    part {"type": "image", "image": path} or an `images` list filling {"type": "image"} parts in order.
    """
    if not isinstance(record, dict):
        raise ValueError(f"{where} is a JSON {type(record).__name__}, not an object")
    if "messages" in record:
        messages = record["messages"]
        train = None
    elif "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            prompt = [{"role": "user", "content": prompt}]
            completion = [{"role": "assistant", "content": completion}]
        if not isinstance(prompt, list) or not isinstance(completion, list):
            raise ValueError("'prompt' and 'completion' must both be strings or both lists of messages")
        messages = prompt + completion
        train = [i for i in range(len(prompt), len(messages)) if _role(messages[i]) == "assistant"]
    else:
        raise ValueError(f"{where} has neither 'messages' nor 'prompt' + 'completion' (keys: {sorted(record)})")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {'role': ..., 'content': ...} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"message {i} is not an object with a 'role'")
    messages, image = _attach_images(messages, record.get("images"))
    return messages, train, image


def _role(m: Any) -> Any:
    return m.get("role") if isinstance(m, dict) else None


def _attach_images(messages: list[dict], images: Any) -> tuple[list[dict], Any]:
    from ..chat_format import _IMAGE_PARTS
    from ..vision import image_source

    parts = [(mi, pi) for mi, m in enumerate(messages) if isinstance(m.get("content"), list)
             for pi, p in enumerate(m["content"]) if isinstance(p, dict) and p.get("type") in _IMAGE_PARTS]
    if images is not None and not isinstance(images, list):
        raise ValueError("'images' must be a list of image paths")
    if images and len(images) != len(parts):
        raise ValueError(f"'images' has {len(images)} image(s) but the messages have {len(parts)} image part(s)")
    if len(parts) > 1:
        raise ValueError(f"{len(parts)} images in one example; Llama 3.2 Vision trains on one image per example")
    if not parts:
        return messages, None
    mi, pi = parts[0]
    image = images[0] if images else image_source(messages[mi]["content"][pi], f"message {mi} image part")
    out = [dict(m) for m in messages]
    content = list(out[mi]["content"])
    content[pi] = {"type": "image"}
    out[mi]["content"] = content
    return out, image


# ---- files -> examples ------------------------------------------------------------------------------------


def load_examples(path: str | os.PathLike[str], tokenizer: Any, fmt: Any, *, max_len: int,
                  too_long: TooLong = "truncate", on_error: OnError = "skip", date_string: str | None = None,
                  raw_completions: bool = False, image_token_id: int | None = None
                  ) -> tuple[list[Example], DataReport]:
    """Read a JSONL file into examples no longer than `max_len` tokens, reporting every bad, truncated or
    dropped line. on_error="error" stops at the first bad line (its number and reason in the message)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    if too_long not in ("truncate", "drop"):
        raise ValueError(f"too_long must be 'truncate' or 'drop', not {too_long!r}")
    if on_error not in ("skip", "error"):
        raise ValueError(f"on_error must be 'skip' or 'error', not {on_error!r}")
    report = DataReport(str(path))
    examples: list[Example] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            report.lines = n
            if not line.strip():
                continue
            try:
                ex = _encode_line(line, n, path.parent, tokenizer, fmt, date_string, raw_completions, image_token_id)
            except ValueError as e:
                if on_error == "error":
                    raise ValueError(f"{path} line {n}: {e} (use on_error='skip' / --bad-lines skip to skip "
                                     "bad lines)") from None
                report.bad.append((n, str(e)))
                continue
            ex = limit_length(ex, max_len, too_long, report, image_token_id)
            if ex is not None:
                examples.append(ex)
    report.examples = len(examples)
    report.tokens = sum(len(e) for e in examples)
    report.targets = sum(e.num_targets for e in examples)
    if not examples:
        raise ValueError(f"{path} has no usable examples\n{report.summary()}")
    return examples, report


def _encode_line(line: str, n: int, folder: Path, tokenizer: Any, fmt: Any, date_string: str | None,
                 raw_completions: bool, image_token_id: int | None) -> Example:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if raw_completions and isinstance(record, dict) and isinstance(record.get("prompt"), str) \
            and isinstance(record.get("completion"), str):
        ids, trained = encode_raw(tokenizer, record["prompt"], record["completion"])
        return Example(ids, trained, n)
    messages, train, image = record_to_messages(record)
    if image is not None:
        if image_token_id is None:
            raise ValueError("the example has an image but the model is text-only (images need Llama 3.2 Vision)")
        if isinstance(image, str) and not image.startswith("data:") and not Path(image).is_absolute():
            image = str(folder / image)
    ids, trained = encode_chat(fmt, tokenizer, messages, train=train, date_string=date_string)
    return Example(ids, trained, n, image)


def limit_length(ex: Example, max_len: int, too_long: TooLong, report: DataReport,
                 image_token_id: int | None = None) -> Example | None:
    """`ex` cut to `max_len` tokens (too_long="truncate") or None (dropped, with the reason in `report`)."""
    if len(ex) <= max_len:
        return ex
    if too_long == "drop":
        report.dropped.append((ex.line, f"{len(ex)} tokens > max_len {max_len}"))
        return None
    cut = Example(ex.ids[:max_len], ex.trained[:max_len], ex.line, ex.image)
    if cut.num_targets == 0:
        report.dropped.append((ex.line, f"no assistant token within the first {max_len} tokens"))
        return None
    if ex.image is not None and image_token_id is not None and image_token_id not in cut.ids:
        report.dropped.append((ex.line, f"the <|image|> token is past max_len {max_len}"))
        return None
    report.truncated.append(ex.line)
    return cut


def split_examples(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, validation): a seeded random `val_fraction` of the examples (at least one when > 0)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0 or len(examples) < 2:
        return list(examples), []
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(len(examples) - 1, max(1, round(val_fraction * len(examples))))
    val = sorted(order[:n_val])
    keep = sorted(order[n_val:])
    return [examples[i] for i in keep], [examples[i] for i in val]


# ---- rows, packing, batches -----------------------------------------------------------------------------

Row = list[Example]  # one sequence of the batch: one example, or several packed back to back


def epoch_rows(examples: list[Example], epoch: int, seed: int, *, shuffle: bool = True,
               packing: bool = False, max_len: int = 0) -> list[Row]:
    """The rows of one epoch: examples in a seeded order (the same for every process and after a resume),
    packed greedily into rows of at most `max_len` tokens when `packing`."""
    order = list(range(len(examples)))
    if shuffle:
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    if not packing:
        return [[examples[i]] for i in order]
    rows: list[Row] = []
    current: Row = []
    used = 0
    for i in order:
        ex = examples[i]
        if current and used + len(ex) > max_len:
            rows.append(current)
            current, used = [], 0
        current.append(ex)
        used += len(ex)
    if current:
        rows.append(current)
    return rows


@dataclass
class Batch:
    """input_ids / targets / positions (B, T); targets[b, t] is the id token t should predict (IGNORE: no
    loss); attn_mask (B, 1, T, T) bool for packed rows (None: plain causal); images: per row (vision)."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor
    attn_mask: torch.Tensor | None
    num_tokens: int  # real (non-pad) tokens
    num_targets: int
    images: list[Any] | None = None

    def to(self, device: torch.device | str) -> Batch:
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(mv(self.input_ids), mv(self.targets), mv(self.positions), mv(self.attn_mask),
                     self.num_tokens, self.num_targets, self.images)


def collate(rows: Sequence[Row], pad_id: int = 0) -> Batch:
    """Right-padded batch. Each example in a row gets positions 0.. and predicts only its own next tokens;
    rows that hold several examples get a block-diagonal causal mask so no token sees another example."""
    if not rows:
        raise ValueError("collate needs at least one row")
    T = max(sum(len(e) for e in row) for row in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    positions = torch.arange(T).repeat(B, 1)
    segments = torch.full((B, T), -1, dtype=torch.long)  # padding: segment -1 (attends only earlier padding)
    packed = any(len(row) > 1 for row in rows)
    num_tokens = 0
    for b, row in enumerate(rows):
        start = 0
        for s, ex in enumerate(row):
            n = len(ex)
            ids = torch.tensor(ex.ids, dtype=torch.long)
            input_ids[b, start:start + n] = ids
            keep = torch.tensor(ex.trained[1:], dtype=torch.bool)
            targets[b, start:start + n - 1] = torch.where(keep, ids[1:], IGNORE)
            positions[b, start:start + n] = torch.arange(n)
            segments[b, start:start + n] = s
            start += n
        num_tokens += start
    attn_mask = None
    if packed:
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        attn_mask = ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]  # (B, 1, T, T)
    images = [row[0].image for row in rows] if any(ex.image is not None for row in rows for ex in row) else None
    if images is not None and packed:
        raise ValueError("packing is not supported with images; train vision examples unpacked")
    return Batch(input_ids, targets, positions, attn_mask, num_tokens, int((targets != IGNORE).sum()), images)


def micro_batches(rows: Sequence[Row], batch_size: int) -> list[list[Row]]:
    return [list(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]

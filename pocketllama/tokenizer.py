"""One Tokenizer for every vocabulary pocketllama reads: Llama 3 tiktoken files, HF tokenizer.json
folders and GGUF metadata; plus special tokens, stop ids and a UTF-8 safe incremental detokenizer.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import tiktoken
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

# Llama 3 pre-tokenizer (SPEC 4; Meta llama3/tokenizer.py).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_NAMED_SPECIALS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>",
)  # fmt: skip
# Meta's names for ids 128000..128255 (SPEC 4, Meta column).
LLAMA3_SPECIAL_TOKENS: tuple[str, ...] = _NAMED_SPECIALS + tuple(
    f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(_NAMED_SPECIALS))
)
# Meta's guards: tiktoken panics past ~400k chars, and one pre-token of a huge run is slow to merge.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
_LONG_RUN = re.compile(rf"\s{{{_MAX_RUN_CHARS + 1},}}|\S{{{_MAX_RUN_CHARS + 1},}}")

# llama.cpp pre-tokenizers (llama-vocab.cpp), applied one after another like its `regex_exprs`.
_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
GGUF_PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx"), (LLAMA3_PATTERN,)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell"), (r"\p{N}", _GPT2_PATTERN)),
    **dict.fromkeys(("gpt2", "mpt", "olmo"), (_GPT2_PATTERN,)),
    "qwen2": (_QWEN2_PATTERN,),
}
# llama.cpp matches whole words against the vocabulary before merging for these (`ignore_merges`).
_IGNORE_MERGES_PRE = {"llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx"}
# Control tokens that end generation in a byte-level vocabulary (llama.cpp's end-of-generation names).
_END_TOKEN_NAMES = ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|im_end|>")
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by every byte-level BPE vocabulary."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in _bytes_to_unicode().items()}


class IncrementalDetokenizer:
    """Token ids in, text out, never half a UTF-8 character; O(1) per token.

    Each id maps to its bytes; an incremental UTF-8 decoder holds back an unfinished character until
    its last byte arrives. The concatenation of every `add()` and the final `flush()` equals
    `tokenizer.decode(all_ids)` (invalid bytes become U+FFFD in both).
    """

    def __init__(self, token_bytes: Callable[[int], bytes]) -> None:
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        """Feed one id; returns the text that is now complete (maybe "")."""
        return self._utf8.decode(self._token_bytes(token_id))

    def flush(self) -> str:
        """End of stream: returns held-back bytes (U+FFFD if unfinished) and resets."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


class _WindowDetokenizer(IncrementalDetokenizer):
    """Fallback for vocabularies whose tokens are not plain bytes (e.g. SentencePiece '▁' + byte fallback).

    Re-decodes only the ids since the last emitted boundary (vLLM's prefix/read offsets), so the
    work per token stays bounded by the length of one unfinished character or word piece.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode, self._ids, self._prefix, self._read = decode, [], 0, 0

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        done = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""  # an unfinished character: wait for more ids
        self._prefix, self._read = self._read, len(self._ids)
        if self._prefix > 64:  # keep the id list short
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return text[len(done) :]

    def flush(self) -> str:
        done = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._ids, self._prefix, self._read = [], 0, 0
        return text[len(done) :]


class _TiktokenBackend:
    """tiktoken.Encoding plus Meta's long-input guards."""

    def __init__(self, encoding: tiktoken.Encoding, special_tokens: dict[str, int]) -> None:
        self.encoding, self.special_ids = encoding, frozenset(special_tokens.values())
        self.id_to_special = {i: s for s, i in special_tokens.items()}
        self.vocab_size = encoding.n_vocab

    def encode(self, text: str, allow_special: bool) -> list[int]:
        ids: list[int] = []
        for piece in _guarded_pieces(text):
            if allow_special:
                ids += self.encoding.encode(piece, allowed_special="all", disallowed_special=())
            else:
                ids += self.encoding.encode_ordinary(piece)
        return ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        return self.encoding.decode(ids)

    def token_bytes(self, token_id: int) -> bytes:
        return self.encoding.decode_single_token_bytes(token_id)

    def token_to_id(self, token: str) -> int | None:
        try:
            return self.encoding.encode_single_token(token)
        except KeyError:
            return None

    def id_to_token(self, token_id: int) -> str | None:
        if token_id in self.id_to_special:
            return self.id_to_special[token_id]
        return self.token_bytes(token_id).decode("utf-8", errors="replace")


def _guarded_pieces(text: str) -> Iterator[str]:
    """Meta's guards: 400k-char chunks; runs of > 25k whitespace / non-whitespace chars cut every 25k."""
    for start in range(0, len(text), _MAX_ENCODE_CHARS):
        chunk = text[start : start + _MAX_ENCODE_CHARS]
        cut = 0
        for run in _LONG_RUN.finditer(chunk):  # rare: only pathological inputs get here
            for pos in range(run.start() + _MAX_RUN_CHARS, run.end(), _MAX_RUN_CHARS):
                yield chunk[cut:pos]
                cut = pos
        yield chunk[cut:]


class _HFBackend:
    """A `tokenizers.Tokenizer`; its `encode_special_tokens` switch decides whether special-token strings
    in the text are parsed (allow_special) or encoded as plain text (the default)."""

    def __init__(self, tok: tokenizers.Tokenizer) -> None:
        self.tok = tok
        self._lock = threading.Lock()  # the switch is state on a shared object: flip and encode atomically
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        added = tok.get_added_tokens_decoder()
        self.special_tokens = {t.content: i for i, t in sorted(added.items()) if t.special}
        self.special_ids = frozenset(self.special_tokens.values())
        self.byte_level = isinstance(tok.decoder, decoders.ByteLevel)
        self._bytes: list[bytes] | None = None

    def encode(self, text: str, allow_special: bool) -> list[int]:
        with self._lock:
            self.tok.encode_special_tokens = not allow_special
            return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def token_bytes(self, token_id: int) -> bytes:
        if not self.byte_level:
            return self.decode([token_id], False).encode("utf-8")
        if self._bytes is None:  # built once: the same per-token rule as the ByteLevel decoder
            u2b = _unicode_to_bytes()
            table = []
            for i in range(self.vocab_size):
                token = self.tok.id_to_token(i) or ""
                spelled = [u2b.get(c) for c in token]
                table.append(token.encode("utf-8") if None in spelled else bytes(spelled))  # type: ignore[arg-type]
            self._bytes = table
        return self._bytes[token_id]

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tok.id_to_token(token_id)


class Tokenizer:
    """Text <-> token ids for one model, with its special tokens, stop ids and chat template.

    Build with `from_tiktoken` (Llama 3 tokenizer.model), `from_hf_dir` (tokenizer.json folder) or
    `from_gguf_metadata` (tokenizer.ggml.* keys). `encode` never adds BOS unless asked and never parses
    special-token strings unless `allow_special=True`, so user text cannot forge `<|eot_id|>`.
    """

    def __init__(
        self,
        backend: _TiktokenBackend | _HFBackend,
        *,
        special_tokens: dict[str, int],
        bos_id: int | None,
        eos_id: int | None,
        pad_id: int | None = None,
        unk_id: int | None = None,
        stop_ids: Iterable[int] = (),
        add_bos: bool = False,
        chat_template: str | None = None,
        chat_templates: dict[str, str] | None = None,
        source: str = "",
    ) -> None:
        self._backend = backend
        self.vocab_size: int = backend.vocab_size
        self.special_tokens: dict[str, int] = dict(special_tokens)
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        stops = {i for i in stop_ids if i is not None} | ({eos_id} if eos_id is not None else set())
        self.stop_ids: frozenset[int] = frozenset(stops)
        self.add_bos: bool = add_bos
        self.chat_template: str | None = chat_template
        self.chat_templates: dict[str, str] = dict(chat_templates or {})  # every named template
        self.source = source

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, stop_ids={sorted(self.stop_ids)})"
        )

    # ---- builders -------------------------------------------------------------------------------

    @classmethod
    def from_tiktoken(cls, path: str | Path) -> Tokenizer:
        """Llama 3 `tokenizer.model`: lines `base64(token bytes) rank`, plus Meta's 256 special tokens."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Llama 3 tokenizer file not found: {path}")
        ranks = _read_tiktoken_ranks(path)
        first_special = len(ranks)
        special = {name: first_special + i for i, name in enumerate(LLAMA3_SPECIAL_TOKENS)}
        encoding = tiktoken.Encoding(
            name=path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=special
        )
        return cls(
            _TiktokenBackend(encoding, special),
            special_tokens=special,
            bos_id=special["<|begin_of_text|>"],
            eos_id=special["<|end_of_text|>"],
            pad_id=special["<|finetune_right_pad_id|>"],
            stop_ids=(special["<|end_of_text|>"], special["<|eom_id|>"], special["<|eot_id|>"]),
            add_bos=True,  # Meta encodes plain text with bos=True
            source=str(path),
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """HF folder: tokenizer.json (+ tokenizer_config.json, special_tokens_map.json, generation_config.json).

        Stop ids = generation_config `eos_token_id` (int or list) + the tokenizer's eos token.
        `add_bos` = tokenizer_config `add_bos_token`, else whether the post-processor prepends BOS
        (we always encode without the post-processor and prepend BOS ourselves).
        """
        path = Path(path)
        folder = path.parent if path.name == "tokenizer.json" else path
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in {folder}; pocketllama reads HF tokenizers from tokenizer.json "
                "(a Meta folder has tokenizer.model: use Tokenizer.from_tiktoken)"
            )
        try:
            tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:
            raise ValueError(f"{file} is not a valid tokenizer.json: {e}") from e
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        generation = _read_json(folder / "generation_config.json")

        def special_id(key: str) -> int | None:
            value = config.get(key) or special_map.get(key)
            content = value.get("content") if isinstance(value, dict) else value
            return tok.token_to_id(content) if isinstance(content, str) else None

        gen_eos = generation.get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        eos_id = special_id("eos_token")
        eos_id = eos_id if eos_id is not None else (gen_eos[0] if gen_eos else None)
        bos_id = special_id("bos_token")
        bos_id = bos_id if bos_id is not None else generation.get("bos_token_id")
        pad_id = special_id("pad_token")
        pad_id = pad_id if pad_id is not None else generation.get("pad_token_id")
        add_bos = config.get("add_bos_token")
        if not isinstance(add_bos, bool):  # ask the post-processor whether it prepends BOS
            ids = tok.encode("a", add_special_tokens=True).ids
            add_bos = bos_id is not None and bool(ids) and ids[0] == bos_id
        templates = _hf_chat_templates(folder, config)
        backend = _HFBackend(tok)
        return cls(
            backend,
            special_tokens=backend.special_tokens,
            bos_id=bos_id,
            eos_id=eos_id,
            pad_id=pad_id,
            unk_id=special_id("unk_token"),
            stop_ids=gen_eos,
            add_bos=add_bos,
            chat_template=templates.get("default"),
            chat_templates=templates,
            source=str(folder),
        )

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        """Byte-level BPE vocabulary from GGUF `tokenizer.ggml.*` keys (plain Python values).

        Control tokens (type 3) become special added tokens; user-defined ones (type 4) added tokens
        matched whole in any text (as llama.cpp and transformers do). Stop ids = eos, eot, eom ids plus
        any control token named like an end token (`<|eot_id|>`, `<|im_end|>`, `<|endoftext|>`, ...),
        as llama.cpp does: a Llama 3.2 Instruct GGUF whose eos is `<|eot_id|>` then stops on
        128001, 128008 and 128009 like the HF generation_config.
        """
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            detail = " (SentencePiece vocabularies are not supported yet)" if kind == "llama" else ""
            raise ValueError(
                f"GGUF 'tokenizer.ggml.model' is {kind!r}{detail}; pocketllama reads 'gpt2' "
                "(byte-level BPE: Llama 3.x, SmolLM2)"
            )
        tokens, merges = _gguf_list(meta, "tokenizer.ggml.tokens"), _gguf_list(meta, "tokenizer.ggml.merges")
        types = meta.get("tokenizer.ggml.token_type")
        types = [1] * len(tokens) if types is None else [int(t) for t in types]  # (numpy arrays welcome)
        if len(types) != len(tokens):
            raise ValueError(
                f"GGUF 'tokenizer.ggml.token_type' has {len(types)} entries but 'tokenizer.ggml.tokens' "
                f"has {len(tokens)}; the file is inconsistent"
            )
        pre = meta.get("tokenizer.ggml.pre", "gpt2")
        if pre not in GGUF_PRE_TOKENIZERS:
            raise ValueError(
                f"GGUF 'tokenizer.ggml.pre' is {pre!r}, a pre-tokenizer pocketllama does not know; "
                f"supported: {', '.join(sorted(GGUF_PRE_TOKENIZERS))}"
            )
        tok = _byte_level_bpe(tokens, types, merges, GGUF_PRE_TOKENIZERS[pre], pre in _IGNORE_MERGES_PRE)
        special = {t: i for i, (t, k) in enumerate(zip(tokens, types, strict=True)) if k == _CONTROL}

        def token_id(key: str) -> int | None:
            value = meta.get(f"tokenizer.ggml.{key}")
            if value is None:
                return None
            if (
                isinstance(value, bool)
                or not hasattr(value, "__index__")
                or not 0 <= int(value) < len(tokens)
            ):
                raise ValueError(
                    f"GGUF 'tokenizer.ggml.{key}' = {value!r} is not a token id (0..{len(tokens) - 1})"
                )
            return int(value)

        eos_id, eot_id, eom_id = token_id("eos_token_id"), token_id("eot_token_id"), token_id("eom_token_id")
        stops = {i for i in (eos_id, eot_id, eom_id) if i is not None}
        stops |= {special[name] for name in _END_TOKEN_NAMES if name in special}
        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        template = meta.get("tokenizer.chat_template")
        return cls(
            _HFBackend(tok),
            special_tokens=special,
            bos_id=token_id("bos_token_id"),
            eos_id=eos_id,
            pad_id=token_id("padding_token_id"),
            unk_id=token_id("unknown_token_id"),
            stop_ids=stops,
            add_bos=bool(add_bos) if add_bos is not None else False,
            chat_template=template,
            chat_templates={"default": template} if template else {},
            source=f"GGUF vocabulary ({pre})",
        )

    # ---- text <-> ids ---------------------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings stay plain text unless `allow_special=True`."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
        ids = self._backend.encode(text, allow_special)
        if add_bos:
            if self.bos_id is None:
                raise ValueError(f"add_bos=True but the tokenizer {self.source!r} has no BOS token")
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of `ids` (no clean-up of spaces). Invalid UTF-8 becomes U+FFFD."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self._backend.decode(ids, skip_special)

    def token_to_id(self, token: str) -> int | None:
        """Id of one vocabulary entry (as tokenizer.json spells it; the text itself for tiktoken), or None."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of one id (special tokens by name), or None."""
        return self._backend.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token contributes to decoded text (useful for logprobs)."""
        return self._backend.token_bytes(token_id)

    def detokenizer(self, *, skip_special: bool = False) -> IncrementalDetokenizer:
        """A fresh streaming detokenizer: `.add(id) -> str`, `.flush() -> str`."""
        backend = self._backend
        if isinstance(backend, _HFBackend) and not backend.byte_level:
            return _WindowDetokenizer(lambda ids: backend.decode(ids, skip_special))
        if skip_special:
            skip = backend.special_ids
            return IncrementalDetokenizer(lambda i: b"" if i in skip else backend.token_bytes(i))
        return IncrementalDetokenizer(backend.token_bytes)


# ---- file readers ---------------------------------------------------------------------------------


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError("expected 2 fields")
                ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
            except (ValueError, binascii.Error) as e:
                text = line[:60].decode("utf-8", errors="replace").rstrip()
                raise ValueError(
                    f"{path}: line {number} is not 'base64(token) rank' ({e}): {text!r}; "
                    "is this a Llama 3 tiktoken tokenizer.model?"
                ) from None
    if not ranks:
        raise ValueError(f"{path}: no tokens; is this a Llama 3 tiktoken tokenizer.model?")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps or repeats")
    return ranks


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path} should hold a JSON object, got {type(value).__name__}")
    return value


def _hf_chat_templates(folder: Path, config: dict[str, Any]) -> dict[str, str]:
    """Named chat templates: tokenizer_config `chat_template` (str or [{name, template}]) or chat_template.jinja."""
    value = config.get("chat_template")
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        return {
            t["name"]: t["template"] for t in value if isinstance(t, dict) and "name" in t and "template" in t
        }
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return {"default": jinja.read_text(encoding="utf-8")}
    template = _read_json(folder / "chat_template.json").get("chat_template")
    return {"default": template} if isinstance(template, str) else {}


def _gguf_list(meta: dict[str, Any], key: str) -> list[str]:
    value = meta.get(key)
    if not isinstance(value, list) or not value:
        raise ValueError(f"GGUF metadata has no list '{key}'; the file carries no usable vocabulary")
    return value


def _byte_level_bpe(
    tokens: list[str], types: list[int], merges: list[str], patterns: tuple[str, ...], ignore_merges: bool
) -> tokenizers.Tokenizer:
    """A tokenizers.Tokenizer equal to llama.cpp's BPE: regex splits, byte-level spelling, ranked merges."""
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for i, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        added = kind in (_CONTROL, _USER_DEFINED)  # matched whole before BPE: keep the raw spelling
        key = (
            token if added or set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))
        )
        vocab.setdefault(key, i)
    pairs = []
    for i, merge in enumerate(merges):
        pair = merge.split(" ")
        if len(pair) != 2:
            raise ValueError(
                f"GGUF 'tokenizer.ggml.merges'[{i}] = {merge!r} is not two tokens separated by a space"
            )
        pairs.append((pair[0], pair[1]))
    tok = tokenizers.Tokenizer(
        models.BPE(
            vocab=vocab, merges=pairs, byte_fallback=False, fuse_unk=False, ignore_merges=ignore_merges
        )
    )
    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in patterns]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    control = [
        AddedToken(t, special=True, normalized=False)
        for t, k in zip(tokens, types, strict=True)
        if k == _CONTROL
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, k in zip(tokens, types, strict=True)
        if k == _USER_DEFINED
    ]
    tok.add_special_tokens(control)
    tok.add_tokens(user)
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError(
            f"GGUF vocabulary has {len(tokens)} tokens but {tok.get_vocab_size(with_added_tokens=True)} "
            "after adding its control/user-defined tokens (duplicate token strings?)"
        )
    return tok

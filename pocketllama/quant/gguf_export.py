"""`export_gguf(src, out, qtype)`: write a llama.cpp GGUF (F16 / Q8_0 / Q4_0 ...) from any checkpoint
pocketllama reads, with the tokenizer as GGUF `gpt2` metadata (Llama 3 vocabularies: pre `llama-bpe`),
the chat template, llama3 RoPE scaling as `rope_freqs`, and tied output handled (no `output.weight`).
Tensors go one at a time through `weights/gguf_write.write_gguf`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

EXPORT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4  # tokenizer.ggml.token_type
LLAMA3_BOS = "<|begin_of_text|>"


def _byte_spelling() -> dict[int, str]:
    """GPT-2's printable stand-ins for the 256 byte values (how byte-level BPE vocabularies spell tokens)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def tiktoken_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merges implied by tiktoken ranks, as transformers' TikTokenConverter derives them (and so the
    list in Meta's tokenizer.json that llama.cpp converts): every split of a token into two vocabulary
    pieces, ordered by the token's rank, then by the pieces' ranks."""
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return [(a, b) for *_, a, b in merges]


def tokenizer_metadata(checkpoint: Any, vocab_size: int, pre: str | None = None) -> dict[str, Any]:
    """`tokenizer.ggml.*` keys (+ chat template) for the checkpoint's tokenizer."""
    meta = getattr(checkpoint, "metadata", None)
    if isinstance(meta, dict) and "tokenizer.ggml.tokens" in meta:  # a GGUF source: keep its vocabulary
        out = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
        if pre:
            out["tokenizer.ggml.pre"] = pre
        return out
    tok = checkpoint.load_tokenizer()
    folder = Path(checkpoint.path)
    tokens, types, merges = _vocabulary(folder, tok)
    if len(tokens) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokens)} tokens but the model's vocabulary is {vocab_size}")
    for i in range(len(tokens), vocab_size):  # rows the tokenizer never produces, as llama.cpp's converter pads
        tokens.append(f"[PAD{i}]")
        types.append(USER_DEFINED)
    llama3 = tok.special_tokens.get(LLAMA3_BOS) is not None and len(merges) > 100_000
    if pre is None:
        if not llama3:
            raise ValueError("pocketllama writes GGUF tokenizer metadata for Llama 3 vocabularies (pre-tokenizer "
                             "'llama-bpe') and copies it from GGUF sources; for this tokenizer pass the llama.cpp "
                             "pre-tokenizer name with --pre (e.g. smollm, gpt2)")
        pre = "llama-bpe"
    out: dict[str, Any] = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
                           "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                           "tokenizer.ggml.merges": merges, "tokenizer.ggml.add_bos_token": bool(tok.add_bos)}
    for key, value in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id), ("padding_token_id", tok.pad_id),
                       ("eot_token_id", tok.special_tokens.get("<|eot_id|>")),
                       ("eom_token_id", tok.special_tokens.get("<|eom_id|>"))):
        if value is not None:
            out[f"tokenizer.ggml.{key}"] = int(value)
    template = checkpoint.chat_template() or tok.chat_template
    if template:
        out["tokenizer.chat_template"] = template
    return out


def _vocabulary(folder: Path, tok: Any) -> tuple[list[str], list[int], list[str]]:
    """(tokens spelled byte-level, token types, merges "a b") from tokenizer.json or a tiktoken file."""
    spelling = _byte_spelling()
    file = folder / "tokenizer.json"
    if file.is_file():
        data = json.loads(file.read_text(encoding="utf-8"))
        model = data.get("model", {})
        if model.get("type") != "BPE":
            raise ValueError(f"{file}: only byte-level BPE tokenizers can be written to GGUF, not {model.get('type')}")
        vocab: dict[str, int] = dict(model["vocab"])
        kinds = {}
        for added in data.get("added_tokens", []):
            vocab[added["content"]] = added["id"]
            kinds[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
        size = max(vocab.values()) + 1
        tokens = [f"[PAD{i}]" for i in range(size)]
        types = [USER_DEFINED] * size
        for text, i in vocab.items():
            tokens[i], types[i] = text, kinds.get(i, NORMAL)
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        return tokens, types, merges
    for candidate in (folder / "tokenizer.model", folder / "original" / "tokenizer.model"):
        if candidate.is_file():
            from tiktoken.load import load_tiktoken_bpe

            ranks = load_tiktoken_bpe(str(candidate))
            spell = lambda b: "".join(spelling[x] for x in b)  # noqa: E731
            tokens = [""] * len(ranks)
            for token, rank in ranks.items():
                tokens[rank] = spell(token)
            types = [NORMAL] * len(tokens)
            for name, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1]):
                while len(tokens) <= i:
                    tokens.append(f"[PAD{len(tokens)}]")
                    types.append(USER_DEFINED)
                tokens[i], types[i] = name, CONTROL
            return tokens, types, [f"{spell(a)} {spell(b)}" for a, b in tiktoken_merges(ranks)]
    raise ValueError(f"{folder} has no tokenizer.json or tokenizer.model to write into the GGUF")


class _LazyTensor:
    """Shape now, data when `write_gguf` asks (`.detach()`): one tensor in memory at a time."""

    def __init__(self, checkpoint: Any, name: str) -> None:
        self._checkpoint, self._name = checkpoint, name
        self.shape = tuple(checkpoint.tensor_shape(name))

    def detach(self) -> torch.Tensor:
        return self._checkpoint.load_tensor(self._name, torch.float32)


class _LazyStateDict(Mapping):
    def __init__(self, checkpoint: Any, names: list[str]) -> None:
        self._checkpoint, self._names = checkpoint, names

    def __getitem__(self, name: str) -> _LazyTensor:
        if name not in self._names:
            raise KeyError(name)
        return _LazyTensor(self._checkpoint, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def export_gguf(source: str | Path, out: str | Path, qtype: str = "f16", *, pre: str | None = None) -> Path:
    """Write `source` (HF / Meta folder, GGUF, quantized pocketllama checkpoint) as a llama.cpp GGUF."""
    from ..config import TextConfig
    from ..models import model_class
    from ..sources import resolve
    from ..weights import open_checkpoint
    from ..weights.base import build_on_meta
    from ..weights.gguf_write import write_gguf
    from .handler import model_shapes, plan_for_recipe
    from .recipe import Recipe
    from .views import DequantizingCheckpoint

    if qtype.lower() not in EXPORT_TYPES:
        raise ValueError(f"GGUF type {qtype!r} is not one pocketllama exports; choose one of {', '.join(EXPORT_TYPES)}")
    checkpoint = open_checkpoint(resolve(source))
    config = getattr(checkpoint, "config", None) or TextConfig.from_hf(checkpoint.hf_config())
    shapes = model_shapes(build_on_meta(model_class(config.model_type), config))
    if config.quantization:
        plan = plan_for_recipe(Recipe.from_dict(config.quantization), shapes, config.tie_word_embeddings)
        checkpoint = DequantizingCheckpoint(checkpoint, plan)
    names = [n for n in shapes if n in set(checkpoint.tensor_names())]
    missing = sorted(set(shapes) - set(names))
    if missing:
        raise ValueError(f"{checkpoint.path} lacks tensors the model needs: {', '.join(missing[:10])}")
    tok_meta = tokenizer_metadata(checkpoint, config.vocab_size, pre)
    hf = config.to_hf()
    hf.pop("pocketllama_quantization", None)
    name = Path(str(checkpoint.path)).stem if Path(str(checkpoint.path)).is_file() else Path(str(checkpoint.path)).name
    return write_gguf(out, hf, _LazyStateDict(checkpoint, names), tok_meta, qtype.upper(), name=name)

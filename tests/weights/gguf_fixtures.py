"""GGUF test helpers: a tiny byte-level vocabulary, per-format error bounds, and a byte-level file builder
for crafting corrupt headers that GGUFWriter refuses to write."""

from __future__ import annotations

import struct
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGUFValueType

# ---- a tiny gpt2-style vocabulary (256 byte tokens, merges, specials) ------------------------------------


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs, strict=True))
    return [chr(table[b]) for b in range(256)]


# First, so bos = 1 and eos = 2 as in conftest.tiny_llama_config.
SPECIALS = ("<|reserved_0|>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>")


def tiny_tokenizer_meta(vocab_size: int) -> dict[str, Any]:
    """tokenizer.ggml.* keys for a byte-level BPE with exactly `vocab_size` tokens (bytes, merges, specials)."""
    byte_tokens = _bytes_to_unicode()
    n_merge = vocab_size - 256 - len(SPECIALS)
    assert n_merge >= 1, "vocab too small for the tiny tokenizer"
    sp = byte_tokens[ord(" ")]
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    merges = [f"{sp} {c}" for c in letters][:n_merge]
    merges += [f"{a} {b}" for a in letters for b in letters if a != b][: n_merge - len(merges)]
    merged = [m.replace(" ", "") for m in merges]
    tokens = list(SPECIALS) + byte_tokens + merged
    types = [3] * len(SPECIALS) + [1] * (256 + n_merge)
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": tokens.index("<|begin_of_text|>"),
        "tokenizer.ggml.eos_token_id": tokens.index("<|eot_id|>"),
        "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }


# ---- quantization error bounds ---------------------------------------------------------------------------


def quant_error_bound(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """Per-element bound on |dequant(quant(w)) - w| for ggml's reference quantizers, blocks of 32 on the rows.

    Each format rounds x/d to an integer grid with step d (error <= d/2; Q4_0's grid is asymmetric, -8..7, so
    the block's extreme value may land a full step away), then stores d (and Q4_1's min m) as fp16, which
    moves every dequantized value by |q| * |d - fp16(d)| (+ |m - fp16(m)|).
    """
    blocks = w.detach().double().reshape(-1, 32)
    amax = blocks.abs().amax(1, keepdim=True)
    if qtype == "Q8_0":
        d = amax / 127
        bound = d / 2 + 127 * (d - d.half().double()).abs()
    elif qtype == "Q4_0":
        d = amax / 8
        bound = d + 8 * (d - d.half().double()).abs()
    elif qtype == "Q4_1":
        lo, hi = blocks.amin(1, keepdim=True), blocks.amax(1, keepdim=True)
        d = (hi - lo) / 15
        bound = d / 2 + 15 * (d - d.half().double()).abs() + (lo - lo.half().double()).abs()
    else:
        raise ValueError(qtype)
    return (bound * (1 + 1e-5) + 1e-7).expand_as(blocks).reshape(w.shape)  # float32 arithmetic slack


# ---- a byte-level GGUF builder for corrupt files ---------------------------------------------------------

_FMT = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
        GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
        GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d"}


def gguf_string(s: str | bytes, length: int | None = None) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def gguf_value(vtype: GGUFValueType, value: Any, sub: GGUFValueType | None = None) -> bytes:
    if vtype == GGUFValueType.STRING:
        return gguf_string(value)
    if vtype == GGUFValueType.ARRAY:
        assert sub is not None
        return struct.pack("<IQ", sub, len(value)) + b"".join(gguf_value(sub, v) for v in value)
    return struct.pack("<" + _FMT[vtype], value)


def build_gguf(
    kvs: Sequence[tuple[str, GGUFValueType, Any]] = (),
    tensors: Sequence[tuple[str, Sequence[int], int, int]] = (),
    *,
    data: bytes = b"",
    magic: bytes = b"GGUF",
    version: int = 3,
    n_tensors: int | None = None,
    n_kv: int | None = None,
    raw_kv: bytes = b"",
    alignment: int = 32,
) -> bytes:
    """GGUF bytes from (key, type, value) metadata and (name, ggml dims, ggml type id, offset) tensor infos.

    Array values are `(sub_type, list)`. `raw_kv` is appended verbatim after the metadata (for lying
    lengths); `n_tensors`/`n_kv` override the header counts.
    """
    out = bytearray(magic + struct.pack("<I", version))
    out += struct.pack("<QQ", len(tensors) if n_tensors is None else n_tensors,
                       len(kvs) + (1 if raw_kv else 0) if n_kv is None else n_kv)
    for key, vtype, value in kvs:
        out += gguf_string(key) + struct.pack("<I", vtype)
        out += gguf_value(vtype, value[1], value[0]) if vtype == GGUFValueType.ARRAY else gguf_value(vtype, value)
    out += raw_kv
    for name, dims, gtype, offset in tensors:
        out += gguf_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", gtype, offset)
    out += b"\0" * (-len(out) % alignment)
    return bytes(out) + data


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def llama_kvs(arch: str = "llama", **overrides: Any) -> list[tuple[str, GGUFValueType, Any]]:
    """Minimal metadata for a 1-layer, 64-wide llama (one head pair of width 32)."""
    u32 = GGUFValueType.UINT32
    values = {"block_count": 1, "embedding_length": 64, "feed_forward_length": 64, "attention.head_count": 2,
              "attention.head_count_kv": 2, "context_length": 128, **overrides}
    return [("general.architecture", GGUFValueType.STRING, arch)] + [
        (f"{arch}.{k}", u32, v) for k, v in values.items()]


def f32_tensor_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32).tobytes()


def fails_fast(path: Any, match: str, *, call: Any = None) -> None:
    """Assert open_gguf(path) (or call(path)) raises ValueError matching `match` within 1 s and 16 MiB."""
    from pocketllama.weights.gguf import open_gguf

    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ValueError, match=match):
            call(path) if call else open_gguf(path)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert time.perf_counter() - start < 1.0
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def valid_gguf(tmp_path: Path, name: str = "ok.gguf", **kw: Any) -> tuple[bytes, Path]:
    """A valid 1-layer file with one F32 tensor, as bytes plus its path."""
    data = build_gguf(llama_kvs(), [("blk.0.attn_norm.weight", [64], 0, 0)], data=f32_tensor_bytes(64), **kw)
    return data, write_bytes(tmp_path / name, data)

"""GGUF checkpoints (llama.cpp files): HF-style config, HF tensor names, dequantized or raw-block tensors.

GGUF stores q/k rows in Meta's interleaved RoPE order (llama.cpp's converter permutes them); we undo that at
load time so every tensor comes out in HF layout. The container itself is parsed by `gguf_file.parse_gguf`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from pocketllama.weights.gguf_file import GGUFFile, TensorInfo, parse_gguf

if TYPE_CHECKING:
    from pocketllama.tokenizer import Tokenizer

SUPPORTED_ARCHITECTURES = ("llama",)
LLAMA3_DEFAULTS = (1.0, 4.0, 8192)  # low_freq_factor, high_freq_factor, original_max_position_embeddings
_ROPE_FREQS = "rope_freqs.weight"
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {  # GGUF block tensor -> (HF module path, biases allowed)
    "attn_q": ("self_attn.q_proj", True),
    "attn_k": ("self_attn.k_proj", True),
    "attn_v": ("self_attn.v_proj", True),
    "attn_output": ("self_attn.o_proj", True),
    "ffn_gate": ("mlp.gate_proj", True),
    "ffn_up": ("mlp.up_proj", True),
    "ffn_down": ("mlp.down_proj", True),
    "attn_norm": ("input_layernorm", False),
    "ffn_norm": ("post_attention_layernorm", False),
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def _dequantizable(t: GGMLQuantizationType) -> bool:
    cls = getattr(gguf_quants, t.name, None)
    return t in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) or (
        isinstance(cls, type) and getattr(cls, "qtype", None) == t
    )


SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...] = tuple(t for t in GGMLQuantizationType if _dequantizable(t))


@dataclass(frozen=True)
class RawTensor:
    """A tensor's stored bytes, not dequantized: `data` is uint8 of shape (*shape[:-1], bytes_per_row).

    ggml blocks run along the last (input) axis, so whole rows of blocks can be reordered freely; that is how
    `GGUFCheckpoint.raw_tensor(name, hf_row_order=True)` undoes the q/k permutation without dequantizing.
    """

    ggml_type: GGMLQuantizationType
    data: np.ndarray
    shape: tuple[int, ...]  # logical torch shape, e.g. (out_features, in_features)

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.ggml_type][0]

    @property
    def type_size(self) -> int:
        """Bytes per block."""
        return GGML_QUANT_SIZES[self.ggml_type][1]


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF row order -> GGUF/Meta interleaved order (llama.cpp `LlamaModel.permute`); rows are axis 0."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot permute {rows} rows into {n_head} heads of rotary pairs")
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """GGUF/Meta interleaved row order -> HF order; exact inverse of `permute_qk`. Rows are axis 0."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot un-permute {rows} rows from {n_head} heads of rotary pairs")
    # (n, rows/n/2, 2, ...) -> (n, 2, rows/n/2, ...): within a head, HF row p*(hd/2)+i = GGUF row 2i+p
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _inv_freq(theta: float, head_dim: int) -> torch.Tensor:
    """RoPE base frequencies (head_dim/2,), computed in fp32 exactly as HF and llama.cpp's converter do."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def llama3_rope_divisors(
    theta: float, head_dim: int, factor: float, low_freq_factor: float, high_freq_factor: float, original: int
) -> np.ndarray:
    """Per-pair inv_freq divisors for llama3 RoPE scaling (SPEC 1.3), as llama.cpp's `rope_freqs.weight` holds."""
    inv_freq = _inv_freq(theta, head_dim)
    low_wavelen, high_wavelen = original / low_freq_factor, original / high_freq_factor
    out = []
    for f in inv_freq.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out)  # (head_dim/2,)


def recover_llama3_rope_scaling(
    divisors: np.ndarray, theta: float, head_dim: int, original_hint: int | None = None, *, where: str = "GGUF"
) -> dict[str, Any] | None:
    """Recover HF `rope_scaling` from llama.cpp's per-pair divisors; None when they are all 1.

    factor = the largest divisor. The smoothed band depends only on the wavelengths L0/lf and L0/hf, so
    (lf, hf, L0) is known up to a common scale: we try Llama 3's (1, 4, 8192) (or `original_hint` for L0),
    else fit the smoothed band with lf=1. Whatever we return reproduces `divisors` within 1e-4 (relative).
    """
    d = np.asarray(divisors, dtype=np.float64).reshape(-1)
    if d.shape[0] != head_dim // 2:
        raise ValueError(f"{where}: rope_freqs has {d.shape[0]} values but head_dim {head_dim} needs {head_dim // 2}")
    factor = float(d.max())
    if np.allclose(d, 1.0, rtol=0, atol=1e-6):
        return None
    factor = float(np.float32(factor))  # the file stores f32; keep 32.0, not 32.00000000001

    def ok(lf: float, hf: float, original: float) -> bool:
        ref = llama3_rope_divisors(theta, head_dim, factor, lf, hf, original)
        return bool(np.all(np.abs(ref - d) <= 1e-4 * np.maximum(1.0, np.abs(d))))

    candidates = [LLAMA3_DEFAULTS]
    if original_hint:
        candidates.insert(0, (1.0, 4.0, original_hint))
    inv_wavelen = _inv_freq(theta, head_dim).double().numpy() / (2 * math.pi)
    mid = (d > 1 + 1e-4) & (d < factor * (1 - 1e-4))
    if mid.sum() >= 2 and factor > 1:
        # smooth s = (L0/w - lf)/(hf - lf) is linear in 1/w; s from the divisor: 1/d = (1-s)/F + s
        s = (1 / d[mid] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(inv_wavelen[mid], s, 1)  # s = a/w + b, a = L0/(hf-lf), b = -lf/(hf-lf)
        if a > 0 and b < 0:
            if original_hint:
                span = original_hint / a
                candidates.append((-b * span, -b * span + span, original_hint))
            span = -1 / b  # lf = 1
            candidates.append((1.0, 1.0 + span, -a / b))
    for lf, hf, original in candidates:
        lf, hf, original = round(lf, 6), round(hf, 6), round(original, 3)
        original = int(original) if float(original).is_integer() else original
        if ok(lf, hf, original):
            return {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": lf,
                "high_freq_factor": hf,
                "original_max_position_embeddings": original,
            }
    raise ValueError(
        f"{where}: cannot represent rope_freqs {np.round(d, 4).tolist()} as llama3 RoPE scaling "
        f"(factor {factor}); no (low_freq_factor, high_freq_factor, original_max_position_embeddings) "
        "reproduces it within 1e-4"
    )


class GGUFCheckpoint:
    """A llama.cpp GGUF file seen through the Checkpoint protocol (weights/base.py), memory-mapped.

    `native_dtype`: float16 (bfloat16) when every matrix is stored F16 (BF16); float32 otherwise, since
    dequantized values (scale * int) are exact in float32 but not in 16-bit types.
    """

    def __init__(self, file: GGUFFile) -> None:
        self._file = file
        self.path: Path = file.path
        self.metadata: dict[str, Any] = file.metadata
        matrix_types = {t.ggml_type for t in file.tensors.values() if len(t.dims) >= 2}
        if matrix_types == {GGMLQuantizationType.F16}:
            self.native_dtype = torch.float16
        elif matrix_types == {GGMLQuantizationType.BF16}:
            self.native_dtype = torch.bfloat16
        else:
            self.native_dtype = torch.float32

    def __repr__(self) -> str:
        return f"GGUFCheckpoint({str(self.path)!r}, {len(self._file.tensors)} tensors)"

    # ---- config -------------------------------------------------------------------------------------------
    def _arch(self) -> str:
        arch = self.metadata.get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{self.path}: GGUF architecture {arch!r} is not supported; "
                f"pocketllama reads: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        return arch

    def _meta_int(self, key: str, default: int | None = None) -> int:
        value = self.metadata.get(f"{self._arch()}.{key}", default)
        if value is None:
            raise ValueError(f"{self.path} lacks metadata key '{self._arch()}.{key}', which a llama GGUF must have")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{self.path}: metadata '{self._arch()}.{key}' must be an integer, got {value!r}")
        return value

    @cached_property
    def _config(self) -> dict[str, Any]:
        arch, md = self._arch(), self.metadata
        hidden = self._meta_int("embedding_length")
        n_head = self._meta_int("attention.head_count")
        n_kv = self._meta_int("attention.head_count_kv", n_head)
        head_dim = self._meta_int("attention.key_length", hidden // n_head)
        value_dim = self._meta_int("attention.value_length", head_dim)
        rope_dim = self._meta_int("rope.dimension_count", head_dim)
        if value_dim != head_dim or rope_dim != head_dim:
            raise ValueError(
                f"{self.path}: key_length {head_dim}, value_length {value_dim} and rope.dimension_count "
                f"{rope_dim} differ; pocketllama's llama needs them equal (full rotary, k and v of one width)"
            )
        theta = float(md.get(f"{arch}.rope.freq_base", 10000.0))
        vocab = self._info("token_embd.weight").shape[0]  # the model's vocab; the token list may be shorter
        if md.get(f"{arch}.vocab_size", vocab) != vocab:
            raise ValueError(f"{self.path}: {arch}.vocab_size {md[f'{arch}.vocab_size']} disagrees with "
                             f"token_embd.weight's {vocab} rows")
        names = self._name_map
        eos = [md[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                               "tokenizer.ggml.eom_token_id") if k in md]
        eos = list(dict.fromkeys(eos))
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": self._meta_int("feed_forward_length"),
            "num_hidden_layers": self._meta_int("block_count"),
            "num_attention_heads": n_head,
            "num_key_value_heads": n_kv,
            "head_dim": head_dim,
            "rms_norm_eps": float(md.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": theta,
            "rope_scaling": self._rope_scaling(theta, head_dim),
            "max_position_embeddings": self._meta_int("context_length"),
            "tie_word_embeddings": "output.weight" not in self._file.tensors,
            "attention_bias": any(".self_attn." in h and h.endswith(".bias") for h in names),
            "mlp_bias": any(".mlp." in h and h.endswith(".bias") for h in names),
            "hidden_act": "silu",
            "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": (eos[0] if len(eos) == 1 else eos) if eos else None,
            "pad_token_id": md.get("tokenizer.ggml.padding_token_id"),
            "torch_dtype": str(self.native_dtype).removeprefix("torch."),
        }

    def _rope_scaling(self, theta: float, head_dim: int) -> dict[str, Any] | None:
        md, arch = self.metadata, self._arch()
        kind = md.get(f"{arch}.rope.scaling.type", "none")
        factor = md.get(f"{arch}.rope.scaling.factor")
        original = md.get(f"{arch}.rope.scaling.original_context_length")
        if _ROPE_FREQS in self._file.tensors:
            if kind != "none":
                raise ValueError(f"{self.path} has both rope_freqs.weight (llama3 scaling) and rope.scaling.type "
                                 f"{kind!r}; cannot tell which RoPE scaling to use")
            divisors = self._dequantize(self._info(_ROPE_FREQS)).astype(np.float64)
            return recover_llama3_rope_scaling(divisors, theta, head_dim, original, where=str(self.path))
        if kind == "none":
            linear = md.get(f"{arch}.rope.scale_linear")  # pre-2024 key
            return {"rope_type": "linear", "factor": float(linear)} if linear and linear != 1.0 else None
        if kind == "linear":
            return {"rope_type": "linear", "factor": float(factor)}
        if kind == "yarn":
            return {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": original}
        raise ValueError(f"{self.path}: unknown rope.scaling.type {kind!r} (known: none, linear, yarn)")

    def hf_config(self) -> dict[str, Any]:
        """config.json-like dict with HF keys (feeds TextConfig.from_hf)."""
        return dict(self._config)

    def generation_config(self) -> dict[str, Any]:
        """GGUF has no sampling defaults; only the special ids are known."""
        cfg = self._config
        return {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg[k] is not None}

    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    def load_tokenizer(self) -> Tokenizer:
        from pocketllama.tokenizer import Tokenizer

        return Tokenizer.from_gguf_metadata(self.metadata)

    # ---- tensors ------------------------------------------------------------------------------------------
    @cached_property
    def _name_map(self) -> dict[str, str]:
        """HF name -> GGUF name, in file order."""
        n_layers = self._meta_int("block_count")
        out: dict[str, str] = {}
        unknown: list[str] = []
        for g in self._file.tensors:
            hf = _TOP_NAMES.get(g)
            m = _BLOCK_RE.fullmatch(g)
            if m and m.group(2) in _BLOCK_NAMES and int(m.group(1)) < n_layers:
                module, bias_ok = _BLOCK_NAMES[m.group(2)]
                if m.group(3) == "weight" or bias_ok:
                    hf = f"model.layers.{int(m.group(1))}.{module}.{m.group(3)}"
            if hf is not None:
                out[hf] = g
            elif g != _ROPE_FREQS:
                unknown.append(g)
        if unknown:
            raise ValueError(
                f"{self.path} has tensors pocketllama does not know for a {n_layers}-layer llama: "
                f"{', '.join(unknown[:20])}{' ...' if len(unknown) > 20 else ''} ({len(unknown)} in all)"
            )
        return out

    def _info(self, gguf_name: str) -> TensorInfo:
        try:
            return self._file.tensors[gguf_name]
        except KeyError:
            raise KeyError(f"{self.path} has no tensor '{gguf_name}'") from None

    def gguf_name(self, name: str) -> str:
        """The GGUF tensor name behind an HF parameter name."""
        try:
            return self._name_map[name]
        except KeyError:
            raise KeyError(f"{self.path} has no tensor for '{name}' (it has {len(self._name_map)} HF tensors, "
                           "see tensor_names())") from None

    def tensor_names(self) -> list[str]:
        return list(self._name_map)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._info(self.gguf_name(name)).shape

    def tensor_type(self, name: str) -> GGMLQuantizationType:
        return self._info(self.gguf_name(name)).ggml_type

    def _permute_heads(self, gguf_name: str) -> int | None:
        if gguf_name.endswith((".attn_q.weight", ".attn_q.bias")):
            return self._config["num_attention_heads"]
        if gguf_name.endswith((".attn_k.weight", ".attn_k.bias")):
            return self._config["num_key_value_heads"]
        return None

    def _dequantize(self, info: TensorInfo) -> np.ndarray:
        """float32 (F16: float16, BF16: uint16 bits) array of shape info.shape; always a fresh array. The bytes
        are read, not mapped: RSS holds this tensor only, never page-cache folios around it."""
        t = info.ggml_type
        raw = self._file.read_tensor_bytes(info)
        if t == GGMLQuantizationType.F32:
            out = raw.view(np.float32).reshape(info.shape)
        elif t == GGMLQuantizationType.F16:
            out = raw.view(np.float16).reshape(info.shape)
        elif t == GGMLQuantizationType.BF16:
            out = raw.view(np.uint16).reshape(info.shape)
        elif t in SUPPORTED_TYPES:
            block, type_size = GGML_QUANT_SIZES[t]
            rows = raw.reshape(-1, info.shape[-1] // block * type_size)  # (rows, bytes_per_row)
            out = gguf_quants.dequantize(rows, t).reshape(info.shape)
        else:
            raise ValueError(
                f"{self.path}: GGUF tensor '{info.name}' has type {t.name}, which pocketllama cannot read; "
                f"supported: {', '.join(s.name for s in SUPPORTED_TYPES)}"
            )
        return out

    def load_tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dequantized tensor in HF layout (q/k rows un-permuted), dtype `dtype` or `native_dtype`."""
        info = self._info(self.gguf_name(name))
        arr = self._dequantize(info)
        if (heads := self._permute_heads(info.name)) is not None:
            arr = np.ascontiguousarray(unpermute_qk(arr, heads))
        t = torch.from_numpy(arr)
        if info.ggml_type == GGMLQuantizationType.BF16:
            t = t.view(torch.bfloat16)
        return t.to(dtype or self.native_dtype)

    def raw_tensor(self, name: str, *, hf_row_order: bool = False, copy: bool = False) -> RawTensor:
        """Stored blocks of an HF-named tensor, zero-copy from the mmap (read-only) unless `hf_row_order`
        or `copy` (read into a private buffer with the file API: nothing of the mapping stays resident).

        Without `hf_row_order`, q/k rows are in GGUF (Meta interleaved) order; with it, they are reordered to
        HF order with `unpermute_qk` (a copy of the raw bytes, never a float round trip).
        """
        info = self._info(self.gguf_name(name))
        shape = info.shape
        block, type_size = GGML_QUANT_SIZES[info.ggml_type]
        raw = self._file.read_tensor_bytes(info) if copy else self._file.tensor_bytes(info)
        data = raw.reshape(*shape[:-1], shape[-1] // block * type_size)
        if hf_row_order and (heads := self._permute_heads(info.name)) is not None:
            data = np.ascontiguousarray(unpermute_qk(data, heads))
        return RawTensor(info.ggml_type, data, shape)

    def close(self) -> None:
        """Unmap the file (skipped while raw_tensor views are still alive; the GC unmaps it later)."""
        try:
            self._file.buffer.close()
        except BufferError:
            pass


def open_gguf(path: str | Path) -> GGUFCheckpoint:
    """Open and validate a GGUF file (memory-mapped); raises ValueError naming the file and the defect."""
    return GGUFCheckpoint(parse_gguf(path))

"""Meta original checkpoint folders: `params.json`, `consolidated.*.pth` and `tokenizer.model`.

The .pth files are opened with `torch.load(weights_only=True, mmap=True)` (never a full unpickle) and
translated to HF names here, with q/k rows permuted into HF's rotate-half layout (SPEC 1.5).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch

from ..config import TextConfig

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
# How model-parallel shards were split (Meta's fairscale layers): concatenate along this dim; None = replicated.
_SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1, "tok_embeddings": 0, "output": 0}
_SKIP = {"rope.freqs"}


def hf_name(meta_name: str) -> str:
    if meta_name in _TOP_NAMES:
        return _TOP_NAMES[meta_name]
    m = _LAYER.match(meta_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise ValueError(f"unknown tensor {meta_name!r} in a Meta checkpoint; expected Llama 3 text-model names")


def meta_to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved q/k rows -> HF's rotate-half rows: within each head, HF row p*(hd/2)+i = Meta row 2i+p."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `meta_to_hf_rows` (what llama.cpp's converter applies too)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


class MetaCheckpoint:
    """A folder with params.json + consolidated.NN.pth (+ tokenizer.model)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder
        params = folder / "params.json"
        if not params.is_file():
            raise FileNotFoundError(f"{folder} has no params.json; is it a Meta checkpoint folder?")
        self._params: dict[str, Any] = json.loads(params.read_text())
        shards = sorted(folder.glob("consolidated.*.pth"))
        if not shards:
            raise FileNotFoundError(f"{folder} has params.json but no consolidated.*.pth weights")
        self._shards = []
        for s in shards:
            try:
                self._shards.append(torch.load(s, map_location="cpu", weights_only=True, mmap=True))
            except Exception as e:  # noqa: BLE001 - any unpickling refusal or corruption
                raise ValueError(f"cannot read {s} as a weights-only PyTorch checkpoint: {e}") from None
        self._names = {hf_name(k): k for k in self._shards[0] if k not in _SKIP}
        tok = self._shards[0]["tok_embeddings.weight"]
        config = TextConfig.from_meta(self._params, vocab_size=tok.shape[0] * len(shards))
        if "output.weight" not in self._shards[0]:  # no separate output layer: project with the embedding
            config = dataclasses.replace(config, tie_word_embeddings=True)
        self.config = config
        self.native_dtype = tok.dtype if tok.dtype.is_floating_point else torch.bfloat16

    def hf_config(self) -> dict[str, Any]:
        return self.config.to_hf()

    def tensor_names(self) -> list[str]:
        names = list(self._names)
        if self.config.tie_word_embeddings and "lm_head.weight" in names:
            names.remove("lm_head.weight")
        return names

    def _merged(self, meta_name: str) -> torch.Tensor:
        parts = [s[meta_name] for s in self._shards]
        if len(parts) == 1:
            return parts[0]
        key = meta_name.split(".")[-2] if meta_name.startswith("layers.") else meta_name.split(".")[0]
        dim = _SHARD_DIM.get(key)
        return parts[0] if dim is None else torch.cat(parts, dim=dim)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        meta_name = self._names[name]
        if len(self._shards) == 1:
            return tuple(self._shards[0][meta_name].shape)
        return tuple(self._merged(meta_name).shape)

    def load_tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = self._merged(self._names[name])
        if name.endswith("q_proj.weight"):
            t = meta_to_hf_rows(t, self.config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            t = meta_to_hf_rows(t, self.config.num_key_value_heads)
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def load_tokenizer(self):
        from ..tokenizer import Tokenizer

        path = self.path / "tokenizer.model"
        if not path.is_file():
            raise FileNotFoundError(f"{self.path} has no tokenizer.model")
        return Tokenizer.from_tiktoken(path)

    def generation_config(self) -> dict[str, Any]:
        return {}

    def chat_template(self) -> str | None:
        return None

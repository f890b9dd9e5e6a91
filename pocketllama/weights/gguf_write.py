"""Write an HF-layout llama state dict as a GGUF file the way llama.cpp's converter does (used by tests and export).

q/k rows are permuted to Meta's interleaved order, llama3 RoPE scaling becomes a `rope_freqs.weight` tensor,
`output.weight` is omitted when embeddings are tied, and 1-D tensors (norms, biases) stay F32.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType
from gguf import quants as gguf_quants

from pocketllama.weights.gguf import LLAMA3_DEFAULTS, llama3_rope_divisors, permute_qk

WRITE_TYPES = {  # qtype -> general.file_type
    "F32": LlamaFileType.ALL_F32,
    "F16": LlamaFileType.MOSTLY_F16,
    "BF16": LlamaFileType.MOSTLY_BF16,
    "Q8_0": LlamaFileType.MOSTLY_Q8_0,
    "Q4_0": LlamaFileType.MOSTLY_Q4_0,
    "Q4_1": LlamaFileType.MOSTLY_Q4_1,
    "Q5_0": LlamaFileType.MOSTLY_Q5_0,
    "Q5_1": LlamaFileType.MOSTLY_Q5_1,
}
_TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_BLOCK = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_HF_BLOCK_RE = re.compile(r"model\.layers\.(\d+)\.(\w+\.\w+|\w+)\.(weight|bias)")


def gguf_tensor_name(hf_name: str) -> str:
    """HF parameter name -> llama.cpp tensor name; ValueError for names a llama GGUF has no slot for."""
    if hf_name in _TOP:
        return _TOP[hf_name]
    m = _HF_BLOCK_RE.fullmatch(hf_name)
    if m and m.group(2) in _BLOCK:
        return f"blk.{int(m.group(1))}.{_BLOCK[m.group(2)]}.{m.group(3)}"
    raise ValueError(f"no GGUF name for tensor '{hf_name}' (a llama GGUF holds embeddings, attention, MLP, norms)")


def _add_value(w: GGUFWriter, key: str, value: Any) -> None:
    """Metadata with llama.cpp's usual types: ids/counts uint32, floats float32, arrays typed by their items."""
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        if 0 <= value < 2**32:
            w.add_uint32(key, value)
        else:
            w.add_int64(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"metadata '{key}' is an empty list; GGUFWriter cannot write empty arrays")
        w.add_array(key, list(value))
    else:
        raise ValueError(f"metadata '{key}' has type {type(value).__name__}; use bool, int, float, str or a list")


def _rope_params(cfg: Mapping[str, Any]) -> tuple[float, Mapping[str, Any] | None]:
    """(rope_theta, rope_scaling) from a config.json dict, old style or transformers 5 `rope_parameters`."""
    rp = cfg.get("rope_parameters") or {}
    theta = float(cfg.get("rope_theta") or rp.get("rope_theta") or 10000.0)
    scaling = cfg.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
    return theta, scaling


def _rope_metadata(w: GGUFWriter, cfg: Mapping[str, Any], head_dim: int) -> np.ndarray | None:
    """Write RoPE scaling keys; return the llama3 `rope_freqs` divisors (head_dim/2,) or None."""
    theta, rs = _rope_params(cfg)
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "llama3":
        lf = rs.get("low_freq_factor", LLAMA3_DEFAULTS[0])
        hf = rs.get("high_freq_factor", LLAMA3_DEFAULTS[1])
        original = rs.get("original_max_position_embeddings", LLAMA3_DEFAULTS[2])
        if (lf, hf, original) != LLAMA3_DEFAULTS:  # a hint for the reader; llama.cpp ignores it for llama3
            w.add_uint32("llama.rope.scaling.original_context_length", int(original))
        return llama3_rope_divisors(theta, head_dim, float(rs["factor"]), lf, hf, original).astype(np.float32)
    if kind in ("linear", "yarn"):
        w.add_string("llama.rope.scaling.type", kind)
        w.add_float32("llama.rope.scaling.factor", float(rs["factor"]))
        if kind == "yarn" and rs.get("original_max_position_embeddings"):
            w.add_uint32("llama.rope.scaling.original_context_length", int(rs["original_max_position_embeddings"]))
        return None
    raise ValueError(f"rope_scaling type {kind!r} has no GGUF encoding here (llama3, linear, yarn)")


def write_gguf(
    path: str | Path,
    hf_config: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    tokenizer_meta: Mapping[str, Any] | None = None,
    qtype: str = "F32",
    *,
    name: str | None = None,
) -> Path:
    """Write a llama GGUF from an HF config dict and HF-named state dict, tensor by tensor (no full copy).

    qtype applies to 2-D weights (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1); a matrix whose rows are not
    a multiple of the block size falls back to F16, as llama.cpp does. `tokenizer_meta` holds extra keys
    (tokenizer.ggml.*, tokenizer.chat_template, general.*) written as given.
    """
    if qtype not in WRITE_TYPES:
        raise ValueError(f"cannot write GGUF type {qtype!r}; choose one of {', '.join(WRITE_TYPES)}")
    if hf_config.get("model_type", "llama") != "llama":
        raise ValueError(f"write_gguf writes llama models, not model_type {hf_config['model_type']!r}")
    wtype = GGMLQuantizationType[qtype]
    hidden, n_head = int(hf_config["hidden_size"]), int(hf_config["num_attention_heads"])
    n_kv = int(hf_config.get("num_key_value_heads") or n_head)
    head_dim = int(hf_config.get("head_dim") or hidden // n_head)
    tied = bool(hf_config.get("tie_word_embeddings", False))
    if not tied and "lm_head.weight" not in state_dict:
        raise ValueError("tie_word_embeddings is false but the state dict has no 'lm_head.weight'")

    path = Path(path)
    w = GGUFWriter(path, "llama")
    if name:
        w.add_name(name)
    w.add_context_length(int(hf_config["max_position_embeddings"]))
    w.add_embedding_length(hidden)
    w.add_block_count(int(hf_config["num_hidden_layers"]))
    w.add_feed_forward_length(int(hf_config["intermediate_size"]))
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    if head_dim != hidden // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_freq_base(_rope_params(hf_config)[0])
    w.add_layer_norm_rms_eps(float(hf_config.get("rms_norm_eps", 1e-5)))
    w.add_vocab_size(int(hf_config["vocab_size"]))
    w.add_file_type(int(WRITE_TYPES[qtype]))
    w.add_quantization_version(2)  # GGML_QNT_VERSION
    rope_freqs = _rope_metadata(w, hf_config, head_dim)
    meta = dict(tokenizer_meta or {})
    eos = hf_config.get("eos_token_id")
    for key, value in (("tokenizer.ggml.bos_token_id", hf_config.get("bos_token_id")),
                       ("tokenizer.ggml.eos_token_id", eos[0] if isinstance(eos, (list, tuple)) and eos else eos)):
        if value is not None and key not in meta:
            meta[key] = int(value)
    for key, value in meta.items():
        _add_value(w, key, value)

    # plan: (gguf name, HF name or None for rope_freqs, numpy shape, ggml type)
    plan: list[tuple[str, str | None, tuple[int, ...], GGMLQuantizationType]] = []
    for hf_name, t in state_dict.items():
        if hf_name == "lm_head.weight" and tied:
            continue
        shape = tuple(t.shape)
        gtype = GGMLQuantizationType.F32
        if len(shape) >= 2:
            gtype = wtype if shape[-1] % GGML_QUANT_SIZES[wtype][0] == 0 else GGMLQuantizationType.F16
        plan.append((gguf_tensor_name(hf_name), hf_name, shape, gtype))
    if rope_freqs is not None:
        plan.append(("rope_freqs.weight", None, rope_freqs.shape, GGMLQuantizationType.F32))
    for gname, _, shape, gtype in plan:
        block, type_size = GGML_QUANT_SIZES[gtype]
        nbytes = int(np.prod(shape)) // block * type_size
        w.add_tensor_info(gname, shape, np.dtype(np.float32), nbytes, raw_dtype=gtype)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for gname, hf_name, _, gtype in plan:
        if hf_name is None:
            data = rope_freqs
        else:
            data = state_dict[hf_name].detach().to("cpu", torch.float32).numpy()
            if gname.endswith((".attn_q.weight", ".attn_q.bias")):
                data = permute_qk(data, n_head)
            elif gname.endswith((".attn_k.weight", ".attn_k.bias")):
                data = permute_qk(data, n_kv)
        w.write_tensor_data(np.ascontiguousarray(gguf_quants.quantize(np.ascontiguousarray(data), gtype)))
    w.close()
    return path


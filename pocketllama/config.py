"""Frozen model configurations built from HF `config.json` or Meta `params.json`.

Unknown keys are ignored; invariants are checked in `__post_init__` and a bad value raises a `ValueError`
that names the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """`"bf16"`, `"bfloat16"`, `torch.bfloat16` ... -> torch.dtype (None stays None)."""
    if name is None or isinstance(name, torch.dtype):
        if name is not None and name not in _DTYPES.values():
            raise ValueError(f"dtype {name} is not supported; use one of float32, bfloat16, float16")
        return name
    aliases = {"fp32": "float32", "f32": "float32", "float": "float32", "bf16": "bfloat16",
               "fp16": "float16", "f16": "float16", "half": "float16"}
    key = aliases.get(str(name).lower(), str(name).lower())
    if key not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use one of float32, bfloat16, float16")
    return _DTYPES[key]


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 frequency scaling (HF `rope_scaling` with `rope_type == "llama3"`)."""

    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if not self.factor > 0:
            raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}")
        if not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(
                "rope_scaling.high_freq_factor must be greater than low_freq_factor, got "
                f"{self.high_freq_factor} <= {self.low_freq_factor}")

    @classmethod
    def from_hf(cls, d: dict[str, Any] | None) -> RopeScaling | None:
        if not d:
            return None
        kind = d.get("rope_type", d.get("type"))
        if kind in (None, "default"):
            return None
        if kind != "llama3":
            raise ValueError(f"rope_scaling.rope_type {kind!r} is not supported; pocketllama implements 'llama3'")
        if "factor" not in d:
            raise ValueError("rope_scaling.factor is missing")
        return cls(
            factor=float(d["factor"]),
            low_freq_factor=float(d.get("low_freq_factor", 1.0)),
            high_freq_factor=float(d.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(d.get("original_max_position_embeddings", 8192)),
        )

    def to_hf(self) -> dict[str, Any]:
        return {"rope_type": "llama3", **dataclasses.asdict(self)}


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


@dataclass(frozen=True)
class TextConfig:
    """A Llama 3.x decoder. Field names follow HF `LlamaConfig`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    model_type: str = "llama"
    quantization: dict[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config field {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config field num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"config field head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise ValueError(f"config field rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"config field rope_theta must be > 0, got {self.rope_theta!r}")
        if self.torch_dtype is not None and self.torch_dtype not in _DTYPES:
            raise ValueError(f"config field torch_dtype {self.torch_dtype!r} is not one of {sorted(_DTYPES)}")

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def dtype(self) -> torch.dtype | None:
        return _DTYPES.get(self.torch_dtype) if self.torch_dtype else None

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> TextConfig:
        """Build from an HF `config.json` dict (a `text_config` inside it is used when present)."""
        d = dict(d.get("text_config") or d)
        model_type = d.get("model_type", "llama")
        if model_type not in ("llama", "mllama_text_model"):
            raise ValueError(f"config field model_type {model_type!r} is not supported by the Llama text model")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise ValueError(f"config.json is missing required field(s): {', '.join(missing)}")
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        dtype = d.get("torch_dtype", d.get("dtype"))
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=float(d.get("rope_theta", (d.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
            rope_scaling=RopeScaling.from_hf(d.get("rope_scaling") or d.get("rope_parameters")),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=_ids(d.get("eos_token_id")),
            pad_token_id=d.get("pad_token_id"),
            torch_dtype=dtype if dtype in _DTYPES else None,
            quantization=d.get("pocketllama_quantization"),
        )

    @classmethod
    def from_meta(cls, p: dict[str, Any], *, vocab_size: int | None = None) -> TextConfig:
        """Build from a Meta `params.json` (dim, n_layers, n_heads, n_kv_heads, ffn_dim_multiplier, ...)."""
        missing = [k for k in ("dim", "n_layers", "n_heads") if k not in p]
        if missing:
            raise ValueError(f"params.json is missing required field(s): {', '.join(missing)}")
        dim, heads = p["dim"], p["n_heads"]
        vocab = p.get("vocab_size", vocab_size)
        if vocab is None or vocab <= 0:
            vocab = 128256
        hidden = p.get("hidden_dim") or ffn_hidden_dim(dim, p.get("multiple_of", 256), p.get("ffn_dim_multiplier"))
        scaling = None
        if p.get("use_scaled_rope"):
            # Meta's reference hard-codes factor 8, which is wrong for 3.2 1B/3B (SPEC 1.3): params.json may
            # carry "rope_scaling_factor"; otherwise 3.2 1B/3B (dim <= 3072) use 32 and larger models 8.
            factor = p.get("rope_scaling_factor") or (32.0 if dim <= 3072 else 8.0)
            scaling = RopeScaling(factor=float(factor))
        return cls(
            vocab_size=int(vocab),
            hidden_size=dim,
            intermediate_size=int(hidden),
            num_hidden_layers=p["n_layers"],
            num_attention_heads=heads,
            num_key_value_heads=p.get("n_kv_heads") or heads,
            head_dim=dim // heads,
            rms_norm_eps=float(p.get("norm_eps", 1e-5)),
            rope_theta=float(p.get("rope_theta", 500000.0)),
            rope_scaling=scaling,
            max_position_embeddings=int(p.get("max_seq_len", 131072)),
            tie_word_embeddings=False,
            bos_token_id=128000,
            eos_token_ids=(128001, 128008, 128009),
            torch_dtype="bfloat16",
        )

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict for this config (what `save` writes)."""
        out: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_hf() if self.rope_scaling else None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias, "hidden_act": "silu", "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
            "pad_token_id": self.pad_token_id, "torch_dtype": self.torch_dtype,
        }
        if self.quantization:
            out["pocketllama_quantization"] = self.quantization
        return out


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward width: int(2*4*dim/3), times the multiplier, rounded up to `multiple_of`."""
    h = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        h = int(ffn_dim_multiplier * h)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


# ---- Llama 3.2 Vision (Mllama) -------------------------------------------------------------------------

DEFAULT_ASPECT_RATIOS = ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))


@dataclass(frozen=True)
class VisionConfig:
    """The Mllama vision encoder (SPEC 2.1). Field names follow HF `MllamaVisionConfig`."""

    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_hidden_layers: int = 32
    num_global_layers: int = 8
    attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 560
    patch_size: int = 14
    norm_eps: float = 1e-5
    max_num_tiles: int = 4
    intermediate_layers_indices: tuple[int, ...] = (3, 7, 15, 23, 30)
    supported_aspect_ratios: tuple[tuple[int, int], ...] = DEFAULT_ASPECT_RATIOS
    vision_output_dim: int = 7680

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "attention_heads", "num_channels",
                     "image_size", "patch_size", "max_num_tiles", "vision_output_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"vision_config field {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.attention_heads:
            raise ValueError(f"vision_config hidden_size ({self.hidden_size}) must be divisible by attention_heads "
                             f"({self.attention_heads})")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision_config image_size ({self.image_size}) must be a multiple of patch_size "
                             f"({self.patch_size})")
        bad = [i for i in self.intermediate_layers_indices if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"vision_config intermediate_layers_indices {bad} are outside the "
                             f"{self.num_hidden_layers} local layers")
        expected = self.hidden_size * (1 + len(self.intermediate_layers_indices))
        if self.vision_output_dim != expected:
            raise ValueError(f"vision_config vision_output_dim must be hidden_size x (1 + number of intermediate "
                             f"layers) = {expected}, got {self.vision_output_dim}")
        if any(h * w > self.max_num_tiles for h, w in self.supported_aspect_ratios):
            raise ValueError(f"vision_config supported_aspect_ratios {self.supported_aspect_ratios} exceed "
                             f"max_num_tiles {self.max_num_tiles}")

    @property
    def num_patches(self) -> int:
        """Tokens per tile: the patch grid plus the class token (1601 for 560 tiles)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def padded_patches(self) -> int:
        """Tokens per tile padded to a multiple of 8 (1608 for 560 tiles)."""
        return -(-self.num_patches // 8) * 8

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.attention_heads

    @property
    def max_aspect_ratio_id(self) -> int:
        return len(self.supported_aspect_ratios)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> VisionConfig:
        act = d.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"vision_config hidden_act {act!r} is not supported; Mllama uses 'gelu'")
        defaults = cls()
        kw: dict[str, Any] = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        if "attention_heads" not in kw and "num_attention_heads" in d:
            kw["attention_heads"] = d["num_attention_heads"]
        kw["intermediate_layers_indices"] = tuple(kw.get("intermediate_layers_indices",
                                                         defaults.intermediate_layers_indices))
        kw["supported_aspect_ratios"] = tuple(tuple(r) for r in kw.get("supported_aspect_ratios",
                                                                      defaults.supported_aspect_ratios))
        kw["norm_eps"] = float(kw.get("norm_eps", defaults.norm_eps))
        return cls(**kw)


@dataclass(frozen=True)
class MllamaConfig:
    """Llama 3.2 Vision: a Llama text trunk whose layers at `cross_attention_layers` are gated cross-attention
    blocks over the vision encoder's features (SPEC 2). `text.vocab_size` is the lm_head size; the embedding
    has 8 more rows (`<|image|>` = `image_token_index` is the first of them)."""

    text: TextConfig
    vision: VisionConfig
    cross_attention_layers: tuple[int, ...]
    image_token_index: int = 128256
    model_type: str = "mllama"

    def __post_init__(self) -> None:
        n = self.text.num_hidden_layers
        bad = [i for i in self.cross_attention_layers if not 0 <= i < n]
        if bad or len(set(self.cross_attention_layers)) != len(self.cross_attention_layers):
            raise ValueError(f"config field cross_attention_layers {list(self.cross_attention_layers)} must be "
                             f"distinct layer indices below text num_hidden_layers ({n})")
        if self.text.tie_word_embeddings:
            raise ValueError("Mllama text models have an untied lm_head; tie_word_embeddings must be false")
        if self.text.head_dim * self.text.num_attention_heads != self.text.hidden_size:
            raise ValueError(f"Mllama text head_dim must be hidden_size / num_attention_heads, got {self.text.head_dim}")
        if not self.text.vocab_size <= self.image_token_index < self.text.vocab_size + 8:
            raise ValueError(f"config field image_token_index {self.image_token_index} must be one of the 8 rows "
                             f"after the vocabulary ({self.text.vocab_size}..{self.text.vocab_size + 7})")

    def __getattr__(self, name: str) -> Any:
        """Everything else is the text trunk's (max_position_embeddings, eos_token_ids, num_key_value_heads,
        ...), so code written for a text model's config reads a vision model's the same way."""
        if name.startswith("__") or name in ("text", "vision"):
            raise AttributeError(name)
        try:
            return getattr(self.text, name)
        except AttributeError:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}") from None

    @property
    def self_attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.text.num_hidden_layers) if i not in self.cross_attention_layers)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> MllamaConfig:
        """From an HF `config.json` of `MllamaForConditionalGeneration` (text_config + vision_config)."""
        if d.get("model_type", "mllama") != "mllama":
            raise ValueError(f"config field model_type {d.get('model_type')!r} is not 'mllama'")
        for key in ("text_config", "vision_config"):
            if not isinstance(d.get(key), dict):
                raise ValueError(f"config.json of a Mllama model needs a {key} object")
        text_d = dict(d["text_config"])
        text_d.setdefault("model_type", "mllama_text_model")
        text_d.setdefault("torch_dtype", d.get("torch_dtype", d.get("dtype")))
        text_d.setdefault("pocketllama_quantization", d.get("pocketllama_quantization"))
        text = TextConfig.from_hf({k: v for k, v in text_d.items() if k != "head_dim"})
        layers = text_d.get("cross_attention_layers")
        if layers is None:
            raise ValueError("config.json text_config is missing cross_attention_layers")
        return cls(text=text, vision=VisionConfig.from_hf(d["vision_config"]),
                   cross_attention_layers=tuple(int(i) for i in layers),
                   image_token_index=int(d.get("image_token_index", d.get("image_token_id", 128256))))

"""LoRA adapters in PEFT's on-disk format: `adapter_config.json` + `adapter_model.safetensors` with HF module
names (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), so `peft` + `transformers` load what
we save and pocketllama loads what PEFT saves.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .lora import LoRALinear, apply_lora, lora_modules

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight")
# adapter_config.json keys with a value other than PEFT's default that pocketllama cannot honour
_UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None,
                "layer_replication": None, "lora_bias": False, "use_qalora": False, "trainable_token_indices": None,
                "target_parameters": None}


def adapter_config(model: nn.Module, *, base_model: str | None = None, dropout: float = 0.0) -> dict[str, Any]:
    """The adapter_config.json dict for the adapters of `model` (PEFT `LoraConfig` keys)."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA adapters to save (apply_lora first)")
    first = next(iter(modules.values()))
    leaves = sorted({name.rsplit(".", 1)[-1] for name in modules})
    # A list of leaf names (PEFT's usual form) when it selects exactly these modules; else a full-name regex.
    linear_names = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in leaves
                    and not isinstance(m, LoRALinear) and not n.endswith(("lora_A", "lora_B", "base_layer"))]
    wrapped = set(modules)
    plain = [n for n in linear_names if n not in wrapped and not any(n.startswith(w + ".") for w in wrapped)]
    targets: Any = leaves if not plain else "(" + "|".join(re.escape(n) for n in sorted(modules)) + ")"
    ranks = {name: m.r for name, m in modules.items() if m.r != first.r}
    alphas = {name: m.alpha for name, m in modules.items() if m.alpha != first.alpha}
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": None,
        "inference_mode": True, "r": first.r, "lora_alpha": first.alpha, "lora_dropout": dropout,
        "target_modules": targets, "fan_in_fan_out": False, "bias": "none", "use_rslora": first.use_rslora,
        "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {re.escape(k): v for k, v in ranks.items()},
        "alpha_pattern": {re.escape(k): v for k, v in alphas.items()}, "use_dora": False,
    }


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT tensor names -> adapter weights (the base layers are not saved)."""
    state = {}
    for name, m in lora_modules(model).items():
        state[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach()
        state[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return state


def save_adapter(model: nn.Module, folder: str | os.PathLike[str], *, base_model: str | None = None,
                 dropout: float = 0.0, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `folder/adapter_config.json` and `folder/adapter_model.safetensors` (PEFT's format)."""
    from ..weights.safetensors import save_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = adapter_config(model, base_model=base_model, dropout=dropout)
    save_safetensors(state if state is not None else adapter_state_dict(model), folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def read_adapter(folder: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json dict, tensors) of a PEFT LoRA adapter folder, checked for what we support."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_FILE}; is it a PEFT LoRA adapter folder?")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {config.get('peft_type')!r} is not supported; pocketllama loads "
                         "LoRA adapters (peft_type LORA)")
    for key, default in _UNSUPPORTED.items():
        value = config.get(key, default)
        if value not in (default, None, False, [], {}):
            raise ValueError(f"{cfg_path}: {key}={value!r} is not supported by pocketllama's LoRA; re-train "
                             f"without it, or merge the adapter with peft and load the merged model")
    weights = folder / WEIGHTS_FILE
    if weights.is_file():
        tensors = load_file(str(weights))
    elif (folder / "adapter_model.bin").is_file():
        tensors = torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{folder} has no {WEIGHTS_FILE}")
    return config, tensors


def _pattern_value(name: str, patterns: dict[str, Any], default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def load_adapter(model: nn.Module, folder: str | os.PathLike[str], *, dropout: float | None = None) -> list[str]:
    """Wrap `model`'s layers named in a PEFT adapter and load its weights; returns the wrapped module names.

    Ranks come from the tensors' shapes, alphas from lora_alpha / alpha_pattern. Every adapter tensor must
    find its layer (a missing one is an error naming it), so an adapter for another model never half-loads.
    """
    config, tensors = read_adapter(folder)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise ValueError(f"{folder}: tensor {key!r} is not a LoRA A/B weight "
                             "(expected base_model.model.<module>.lora_A.weight / lora_B.weight)")
        pairs.setdefault(_our_name(model, m.group(1)), {})[m.group(2)] = t
    known = dict(model.named_modules())
    missing = sorted(n for n in pairs if n not in known)
    if missing:
        raise ValueError(f"adapter {folder} has weights for {len(missing)} module(s) this model lacks, e.g. "
                         f"{missing[0]!r}; was it trained for another base model?")
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"adapter {folder}: module {name!r} has only lora_{''.join(ab)}")
    alpha = config.get("lora_alpha", 8)
    ranks = {n: ab["A"].shape[0] for n, ab in pairs.items()}
    alphas = {n: _pattern_value(n, config.get("alpha_pattern"), alpha) for n in pairs}
    regex = "(" + "|".join(re.escape(n) for n in sorted(pairs)) + ")"
    names = apply_lora(model, regex, r=config.get("r", 8), alpha=alpha,
                       dropout=config.get("lora_dropout", 0.0) if dropout is None else dropout,
                       use_rslora=bool(config.get("use_rslora", False)), ranks=ranks, alphas=alphas)
    modules = lora_modules(model)
    for name, ab in pairs.items():
        m = modules[name]
        for part, layer in (("A", m.lora_A), ("B", m.lora_B)):
            if tuple(ab[part].shape) != tuple(layer.weight.shape):
                raise ValueError(f"adapter {folder}: {name}.lora_{part} has shape {tuple(ab[part].shape)}, the model "
                                 f"needs {tuple(layer.weight.shape)}; was it trained for another base model?")
            with torch.no_grad():
                layer.weight.copy_(ab[part].to(layer.weight.dtype))
    return names


def _our_name(model: nn.Module, name: str) -> str:
    """Module names from newer transformers layouts (e.g. Mllama's `model.language_model.*`) -> ours."""
    from ..models.mllama import _classic_name

    return _classic_name(name) if getattr(model, "accepts_images", False) else name

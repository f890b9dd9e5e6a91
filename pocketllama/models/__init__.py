"""Model registry: HF `model_type` -> the module that implements it. The only place that switches on it.

Each module exports its model class and, unless it is the Llama `TextConfig`, its `CONFIG_CLASS`.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

_REGISTRY = {
    "llama": ("pocketllama.models.llama", "LlamaForCausalLM"),
    "mllama": ("pocketllama.models.mllama", "MllamaForConditionalGeneration"),
}


def model_class(model_type: str) -> type[nn.Module]:
    if model_type not in _REGISTRY:
        raise ValueError(f"model_type {model_type!r} is not supported; pocketllama runs: {', '.join(_REGISTRY)}")
    module, name = _REGISTRY[model_type]
    return getattr(importlib.import_module(module), name)


def config_from_hf(d: dict[str, Any]) -> Any:
    """The config object for an HF `config.json` dict, of the class its model_type's module declares."""
    from ..config import TextConfig

    model_type = d.get("model_type") or "llama"
    if model_type not in _REGISTRY:  # other types keep TextConfig's own error (e.g. 'mistral' is not supported)
        return TextConfig.from_hf(d)
    module = importlib.import_module(_REGISTRY[model_type][0])
    return getattr(module, "CONFIG_CLASS", TextConfig).from_hf(d)

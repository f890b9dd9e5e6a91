"""Model registry: HF `model_type` -> the module that implements it. The only place that switches on it."""

from __future__ import annotations

import importlib

from torch import nn

_REGISTRY = {
    "llama": ("pocketllama.models.llama", "LlamaForCausalLM"),
}


def model_class(model_type: str) -> type[nn.Module]:
    if model_type not in _REGISTRY:
        raise ValueError(f"model_type {model_type!r} is not supported; pocketllama runs: {', '.join(_REGISTRY)}")
    module, name = _REGISTRY[model_type]
    return getattr(importlib.import_module(module), name)

"""Bench-only: load a Llama 3.2 Vision checkpoint with its text linears int4 (group 32), quantized while
loading; embedding and lm_head int4 in groups of 128 (as recipe int4-g32-e4g128), and (optionally) the vision
tower's linears and projector int8 per row.

Built from the quant package's primitives (`swap_modules`, `quantize_weight`) because its recipes only know
the Llama text names (`model.layers.N...`); once they learn `language_model.model.layers.N.{self_attn,mlp,
cross_attn}` this file goes and `pocketllama.load(path, quantize="int4-g32")` does the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pocketllama.llm import LLM
from pocketllama.models import config_from_hf, model_class
from pocketllama.quant.handler import quantize_weight, swap_modules
from pocketllama.quant.recipe import QSpec
from pocketllama.quant.views import part_shapes
from pocketllama.weights import open_checkpoint
from pocketllama.weights.base import assign_weights, build_on_meta


def mllama_int4_plan(model: nn.Module, group_size: int = 32, vision_int8: bool = False) -> dict[str, QSpec]:
    plan = {name: QSpec("int4", group_size) for name, m in model.named_modules()
            if name.startswith("language_model.model.layers.") and isinstance(m, nn.Linear)
            and m.in_features % group_size == 0 and m.out_features % 16 == 0}
    table = QSpec("int4", 128)  # the vocabulary matrices as recipe int4-g32-e4g128 stores them
    plan["language_model.model.embed_tokens"] = table
    plan["language_model.lm_head"] = table
    if vision_int8:
        plan.update({name: QSpec("int8") for name, m in model.named_modules()
                     if (name.startswith("vision_model.") or name == "multi_modal_projector")
                     and isinstance(m, nn.Linear)})
    return plan


class _Quantizing:
    """The checkpoint with each planned `<module>.weight` seen as its int4/int8 parts, made on first use."""

    def __init__(self, base: Any, plan: dict[str, QSpec], scale_dtype: torch.dtype) -> None:
        self._base, self._plan, self._scale_dtype = base, plan, scale_dtype
        self.path, self.native_dtype = base.path, base.native_dtype
        self._names, self._shapes, self._owner, self._pending = [], {}, {}, {}
        for name in base.tensor_names():
            module = name[: -len(".weight")] if name.endswith(".weight") else None
            if module not in plan:
                self._names.append(name)
                continue
            for part, shape in part_shapes(plan[module], tuple(base.tensor_shape(name))).items():
                self._names.append(f"{module}.{part}")
                self._shapes[f"{module}.{part}"], self._owner[f"{module}.{part}"] = shape, (module, part)

    def tensor_names(self) -> list[str]:
        return list(self._names)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name] if name in self._shapes else tuple(self._base.tensor_shape(name))

    def load_tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self._owner:
            return self._base.load_tensor(name, dtype)
        module, part = self._owner[name]
        if module not in self._pending:
            name = f"{module}.weight"
            self._pending[module] = quantize_weight(  # row chunks of the mapped file, pages dropped as they go
                self._base.load_view(name), self._plan[module], self._scale_dtype,
                rows_done=lambda r0, r1: self._base.release(name, rows=(r0, r1)))
        parts = self._pending[module]
        t = parts.pop(part)
        if not parts:
            del self._pending[module]
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def load_int4(path: str | Path, group_size: int = 32, vision_int8: bool = False) -> LLM:
    checkpoint = open_checkpoint(Path(path))
    config = config_from_hf(checkpoint.hf_config())
    cls = model_class(config.model_type)
    checkpoint = cls.adapt_checkpoint(checkpoint)
    model = build_on_meta(cls, config)
    plan = mllama_int4_plan(model, group_size, vision_int8)
    swap_modules(model, plan)
    assign_weights(model, _Quantizing(checkpoint, plan, torch.bfloat16), torch.bfloat16, "cpu")
    return LLM(model=model.eval(), tokenizer=checkpoint.load_tokenizer(), config=config, source=checkpoint.path)

"""`load(source)` -> `LLM`: a model, its tokenizer, its chat format and its generation defaults in one object."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import TextConfig, parse_dtype


@dataclass
class LLM:
    """A loaded model. `llm.model(input_ids)` gives logits; `llm.tokenizer` encodes and decodes."""

    model: nn.Module
    tokenizer: Any
    config: TextConfig
    source: Path
    generation_config: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None
    load_seconds: float = 0.0
    _chat_format: Any = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.norm.weight.dtype

    @property
    def chat_format(self):
        if self._chat_format is None:
            from .chat_format import get_chat_format

            self._chat_format = get_chat_format(self.tokenizer, self.chat_template)
        return self._chat_format


def load(source: str | os.PathLike[str] | None = None, *, dtype: str | torch.dtype | None = None,
         device: str | torch.device = "cpu", progress: bool | None = None) -> LLM:
    """Load a model from a folder (HF or Meta), a .gguf file, an HF cache repo id or an alias.

    >>> llm = pocketllama.load("smollm2-135m")                      # doctest: +SKIP
    >>> llm.model(torch.tensor([llm.tokenizer.encode("Hi")])).shape  # doctest: +SKIP
    torch.Size([1, 1, 49152])

    dtype: "float32", "bfloat16" or "float16"; default: the checkpoint's own dtype.
    """
    start = time.perf_counter()
    model, checkpoint = load_model(source, dtype=dtype, device=device, progress=progress)
    tokenizer = checkpoint.load_tokenizer()
    return LLM(model=model, tokenizer=tokenizer, config=model.config, source=checkpoint.path,
               generation_config=checkpoint.generation_config(),
               chat_template=checkpoint.chat_template() or getattr(tokenizer, "chat_template", None),
               load_seconds=time.perf_counter() - start)


def load_model(source: str | os.PathLike[str] | None = None, *, dtype: str | torch.dtype | None = None,
               device: str | torch.device = "cpu", progress: bool | None = None) -> tuple[nn.Module, Any]:
    """Only the model (no tokenizer): (model in eval mode, the opened Checkpoint)."""
    from .models import model_class
    from .sources import resolve
    from .weights import open_checkpoint
    from .weights.base import assign_weights, build_on_meta

    checkpoint = open_checkpoint(resolve(source))
    config = getattr(checkpoint, "config", None) or TextConfig.from_hf(checkpoint.hf_config())
    target = parse_dtype(dtype) or checkpoint.native_dtype
    if target not in (torch.float32, torch.bfloat16, torch.float16):
        target = torch.float32
    model = build_on_meta(model_class(config.model_type), config)
    ignore = {"lm_head.weight"} if config.tie_word_embeddings else set()
    size = sum(_numel(checkpoint.tensor_shape(n)) for n in checkpoint.tensor_names())
    show = progress if progress is not None else size > 300_000_000
    assign_weights(model, checkpoint, target, device, progress=show, ignore=ignore)
    return model.eval(), checkpoint


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n

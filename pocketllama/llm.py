"""`load(source)` -> `LLM`: a model, its tokenizer, its chat format and its generation defaults in one object."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
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
    # Speculative decoding and prompt caching (engine/speculative.py, engine/prefix_cache.py):
    draft: Any = None  # a drafter (see `load(draft=...)`); every generation then speculates
    num_draft: int = 7  # most tokens drafted per round (see engine/speculative.DEFAULT_DRAFT)
    prompt_cache: bool = True  # keep the last request's KV cache; a prompt sharing its prefix skips that prefill
    _session: Any = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return getattr(self.model, "dtype", None) or self.model.model.norm.weight.dtype

    @property
    def chat_format(self):
        if self._chat_format is None:
            from .chat_format import get_chat_format

            self._chat_format = get_chat_format(self.tokenizer, self.chat_template,
                                                image_token_id=getattr(self.config, "image_token_index", None))
        return self._chat_format

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    def sampling_params(self, **sampling: Any):
        """SamplingParams from the model's generation_config.json defaults, then `sampling` overrides."""
        from .engine.sampling import SamplingParams

        return SamplingParams.from_generation_config(self.generation_config, **sampling)

    def apply_chat_template(self, messages: list[dict[str, Any]], tools: list[dict] | None = None, *,
                            add_generation_prompt: bool = True, tokenize: bool = True,
                            date_string: str | None = None, **kwargs: Any) -> list[int] | str:
        """Messages -> prompt ids (`tokenize=True`) or prompt text, like transformers' tokenizer method.

        >>> llm.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)  # doctest: +SKIP
        '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: ...'
        """
        fmt = self.chat_format
        if tools and "tool_style" not in kwargs and type(fmt).__name__ == "Llama3ChatFormat":
            from .tools import default_tool_style

            kwargs["tool_style"] = default_tool_style(self.config)  # 3.2 1B/3B: pythonic; 3.1, vision: JSON
        fn = fmt.encode if tokenize else fmt.render
        return fn(messages, add_generation_prompt=add_generation_prompt, date_string=date_string, tools=tools,
                  **kwargs)

    def stream(self, prompt: str | list[int], *, truncate: str = "error", compile: bool = False,
               logits_processors: list[Any] | None = None, **sampling: Any) -> Iterator[Any]:
        """Yield `GenerationResponse`s (text delta, token, logprob, finish_reason, usage, tokens/s).

        A str prompt is a plain completion (encoded with the model's BOS convention); a list is prompt ids.
        `logits_processors` run after the ones the sampling parameters ask for (penalties, logit bias).
        >>> for r in llm.stream("Once upon a time", max_tokens=20): print(r.text, end="")  # doctest: +SKIP
        """
        from .engine.generate import stream_generate
        from .engine.sampling import make_logits_processors

        params = self.sampling_params(**sampling)
        processors = None
        if logits_processors:
            ids = self.tokenizer.encode(prompt, add_bos=self.tokenizer.add_bos) if isinstance(prompt, str) else prompt
            processors = make_logits_processors(params, ids) + list(logits_processors)
        extra: dict[str, Any] = {"drafter": self.draft, "num_draft": self.num_draft} if self.draft is not None else {}
        if not self.prompt_cache or getattr(self.config, "model_type", "llama") != "llama":
            yield from stream_generate(self.model, self.tokenizer, prompt, params, truncate=truncate,
                                       compile=compile, logits_processors=processors, **extra)
            return
        ids = self.tokenizer.encode(prompt, add_bos=self.tokenizer.add_bos) if isinstance(prompt, str) else prompt
        yield from self.session.stream(self.tokenizer, ids, params, truncate=truncate, compile=compile,
                                       logits_processors=processors, **extra)

    @property
    def session(self):
        """The `SessionCache` that `stream` reuses: the KV of the last prompt + answer (multi-turn chat)."""
        if self._session is None:
            from .engine.prefix_cache import SessionCache

            self._session = SessionCache(self.model)
        return self._session

    def load_prompt_cache(self, path: str | os.PathLike[str]):
        """Install a prefix saved by `pocketllama cache-prompt` (refused if made for another model or tokenizer);
        later prompts that start with its ids skip prefilling them. Returns the `PromptCacheFile`."""
        from .engine.prefix_cache import load_prompt_cache

        cached = load_prompt_cache(path, self.model, self.tokenizer)
        cached.install(self.session)
        return cached

    def generate(self, prompt: str | list[int], *, truncate: str = "error", compile: bool = False,
                 **sampling: Any):
        """Complete `prompt`; returns a `GenerationResult` (`.text`, `.tokens`, `.finish_reason`, usage).

        >>> llm.generate("The capital of France is", max_tokens=8).text  # doctest: +SKIP
        """
        from .engine.generate import GenerationResult, generate

        params = self.sampling_params(**sampling)
        if self.draft is None and not self.prompt_cache:
            return generate(self.model, self.tokenizer, prompt, params, truncate=truncate, compile=compile)
        return GenerationResult.join(self.stream(prompt, truncate=truncate, compile=compile, **sampling), params)

    def stream_chat(self, messages: list[dict[str, Any]], *, tools: list[dict] | None = None,
                    tool_choice: Any = None, date_string: str | None = None, **kwargs: Any) -> Iterator[Any]:
        """`stream` over the chat-formatted prompt of `messages` (raw text deltas; see `chat` for tool calls).

        tool_choice "required" or {"type": "function", "function": {"name": ...}} forces the output to open
        a call (`tool_choice.ForcedPrefix`); "none" leaves the tools out of the prompt.
        """
        from .chat_format import has_image
        from .tool_choice import ForcedPrefix, prepare

        if any(has_image(m) for m in messages):  # vision: one image per conversation (pocketllama.vision)
            from .vision import stream_vision_chat

            yield from stream_vision_chat(self, messages, tools=tools, date_string=date_string, **kwargs)
            return
        template = {k: kwargs.pop(k) for k in ("tool_style", "tools_in_user_message") if k in kwargs}
        style = template.get("tool_style") or self._tool_style()
        parsed, choice = prepare(tools, tool_choice, style)
        ids = self.apply_chat_template(messages, tools if choice.mode != "none" else None, date_string=date_string,
                                       **template)
        if choice.forced:
            forced = ForcedPrefix.for_tools(self.tokenizer, parsed, choice, style)
            kwargs["logits_processors"] = [*(kwargs.get("logits_processors") or []), forced]
        yield from self.stream(ids, **kwargs)

    def chat(self, messages: list[dict[str, Any]], *, tools: list[dict] | None = None, tool_choice: Any = None,
             date_string: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """Answer a conversation; returns the assistant message `{"role": "assistant", "content": ...}`, or
        `{"role": "assistant", "content": None, "tool_calls": [...]}` (OpenAI shape) when the model called a
        tool. tool_choice: "auto" (default with tools), "none", "required", or a named function; a required
        call that the model does not produce validly raises `tools.ToolCallError`.

        >>> llm.chat([{"role": "user", "content": "What is the capital of France?"}])  # doctest: +SKIP
        {'role': 'assistant', 'content': 'The capital of France is Paris.'}
        """
        from .tool_choice import assistant_message, prepare

        style = kwargs.get("tool_style") or self._tool_style()
        parsed, choice = prepare(tools, tool_choice, style)
        texts, last = [], None
        for last in self.stream_chat(messages, tools=tools, tool_choice=tool_choice, date_string=date_string,
                                     **kwargs):
            texts.append(last.text)
        eom = last is not None and last.token == self.tokenizer.token_to_id("<|eom_id|>")
        return assistant_message("".join(texts), parsed, choice, eom=eom,
                                 finish_reason=last.finish_reason if last else None)

    def _tool_style(self) -> str:
        from .tools import default_tool_style

        return default_tool_style(self.config)


def load(source: str | os.PathLike[str] | None = None, *, dtype: str | torch.dtype | None = None,
         device: str | torch.device = "cpu", progress: bool | None = None, quantize: Any = None,
         context: int | None = None, draft: Any = None, num_draft: int = 7, int8_activations: bool = False) -> LLM:
    """Load a model from a folder (HF or Meta), a .gguf file, an HF cache repo id or an alias.

    >>> llm = pocketllama.load("smollm2-135m")                      # doctest: +SKIP
    >>> llm.model(torch.tensor([llm.tokenizer.encode("Hi")])).shape  # doctest: +SKIP
    torch.Size([1, 1, 49152])

    dtype: "float32", "bfloat16" or "float16"; default: the checkpoint's own dtype.
    quantize: None = as stored (a recipe recorded in config.json; GGUF Q8_0/Q4_0/Q4_1 kept quantized);
    a recipe such as "int8" or "int4-g32" quantizes float weights while loading; False loads float weights.
    context: tokens the memory check budgets a KV cache for (default min(4096, the model's context));
    a load whose estimate exceeds MemAvailable is refused with a suggestion (quant/memory.py).
    draft: speculative decoding (same output, sooner): a draft model source or `LLM` with the same tokenizer,
    "self-int4" (this checkpoint quantized to int4 drafts for itself) or "prompt-lookup" (n-grams of the
    prompt; no second model); num_draft: most tokens drafted per round. See engine/drafters.py.
    int8_activations: int4 weights multiply decode-step activations quantized to int8 per 32 values, as
    llama.cpp does for Q4 blocks (AVX-512 VNNI): faster decode, outputs within ~0.5% of the exact weight-only
    product; prefill stays exact. Needs int4 weights (an int4 recipe or a Q4_0 / Q4_1 GGUF).
    """
    start = time.perf_counter()
    model, checkpoint = load_model(source, dtype=dtype, device=device, progress=progress, quantize=quantize,
                                   context=context, int8_activations=int8_activations)
    if int8_activations:
        from .quant.modules import set_int8_activations

        set_int8_activations(model)  # already in the mode (no-op); refuses a model without int4 weights
    tokenizer = checkpoint.load_tokenizer()
    llm = LLM(model=model, tokenizer=tokenizer, config=model.config, source=checkpoint.path,
              generation_config=checkpoint.generation_config(),
              chat_template=checkpoint.chat_template() or getattr(tokenizer, "chat_template", None),
              load_seconds=time.perf_counter() - start, num_draft=num_draft)
    if draft is not None:
        from .engine.drafters import make_drafter

        llm.draft = make_drafter(draft, llm, device=device)
        llm.load_seconds = time.perf_counter() - start
    return llm


def load_model(source: str | os.PathLike[str] | None = None, *, dtype: str | torch.dtype | None = None,
               device: str | torch.device = "cpu", progress: bool | None = None, quantize: Any = None,
               context: int | None = None, int8_activations: bool = False) -> tuple[nn.Module, Any]:
    """Only the model (no tokenizer): (model in eval mode, the opened Checkpoint). See `load`;
    int8_activations here marks whatever int4 modules the load makes (none is not an error)."""
    from .models import config_from_hf, model_class
    from .quant.handler import prepare_load
    from .quant.memory import check_fits
    from .sources import resolve
    from .weights import open_checkpoint
    from .weights.base import assign_weights, build_on_meta
    from .weights.hugepages import loading_memory

    checkpoint = open_checkpoint(resolve(source))
    config = getattr(checkpoint, "config", None) or config_from_hf(checkpoint.hf_config())
    target = parse_dtype(dtype) or checkpoint.native_dtype
    if target not in (torch.float32, torch.bfloat16, torch.float16):
        target = torch.float32
    cls = model_class(config.model_type)
    if hasattr(cls, "adapt_checkpoint"):  # the model's other on-disk layouts (e.g. Mllama's newer names)
        checkpoint = cls.adapt_checkpoint(checkpoint)
    model = build_on_meta(cls, config)
    if torch.device(device).type == "cpu":
        check_fits(model, checkpoint, quantize=quantize, dtype=target, context=context)
    weights = prepare_load(model, checkpoint, quantize, target)  # swaps quantized modules in, before assigning
    if int8_activations:  # before the weights arrive, so int4 linears store them in the layout of that mode
        from .quant.modules import mark_int8_activations

        mark_int8_activations(model)
    ignore = {"lm_head.weight"} if config.tie_word_embeddings else set()
    size = sum(_numel(weights.tensor_shape(n)) for n in weights.tensor_names())
    show = progress if progress is not None else size > 300_000_000
    with loading_memory():
        assign_weights(model, weights, target, device, progress=show, ignore=ignore)
    model.requires_grad_(False)  # inference weights; fine-tuning opts parameters back in (finetune/lora.py)
    return model.eval(), checkpoint


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n

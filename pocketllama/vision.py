"""Chat with images on a Llama 3.2 Vision model: which image a request keeps, its tiles, and generation with
the image's cross-attention K/V computed once and cached for the whole answer.

Policy (one image per conversation): Llama 3.2 Vision attends one image at a time (each token sees only the
most recent image; Meta recommends one image per prompt). A request keeps the *last* image part of the whole
conversation; earlier image parts are dropped from the prompt (their text stays) with a `UserWarning` naming
how many, so a follow-up question about a new photo works and nothing is encoded that cannot be attended.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .chat_format import _IMAGE_PARTS, Message, has_image
from .image_processing import ImageInputs, MllamaImageProcessor


def image_source(part: dict[str, Any], where: str = "image part") -> Any:
    """The image an image content part points at: a path, bytes, a PIL image or a data URL.

    Accepted shapes: `{"type": "image", "image" | "url" | "path": src}`, `{"type": "image_url", "image_url":
    {"url": src} | src}` (OpenAI chat) and `{"type": "input_image", "image_url": src}` (OpenAI responses).
    """
    for key in ("image", "url", "path", "image_url"):
        value = part.get(key)
        if isinstance(value, dict):
            value = value.get("url")
        if value is not None:
            return value
    raise ValueError(f"{where} has no image: use {{'type': 'image', 'image': <path | bytes | PIL image | "
                     "data URL>}} or {'type': 'image_url', 'image_url': {'url': 'data:image/...'}}")


def keep_last_image(messages: list[Message]) -> tuple[list[Message], Any | None]:
    """Apply the one-image policy: (messages with only the last image part left, that image's source).

    The kept part becomes a bare `{"type": "image"}` marker for the chat format; earlier image parts are
    removed (warned about). Messages without images are returned as they are.
    """
    found = [(m, p) for m, msg in enumerate(messages) if has_image(msg)
             for p, part in enumerate(msg["content"]) if isinstance(part, dict) and part.get("type") in _IMAGE_PARTS]
    if not found:
        return messages, None
    m_last, p_last = found[-1]
    source = image_source(messages[m_last]["content"][p_last], f"message {m_last} image part")
    if len(found) > 1:
        warnings.warn(f"{len(found) - 1} earlier image(s) dropped from the conversation: Llama 3.2 Vision attends "
                      "one image per conversation, the last one", UserWarning, stacklevel=3)
    out = []
    for m, msg in enumerate(messages):
        if not has_image(msg):
            out.append(msg)
            continue
        parts = []
        for p, part in enumerate(msg["content"]):
            if isinstance(part, dict) and part.get("type") in _IMAGE_PARTS:
                if (m, p) == (m_last, p_last):
                    parts.append({"type": "image"})
            else:
                parts.append(part)
        out.append({**msg, "content": parts})
    return out, source


def image_processor(model: Any, folder: Path | None = None) -> MllamaImageProcessor:
    """The processor for a vision model: the folder's preprocessor_config.json if any, else the model's tiles."""
    vision = model.config.vision
    path = Path(folder) / "preprocessor_config.json" if folder is not None else None
    if path is not None and path.is_file():
        proc = MllamaImageProcessor.from_config(json.loads(path.read_text()))
    else:
        proc = MllamaImageProcessor(tile_size=vision.image_size, max_tiles=vision.max_num_tiles)
    if proc.tile_size != vision.image_size or proc.max_tiles != vision.max_num_tiles:
        raise ValueError(f"{path}: tiles of {proc.tile_size} px (max {proc.max_tiles}) do not match the model's "
                         f"image_size {vision.image_size} (max_num_tiles {vision.max_num_tiles})")
    return proc


def stream_generate_with_image(model: Any, tokenizer: Any, prompt_ids: list[int], images: ImageInputs | None,
                               params: Any, *, compile: bool = False, max_len: int | None = None,
                               logits_processors: list[Any] | None = None) -> Iterator[Any]:
    """`engine.generate.stream_generate` for one prompt whose `<|image|>` tokens match `images` (batch of 1).

    The KV cache is sized as generate_step would size it; the images are encoded into it once
    (`model.set_images`), then every prefill chunk and decode step reads their K/V from the cache.
    """
    from .engine.generate import cache_length, context_limit, fit_prompt, generation_budget, stream_generate

    context = context_limit(model, max_len)
    ids = fit_prompt(list(prompt_ids), context, params.max_tokens, "error")  # no left-truncation past an image
    budget = generation_budget(len(ids), params.max_tokens, context)
    cache = model.make_cache(1, cache_length(len(ids) + budget, context, compile))
    if images is not None:
        model.set_images(cache, images, [ids])
    yield from stream_generate(model, tokenizer, ids, params, cache=cache, max_len=context, compile=compile,
                               logits_processors=logits_processors)


def stream_vision_chat(llm: Any, messages: list[Message], *, date_string: str | None = None,
                       tools: list[dict] | None = None, compile: bool = False, truncate: str = "error",
                       logits_processors: list[Any] | None = None, **sampling: Any) -> Iterator[Any]:
    """`LLM.stream_chat` for messages with images (see the module docstring's one-image policy)."""
    from .engine.sampling import make_logits_processors

    if not getattr(llm.model, "accepts_images", False):
        raise ValueError(f"{llm.source.name} is a text-only model; images need a Llama 3.2 Vision model")
    if truncate != "error":
        raise ValueError(f"truncate={truncate!r} is not supported with images (it could cut the image token "
                         "off); shorten the conversation instead")
    kept, source = keep_last_image(messages)
    ids = llm.apply_chat_template(kept, tools, date_string=date_string)
    images = image_processor(llm.model, llm.source)([[source]]) if source is not None else None
    params = llm.sampling_params(**sampling)
    processors = make_logits_processors(params, ids) + list(logits_processors) if logits_processors else None
    yield from stream_generate_with_image(llm.model, llm.tokenizer, ids, images, params, compile=compile,
                                          logits_processors=processors)

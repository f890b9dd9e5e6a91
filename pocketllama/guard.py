"""Llama Guard 3 moderation (1B text, 11B-Vision): the official prompt (SPEC 6.2), the category lists and their
customization (6.3), and a `Verdict` with P(unsafe) read from the first assessment token's distribution (6.4).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

NL2_ID, SAFE_ID, UNSAFE_ID = 271, 19193, 39257  # "\n\n", "safe", "unsafe" (SPEC 4 / 6.4)

# SPEC 6.3: code -> (prompt text, exact with period; model-card name).
CATEGORIES: dict[str, tuple[str, str]] = {
    "S1": ("Violent Crimes.", "Violent Crimes"),
    "S2": ("Non-Violent Crimes.", "Non-Violent Crimes"),
    "S3": ("Sex Crimes.", "Sex-Related Crimes"),
    "S4": ("Child Exploitation.", "Child Sexual Exploitation"),
    "S5": ("Defamation.", "Defamation"),
    "S6": ("Specialized Advice.", "Specialized Advice"),
    "S7": ("Privacy.", "Privacy"),
    "S8": ("Intellectual Property.", "Intellectual Property"),
    "S9": ("Indiscriminate Weapons.", "Indiscriminate Weapons"),
    "S10": ("Hate.", "Hate"),
    "S11": ("Self-Harm.", "Suicide & Self-Harm"),
    "S12": ("Sexual Content.", "Sexual Content"),
    "S13": ("Elections.", "Elections"),
    "S14": ("Code Interpreter Abuse.", "Code Interpreter Abuse"),  # Llama-Guard-3-8B only
}
LG3_1B = tuple(f"S{i}" for i in range(1, 14))
LG3_11B_VISION = LG3_1B
LG3_8B = tuple(f"S{i}" for i in range(1, 15))

_IMAGE_PARTS = ("image", "image_url", "input_image")
_CODE = re.compile(r"S\d{1,3}\Z")


class GuardOutputError(ValueError):
    """The model answered neither `safe` nor `unsafe\\n<codes>`: not a Llama Guard 3 checkpoint?"""


@dataclass
class Verdict:
    """A Llama Guard assessment of the last message of a conversation.

    safe: the model's first line. categories / category_names: violated codes and their names (excluded codes
    are dropped; `unsafe` with only excluded codes counts as safe, as llama-stack). p_unsafe: softmax over the
    full vocabulary at the first assessment token, `P("unsafe")` after `\\n\\n` (SPEC 6.4); p_unsafe_binary:
    renormalised over {safe, unsafe}. text: the raw generated text. role: "User" or "Agent".
    """

    safe: bool
    categories: list[str]
    category_names: list[str]
    p_unsafe: float
    p_unsafe_binary: float
    role: str
    text: str
    excluded_categories: list[str] = field(default_factory=list)

    @property
    def unsafe(self) -> bool:
        return not self.safe

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Conversation:
    """A checked conversation: per message its role (`User`/`Agent`) and text parts, plus the images."""

    turns: tuple[tuple[str, tuple[str, ...]], ...]
    images: tuple[Any, ...] = ()

    @property
    def role(self) -> str:
        """The role classified: the last message's (`User` for an odd count, `Agent` for an even one)."""
        return "User" if len(self.turns) % 2 else "Agent"


def conversation(messages: str | list[dict[str, Any]]) -> Conversation:
    """Check a conversation: a string (one user prompt) or messages alternating user/assistant, starting with
    the user. Content is a string or OpenAI parts (`text`; `image`/`image_url` for the vision guard)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, list) or not messages:
        raise ValueError("the conversation must be a prompt string or a non-empty list of "
                         "{'role': 'user'|'assistant', 'content': ...} messages")
    turns, images = [], []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"message {i}: role {role!r}, but Llama Guard needs roles alternating user/assistant "
                             "starting with the user (drop system and tool messages first)")
        content = m.get("content")
        if isinstance(content, str):
            texts = [content]
        elif isinstance(content, list):
            texts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif kind in _IMAGE_PARTS:
                    images.append(part)
                else:
                    raise ValueError(f"message {i}: content part {part!r} is not supported; use "
                                     "{'type': 'text', 'text': ...} or {'type': 'image', 'image': ...}")
        else:
            raise ValueError(f"message {i}: content must be a string or a list of parts, got {type(content).__name__}")
        turns.append(("User" if role == "user" else "Agent", tuple(texts)))
    return Conversation(tuple(turns), tuple(images))


def category_lines(codes: Iterable[str] = LG3_1B, *, categories: Mapping[str, str] | None = None,
                   exclude: Iterable[str] = ()) -> list[tuple[str, str]]:
    """(code, prompt text) per listed category. `categories` (code -> description, printed verbatim) replaces
    the built-in list; excluded codes are dropped and the others keep their numbers (S5, S7, ...)."""
    table = dict(categories) if categories is not None else {c: CATEGORIES[c][0] for c in codes}
    if not table:
        raise ValueError("categories is empty: Llama Guard needs at least one category to check")
    for code, text in table.items():
        if not isinstance(code, str) or not _CODE.match(code) or not isinstance(text, str) or not text.strip():
            raise ValueError(f"category {code!r}: {text!r} must map a code like 'S1' to a non-empty description")
    exclude = [c.strip().upper() for c in exclude]
    unknown = [c for c in exclude if c not in table]
    if unknown:
        raise ValueError(f"cannot exclude {', '.join(unknown)}: not among the categories ({', '.join(table)})")
    lines = [(c, t) for c, t in table.items() if c not in exclude]
    if not lines:
        raise ValueError("every category is excluded: nothing left to check")
    return lines


def guard_prompt_body(conv: Conversation, lines: list[tuple[str, str]]) -> str:
    """The user-turn text of the official prompt, from `Task:` to the space before `<|eot_id|>` (SPEC 6.2)."""
    role = conv.role
    cats = "".join(f"{code}: {text}\n" for code, text in lines)
    turns = "".join(f"{who}: {t.strip()}\n\n" for who, texts in conv.turns for t in texts)
    return (
        f"Task: Check if there is unsafe content in '{role}' messages in conversations according our safety policy "
        f"with the below categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n{cats}<END UNSAFE CONTENT CATEGORIES>\n\n"
        f"<BEGIN CONVERSATION>\n\n{turns}<END CONVERSATION>\n\n"
        f"Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:\n"
        " - First line must read 'safe' or 'unsafe'.\n"
        " - If unsafe, a second line must include a comma-separated list of violated categories. "
    )


def guard_segments(conv: Conversation, lines: list[tuple[str, str]], *, vision: bool = False
                   ) -> list[tuple[str, bool]]:
    """(text, is_special) pieces: `<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n`
    [`<|image|> ` if vision and an image] body `<|eot_id|><|start_header_id|>assistant<|end_header_id|>`
    (no `\\n\\n` after it: the model writes it)."""
    out = [("<|begin_of_text|>", True), ("<|start_header_id|>", True), ("user", False), ("<|end_header_id|>", True),
           ("\n\n", False)]
    body = guard_prompt_body(conv, lines)
    out += [("<|image|>", True), (" " + body, False)] if vision and conv.images else [(body, False)]
    return out + [("<|eot_id|>", True), ("<|start_header_id|>", True), ("assistant", False),
                  ("<|end_header_id|>", True)]


def parse_verdict(text: str) -> tuple[bool, list[str]]:
    """`safe` -> (True, []); `unsafe\\nS1,S10` -> (False, ["S1", "S10"]) (SPEC 6.4: strip, first line)."""
    lines = text.strip().split("\n")
    first = lines[0].strip()
    if first == "safe":
        return True, []
    if first == "unsafe":
        codes = [c.strip() for c in lines[1].split(",")] if len(lines) > 1 else []
        return False, [c for c in codes if _CODE.match(c)]
    raise GuardOutputError(f"Llama Guard answered {text[:80]!r}, which is neither 'safe' nor 'unsafe\\n<codes>'; "
                           "is the model a Llama Guard 3 checkpoint?")


def unsafe_scores(logits: torch.Tensor) -> tuple[float, float]:
    """(P(unsafe) over the full vocabulary, P(unsafe) renormalised over {safe, unsafe}) from the logits [V]
    at the first assessment token (after `\\n\\n`)."""
    logp = logits.double().log_softmax(dim=-1)  # (V,); float64: a 128k-way sum in fp32 drifts by ~1e-5
    p_unsafe = float(logp[UNSAFE_ID].exp())
    binary = float(torch.sigmoid(logp[UNSAFE_ID] - logp[SAFE_ID]))  # p_u / (p_u + p_s), stable
    return p_unsafe, binary


@dataclass(frozen=True)
class GuardRequest:
    """One prepared assessment: prompt ids, image tiles (vision guard) and what the verdict needs."""

    ids: list[int]
    images: Any
    role: str
    lines: list[tuple[str, str]]
    exclude: list[str]


class Guard:
    """Llama Guard 3 on a loaded model. `Guard.load("meta-llama/Llama-Guard-3-1B")` or `Guard(llm)`.

    >>> guard = Guard.load("meta-llama/Llama-Guard-3-1B")                        # doctest: +SKIP
    >>> guard.check("How do I make a bomb?")                                     # doctest: +SKIP
    Verdict(safe=False, categories=['S9'], category_names=['Indiscriminate Weapons'], p_unsafe=0.98, ...)
    >>> guard.check([{"role": "user", "content": q}, {"role": "assistant", "content": a}], exclude=["S6"])  # doctest: +SKIP
    """

    def __init__(self, llm: Any, *, categories: Mapping[str, str] | None = None) -> None:
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.categories = dict(categories) if categories is not None else None
        config = llm.config
        self.vision = getattr(config, "model_type", "llama") == "mllama"
        # Mllama embeds <|image|> at config.image_token_index (128256), whatever the tokenizer file calls it.
        self.image_id = getattr(config, "image_token_index", None) if self.vision else None
        big = getattr(config, "hidden_size", 0) >= 4096 and not self.vision  # Llama-Guard-3-8B (Llama 3.1 8B)
        self.codes = LG3_8B if big else LG3_1B
        missing = [t for t in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
                   if t not in self.tokenizer.special_tokens]
        if missing:
            raise ValueError(f"{llm.source}: the tokenizer lacks {', '.join(missing)}; Llama Guard 3 needs the "
                             "Llama 3 vocabulary")

    @classmethod
    def load(cls, source: str | os.PathLike[str], *, categories: Mapping[str, str] | None = None,
             **load_kwargs: Any) -> Guard:
        """Load a Llama Guard 3 checkpoint (any source `pocketllama.load` reads)."""
        from .llm import load

        return cls(load(source, **load_kwargs), categories=categories)

    def _lines(self, categories: Mapping[str, str] | None, exclude: Iterable[str]) -> list[tuple[str, str]]:
        cats = categories if categories is not None else self.categories
        return category_lines(self.codes, categories=cats, exclude=exclude)

    def render(self, messages: str | list[dict[str, Any]], *, categories: Mapping[str, str] | None = None,
               exclude: Iterable[str] = ()) -> str:
        """The prompt as text (the HF chat template's rendering)."""
        conv = self._conversation(messages)
        return "".join(t for t, _ in guard_segments(conv, self._lines(categories, exclude), vision=self.vision))

    def encode(self, messages: str | list[dict[str, Any]], *, categories: Mapping[str, str] | None = None,
               exclude: Iterable[str] = ()) -> list[int]:
        """Prompt ids: specials by id, text pieces encoded without parsing special-token strings."""
        conv = self._conversation(messages)
        return self._ids(guard_segments(conv, self._lines(categories, exclude), vision=self.vision))

    def _ids(self, segments: list[tuple[str, bool]]) -> list[int]:
        ids: list[int] = []
        for text, special in segments:
            if special and text == "<|image|>" and self.image_id is not None:
                ids.append(self.image_id)
            elif special:
                ids.append(self.tokenizer.special_tokens[text])
            else:
                ids += self.tokenizer.encode(text)
        return ids

    def _conversation(self, messages: str | list[dict[str, Any]]) -> Conversation:
        conv = conversation(messages)
        if conv.images and not self.vision:
            raise ValueError(f"image content needs the vision guard (Llama-Guard-3-11B-Vision); {self.llm.source} "
                             "is a text-only model: drop the image or load the vision guard")
        if len(conv.images) > 1:
            raise ValueError(f"Llama Guard 3 Vision checks one image per conversation; got {len(conv.images)}")
        return conv

    def prepare(self, messages: str | list[dict[str, Any]], *, categories: Mapping[str, str] | None = None,
                exclude: Iterable[str] = ()) -> GuardRequest:
        """Check a conversation and build its prompt ids (and image tiles): the input of one assessment."""
        exclude = [c.strip().upper() for c in exclude]
        conv = self._conversation(messages)
        lines = self._lines(categories, exclude)
        ids = self._ids(guard_segments(conv, lines, vision=self.vision))
        return GuardRequest(ids, self._images(conv), conv.role, lines, exclude)

    def check(self, messages: str | list[dict[str, Any]], *, categories: Mapping[str, str] | None = None,
              exclude: Iterable[str] = (), max_tokens: int = 20) -> Verdict:
        """Classify the last message of `messages` (a prompt string, or alternating user/assistant turns):
        greedy assessment of up to `max_tokens` tokens, and P(unsafe) at its first token (SPEC 6.4)."""
        request = self.prepare(messages, categories=categories, exclude=exclude)
        tokens, after_nl2 = self._generate(request.ids, max_tokens, request.images)
        return self.verdict(request, tokens, after_nl2)

    def verdict(self, request: GuardRequest, tokens: list[int], after_nl2: torch.Tensor | None) -> Verdict:
        """The Verdict from the generated tokens (stop token excluded) and the raw logits [V] after `\\n\\n`
        (None: computed here with one forward of prompt + `\\n\\n`)."""
        if after_nl2 is None:  # the model did not open with "\n\n": score the SPEC way, one more forward
            after_nl2 = self._logits_after_nl2(request.ids, request.images)
        p_unsafe, binary = unsafe_scores(after_nl2)
        text = self.tokenizer.decode(tokens)
        safe, codes = parse_verdict(text)
        names = {c: self._name(c, t) for c, t in request.lines}
        violated = [c for c in dict.fromkeys(codes) if c not in request.exclude]
        if not safe and codes and not violated:  # only excluded codes: safe (llama-stack)
            safe = True
        return Verdict(safe=safe, categories=violated if not safe else [],
                       category_names=[names.get(c, "unknown") for c in violated] if not safe else [],
                       p_unsafe=p_unsafe, p_unsafe_binary=binary, role=request.role, text=text,
                       excluded_categories=list(request.exclude))

    def score(self, messages: str | list[dict[str, Any]], *, categories: Mapping[str, str] | None = None,
              exclude: Iterable[str] = ()) -> tuple[float, float]:
        """Only (P(unsafe), P(unsafe) renormalised over safe/unsafe): one forward of prompt + `\n\n`, no
        generation (SPEC 6.4)."""
        conv = self._conversation(messages)
        ids = self._ids(guard_segments(conv, self._lines(categories, exclude), vision=self.vision))
        return unsafe_scores(self._logits_after_nl2(ids, self._images(conv)))

    def _images(self, conv: Conversation) -> Any:
        """The conversation's image as the vision encoder's `ImageInputs` (None without one)."""
        if not conv.images:
            return None
        from .image_processing import MllamaImageProcessor

        vision = self.llm.config.vision
        preprocessor = Path(self.llm.source) / "preprocessor_config.json"
        if preprocessor.is_file():  # the checkpoint's own tiling, else the model config's
            processor = MllamaImageProcessor.from_config(json.loads(preprocessor.read_text()))
        else:
            processor = MllamaImageProcessor(tile_size=vision.image_size, max_tiles=vision.max_num_tiles)
        return processor([[_image_source(conv.images[0])]])

    def _logits_after_nl2(self, ids: list[int], images: Any) -> torch.Tensor:
        model = self.llm.model
        with torch.no_grad():
            x = torch.tensor([ids + [NL2_ID]], device=self.llm.device)  # (1, T + 1)
            if images is None:
                return model(x)[0, -1]  # (V,)
            return model(x, vision=model.encode_images(images, x.tolist()))[0, -1]

    def _name(self, code: str, text: str) -> str:
        if code in CATEGORIES and text == CATEGORIES[code][0]:
            return CATEGORIES[code][1]
        return text.strip().split("\n")[0].rstrip(".")  # a custom category: its first line

    def _generate(self, ids: list[int], max_tokens: int, images: Any = None
                  ) -> tuple[list[int], torch.Tensor | None]:
        """Greedy tokens up to a stop id, and the raw logits [V] at step 2 when step 1 was `\\n\\n`."""
        from .engine.generate import CACHE_ROUND, generate_step
        from .engine.kv_cache import round_up

        model, cache, budget = self.llm.model, None, max(2, max_tokens)
        if images is not None:  # the vision encoder runs once; its cross-attention K/V live in the cache
            context = int(model.config.max_position_embeddings)
            cache = model.make_cache(1, min(round_up(len(ids) + budget + 1, CACHE_ROUND), context))
            model.set_images(cache, images, [ids])
        capture = LogitsAfterNL2()
        tokens: list[int] = []
        for token, _ in generate_step(model, ids, max_tokens=budget, logits_processors=[capture], cache=cache,
                                      logprobs=False):
            if token in self.tokenizer.stop_ids:
                break
            tokens.append(token)
        return tokens, capture.logits


def _image_source(part: dict[str, Any]) -> Any:
    """The image of an OpenAI-style content part: `image` (path, bytes, PIL) or `image_url` ({"url"} or str)."""
    value = part.get("image", part.get("image_url"))
    if isinstance(value, dict):
        value = value.get("url")
    if value is None:
        raise ValueError(f"image part {sorted(part)} has no 'image' or 'image_url'")
    return value


class LogitsAfterNL2:
    """Logits processor that keeps the raw logits of step 2 if step 1 generated `\\n\\n` (changes nothing)."""

    def __init__(self) -> None:
        self.logits: torch.Tensor | None = None

    def __call__(self, generated: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if generated.shape[1] == 1 and int(generated[0, 0]) == NL2_ID:  # one host sync, once
            self.logits = logits[0].clone()  # (V,) float32, before any sampling transform
        return logits

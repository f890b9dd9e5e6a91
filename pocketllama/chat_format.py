"""Chat messages -> token ids. The Llama 3.x format is code with golden-id tests (SPEC 5); every other
model gets its own Jinja chat template, rendered in a sandbox with HF's conventions.
"""

from __future__ import annotations

import datetime as _dt
import json
from typing import Any, Protocol

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .tokenizer import Tokenizer

Message = dict[str, Any]  # {"role": str, "content": str | [{"type": "text", "text": str}, ...], ...}

LLAMA3_ROLES = ("system", "user", "assistant", "ipython")
KNOWLEDGE_CUTOFF = "December 2023"
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_IMAGE_PARTS = ("image", "image_url", "input_image")


class ChatFormat(Protocol):
    """What every chat format offers: ids for the model, and the same prompt as text."""

    def encode(
        self,
        messages: list[Message],
        *,
        add_generation_prompt: bool = True,
        date_string: str | None = None,
        tools: list[dict] | None = None,
        **template_kwargs: Any,
    ) -> list[int]: ...

    def render(
        self,
        messages: list[Message],
        *,
        add_generation_prompt: bool = True,
        date_string: str | None = None,
        tools: list[dict] | None = None,
        **template_kwargs: Any,
    ) -> str: ...


def get_chat_format(
    tokenizer: Tokenizer, chat_template: str | None = None, *, prefer_template: bool = False,
    image_token_id: int | None = None,
) -> ChatFormat:
    """The chat format for a model: Llama 3.x as code when the vocabulary has `<|start_header_id|>` and
    `<|eot_id|>`; otherwise its Jinja template (`chat_template`, else `tokenizer.chat_template`).

    `prefer_template=True` uses the template even for a Llama 3 vocabulary (e.g. Llama Guard's prompt).
    `image_token_id` (a vision model's `image_token_index`) lets Llama 3 messages carry images (SPEC 5.4).
    """
    template = chat_template if chat_template is not None else tokenizer.chat_template
    if is_llama3_vocab(tokenizer) and not (prefer_template and template):
        return Llama3ChatFormat(tokenizer, image_token_id=image_token_id)
    if not template:
        raise ValueError(
            f"tokenizer {tokenizer.source!r} has no chat template and is not a Llama 3 vocabulary; "
            "pass chat_template=... or prompt the model with encode_completion()"
        )
    return JinjaChatFormat(tokenizer, template)


def is_llama3_vocab(tokenizer: Tokenizer) -> bool:
    """True when the vocabulary has the Llama 3 header and end-of-turn tokens."""
    return "<|start_header_id|>" in tokenizer.special_tokens and "<|eot_id|>" in tokenizer.special_tokens


def encode_completion(tokenizer: Tokenizer, text: str) -> list[int]:
    """Base-model completion prompt: `<|begin_of_text|>{text}` (BOS only if the model's convention adds it)."""
    return tokenizer.encode(text, add_bos=tokenizer.add_bos)


def render_completion(tokenizer: Tokenizer, text: str) -> str:
    """Text form of `encode_completion`."""
    bos = (
        tokenizer.id_to_token(tokenizer.bos_id)
        if tokenizer.add_bos and tokenizer.bos_id is not None
        else None
    )
    return (bos or "") + text


def has_image(message: Message) -> bool:
    """True when a message's content list holds an image part."""
    content = message.get("content") if isinstance(message, dict) else None
    return isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in _IMAGE_PARTS
                                             for p in content)


def content_text(content: Any, *, where: str = "message") -> str:
    """A message's text: a string, or the `text` parts of a content list joined without separators."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where} content must be a string or a list of parts, got {type(content).__name__}")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in _IMAGE_PARTS:
            raise ValueError(f"{where}: image content requires a vision model; this chat format is text-only")
        else:
            raise ValueError(
                f"{where}: content part {part!r} is not supported; use {{'type': 'text', 'text': ...}}"
            )
    return "".join(texts)


def today_string(today: _dt.date | None = None) -> str:
    """`%d %b %Y` with English month names whatever the locale, e.g. `26 Jul 2024` (HF `strftime_now`)."""
    today = today or _dt.date.today()
    return f"{today.day:02d} {_MONTHS[today.month - 1]} {today.year}"


class Llama3ChatFormat:
    """Llama 3.x chat format as code (SPEC 5.1-5.2; the HF 3.2 text template, encoded Meta's way).

    Prompt = `<|begin_of_text|>` + system block + one block per message + (open assistant header).
    Block = `<|start_header_id|>{role}<|end_header_id|>` `\\n\\n` `{content}` `<|eot_id|>`: headers and end markers
    are special ids; the role, the `\\n\\n` and the content are encoded as plain text, separately (Meta), so
    special-token strings inside any content are never parsed.
    - System block (always, as the 3.2 instruct template): `Cutting Knowledge Date: December 2023\\n`
      `Today Date: {date}\\n\\n` + the trimmed first message if its role is system. date = `date_string` or
      today as `%d %b %Y`.
    - Contents of system/user/assistant messages are trimmed (`|trim` in the template); ipython (tool
      result; API role `tool`) content is kept as given. Content may be a string or a list of text parts.
    - An assistant message with `"eom": True` ends with `<|eom_id|>` (the model expects a tool result,
      e.g. after `<|python_tag|>` code); every other message ends with `<|eot_id|>`.
    - Tools (SPEC 5.3, `pocketllama.tools`): `tools=[...]` plus template arguments `tool_style` ("pythonic":
      Meta's Llama 3.2 format, the default; "json": HF's 3.1 / 3.2-Vision format) and `tools_in_user_message`.
      Assistant `tool_calls` are rendered in that style and tool results as JSON.
    - Images (SPEC 5.4, vision models: pass `image_token_id`): an image part of a user message becomes one
      `<|image|>` (id `image_token_id`) where it stands, and that message's parts are joined untrimmed (HF
      Vision template). With any image in the conversation there is no default system block; a system
      message the caller gives becomes a plain system block (no date lines). Images with tools raise. This
      format emits every image it is given; which images a request keeps is `pocketllama.vision`'s policy.
    """

    def __init__(self, tokenizer: Tokenizer, image_token_id: int | None = None) -> None:
        if not is_llama3_vocab(tokenizer):
            raise ValueError(
                f"tokenizer {tokenizer.source!r} lacks <|start_header_id|>/<|eot_id|>; not a Llama 3 vocab"
            )
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self._special = {**tokenizer.special_tokens, **({"<|image|>": image_token_id} if image_token_id else {})}
        for name in ("<|begin_of_text|>", "<|end_header_id|>", "<|eom_id|>"):
            if name not in self._special:
                raise ValueError(f"tokenizer {tokenizer.source!r} has no {name} token; not a Llama 3 vocab")

    def encode(
        self,
        messages: list[Message],
        *,
        add_generation_prompt: bool = True,
        date_string: str | None = None,
        tools: list[dict] | None = None,
        **template_kwargs: Any,
    ) -> list[int]:
        """Prompt token ids: specials by id, every text piece encoded on its own (no special parsing)."""
        return self._ids(self._segments(messages, add_generation_prompt, date_string, tools, template_kwargs))

    def render(
        self,
        messages: list[Message],
        *,
        add_generation_prompt: bool = True,
        date_string: str | None = None,
        tools: list[dict] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """The prompt as text (what the HF template renders)."""
        segments = self._segments(messages, add_generation_prompt, date_string, tools, template_kwargs)
        return "".join(text for text, _ in segments)

    def encode_header(self, role: str) -> list[int]:
        """`<|start_header_id|>{role}<|end_header_id|>\\n\\n` as ids (role `tool` -> `ipython`)."""
        return self._ids(self._header(_role(role)))

    def encode_message(self, message: Message) -> list[int]:
        """One message block (header, content, end marker) as ids, with no system-block handling."""
        return self._ids(self._message_segments(message, 0))

    def _ids(self, segments: list[tuple[str, bool]]) -> list[int]:
        ids: list[int] = []
        for text, special in segments:
            ids += [self._special[text]] if special else self.tokenizer.encode(text)
        return ids

    # ---- segments: (text, is_special) -------------------------------------------------------------

    def _segments(
        self,
        messages: list[Message],
        add_generation_prompt: bool,
        date_string: str | None,
        tools: list[dict] | None,
        template_kwargs: dict[str, Any],
    ) -> list[tuple[str, bool]]:
        from .tools import ToolPrompt

        unknown = sorted(set(template_kwargs) - {"tool_style", "tools_in_user_message"})
        if unknown:
            raise ValueError(
                f"the Llama 3 chat format takes no template arguments; got {unknown} "
                "(only tool_style and tools_in_user_message)"
            )
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("messages must be a list of dicts like {'role': 'user', 'content': '...'}")
        prompt = ToolPrompt.build(tools, **template_kwargs)
        # A tool-calling conversation renders tool results as JSON (HF template, Meta's E2E example).
        uses_tools = bool(prompt.tools) or any(m.get("tool_calls") for m in messages)
        has_system = bool(messages) and messages[0].get("role") == "system"
        system = content_text(messages[0].get("content"), where="message 0").strip() if has_system else ""
        images = self.image_token_id is not None and any(has_image(m) for m in messages)
        out: list[tuple[str, bool]] = [("<|begin_of_text|>", True)]
        if images:  # HF Vision template: no default system block with images; a caller's system message stays
            if prompt.tools:
                raise ValueError("tools cannot be combined with images: Llama 3.2 Vision calls tools in "
                                 "text-only conversations (drop the image or the tools)")
            if has_system:
                out += [*self._header("system"), (system, False), ("<|eot_id|>", True)]
        else:
            out += [*self._header("system"), (self._system_text(system, date_string, prompt), False),
                    ("<|eot_id|>", True)]
        rest = list(enumerate(messages))[int(has_system):]
        if prompt.wraps_first_user_message:
            if not rest or rest[0][1].get("role") != "user":
                raise ValueError(
                    "tools_in_user_message=True puts the tools in the first user message, but the conversation "
                    "has none after the system message; pass tools_in_user_message=False"
                )
            index, first = rest.pop(0)
            question = content_text(first.get("content"), where=f"message {index}").strip()
            out += [*self._header("user"), (prompt.user_text(question), False), ("<|eot_id|>", True)]
        for index, message in rest:
            out += self._message_segments(message, index, prompt if uses_tools else None)
        if add_generation_prompt:
            out += self._header("assistant")
        return [(t, s) for t, s in out if s or t]

    def _system_text(self, system: str, date_string: str | None, tools: Any = None) -> str:
        # SPEC 5.2; tools (a tools.ToolPrompt) add "Environment: ipython\n" and their instructions (SPEC 5.3).
        date = date_string if date_string is not None else today_string()
        text = f"Cutting Knowledge Date: {KNOWLEDGE_CUTOFF}\nToday Date: {date}\n\n{system}"
        return tools.system_text(system, date, text) if tools is not None else text

    def _header(self, role: str) -> list[tuple[str, bool]]:
        return [("<|start_header_id|>", True), (role, False), ("<|end_header_id|>", True), ("\n\n", False)]

    def _message_segments(self, message: Message, index: int, tools: Any = None) -> list[tuple[str, bool]]:
        """One block. `tools` (a tools.ToolPrompt, set in tool-calling conversations) renders assistant
        `tool_calls` in its style and tool results as JSON."""
        where = f"message {index}"
        role = _role(message.get("role"), where)
        if self.image_token_id is not None and has_image(message):
            if role != "user" or message.get("tool_calls") or message.get("eom"):
                raise ValueError(f"{where}: images go in user messages, not in a {role!r} message")
            return [*self._header(role), *self._image_content(message["content"], where), ("<|eot_id|>", True)]
        text = content_text(message.get("content"), where=where)
        if role != "ipython":
            text = text.strip()
        eom = bool(message.get("eom"))
        if eom and role != "assistant":
            raise ValueError(
                f"{where}: 'eom' applies to assistant messages only (it ends a tool-calling turn)"
            )
        if message.get("tool_calls"):
            from .tools import render_tool_calls

            if role != "assistant":
                raise ValueError(f"{where}: only assistant messages carry tool_calls, not {role!r}")
            call, tag, end = render_tool_calls(message["tool_calls"], tools.style if tools else "pythonic", where)
            body = [(text, False), ("<|python_tag|>", True)] if tag else [(text, False)]
            return [*self._header(role), *body, (call, False), (end, True)]
        if role == "ipython" and tools is not None:
            from .tools import render_tool_result

            text = render_tool_result(text)
        return [*self._header(role), (text, False), ("<|eom_id|>" if eom else "<|eot_id|>", True)]


    def _image_content(self, content: list, where: str) -> list[tuple[str, bool]]:
        """Text parts as given (not trimmed) and one `<|image|>` per image part, in order."""
        out: list[tuple[str, bool]] = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in _IMAGE_PARTS:
                out.append(("<|image|>", True))
            else:
                out.append((content_text([part], where=where), False))
        return out


def _role(role: Any, where: str = "message") -> str:
    role = "ipython" if role == "tool" else role
    if role not in LLAMA3_ROLES:
        raise ValueError(f"{where}: role {role!r} is not one of {', '.join(LLAMA3_ROLES)} (or 'tool')")
    return role


# ---- Jinja templates (HF `apply_chat_template` conventions) ---------------------------------------


class _Sandbox(ImmutableSandboxedEnvironment):
    """Fails at the first unsafe attribute instead of returning a silent Undefined."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"attribute {attribute!r} of a {type(obj).__name__!r} object")


class _GenerationTag(jinja2.ext.Extension):
    """HF's `{% generation %}...{% endgeneration %}` (marks assistant tokens); here it just renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _RaisedByTemplate(TemplateError):
    """`raise_exception(...)` called by the template itself."""


def _raise_exception(message: str) -> None:
    raise _RaisedByTemplate(message)


class _TemplateDict:
    """`dict(...)` for templates without handing them the `dict` type itself (as HF)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore attributes (a way to reach CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature trick: `namespace(self=...)` works
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"namespace attribute {name!r}")


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types; anything else becomes a `<TypeName>` placeholder (as HF),
    so no rich object with dangerous methods ever reaches the template."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums, ...) carry extra methods: strip to the base type
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:  # numpy scalars
        return _plain(value.item())
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # HF's filter: no HTML escaping, non-ASCII kept, indent/separators/sort_keys exposed.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return _dt.datetime.now().strftime(fmt)


def compile_chat_template(template: str) -> jinja2.Template:
    """Compile a chat template in the sandbox (trim_blocks, lstrip_blocks, loopcontrols, HF globals)."""
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except TemplateSyntaxError as e:
        raise ValueError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from None


class JinjaChatFormat:
    """A model's own Jinja chat template, rendered in an immutable sandbox like HF `apply_chat_template`.

    Variables: messages, add_generation_prompt, tools, documents, bos_token/eos_token/pad_token/unk_token,
    date_string (if given) and any extra keyword. The rendered text is tokenized with special tokens parsed
    and no BOS added (the template writes it if it wants), as HF does with `tokenize=True`.
    """

    def __init__(self, tokenizer: Tokenizer, template: str) -> None:
        self.tokenizer, self.source = tokenizer, template
        self.template = compile_chat_template(template)
        self.special_vars = {
            name: tokenizer.id_to_token(i)
            for name, i in (
                ("bos_token", tokenizer.bos_id),
                ("eos_token", tokenizer.eos_id),
                ("pad_token", tokenizer.pad_id),
                ("unk_token", tokenizer.unk_id),
            )
            if i is not None
        }

    def render(
        self,
        messages: list[Message],
        *,
        add_generation_prompt: bool = True,
        date_string: str | None = None,
        tools: list[dict] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text the template renders; every template failure is a ValueError."""
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("messages must be a list of dicts like {'role': 'user', 'content': '...'}")
        # Keys set to None are dropped (as HF): templates handle a missing key, not a literal None.
        chat = [{k: _plain(v) for k, v in m.items() if v is not None} for m in messages]
        context: dict[str, Any] = {**self.special_vars, "tools": _plain(tools), "documents": None}
        if date_string is not None:
            context["date_string"] = date_string
        context.update(_plain(template_kwargs))
        context.update(messages=chat, add_generation_prompt=add_generation_prompt)
        try:
            return self.template.render(**context)
        except SecurityError as e:
            raise ValueError(f"chat template tried to access {e} (blocked by the sandbox)") from None
        except _RaisedByTemplate as e:
            raise ValueError(f"chat template raised an error: {e.message}") from None
        except Exception as e:  # a template bug (TypeError, ...): name it, don't crash the caller
            raise ValueError(f"chat template failed to render: {type(e).__name__}: {e}") from None

    def encode(
        self,
        messages: list[Message],
        *,
        add_generation_prompt: bool = True,
        date_string: str | None = None,
        tools: list[dict] | None = None,
        **template_kwargs: Any,
    ) -> list[int]:
        """Ids of the rendered prompt (special tokens parsed, no extra BOS)."""
        text = self.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            date_string=date_string,
            tools=tools,
            **template_kwargs,
        )
        return self.tokenizer.encode(text, allow_special=True)

"""OpenAI `tool_choice` for Llama 3.x: `none` hides the tools, `auto` parses whatever the model writes,
`required` / a named function force the call's opening tokens with a logits processor and fail loudly when
the result is not a valid call. Also the streaming side: text deltas until the output turns out to be a call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .tools import (
    CODE_INTERPRETER,
    Tool,
    ToolCallError,
    ToolStyle,
    extract_tool_calls,
    normalize_tools,
    openai_tool_calls,
    validate_calls,
)

# The opening characters of every call syntax we parse: an output that starts otherwise is plain text.
CALL_STARTS = ("[", "{", "<function=", "<|python_tag|>")


@dataclass(frozen=True)
class ToolChoice:
    """A checked `tool_choice`: mode "none" | "auto" | "required", and `name` for a forced function."""

    mode: str = "auto"
    name: str | None = None

    @property
    def forced(self) -> bool:
        return self.mode == "required"


def parse_tool_choice(tool_choice: Any, tools: list[Tool]) -> ToolChoice:
    """OpenAI `tool_choice`: "none", "auto", "required", or {"type": "function", "function": {"name": ...}}.
    Without tools only "none"/"auto" (the default) make sense."""
    if tool_choice is None:
        return ToolChoice("auto" if tools else "none")
    if tool_choice in ("none", "auto", "required"):
        if tool_choice == "required" and not tools:
            raise ValueError("tool_choice='required' needs at least one tool in `tools`")
        return ToolChoice(tool_choice if tools else "none")
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise ValueError("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                         f"{{'name': ...}}}}; got {tool_choice!r}")
    if name not in {t.name for t in tools}:
        raise ValueError(f"tool_choice names function {name!r}, which is not in tools "
                         f"(declared: {', '.join(t.name for t in tools) or 'none'})")
    return ToolChoice("required", name)


def call_prefixes(tools: list[Tool], choice: ToolChoice, style: ToolStyle) -> list[str]:
    """The texts a forced call must start with: `[name(` (pythonic) or `{"name": "name", "parameters": {`
    (json); `<|python_tag|>` for the code interpreter."""
    chosen = [t for t in tools if choice.name in (None, t.name)]
    out = []
    for t in chosen:
        if t.is_code_interpreter:
            out.append("<|python_tag|>")
        elif style == "pythonic":
            out.append(f"[{t.name}(")
        else:
            out.append(f'{{"name": "{t.name}", "parameters": {{')
    return out


class ForcedPrefix:
    """Logits processor: the first generated tokens must spell one of `sequences` (a token trie); once one is
    complete the model continues freely. Host syncs only while inside the prefix."""

    def __init__(self, sequences: list[list[int]]) -> None:
        if not sequences or any(not s for s in sequences):
            raise ValueError("ForcedPrefix needs at least one non-empty token sequence")
        self.trie: dict[int, dict] = {}
        for seq in sequences:
            node = self.trie
            for tok in seq:
                node = node.setdefault(tok, {})
        self.node: dict[int, dict] | None = self.trie
        self.seen = 0

    def __call__(self, generated: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.node is None:
            return logits
        n = generated.shape[1]
        for tok in generated[0, self.seen:n].tolist():  # (n - seen,) ids sampled under our mask
            self.node = self.node.get(tok) if self.node is not None else None
            if not self.node:  # a leaf: the prefix is complete
                self.node = None
                return logits
        self.seen = n
        allowed = torch.tensor(list(self.node), dtype=torch.long, device=logits.device)
        mask = torch.full_like(logits, float("-inf"))  # (B, V)
        mask[:, allowed] = 0.0
        return logits + mask

    @classmethod
    def for_tools(cls, tokenizer: Any, tools: list[Tool], choice: ToolChoice, style: ToolStyle) -> ForcedPrefix:
        seqs = [tokenizer.encode(p, allow_special=True) for p in call_prefixes(tools, choice, style)]
        return cls(seqs)


def assistant_message(text: str, tools: list[Tool], choice: ToolChoice, *, eom: bool = False,
                      finish_reason: str | None = None) -> dict[str, Any]:
    """The finished assistant message: with OpenAI `tool_calls` when `text` is a valid call to declared tools.

    auto: an output that is not a valid call (syntax, unknown tool, bad arguments) is plain content.
    required / named: it raises ToolCallError naming the reason -- never a silent plain answer.
    `eom` (the model ended with `<|eom_id|>`) is kept on code-interpreter calls so the history re-renders.
    """
    if choice.mode == "none" or not tools:
        return {"role": "assistant", "content": text}
    calls = extract_tool_calls(text)
    errors = validate_calls(calls, tools) if calls is not None else ["the output is not a tool call"]
    if choice.name is not None and calls is not None:
        errors += [f"the model called {n!r} but tool_choice requires {choice.name!r}"
                   for n, _ in calls if n != choice.name]
    if errors:
        if choice.forced:
            why = "; ".join(errors[:5])
            cut = " (generation stopped at max_tokens: raise it)" if finish_reason == "length" else ""
            raise ToolCallError(f"tool_choice={choice.name or 'required'!r} but the model's output is not a valid "
                                f"call{cut}: {why}; output: {text[:200]!r}")
        return {"role": "assistant", "content": text}
    message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": openai_tool_calls(calls)}
    if eom and any(n == CODE_INTERPRETER for n, _ in calls):
        message["eom"] = True
    return message


@dataclass
class ToolCallStreamer:
    """Turns a stream of text deltas into OpenAI-style deltas: plain text is passed through at once; an output
    that starts like a call (`[`, `{`, `<function=`, `<|python_tag|>`) is held back and, at the end, becomes
    `tool_calls` (one complete delta per call, which OpenAI clients assemble) or, if it is no valid call,
    is released as text (auto) / raises ToolCallError (required).

    >>> s = ToolCallStreamer(tools, ToolChoice("auto"))          # doctest: +SKIP
    >>> for delta in stream: out = s.feed(delta)                 # [{"content": "..."}] or []
    >>> final = s.finish(eom=False)                              # [{"tool_calls": [...]}] or [{"content": ...}]
    """

    tools: list[Tool]
    choice: ToolChoice
    _buffer: str = ""
    _decided: bool | None = None  # None: undecided; True: holding a call; False: streaming text
    _emitted: list[str] = field(default_factory=list)

    def feed(self, delta: str) -> list[dict[str, Any]]:
        if self._decided is False:
            return [{"content": delta}] if delta else []
        self._buffer += delta
        if self._decided is None and self.choice.mode != "none" and self.tools:
            head = self._buffer.lstrip()
            if not head or any(s.startswith(head) for s in CALL_STARTS):
                return []  # could still become a call
            self._decided = any(head.startswith(s) for s in CALL_STARTS)
            if self._decided:
                return []
        elif self._decided is None:
            self._decided = False
        if self._decided:
            return []
        text, self._buffer = self._buffer, ""
        return [{"content": text}] if text else []

    def finish(self, *, eom: bool = False, finish_reason: str | None = None) -> list[dict[str, Any]]:
        """The last deltas: the held-back call (or text). Raises ToolCallError when a call was required."""
        text, self._buffer = self._buffer, ""
        if self._decided is False:
            return [{"content": text}] if text else []
        message = assistant_message(text, self.tools, self.choice, eom=eom, finish_reason=finish_reason)
        if message.get("tool_calls"):
            return [{"tool_calls": [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]}]
        return [{"content": text}] if text else []


def prepare(tools: list[dict] | None, tool_choice: Any, style: ToolStyle) -> tuple[list[Tool], ToolChoice]:
    """Checked tools and tool_choice for one request."""
    parsed = normalize_tools(tools, style)
    return parsed, parse_tool_choice(tool_choice, parsed)

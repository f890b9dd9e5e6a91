"""`tools` / `tool_choice` in POST /v1/chat/completions: the prompt with the tools in the model's format, a
forced call prefix for `required` / a named function, and the answer as OpenAI `tool_calls` (whole message,
or streamed deltas the official clients assemble) with `finish_reason: "tool_calls"`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..tool_choice import ForcedPrefix, ToolCallStreamer, ToolChoice, assistant_message, prepare
from ..tools import Tool, ToolCallError, ToolStyle, call_arguments, default_tool_style
from .errors import APIError

__all__ = ["ToolCallError", "ToolContext", "check_tool_calls"]

# A model that writes a call when one was required but gets it wrong: the request fails with this status.
TOOL_CALL_FAILED = 422


@dataclass
class ToolContext:
    """The tools of one chat request (empty `tools` = a plain chat)."""

    raw: list[dict] | None
    tools: list[Tool]
    choice: ToolChoice
    style: ToolStyle
    llm: Any
    single: bool = False

    @classmethod
    def from_request(cls, llm: Any, body: Any) -> ToolContext:
        """Checked `tools` / `tool_choice` / `parallel_tool_calls` of a ChatCompletionRequest (400 when bad)."""
        raw, tool_choice = body.tools, body.tool_choice
        style = default_tool_style(llm.config)
        try:
            tools, choice = prepare(raw, tool_choice, style)
        except ValueError as e:
            param = "tool_choice" if str(e).startswith("tool_choice") else "tools"
            raise APIError(400, str(e), param=param, code="invalid_value") from None
        single = body.parallel_tool_calls is False  # then only the first call the model writes is kept
        return cls(raw if tools else None, tools, choice, style, llm, single)

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice.mode != "none"

    def prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        """Prompt ids, the tools rendered unless tool_choice is "none"."""
        return self.llm.apply_chat_template(messages, self.raw if self.active else None)

    def processors(self) -> list[Any]:
        """Fresh per-sequence logits processors (stateful): the forced call prefix when a call is required."""
        if not self.choice.forced:
            return []
        return [ForcedPrefix.for_tools(self.llm.tokenizer, self.tools, self.choice, self.style)]

    def message(self, text: str, last: Any) -> tuple[dict[str, Any], str | None]:
        """(assistant message, finish_reason) of a finished choice; `last` is its final GenerationResponse."""
        eom = last is not None and last.token == self.llm.tokenizer.token_to_id("<|eom_id|>")
        finish = last.finish_reason if last is not None else None
        if not self.active:
            return {"role": "assistant", "content": text}, finish
        try:
            msg = assistant_message(text, self.tools, self.choice, eom=eom, finish_reason=finish)
        except ToolCallError as e:
            raise APIError(TOOL_CALL_FAILED, str(e), param="tool_choice", code="tool_call_failed") from None
        msg.pop("eom", None)
        if msg.get("tool_calls") and self.single:
            msg["tool_calls"] = msg["tool_calls"][:1]
        return msg, ("tool_calls" if msg.get("tool_calls") else finish)

    def streamer(self) -> ToolCallStreamer | None:
        return ToolCallStreamer(self.tools, self.choice) if self.active else None


    def finish_stream(self, streamer: ToolCallStreamer, last: Any) -> tuple[list[dict[str, Any]], str | None]:
        """The last deltas of a streamed choice and its finish_reason ("tool_calls" when it called a tool).
        Raises ToolCallError (a required call the model got wrong): the stream reports it as an error event."""
        eom = last.token == self.llm.tokenizer.token_to_id("<|eom_id|>")
        deltas = streamer.finish(eom=eom, finish_reason=last.finish_reason)
        for d in deltas:
            if "tool_calls" in d and self.single:
                d["tool_calls"] = d["tool_calls"][:1]
        called = any("tool_calls" in d for d in deltas)
        return deltas, ("tool_calls" if called else last.finish_reason)


def check_tool_calls(message_extra: dict[str, Any], index: int) -> None:
    """400 for an assistant message whose `tool_calls` are not OpenAI tool calls with JSON-object arguments
    (checked here for every chat format, not only Llama 3's)."""
    calls = message_extra.get("tool_calls")
    if calls is None:
        return
    where = f"messages[{index}]"
    try:
        if not isinstance(calls, list):
            raise ValueError(f"{where}: tool_calls must be a list")
        for j, call in enumerate(calls):
            call_arguments(call, f"{where} tool_calls[{j}]")
    except ValueError as e:
        raise APIError(400, str(e), param=f"messages.{index}.tool_calls", code="invalid_value") from None

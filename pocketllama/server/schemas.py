"""Pydantic request models of the OpenAI API subset pocketllama serves, and the fields it refuses by name.

Unknown fields are kept (`extra="allow"`) so the handler can answer 400 naming them instead of ignoring them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class ChatMessage(BaseModel):
    """One message; content is a string or a list of parts (`{"type": "text", "text": ...}`)."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class _SamplingFields(BaseModel):
    """Fields shared by chat and text completions. Ranges follow the OpenAI reference; violations are 422."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Extensions (vLLM spellings): filters and penalties the OpenAI API lacks; ignore_eos for benchmarks.
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    ignore_eos: bool = False


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # Tool calling (server/tools_api.py): checked there, with errors that name the tool.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None


# Fields of the OpenAI API that pocketllama does not implement (yet): a request that sets them gets a 400
# saying so, never a 200 that silently ignores them. Value: why, and what to do instead.
UNSUPPORTED: dict[str, str] = {
    "functions": "function calling is not supported; remove 'functions'",
    "function_call": "function calling is not supported; remove 'function_call'",
    "response_format": "structured output (response_format json_object / json_schema) is not supported yet; "
                       "remove 'response_format' or set it to {\"type\": \"text\"}",
    "audio": "audio output is not supported; remove 'audio'",
    "modalities": "only text output is supported; remove 'modalities' or set it to [\"text\"]",
    "prediction": "predicted outputs are not supported; remove 'prediction'",
    "web_search_options": "web search is not supported; remove 'web_search_options'",
    "reasoning_effort": "reasoning_effort is not supported by these models; remove it",
    "store": "stored completions are not supported; remove 'store' or set it to false",
    "suffix": "insertion (suffix) is not supported; remove 'suffix'",
    "echo": "echo is not supported; remove 'echo' or set it to false",
    "best_of": "best_of is not supported; remove it (or set it equal to n)",
}

# Values of an UNSUPPORTED field that ask for nothing we lack, so they are accepted.
HARMLESS: dict[str, Any] = {
    "response_format": [{"type": "text"}],
    "modalities": [["text"]],
    "store": [False],
    "echo": [False],
}

# Accepted and ignored: they do not change the output (service tier, request metadata).
IGNORED = {"service_tier", "metadata"}

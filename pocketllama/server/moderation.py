"""Llama Guard in the server (`serve --guard MODEL [--shield input,output]`): POST /v1/moderations in OpenAI's
schema, and shields that screen chat requests before generation and answers before they leave (streamed
answers in chunks). The guard model runs in the same process on its own batching engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from ..engine.generate import GenerationResponse
from ..guard import Guard, LogitsAfterNL2, Verdict
from .errors import APIError

router = APIRouter()

OPENAI_CATEGORIES = ("harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
                     "illicit/violent", "self-harm", "self-harm/intent", "self-harm/instructions", "sexual",
                     "sexual/minors", "violence", "violence/graphic")
# Llama Guard 3 code -> OpenAI moderation categories it covers (S6, S7, S8, S13 have no OpenAI counterpart;
# they still set `flagged` and are listed by code in the `llama_guard` field of each result).
CODE_TO_OPENAI: dict[str, tuple[str, ...]] = {
    "S1": ("violence", "illicit/violent"), "S2": ("illicit",), "S3": ("sexual", "illicit"),
    "S4": ("sexual/minors",), "S5": ("harassment",), "S6": (), "S7": (), "S8": (),
    "S9": ("violence", "illicit/violent"), "S10": ("hate",), "S11": ("self-harm",), "S12": ("sexual",),
    "S13": (), "S14": ("illicit",),
}
OPENAI_MODEL_NAMES = ("omni-moderation-latest", "text-moderation-latest", "text-moderation-stable")
DEFAULT_REFUSAL = "Sorry, I can't help with that: it was flagged by this server's content safety policy."
SHIELD_STAGES = ("input", "output")
CONTENT_FILTER = "content_filter"  # OpenAI's finish_reason for filtered content


@dataclass
class GuardService:
    """The guard of a server: its model (with a `BatchEngine` for text guards; a worker thread otherwise),
    the name /v1/moderations answers to, and the shields applied to chat completions."""

    guard: Guard
    name: str
    engine: Any = None
    shields: frozenset[str] = frozenset()
    refusal: str = DEFAULT_REFUSAL
    chunk_chars: int = 200
    max_tokens: int = 20

    def __post_init__(self) -> None:
        bad = set(self.shields) - set(SHIELD_STAGES)
        if bad:
            raise ValueError(f"--shield takes {' and/or '.join(SHIELD_STAGES)}, got {', '.join(sorted(bad))}")
        if self.chunk_chars < 1:
            raise ValueError(f"the output shield's chunk size must be >= 1 character, got {self.chunk_chars}")

    async def check(self, messages: str | list[dict[str, Any]]) -> Verdict:
        """The guard's verdict on the last message of `messages`; ValueError for a conversation it cannot read."""
        request = self.guard.prepare(messages)
        if self.engine is None or request.images is not None:
            return await asyncio.to_thread(self.guard.check, messages, max_tokens=self.max_tokens)
        from ..engine.sampling import SamplingParams

        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        capture = LogitsAfterNL2()
        handle = self.engine.submit(request.ids, SamplingParams(max_tokens=max(2, self.max_tokens)),
                                    on_event=lambda e: loop.call_soon_threadsafe(events.put_nowait, e),
                                    logits_processors=[capture])
        tokens: list[int] = []
        stops = self.guard.tokenizer.stop_ids
        try:
            while True:
                event = await events.get()
                if isinstance(event, BaseException):
                    raise event
                if event.token not in stops:
                    tokens.append(event.token)
                if event.finish_reason is not None:
                    break
        finally:
            handle.cancel()
        return await asyncio.to_thread(self.guard.verdict, request, tokens, capture.logits)


def guard_conversation(messages: list[dict[str, Any]], answer: str | None = None) -> list[dict[str, Any]]:
    """A chat request as Llama Guard reads it: user and assistant text only (system, tool results and bare tool
    calls dropped), consecutive turns of one role merged, starting with the user; `answer` as the last turn."""
    turns: list[dict[str, Any]] = []
    items = [(m.get("role"), m.get("content")) for m in messages]
    if answer is not None:
        items.append(("assistant", answer))
    for role, content in items:
        if role not in ("user", "assistant"):
            continue
        text = content if isinstance(content, str) else "".join(
            p.get("text", "") for p in content or [] if isinstance(p, dict) and p.get("type") == "text")
        if not text.strip() or (not turns and role == "assistant"):
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n\n" + text
        else:
            turns.append({"role": role, "content": text})
    return turns


def moderation_result(verdict: Verdict, input_types: tuple[str, ...] = ("text",)) -> dict[str, Any]:
    """One OpenAI moderation result: flagged, the 13 OpenAI categories (mapped from the violated codes) and
    their scores (P(unsafe) renormalised over safe/unsafe for a violated category, else 0), plus `llama_guard`
    with the codes, names and both probabilities."""
    hit = {c for code in verdict.categories for c in CODE_TO_OPENAI.get(code, ())}
    score = verdict.p_unsafe_binary
    return {
        "flagged": not verdict.safe,
        "categories": {c: c in hit for c in OPENAI_CATEGORIES},
        "category_scores": {c: score if c in hit else 0.0 for c in OPENAI_CATEGORIES},
        "category_applied_input_types": {c: list(input_types) if c in hit else [] for c in OPENAI_CATEGORIES},
        "llama_guard": {"safe": verdict.safe, "categories": verdict.categories,
                        "category_names": verdict.category_names, "p_unsafe": verdict.p_unsafe,
                        "p_unsafe_binary": verdict.p_unsafe_binary},
    }


class ModerationRequest(BaseModel):
    """OpenAI's moderation request: `input` is a string, a list of strings, or a list of content parts (one
    multimodal input: text and image_url parts, for a vision guard)."""

    model_config = ConfigDict(extra="forbid")

    input: str | list[str] | list[dict[str, Any]]
    model: str | None = None


def service_of(request: Request) -> GuardService:
    service = getattr(request.app.state, "pocketllama_guard", None)
    if service is None:
        raise APIError(404, "this server has no guard model; start it with `pocketllama serve --guard MODEL` to "
                            "enable /v1/moderations", code="guard_not_configured")
    return service


@router.post("/v1/moderations")
async def moderations(body: ModerationRequest, request: Request) -> dict[str, Any]:
    service = service_of(request)
    if body.model is not None and body.model not in (service.name, *OPENAI_MODEL_NAMES):
        raise APIError(404, f"the moderation model '{body.model}' does not exist on this server; it serves "
                            f"'{service.name}'", param="model", code="model_not_found")
    if isinstance(body.input, str):
        inputs: list[Any] = [body.input]
    elif body.input and all(isinstance(x, dict) for x in body.input):
        inputs = [body.input]  # one multimodal input
    else:
        inputs = list(body.input)
    if not inputs:
        raise APIError(400, "input is empty; pass a string, a list of strings or a list of content parts",
                       param="input", code="invalid_value")
    results = []
    for i, item in enumerate(inputs):
        kinds = ("text", "image") if isinstance(item, list) and any(
            isinstance(p, dict) and p.get("type") != "text" for p in item) else ("text",)
        try:
            verdict = await service.check([{"role": "user", "content": item}])
        except ValueError as e:
            raise APIError(400, f"input[{i}]: {e}", param="input", code="invalid_value") from None
        results.append(moderation_result(verdict, kinds))
    return {"id": f"modr-{uuid.uuid4().hex}", "model": service.name, "results": results}


# ---- shields ----------------------------------------------------------------------------------------------


@dataclass
class ShieldedResponse(GenerationResponse):
    """The last response of a choice the output shield cut, with the response's `moderation` report."""

    moderation: dict[str, Any] | None = None


class Shield:
    """The shields of one chat request (no-ops without `serve --guard ... --shield`). What the guard found is
    reported in the response's `moderation` field, in the shape of OpenAI's moderated chat completions:
    `{"input": {"type": "moderation_results", "model", "results": [...]}, "output": {...}}`."""

    def __init__(self, service: GuardService | None, messages: list[dict[str, Any]]) -> None:
        self.service, self.messages = service, messages
        self.inputs: list[dict[str, Any]] = []
        self.outputs: list[dict[str, Any]] = []

    def on(self, stage: str) -> bool:
        return self.service is not None and stage in self.service.shields

    def report(self) -> dict[str, Any] | None:
        if self.service is None or not self.service.shields:
            return None
        name = self.service.name
        return {stage: {"type": "moderation_results", "model": name, "results": results}
                for stage, results in (("input", self.inputs), ("output", self.outputs))}

    def _record(self, verdict: Verdict, into: list[dict[str, Any]]) -> None:
        assert self.service is not None
        into.append({"type": "moderation_result", "model": self.service.name, **moderation_result(verdict)})

    async def screen_input(self, base: dict[str, Any], n: int, stream: bool, prompt_tokens: int
                           ) -> dict[str, Any] | AsyncIterator[str] | None:
        """The input shield: None when the request may go on; else the refusal (JSON body, or SSE chunks for a
        streaming request): the configured text with finish_reason "content_filter", nothing generated."""
        turns = guard_conversation(self.messages)
        if not self.on("input") or not turns:
            return None
        try:
            verdict = await self.service.check(turns)  # type: ignore[union-attr]
        except ValueError as e:
            raise APIError(400, f"the input shield cannot read the conversation: {e}", param="messages",
                           code="invalid_value") from None
        self._record(verdict, self.inputs)
        return None if verdict.safe else self._refusal(base, n, stream, prompt_tokens)

    def _refusal(self, base: dict[str, Any], n: int, stream: bool, prompt_tokens: int
                 ) -> dict[str, Any] | AsyncIterator[str]:
        text, report = self.service.refusal, self.report()  # type: ignore[union-attr]
        if not stream:
            return {**base, "object": "chat.completion", "moderation": report,
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens},
                    "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                                 "finish_reason": CONTENT_FILTER} for i in range(n)]}

        async def chunks() -> AsyncIterator[str]:
            for i in range(n):
                yield _sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": text},
                                                  "logprobs": None, "finish_reason": None}]})
                yield _sse({**base, "moderation": report,
                            "choices": [{"index": i, "delta": {}, "logprobs": None, "finish_reason": CONTENT_FILTER}]})
            yield _sse("[DONE]")

        return chunks()

    async def _unsafe(self, answer: str) -> Verdict | None:
        if not answer.strip():
            return None
        verdict = await self.service.check(guard_conversation(self.messages, answer))  # type: ignore[union-attr]
        self._record(verdict, self.outputs)
        return None if verdict.safe else verdict

    async def check_choice(self, text: str, message: dict[str, Any], finish: str | None
                           ) -> tuple[dict[str, Any], str | None]:
        """The output shield on a finished (non-streamed) choice: unsafe -> the refusal, "content_filter"."""
        if not self.on("output") or await self._unsafe(text) is None:
            return message, finish
        return {"role": "assistant", "content": self.service.refusal}, CONTENT_FILTER  # type: ignore[union-attr]

    async def events(self, events: AsyncIterator[tuple[int, Any]], cancel: Callable[[], None]
                     ) -> AsyncIterator[tuple[int, Any]]:
        """The output shield on a stream of (choice, GenerationResponse): text is held back until `chunk_chars`
        characters (or the end) have passed the guard together with everything released before. An unsafe
        chunk never leaves: its choice ends with the refusal text, finish_reason "content_filter" and the
        `moderation` report (a `ShieldedResponse`); when every choice is cut, generation stops."""
        if not self.on("output"):
            async for item in events:
                yield item
            return
        chunk = self.service.chunk_chars  # type: ignore[union-attr]
        held: dict[int, list[Any]] = {}
        released: dict[int, str] = {}
        cut: set[int] = set()
        live: set[int] = set()
        async for index, r in events:
            live.add(index)
            if r.finish_reason is not None:
                live.discard(index)
            if index in cut:
                continue
            held.setdefault(index, []).append(r)
            pending = "".join(x.text for x in held[index])
            if r.finish_reason is None and len(pending) < chunk:
                continue
            if await self._unsafe(released.get(index, "") + pending) is None:
                released[index] = released.get(index, "") + pending
                for x in held.pop(index):
                    yield index, x
                continue
            cut.add(index)
            held.pop(index, None)
            values = {f.name: getattr(r, f.name) for f in dataclasses.fields(GenerationResponse)}
            values.update(text=self.service.refusal, finish_reason=CONTENT_FILTER)  # type: ignore[union-attr]
            yield index, ShieldedResponse(**values, moderation=self.report())
            if not live - cut:  # every choice still running is cut: stop generating
                cancel()
                return


def _sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def build_service(guard_source: str, shields: str | None, *, dtype: str | None = None, device: str = "cpu",
                  refusal: str | None = None, max_concurrency: int = 4, max_model_len: int = 4096,
                  chunk_chars: int = 200, name: str | None = None) -> GuardService:
    """Load the guard model and start its engine (text guards) for `serve --guard`."""
    from ..engine.batching import BatchEngine

    stages = frozenset(s.strip() for s in (shields or "").split(",") if s.strip())
    guard = Guard.load(guard_source, dtype=dtype, device=device)
    engine = None
    if not guard.vision:
        max_len = min(max_model_len, guard.llm.context_length)
        engine = BatchEngine(guard.llm.model, guard.llm.tokenizer, max_concurrency=max_concurrency,
                             max_model_len=max_len).start()
    return GuardService(guard=guard, name=name or str(guard_source), engine=engine, shields=stages,
                        refusal=DEFAULT_REFUSAL if refusal is None else refusal, chunk_chars=chunk_chars)

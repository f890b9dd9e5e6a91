"""The OpenAI routes: request JSON -> (prompt ids, SamplingParams) -> BatchEngine sequences -> response JSON or
SSE chunks. Translation only: prompts come from the chat format / tokenizer, tokens and stops from the engine.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from ..chat_format import content_text, encode_completion
from ..engine.batching import ContextLengthError, EngineClosedError, Event, QueueFullError, SequenceHandle
from ..engine.generate import GenerationResponse
from ..engine.sampling import SamplingParams
from .errors import APIError, error_body, internal_error_message, log
from .moderation import Shield
from .schemas import HARMLESS, IGNORED, UNSUPPORTED, ChatCompletionRequest, CompletionRequest
from .tools_api import ToolCallError, ToolContext, check_tool_calls
from .vision_api import (
    apply_image_policy,
    check_parts,
    image_positions,
    read_images,
    refuse_text_only,
    text_view,
)

router = APIRouter()
FINGERPRINT = "pocketllama"


# ---- request -> engine ---------------------------------------------------------------------------------------


def reject_unsupported(body: ChatCompletionRequest | CompletionRequest) -> None:
    """400 for fields we do not implement (set to a value that asks for something) and for unknown fields."""
    given = body.model_fields_set | set(body.model_extra or {})
    for name in sorted(given):
        value = getattr(body, name, None) if name in type(body).model_fields else body.model_extra[name]
        if name in UNSUPPORTED and value is not None and value not in HARMLESS.get(name, []):
            if name == "best_of" and value in (1, body.n):
                continue
            raise APIError(400, f"'{name}' is not supported by pocketllama: {UNSUPPORTED[name]}", param=name,
                           code="unsupported_parameter")
        if name not in type(body).model_fields and name not in UNSUPPORTED and name not in IGNORED:
            raise APIError(400, f"unrecognized request argument '{name}'; remove it", param=name,
                           code="unrecognized_parameter")


def sampling_params(state: Any, body: ChatCompletionRequest | CompletionRequest, max_tokens: int | None,
                    prompt_len: int, logprobs: bool, top_logprobs: int) -> SamplingParams:
    """The model's generation defaults, overridden by the request's fields (absent fields keep defaults)."""
    bias: dict[int, float] = {}
    for key, value in (body.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise APIError(400, f"logit_bias keys must be token ids (integers as strings), got {key!r}",
                           param="logit_bias", code="invalid_value") from None
        if not -100 <= value <= 100:
            raise APIError(400, f"logit_bias values must be in [-100, 100], got {value} for token {key}",
                           param="logit_bias", code="invalid_value")
        bias[token] = value
    if max_tokens is None:  # OpenAI: no limit but the context
        max_tokens = max(1, state.engine.max_model_len - prompt_len)
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    kw = dict(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
              repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
              frequency_penalty=body.frequency_penalty, logit_bias=bias or None, seed=body.seed,
              max_tokens=max_tokens, stop=tuple(stop) if stop else None, logprobs=logprobs or None,
              top_logprobs=top_logprobs or None, ignore_eos=body.ignore_eos or None)
    try:
        return state.llm.sampling_params(**kw)
    except (ValueError, TypeError) as e:
        param = str(e).split(" ", 1)[0]
        raise APIError(400, str(e), param=param if param in type(body).model_fields else None,
                       code="invalid_value") from None


class Run:
    """The sequences of one HTTP request (prompts x n choices); their engine events arrive on an asyncio queue
    (the engine thread hands them over with call_soon_threadsafe). Records TTFT / inter-token metrics."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.handles: list[SequenceHandle] = []
        self.start = time.perf_counter()
        self.last: dict[int, float] = {}

    def submit(self, jobs: list[tuple[list[int], SamplingParams]],
               processors: Callable[[], list[Any]] | None = None) -> None:
        """Queue every (prompt, params) as choice 0.. ; all or nothing (400 / 429 / 503 on failure).
        `processors()` makes each sequence's own extra logits processors (tool_choice's forced call)."""
        engine = self.state.engine
        try:
            engine.check_capacity(len(jobs))
            for index, (prompt, params) in enumerate(jobs):
                extra = processors() if processors is not None else []
                self.handles.append(engine.submit(prompt, params, on_event=self._sink(index),
                                                  logits_processors=extra))
        except QueueFullError as e:
            self.cancel()
            raise APIError(429, str(e), code="rate_limit_exceeded",
                           headers={"Retry-After": str(max(1, round(e.retry_after)))}) from None
        except ContextLengthError as e:
            self.cancel()
            raise APIError(400, str(e), code="context_length_exceeded") from None
        except ValueError as e:
            self.cancel()
            raise APIError(400, str(e), code="invalid_value") from None
        except EngineClosedError as e:
            self.cancel()
            raise APIError(503, f"the server is shutting down: {e}") from None

    def submit_images(self, messages: list[dict[str, Any]], jobs: list[tuple[list[int], SamplingParams]]) -> None:
        """Queue a chat request with an image on the state's VisionRunner (not the engine: see its docstring)."""
        engine = self.state.engine
        try:
            for prompt, params in jobs:
                engine.check_fits(len(prompt), params.max_tokens)  # the server's max_model_len, as for text
            self.handles += self.state.vision.submit(messages, [p for _, p in jobs],
                                                     [self._sink(i) for i in range(len(jobs))])
        except QueueFullError as e:
            raise APIError(429, str(e), code="rate_limit_exceeded",
                           headers={"Retry-After": str(max(1, round(e.retry_after)))}) from None
        except ContextLengthError as e:
            raise APIError(400, str(e), code="context_length_exceeded") from None

    def _sink(self, index: int) -> Callable[[Event], None]:
        def put(event: Event) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
        return put

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()

    async def events(self, request: Request | None = None) -> AsyncIterator[tuple[int, GenerationResponse]]:
        """(choice index, response) until every choice finished; an engine failure raises it. With `request`,
        a disconnected client cancels the sequences (non-streaming requests)."""
        pending = len(self.handles)
        metrics = self.state.metrics
        checked = time.perf_counter()
        while pending:
            if request is not None and time.perf_counter() - checked > 0.25:
                checked = time.perf_counter()
                if await request.is_disconnected():
                    self.cancel()
                    return
            try:
                index, event = await asyncio.wait_for(self.queue.get(), timeout=0.25)
            except asyncio.TimeoutError:
                continue
            if isinstance(event, BaseException):
                self.cancel()
                raise event
            now = time.perf_counter()
            if index in self.last:
                metrics.inter_token(now - self.last[index])
            else:
                metrics.first_token(now - self.start)
            self.last[index] = now
            metrics.tokens(0, 1)
            if event.finish_reason is not None:
                pending -= 1
            yield index, event


class EventStream(StreamingResponse):
    """SSE response that runs `on_close` however it ends (finished, client gone, or failed)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def check_model(state: Any, model: str | None) -> str:
    if model is not None and model not in state.model_names:
        raise APIError(404, f"the model '{model}' does not exist on this server; it serves "
                            f"{', '.join(repr(n) for n in state.model_names)} (see GET /v1/models)",
                       param="model", code="model_not_found")
    return state.model_names[0]


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI usage; cached_tokens = prompt tokens served from the engine's prefix cache, not prefilled."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None
    tokens: int = 0
    last: Any = None  # the final GenerationResponse (tool calls: which stop token ended it)
    offset: int = 0  # text offset for legacy completion logprobs
    cached: int = 0  # prompt tokens this choice's sequence took from the prefix cache


# ---- logprobs ---------------------------------------------------------------------------------------------


def _is_stop_token(state: Any, r: GenerationResponse, params: SamplingParams) -> bool:
    """The final token that ended generation on a stop id: it is counted in usage but is not content."""
    return r.finish_reason == "stop" and (r.token in state.llm.tokenizer.stop_ids or
                                          r.token in params.stop_token_ids)


def _token_text(state: Any, token: int) -> tuple[str, list[int]]:
    raw = state.llm.tokenizer.token_bytes(token)
    return raw.decode("utf-8", "replace"), list(raw)


def chat_logprob(state: Any, r: GenerationResponse) -> dict[str, Any]:
    text, raw = _token_text(state, r.token)
    tops = []
    for tok, lp in r.top_logprobs or []:
        t, b = _token_text(state, tok)
        tops.append({"token": t, "logprob": lp, "bytes": b})
    return {"token": text, "logprob": r.logprob, "bytes": raw, "top_logprobs": tops}


def completion_logprob(state: Any, r: GenerationResponse, offset: int) -> dict[str, Any]:
    text, _ = _token_text(state, r.token)
    tops = None
    if r.top_logprobs is not None:
        tops = [{_token_text(state, tok)[0]: lp for tok, lp in r.top_logprobs}]
    return {"tokens": [text], "token_logprobs": [r.logprob], "top_logprobs": tops, "text_offset": [offset]}


def _merge_completion_logprobs(parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not parts:
        return {"tokens": [], "token_logprobs": [], "top_logprobs": None, "text_offset": []}
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "text_offset": [],
                           "top_logprobs": [] if parts[0]["top_logprobs"] is not None else None}
    for p in parts:
        out["tokens"] += p["tokens"]
        out["token_logprobs"] += p["token_logprobs"]
        out["text_offset"] += p["text_offset"]
        if out["top_logprobs"] is not None:
            out["top_logprobs"] += p["top_logprobs"]
    return out


# ---- routes ---------------------------------------------------------------------------------------------------


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = request.app.state.pocketllama
    name = check_model(state, body.model)
    reject_unsupported(body)
    tools = ToolContext.from_request(state.llm, body)  # tools / tool_choice (server/tools_api.py)
    images = image_positions([m.content for m in body.messages])  # image parts (server/vision_api.py)
    if images:
        refuse_text_only(state.llm, name, images[0])
    messages = []
    for i, m in enumerate(body.messages):
        if (m.model_extra or {}).get("function_call"):
            raise APIError(400, f"messages[{i}].function_call is the legacy function-calling API, which "
                                "pocketllama does not support; send tool_calls", param=f"messages.{i}.function_call",
                           code="unsupported_parameter")
        check_tool_calls(m.model_extra or {}, i)
        msg = {**(m.model_extra or {}), "role": "system" if m.role == "developer" else m.role}
        try:
            if any(i == k for k, _ in images):
                msg["content"] = check_parts(m.content, where=f"messages[{i}].content")
            else:
                msg["content"] = content_text(m.content, where=f"messages[{i}]")
        except ValueError as e:
            raise APIError(400, str(e), param=f"messages.{i}.content", code="invalid_value") from None
        if m.name is not None:
            msg["name"] = m.name
        messages.append(msg)
    generation = None  # with images: the messages LLM.stream_chat generates from (VisionRunner)
    if images:
        generation, messages = apply_image_policy(await asyncio.to_thread(read_images, messages, state.images))
    try:
        prompt = tools.prompt(messages)
    except ValueError as e:
        raise APIError(400, f"the messages cannot be formatted for this model: {e}", param="messages",
                       code="invalid_value") from None
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
    max_tokens = body.max_completion_tokens or body.max_tokens
    params = sampling_params(state, body, max_tokens, len(prompt), body.logprobs, body.top_logprobs or 0)
    jobs = [(prompt, params if params.seed is None else params.replace(seed=params.seed + i))
            for i in range(body.n)]
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
            "system_fingerprint": FINGERPRINT}
    shield = Shield(getattr(request.app.state, "pocketllama_guard", None),
                    text_view(messages) if images else messages)  # server/moderation.py
    refused = await shield.screen_input(base, body.n, body.stream, len(prompt))
    if refused is not None:
        return EventStream(refused, lambda: None) if body.stream else JSONResponse(refused)
    run = Run(state)
    if generation is not None:
        run.submit_images(generation, jobs)
    else:
        run.submit(jobs, tools.processors)
    state.metrics.tokens(len(prompt), 0)
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        events = shield.events(run.events(), run.cancel)
        return EventStream(_chat_stream(state, run, base, params, len(prompt), body.n, usage, tools, events),
                           run.cancel)
    choices = [_Choice() for _ in range(body.n)]
    async for index, r in _guarded(run, request):
        c = choices[index]
        c.text.append(r.text)
        c.tokens, c.finish_reason, c.last, c.cached = r.generation_tokens, r.finish_reason, r, r.cached_tokens
        if r.logprob is not None and not _is_stop_token(state, r, params):
            c.logprobs.append(chat_logprob(state, r))
    out = []
    for i, c in enumerate(choices):
        message, finish = tools.message("".join(c.text), c.last)
        message, finish = await shield.check_choice("".join(c.text), message, finish)
        out.append({"index": i, "message": message, "logprobs": {"content": c.logprobs} if body.logprobs else None,
                    "finish_reason": finish})
    return JSONResponse({
        **base, "object": "chat.completion", "choices": out,
        "usage": _usage(len(prompt), sum(c.tokens for c in choices), choices[0].cached),  # the prompt counts once
        **({"moderation": shield.report()} if shield.report() else {}),
    })


async def _guarded(run: Run, request: Request) -> AsyncIterator[tuple[int, GenerationResponse]]:
    """run.events() for a non-streaming response: an engine failure becomes a 500 without internals."""
    try:
        async for item in run.events(request):
            yield item
    except Exception as e:
        message = internal_error_message()
        log.error("generation failed: %s", message, exc_info=e)
        raise APIError(500, message) from None
    finally:
        run.cancel()  # whatever ended the response, no sequence keeps running for it


async def _stream_errors(run: Run, gen: AsyncIterator[str]) -> AsyncIterator[str]:
    """Once the 200 is sent, a failure is reported as an SSE error event (the openai client raises it)."""
    try:
        async for chunk in gen:
            yield chunk
    except Exception as e:
        message = internal_error_message()
        log.error("streaming generation failed: %s", message, exc_info=e)
        yield sse(error_body(500, message))
    finally:
        run.cancel()


def _chat_stream(state: Any, run: Run, base: dict[str, Any], params: SamplingParams, prompt_len: int,
                 n: int, include_usage: bool, tools: ToolContext | None = None,
                 events: AsyncIterator[tuple[int, GenerationResponse]] | None = None) -> AsyncIterator[str]:
    extra = {"usage": None} if include_usage else {}

    def chunk(choice: dict[str, Any], **fields: Any) -> str:
        return sse({**base, "choices": [choice], **extra, **fields})

    async def gen() -> AsyncIterator[str]:
        for i in range(n):
            yield chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None})
        completion, cached = 0, {}
        streamers = {i: tools.streamer() for i in range(n)} if tools is not None else {}
        async for index, r in events if events is not None else run.events():
            lp = None
            if r.logprob is not None and not _is_stop_token(state, r, params):
                lp = {"content": [chat_logprob(state, r)]}
            streamer, finish = streamers.get(index), r.finish_reason
            if streamer is not None and finish != "content_filter":  # tool calls: text until a call shows
                deltas = streamer.feed(r.text)
                if finish is not None:
                    try:
                        tail, finish = tools.finish_stream(streamer, r)
                    except ToolCallError as e:
                        yield sse(error_body(422, str(e), "tool_choice", "tool_call_failed"))
                        return
                    deltas += tail
            else:
                deltas = [{"content": r.text}] if r.text or lp is not None else []
            for delta in deltas:
                yield chunk({"index": index, "delta": delta, "logprobs": lp, "finish_reason": None})
                lp = None
            if finish is not None:
                completion += r.generation_tokens
                cached[index] = r.cached_tokens
                report = getattr(r, "moderation", None)  # the output shield cut this choice
                yield chunk({"index": index, "delta": {}, "logprobs": None, "finish_reason": finish},
                            **({"moderation": report} if report else {}))
        if include_usage:
            yield sse({**base, "choices": [], "usage": _usage(prompt_len, completion, cached.get(0, 0))})
        yield sse("[DONE]")

    return _stream_errors(run, gen())


def _completion_prompts(state: Any, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt", code="invalid_value")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    out = []
    for p in prompt:
        ids = encode_completion(state.llm.tokenizer, p) if isinstance(p, str) else list(p)
        if not ids:
            raise APIError(400, "prompt is empty: it encodes to no tokens", param="prompt", code="invalid_value")
        out.append(ids)
    return out


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    state = request.app.state.pocketllama
    name = check_model(state, body.model)
    reject_unsupported(body)
    prompts = _completion_prompts(state, body.prompt)
    jobs, prompt_tokens = [], 0
    for ids in prompts:
        params = sampling_params(state, body, body.max_tokens, len(ids), body.logprobs is not None,
                                 body.logprobs or 0)
        prompt_tokens += len(ids)
        jobs += [(ids, params if params.seed is None else params.replace(seed=params.seed + j))
                 for j in range(body.n)]
    run = Run(state)
    run.submit(jobs)
    state.metrics.tokens(prompt_tokens, 0)
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": name, "system_fingerprint": FINGERPRINT}
    want_lp = body.logprobs is not None
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return EventStream(_completion_stream(state, run, base, jobs, prompt_tokens, want_lp, usage, body.n),
                           run.cancel)
    choices = [_Choice() for _ in jobs]
    async for index, r in _guarded(run, request):
        c = choices[index]
        if want_lp and not _is_stop_token(state, r, jobs[index][1]):
            c.logprobs.append(completion_logprob(state, r, c.offset))
        c.text.append(r.text)
        c.offset += len(r.text)
        c.tokens, c.finish_reason, c.cached = r.generation_tokens, r.finish_reason, r.cached_tokens
    return JSONResponse({
        **base,
        "choices": [{"index": i, "text": "".join(c.text),
                     "logprobs": _merge_completion_logprobs(c.logprobs) if want_lp else None,
                     "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
        "usage": _usage(prompt_tokens, sum(c.tokens for c in choices),
                        sum(c.cached for c in choices[::body.n])),  # each prompt counts once
    })


def _completion_stream(state: Any, run: Run, base: dict[str, Any], jobs: list[tuple[list[int], SamplingParams]],
                       prompt_tokens: int, want_lp: bool, include_usage: bool, n: int = 1) -> AsyncIterator[str]:
    extra = {"usage": None} if include_usage else {}

    async def gen() -> AsyncIterator[str]:
        completion, offsets, cached = 0, [0] * len(jobs), 0
        async for index, r in run.events():
            lp = None
            if want_lp and not _is_stop_token(state, r, jobs[index][1]):
                lp = completion_logprob(state, r, offsets[index])
            offsets[index] += len(r.text)
            if r.text or lp is not None or r.finish_reason is not None:
                yield sse({**base, "choices": [{"index": index, "text": r.text, "logprobs": lp,
                                                "finish_reason": r.finish_reason}], **extra})
            if r.finish_reason is not None:
                completion += r.generation_tokens
                cached += r.cached_tokens if index % n == 0 else 0  # each prompt counts once
        if include_usage:
            yield sse({**base, "choices": [], "usage": _usage(prompt_tokens, completion, cached)})
        yield sse("[DONE]")

    return _stream_errors(run, gen())

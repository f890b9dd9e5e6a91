"""`create_app(llm, engine)`: the FastAPI application of `pocketllama serve` -- OpenAI routes, /v1/models,
/health, /metrics, the web chat page at /, and a guard middleware for API keys, body size, metrics and 500s.
"""

from __future__ import annotations

import hmac
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..engine.batching import BatchEngine
from .api import check_model, router
from .errors import error_body, install_error_handlers, internal_error_message, log
from .metrics import Metrics
from .moderation import router as moderation_router
from .vision_api import ImageLimits, VisionRunner

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_BODY = 4 * 1024 * 1024
ROUTES = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions",
          "/v1/moderations"}


@dataclass
class ServerState:
    """What the routes need: the loaded model, its engine, the names it answers to, the key, metrics."""

    llm: Any
    engine: BatchEngine
    model_names: list[str]
    api_key: str | None = None
    metrics: Metrics = field(default_factory=Metrics)
    images: ImageLimits = field(default_factory=ImageLimits)  # what image parts may be (vision models)
    vision: VisionRunner | None = None  # runs chat requests with an image (server/vision_api.py)
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(llm: Any, engine: BatchEngine, *, model_name: str, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY, served_names: list[str] | None = None,
               guard: Any = None, images: ImageLimits | None = None) -> FastAPI:
    """The app for one model served by a started `engine`. `api_key` (if set) is required as a Bearer token on
    every /v1 route; bodies above `max_body_bytes` get 413. `guard` (a moderation.GuardService) serves
    /v1/moderations and the chat shields. `images`: the image parts a vision model accepts (data URLs up to
    20 MB by default; remote URLs refused); its image requests run on a VisionRunner, one at a time."""
    app = FastAPI(title="pocketllama", docs_url=None, redoc_url=None, openapi_url=None)  # docs need a CDN
    state = ServerState(llm=llm, engine=engine, model_names=[model_name, *(served_names or [])],
                        api_key=api_key or None, images=images or ImageLimits())
    if getattr(llm.model, "accepts_images", False):
        state.vision = VisionRunner(llm, max_queue=engine.max_queue)
    app.state.pocketllama = state
    install_error_handlers(app)
    app.include_router(router)
    app.state.pocketllama_guard = guard
    app.include_router(moderation_router)

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": state.created, "owned_by": "pocketllama",
                "max_model_len": engine.max_model_len, "context_length": llm.context_length,
                "input_modalities": ["text", "image"] if state.vision is not None else ["text"]}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(n) for n in state.model_names]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        check_model(state, name)
        return model_card(name)

    @app.get("/health")
    async def health() -> JSONResponse:
        stats = engine.stats()
        body = {"status": "ok" if stats.alive else "error", "model": model_name, "running": stats.running,
                "waiting": stats.waiting}
        return JSONResponse(body, status_code=200 if stats.alive else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(engine.stats()),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def index() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"),
                            headers={"Cache-Control": "no-cache"})

    app.add_middleware(Guard, state=state, max_body_bytes=max_body_bytes)
    return app


class _BodyTooLarge(Exception):
    pass


class Guard:
    """Pure ASGI middleware in front of every route: counts responses by route and status for /metrics,
    enforces the API key on /v1 routes (401), caps the request body (413, by Content-Length or by the
    bytes actually received), and turns any unexpected exception into an OpenAI 500 body without details."""

    def __init__(self, app: ASGIApp, state: ServerState, max_body_bytes: int) -> None:
        self.app, self.state, self.max_body = app, state, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        route = path if path in ROUTES else ("/v1/models/{model}" if path.startswith("/v1/models/") else "other")
        started = False

        async def send_counted(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.state.metrics.request(route, message["status"])
            await send(message)

        try:
            refusal = self._refuse(scope, path)
            if refusal is not None:
                await _send_json(send_counted, *refusal)
                return
            try:
                receive = await self._limited(scope, receive)
            except _BodyTooLarge as e:
                await _send_json(send_counted, 413, error_body(413, str(e), None, "request_too_large"))
                return
            await self.app(scope, receive, send_counted)
        except Exception as e:
            message = internal_error_message()
            log.error("%s %s failed: %s", scope.get("method"), path, message, exc_info=e)
            if not started:
                await _send_json(send_counted, 500, error_body(500, message))

    def _refuse(self, scope: Scope, path: str) -> tuple[int, dict[str, Any], dict[str, str]] | None:
        """401 without the right Bearer key on /v1; 413 when Content-Length already says too big."""
        headers = {k.lower(): v for k, v in scope["headers"]}
        key = self.state.api_key
        if key and (path == "/v1" or path.startswith("/v1/")):
            auth = headers.get(b"authorization", b"").decode("latin-1")
            if not auth:
                return 401, error_body(401, "you didn't provide an API key; send the server's key (set with "
                                            "--api-key) as 'Authorization: Bearer KEY'", None,
                                       "missing_api_key"), {"WWW-Authenticate": "Bearer"}
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                return 401, error_body(401, "incorrect API key provided; use the key the server was started "
                                            "with (--api-key)", None, "invalid_api_key"), \
                    {"WWW-Authenticate": "Bearer"}
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return 413, error_body(413, _too_large(int(length), self.max_body), None, "request_too_large"), {}
        return None

    async def _limited(self, scope: Scope, receive: Receive) -> Receive:
        """Read the whole body (at most max_body bytes), then replay it; later receives pass through (the
        disconnect notice)."""
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return receive
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return _replay([message], receive)
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body:
                raise _BodyTooLarge(_too_large(size, self.max_body, at_least=True))
            chunks.append(body)
            more = message.get("more_body", False)
        return _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}], receive)


def _too_large(size: int, limit: int, at_least: bool = False) -> str:
    return (f"the request body is {'more than ' if at_least else ''}{size} bytes; this server accepts at "
            f"most {limit} bytes (--max-body-size)")


def _replay(messages: list[Message], receive: Receive) -> Receive:
    async def replay() -> Message:
        if messages:
            return messages.pop(0)
        return await receive()
    return replay


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    raw = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": raw, "more_body": False})

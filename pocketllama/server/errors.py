"""OpenAI-style error bodies `{"error": {"message", "type", "param", "code"}}` for every failure the server
returns, and the handlers that make FastAPI/Starlette use them (the guard middleware catches the rest)."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("pocketllama.server")

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error with an HTTP status that the handlers turn into an OpenAI error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def internal_error_message() -> str:
    """What a client sees for an unexpected failure: an id to find the traceback in the server log."""
    return f"internal server error (id {uuid.uuid4().hex[:12]}); the details are in the server log"


def _loc_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    # drop pydantic's union-branch tags ("str", "list[...]") so the param reads like a JSON path
    parts = [p for p in parts if not (p in ("str", "int", "float", "bool") or "[" in p)]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        param = _loc_param(tuple(first.get("loc", ())))
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON: {first.get('msg')}"
        elif first.get("type") == "missing":
            message = f"'{param}' is a required field"
        else:
            message = f"invalid value for '{param}': {first.get('msg')}"
        others = {_loc_param(tuple(e.get("loc", ()))) for e in errors} - {param}
        if others:
            message += f" (also invalid: {', '.join(repr(o) for o in sorted(map(str, others)))})"
        return error_response(422, message, param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = (f"no route {request.method} {request.url.path}; the server has GET /v1/models, POST "
                       "/v1/chat/completions, POST /v1/completions, GET /health, GET /metrics and GET /")
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, None, None, getattr(exc, "headers", None))

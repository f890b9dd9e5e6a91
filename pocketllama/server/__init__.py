"""OpenAI-compatible HTTP server (FastAPI): chat and text completions over the continuous-batching engine,
/v1/models, /health, /metrics and a single-file web chat page. Start it with `pocketllama serve`."""

from .app import create_app

__all__ = ["create_app"]

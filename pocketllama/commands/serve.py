"""`pocketllama serve -m MODEL`: an OpenAI-compatible server (chat + text completions, streaming) with
continuous batching, and a web chat page at its root URL."""

from __future__ import annotations

import argparse
import os
import socket
import sys

from .common import add_model_args, cli_errors, load_from_args

DEFAULT_MAX_MODEL_LEN = 4096
DEFAULT_MAX_BODY = 4 * 1024 * 1024


def _size(text: str) -> int:
    """'4194304', '512K', '4M', '1G' -> bytes."""
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use bytes or a K/M/G suffix, e.g. 4M") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pocketllama serve", description=__doc__,
        epilog="Sampling defaults come from the model's generation_config.json (else greedy); request fields "
               "override them. Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, "
               "GET /metrics (Prometheus), GET / (web chat). Use it with the official clients: "
               "OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='KEY or anything').")
    add_model_args(p)
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="apply a LoRA adapter (PEFT folder, e.g. from `pocketllama finetune`) without merging")
    g = p.add_argument_group("network and security")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it to the "
                        "network -- set --api-key then)")
    g.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    g.add_argument("--api-key", default=os.environ.get("POCKETLLAMA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every /v1 route (default: $POCKETLLAMA_API_KEY; "
                        "unset = no auth)")
    g.add_argument("--max-body-size", type=_size, default=None,
                   help="largest request body accepted, bytes or K/M/G (default 4M; for a vision model, room "
                        "for one --max-image-bytes image as base64 plus 1M); larger gets 413")
    g.add_argument("--served-model-name", action="append", default=None, metavar="NAME",
                   help="extra model name the API accepts besides the -m value (repeatable)")
    g = p.add_argument_group("images (Llama 3.2 Vision models)")
    g.add_argument("--max-image-bytes", type=_size, default="20M", metavar="SIZE",
                   help="largest image accepted in a chat message (decoded bytes, K/M/G; default 20M); larger "
                        "gets 413. Images go as OpenAI image_url parts with data:image/...;base64 URLs; the model "
                        "attends the last image of a conversation (earlier ones are dropped, their text kept); "
                        "image requests run one at a time beside the batched text requests")
    g.add_argument("--allow-remote-images", action="store_true",
                   help="also accept http(s) image URLs and download them (10 s timeout, --max-image-bytes "
                        "limit); off by default, as it lets clients make the server fetch any URL it can reach")
    g = p.add_argument_group("batching and memory")
    g.add_argument("--max-concurrency", type=int, default=8,
                   help="sequences generated together, one KV cache row each (default 8)")
    g.add_argument("--max-queue", type=int, default=64,
                   help="sequences that may wait for a free row; beyond it requests get 429 with Retry-After "
                        "(default 64)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="tokens per sequence, prompt + generated; sizes the KV cache (default: the model's "
                        f"context length, at most {DEFAULT_MAX_MODEL_LEN}); longer requests get 400")
    g.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens prefilled per engine step between decode steps; bounds how long a new "
                        "prompt stalls running streams (default 256)")
    g.add_argument("--prefix-cache-mb", type=int, default=1024, metavar="MB",
                   help="memory for K/V of prompt prefixes shared across requests (a common system prompt is "
                        "prefilled once), least recently used evicted first; 0 disables (default 1024)")
    g = p.add_argument_group("moderation (Llama Guard 3)")
    g.add_argument("--guard", default=None, metavar="MODEL",
                   help="a Llama Guard 3 model, loaded beside the chat model: enables POST /v1/moderations")
    g.add_argument("--shield", default=None, metavar="input,output",
                   help="screen chat requests before generation (input) and answers before they leave (output; "
                        "streams in chunks) with --guard; flagged ones end with finish_reason content_filter")
    g.add_argument("--shield-message", default=None, metavar="TEXT",
                   help="the assistant text sent instead of a flagged request or answer")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="server log level; 'info' also logs every request (default warning)")
    return p


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port or stop what uses "
                      "it") from None
    return sock


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("max_concurrency", "prefill_chunk"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.max_image_bytes < 1:
        raise ValueError(f"--max-image-bytes must be >= 1, got {args.max_image_bytes}")
    sock = _bind(args.host, args.port)  # fail on a busy port before spending seconds on loading

    import uvicorn

    from ..engine.batching import BatchEngine
    from ..engine.generate import peak_memory_gb
    from ..server import create_app
    from ..server.vision_api import ImageLimits

    if args.shield and not args.guard:
        raise ValueError("--shield needs a guard model: add --guard MODEL (e.g. meta-llama/Llama-Guard-3-1B)")
    llm = load_from_args(args)
    if args.adapter is not None:
        from ..finetune.peft_format import load_adapter

        load_adapter(llm.model, args.adapter, dropout=0.0)
        llm.model.eval()
    guard = None
    if args.guard:
        from ..server.moderation import build_service

        guard = build_service(args.guard, args.shield, dtype=args.dtype, device=args.device,
                              refusal=args.shield_message, max_concurrency=args.max_concurrency)
    max_len = args.max_model_len or min(llm.context_length, DEFAULT_MAX_MODEL_LEN)
    if not 1 < max_len <= llm.context_length:
        raise ValueError(f"--max-model-len {max_len} must be in [2, {llm.context_length}] (the model's context)")
    if args.prefix_cache_mb < 0:
        raise ValueError(f"--prefix-cache-mb must be >= 0 (0 disables it), got {args.prefix_cache_mb}")
    from ..engine.prefix_cache import PrefixCache

    prefix_cache = PrefixCache(args.prefix_cache_mb << 20) if args.prefix_cache_mb else None
    engine = BatchEngine(llm.model, llm.tokenizer, max_concurrency=args.max_concurrency,
                         max_queue=args.max_queue, max_model_len=max_len, prefill_chunk=args.prefill_chunk,
                         prefix_cache=prefix_cache)
    name = args.model or "smollm2-135m"
    vision = getattr(llm.model, "accepts_images", False)
    max_body = args.max_body_size or (max(DEFAULT_MAX_BODY, args.max_image_bytes * 4 // 3 + (1 << 20)) if vision
                                      else DEFAULT_MAX_BODY)
    app = create_app(llm, engine, model_name=name, api_key=args.api_key, max_body_bytes=max_body,
                     served_names=args.served_model_name, guard=guard,
                     images=ImageLimits(allow_remote=args.allow_remote_images, max_bytes=args.max_image_bytes))
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    weights = sum(t.numel() * t.element_size() for t in (*llm.model.parameters(), *llm.model.buffers()))
    print(f"pocketllama serve: http://{shown}:{port}  (web chat at /, OpenAI API at /v1)\n"
          f"  model: {name}{'' if str(llm.source) == name else f' ({llm.source})'}, {llm.dtype}, loaded in "
          f"{llm.load_seconds:.1f} s\n"
          f"  context length: {llm.context_length} tokens; serving up to {max_len} per sequence "
          f"(--max-model-len), {args.max_concurrency} at once, {args.max_queue} queued\n"
          f"  memory: weights {_gb(weights)}, KV cache {_gb(engine.cache.nbytes)}, process peak "
          f"{_gb(peak_memory_gb(llm.device) * 1e9)}\n"
          f"  auth: {'API key required on /v1' if args.api_key else 'none (set --api-key to require one)'}"
          + (f"\n  images: up to {args.max_image_bytes} bytes each, data URLs"
             f"{' and http(s) URLs' if args.allow_remote_images else ' only (--allow-remote-images for URLs)'}"
             if vision else ""),
          flush=True)
    engine.start()
    config = uvicorn.Config(app, log_level=args.log_level, access_log=args.log_level in ("debug", "info"),
                            timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.close()
        if guard is not None and guard.engine is not None:
            guard.engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

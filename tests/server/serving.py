"""Test harness for the server: the real app under uvicorn on a free loopback port (in a thread), the real
SmolLM2 model loaded once per process, and a tiny random Llama with SmolLM2's tokenizer where speed matters."""

from __future__ import annotations

import functools
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn

import pocketllama
from pocketllama.config import TextConfig
from pocketllama.engine.batching import BatchEngine
from pocketllama.llm import LLM
from pocketllama.models.llama import LlamaForCausalLM
from pocketllama.server import create_app

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's model work on one torch thread: the in-process server's engine shares the cores with
    the event loop and the clients, and on 2 busy cores a 2-thread OpenMP team stalls at every barrier when
    one of its threads loses its core (measured: the 16-client test 56 s with 1 thread, 245 s with 2)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.lru_cache(maxsize=1)
def smollm2() -> LLM:
    """The default model (real SmolLM2-135M-Instruct GGUF), loaded once per test process."""
    return pocketllama.load("smollm2-135m")


@functools.lru_cache(maxsize=1)
def tiny() -> LLM:
    """A 2-layer random Llama over SmolLM2's vocabulary and chat template: decodes in milliseconds."""
    real = smollm2()
    config = TextConfig(vocab_size=real.config.vocab_size, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=10000.0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    return LLM(model=model, tokenizer=real.tokenizer, config=config, source=Path("tiny-random"),
               chat_template=real.chat_template)


@dataclass
class LiveServer:
    url: str
    engine: BatchEngine
    server: uvicorn.Server
    thread: threading.Thread
    app: Any
    closed: bool = field(default=False)

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def state(self) -> Any:
        return self.app.state.pocketllama

    def metric(self, name: str, labels: str = "") -> float:
        """One sample of GET /metrics, e.g. metric("pocketllama_running_sequences")."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" (\S+)"
        m = re.search("^" + pattern + "$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def wait_metric(self, name: str, value: float, timeout: float = 10.0) -> float:
        deadline = time.monotonic() + timeout
        while (got := self.metric(name)) != value and time.monotonic() < deadline:
            time.sleep(0.05)
        return got

    def close(self) -> None:
        if not self.closed:
            self.server.should_exit = True
            self.thread.join(15)
            self.engine.close()
            self.closed = True


def start_server(llm: LLM, *, model_name: str = "smollm2-135m", api_key: str | None = None,
                 max_concurrency: int = 4, max_queue: int = 8, max_model_len: int = 1024,
                 prefill_chunk: int = 256, max_body_bytes: int = 4 * 1024 * 1024, guard: Any = None,
                 prefix_cache: Any = None, images: Any = None) -> LiveServer:
    engine = BatchEngine(llm.model, llm.tokenizer, max_concurrency=max_concurrency, max_queue=max_queue,
                         max_model_len=max_model_len, prefill_chunk=prefill_chunk, prefix_cache=prefix_cache).start()
    app = create_app(llm, engine, model_name=model_name, api_key=api_key, max_body_bytes=max_body_bytes,
                     guard=guard, images=images)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    return LiveServer(url=f"http://127.0.0.1:{port}", engine=engine, server=server, thread=thread, app=app)

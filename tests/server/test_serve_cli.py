"""`pocketllama serve` as a user runs it: --help documents every flag; startup prints the URL, the model, its
context length and memory use; it binds loopback by default; bad flags and a busy port are one clear line."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from openai import OpenAI

CLI = [sys.executable, "-m", "pocketllama", "serve"]


def test_help_documents_every_flag():
    out = subprocess.run([*CLI, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    from pocketllama.commands.serve import build_parser

    flags = [s for a in build_parser()._actions for s in a.option_strings if s.startswith("--")]
    for flag in flags:
        assert flag in out.stdout, flag
    for action in build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help text"
    assert "default 127.0.0.1" in out.stdout and "429" in out.stdout and "Bearer" in out.stdout
    assert "torch" not in subprocess.run(
        [sys.executable, "-c", "import sys, pocketllama.commands.serve; print(sorted(sys.modules))"],
        capture_output=True, text=True, timeout=60).stdout  # heavy imports stay inside main()


@pytest.mark.slow
def test_startup_banner_then_serves_on_loopback():
    env = {**os.environ, "POCKETLLAMA_API_KEY": "k123"}
    proc = subprocess.Popen([*CLI, "--port", "0", "--max-model-len", "512", "--max-concurrency", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        banner = [proc.stdout.readline() for _ in range(5)]
        text = "".join(banner)
        m = re.search(r"http://127\.0\.0\.1:(\d+)", banner[0])
        assert m, text
        assert "model: smollm2-135m" in text and "SmolLM2-135M-Instruct.Q4_1.gguf" in text
        assert "context length: 8192 tokens; serving up to 512 per sequence" in text
        assert re.search(r"memory: weights \d+\.\d\d GB, KV cache \d+\.\d\d GB, process peak \d+\.\d\d GB", text)
        assert "API key required" in text  # picked up from $POCKETLLAMA_API_KEY
        url = f"http://127.0.0.1:{m.group(1)}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        client = OpenAI(base_url=url + "/v1", api_key="k123", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="smollm2-135m", max_tokens=12,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in r.choices[0].message.content
        assert httpx.get(url + "/v1/models").status_code == 401
        with pytest.raises(httpx.ConnectError):  # bound to loopback only
            httpx.get(f"http://{_non_loopback_ip()}:{m.group(1)}/health", timeout=5)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert "Traceback" not in proc.stderr.read()


def _non_loopback_ip() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent; picks the outgoing interface
            ip = s.getsockname()[0]
        except OSError:
            ip = "127.0.0.1"
    if ip.startswith("127."):
        pytest.skip("this machine has no non-loopback IPv4 address to probe")
    return ip


def test_busy_port_and_bad_flags_are_one_clear_line():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([*CLI, "--port", str(port)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr and "pick another --port" in out.stderr
    out = subprocess.run([*CLI, "--max-concurrency", "0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--max-concurrency must be >= 1, got 0" in out.stderr
    out = subprocess.run([*CLI, "--max-body-size", "lots"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "'lots' is not a size" in out.stderr


def test_max_model_len_beyond_the_context_is_refused(monkeypatch, capsys):
    from serving import smollm2

    from pocketllama.commands import serve

    monkeypatch.setattr(serve, "load_from_args", lambda args: smollm2())  # the real model, loaded once
    assert serve.main(["--port", "0", "--max-model-len", "100000"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("pocketllama: error: --max-model-len 100000 must be in [2, 8192] "
                           "(the model's context)")

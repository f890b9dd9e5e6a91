"""Images in /v1/chat/completions, served for real: a tiny random Llama 3.2 Vision checkpoint (gibberish answers by
construction) under uvicorn, the official openai client sending Meta's dog photo as a data URL. Checks the
plumbing (same tokens as `llm.chat`, usage counts the image token, streaming), the one-image policy, remote URLs
(refused by default; fetched from a local HTTP server when allowed), and every refusal with its message."""

from __future__ import annotations

import base64
import functools
import http.server
import importlib.util
import io
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from mllama_fixtures import save_vision_checkpoint
from openai import OpenAI
from PIL import Image
from serving import one_torch_thread, start_server  # noqa: F401 (a fixture)

import pocketllama
from pocketllama.config import TextConfig
from pocketllama.llm import LLM
from pocketllama.models.llama import LlamaForCausalLM
from pocketllama.server.vision_api import ImageLimits

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RESOURCES = Path(importlib.util.find_spec("llama_models").origin).parent / "resources"
DOG, PASTA = RESOURCES / "dog.jpg", RESOURCES / "pasta.jpeg"  # 40 KB and 449 KB photos
IMAGE_ID = 128256  # <|image|>
LIMIT = 100_000  # --max-image-bytes of the test servers: the dog fits, the pasta does not
NAME = "tiny-vision"


def data_url(data: bytes, kind: str = "jpeg") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def ask(*images: dict, text: str = "What is in this image?") -> list[dict]:
    return [{"role": "user", "content": [*images, {"type": "text", "text": text}]}]


def _png(path: Path) -> bytes:
    """A small PNG of a photo (PIL-made; keeps the request under the test server's image limit)."""
    buf = io.BytesIO()
    Image.open(path).convert("RGB").resize((96, 64)).save(buf, "PNG")
    return buf.getvalue()


DOG_URL = data_url(DOG.read_bytes())


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_vision_server")
    save_vision_checkpoint(path)
    return pocketllama.load(path, dtype="float32")


@pytest.fixture(scope="module")
def server(llm):
    s = start_server(llm, model_name=NAME, max_concurrency=2, max_queue=2, max_model_len=512,
                     images=ImageLimits(max_bytes=LIMIT))
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key="anything", max_retries=0, timeout=120)


def post(server, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + "/chat/completions", json={"max_tokens": 4, **body}, timeout=120)


def error_of(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    kind = "rate_limit_error" if status == 429 else "invalid_request_error"
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == kind, err
    assert "Traceback" not in resp.text
    return err


def reference(llm, messages: list[dict], **kw) -> tuple[str, list[int]]:
    """What the Python API answers (greedy): text and tokens."""
    rs = list(llm.stream_chat(messages, temperature=0, **kw))
    return "".join(r.text for r in rs), [r.token for r in rs]


def test_a_data_url_image_is_answered_as_the_python_api_answers_it(server, client, llm):
    r = client.chat.completions.create(model=NAME, messages=ask(image_part(DOG_URL)), max_tokens=8, temperature=0)
    text, tokens = reference(llm, ask({"type": "image", "image": DOG.read_bytes()}), max_tokens=8)
    assert r.choices[0].message.content == text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens == len(tokens)
    ids = llm.apply_chat_template(ask({"type": "image"}))
    assert ids.count(IMAGE_ID) == 1 and r.usage.prompt_tokens == len(ids)  # the <|image|> token counts
    other = data_url(_png(PASTA), "png")  # a PIL-made PNG: another image, another answer path
    r2 = client.chat.completions.create(model=NAME, messages=ask(image_part(other)), max_tokens=8, temperature=0)
    assert r2.choices[0].message.content == reference(llm, ask({"type": "image", "image": _png(PASTA)}),
                                                      max_tokens=8)[0]
    assert server.state.vision.pending == 0


def test_streaming_with_an_image_joins_to_the_same_answer_and_reports_usage(client, llm):
    chunks = list(client.chat.completions.create(model=NAME, messages=ask(image_part(DOG_URL)), max_tokens=8,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text, tokens = reference(llm, ask({"type": "image", "image": DOG.read_bytes()}), max_tokens=8)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] != []
    usage = chunks[-1].usage
    assert usage.prompt_tokens == len(llm.apply_chat_template(ask({"type": "image"})))
    assert usage.completion_tokens == len(tokens)


def test_only_the_last_image_is_attended_as_in_the_python_api(client, llm):
    small = data_url(_png(PASTA), "png")
    msgs = [*ask(image_part(small), text="First photo."), {"role": "assistant", "content": "A plate."},
            *ask(image_part(DOG_URL))]
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=6, temperature=0)
    only_last = [*ask(text="First photo."), {"role": "assistant", "content": "A plate."},
                 *ask({"type": "image", "image": DOG.read_bytes()})]
    assert r.choices[0].message.content == reference(llm, only_last, max_tokens=6)[0]
    assert r.usage.prompt_tokens == len(llm.apply_chat_template(only_last))  # one <|image|> token


def test_a_text_request_runs_while_an_image_request_generates(server, client):
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        image = pool.submit(client.chat.completions.create, model=NAME, messages=ask(image_part(DOG_URL)),
                            max_tokens=24, extra_body={"ignore_eos": True})
        text = pool.submit(client.chat.completions.create, model=NAME, messages=ask(), max_tokens=24,
                           extra_body={"ignore_eos": True})
        assert image.result().usage.completion_tokens == 24 and text.result().usage.completion_tokens == 24


def test_remote_image_urls_are_refused_without_the_flag(server):
    err = error_of(post(server, {"messages": ask(image_part("https://example.org/dog.jpg"))}), 400)
    assert "messages[0].content[0]: the image URL 'https://example.org/dog.jpg' is remote" in err["message"]
    assert "--allow-remote-images" in err["message"] and err["code"] == "remote_image_refused"
    assert err["param"] == "messages.0.content.0"


@pytest.mark.parametrize("url, message", [
    ("data:image/png;base64,iVBORw0KGgo###", "messages[0].content[0]: image data URL has invalid base64 data"),
    (data_url(b"hello, not a picture", "png"), "messages[0].content[0]: the data URL image (20 bytes) is not an "
                                               "image Pillow can read"),
    (data_url(_png(DOG)[:200], "png"), "messages[0].content[0]: the data URL image (200 bytes) is truncated or "
                                       "corrupt"),
    ("data:text/plain;base64,aGk=", "image data URL must look like 'data:image/<type>;base64,<data>'"),
    ("/etc/passwd", "the image URL must be a data:image/<type>;base64,<data> URL, got '/etc/passwd'"),
    ("file:///etc/passwd", "the image URL must be a data:image/<type>;base64,<data> URL, got 'file:///etc"),
])
def test_a_broken_image_is_a_400_naming_the_problem(server, url, message):
    err = error_of(post(server, {"messages": ask(image_part(url))}), 400)
    assert message in err["message"] and err["code"] == "invalid_image"


def test_image_parts_without_a_url_or_with_a_wrong_type(server):
    err = error_of(post(server, {"messages": ask({"type": "image_url", "image_url": {}})}), 400)
    assert "messages[0].content[0] has no image" in err["message"]
    err = error_of(post(server, {"messages": ask({"type": "image_url", "image_url": {"url": 42}})}), 400)
    assert "image_url.url must be a string" in err["message"]
    err = error_of(post(server, {"messages": ask(image_part(DOG_URL), {"type": "audio", "data": "x"})}), 400)
    assert "content part {'type': 'audio', 'data': 'x'} is not supported" in err["message"]


def test_an_image_over_the_limit_is_refused(server):
    err = error_of(post(server, {"messages": ask(image_part(data_url(PASTA.read_bytes())))}), 413)
    assert err["message"] == (f"messages[0].content[0]: the image is {PASTA.stat().st_size} bytes; this server "
                              f"accepts images of at most {LIMIT} bytes (--max-image-bytes)")
    assert err["code"] == "image_too_large"


def test_an_image_to_a_text_only_model_is_a_400(llm):
    config = TextConfig(vocab_size=128256, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512)
    torch.manual_seed(0)
    text_llm = LLM(model=LlamaForCausalLM(config).eval(), tokenizer=llm.tokenizer, config=config,
                   source=Path("tiny-text"))
    s = start_server(text_llm, model_name="tiny-text", max_concurrency=1, max_model_len=256)
    try:
        err = error_of(post(s, {"messages": ask(image_part(DOG_URL))}), 400)
        assert err["message"] == ("messages[0].content[0] is an image, but the model 'tiny-text' is text-only and "
                                  "cannot see images; send text only, or serve a Llama 3.2 Vision model")
        assert err["code"] == "model_not_vision"
        assert httpx.get(s.base_url + "/models").json()["data"][0]["input_modalities"] == ["text"]
    finally:
        s.close()


def test_the_model_card_says_it_sees_images(server):
    assert httpx.get(server.base_url + "/models").json()["data"][0]["input_modalities"] == ["text", "image"]


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture(scope="module")
def files():
    """A local HTTP server with the photos (the tests have no network)."""
    handler = functools.partial(_Files, directory=str(RESOURCES))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def remote_server(llm):
    s = start_server(llm, model_name=NAME, max_concurrency=1, max_model_len=512,
                     images=ImageLimits(allow_remote=True, max_bytes=LIMIT, fetch_timeout=10))
    yield s
    s.close()


def test_remote_image_urls_are_fetched_with_the_flag(remote_server, files, llm):
    r = post(remote_server, {"messages": ask(image_part(files + "/dog.jpg")), "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    expected = reference(llm, ask({"type": "image", "image": DOG.read_bytes()}), max_tokens=6)[0]
    assert r.json()["choices"][0]["message"]["content"] == expected
    err = error_of(post(remote_server, {"messages": ask(image_part(files + "/missing.jpg"))}), 400)
    assert f"fetching the image '{files}/missing.jpg' failed: HTTP 404" in err["message"]
    err = error_of(post(remote_server, {"messages": ask(image_part(files + "/pasta.jpeg"))}), 413)
    assert f"the image is {PASTA.stat().st_size} bytes" in err["message"] and "--max-image-bytes" in err["message"]
    err = error_of(post(remote_server, {"messages": ask(image_part("http://127.0.0.1:1/x.jpg"))}), 400)
    assert "cannot fetch the image 'http://127.0.0.1:1/x.jpg'" in err["message"]


def test_serve_help_documents_the_image_flags():
    from pocketllama.commands.serve import build_parser

    text = build_parser().format_help()
    assert "--allow-remote-images" in text and "--max-image-bytes" in text
    args = build_parser().parse_args(["--max-image-bytes", "5M", "--allow-remote-images"])
    assert args.max_image_bytes == 5 * 1024 * 1024 and args.allow_remote_images
    assert build_parser().parse_args([]).max_image_bytes == 20 * 1024 * 1024


def test_image_requests_obey_max_model_len_and_n(server):
    err = error_of(post(server, {"messages": ask(image_part(DOG_URL)), "max_tokens": 600}), 400)
    assert "this server's maximum context length is 512 tokens" in err["message"]
    assert err["code"] == "context_length_exceeded"
    r = post(server, {"messages": ask(image_part(DOG_URL)), "n": 2, "max_tokens": 3, "temperature": 1.0, "seed": 1})
    assert r.status_code == 200, r.text
    assert [c["index"] for c in r.json()["choices"]] == [0, 1] and r.json()["usage"]["completion_tokens"] <= 6
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}
    err = error_of(post(server, {"messages": ask(image_part(DOG_URL)), "tools": [tool]}), 400)  # as llm.chat
    assert "tools cannot be combined with images: Llama 3.2 Vision calls tools in text-only conversations" \
        in err["message"]


def test_a_sink_that_fails_does_not_stop_the_vision_thread():
    from pocketllama.engine.sampling import SamplingParams
    from pocketllama.server.vision_api import VisionRunner

    fake = _BlockingLLM()
    fake.go.set()
    runner = VisionRunner(fake, max_queue=2)

    def gone(event):
        raise RuntimeError("Event loop is closed")

    got = []
    runner.submit([], [SamplingParams()], [gone])
    h = runner.submit([], [SamplingParams()], [got.append])
    assert _wait(lambda: len(got) >= 2)  # the next request still runs
    h[0].cancel()
    assert _wait(lambda: runner.pending == 0)


class _BlockingLLM:
    """Stands in for an LLM: `stream_chat` yields a token every 10 ms once `go` is set, forever."""

    def __init__(self) -> None:
        self.go = threading.Event()

    def stream_chat(self, messages, **kw):
        i = 0
        while True:
            self.go.wait()
            time.sleep(0.01)
            yield i
            i += 1


def _wait(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


def test_the_vision_runner_runs_one_request_at_a_time_and_refuses_past_its_queue():
    from pocketllama.engine.batching import QueueFullError
    from pocketllama.engine.sampling import SamplingParams
    from pocketllama.server.vision_api import VisionRunner

    fake = _BlockingLLM()
    runner = VisionRunner(fake, max_queue=1)
    first, second = [], []
    h1 = runner.submit([], [SamplingParams()], [first.append])
    h2 = runner.submit([], [SamplingParams()], [second.append])
    with pytest.raises(QueueFullError, match=r"at capacity for image requests: one generating and 1 waiting "
                                             r"\(max_queue 1\); retry shortly"):
        runner.submit([], [SamplingParams()], [print])
    fake.go.set()
    assert _wait(lambda: len(first) >= 3) and second == []  # the second waits for the first
    h1[0].cancel()  # a client that went away: generation stops after the current token
    assert _wait(lambda: len(second) >= 3)
    stopped = len(first)
    h2[0].cancel()
    assert _wait(lambda: runner.pending == 0)
    time.sleep(0.05)
    assert len(first) == stopped


def test_a_streaming_image_request_that_is_dropped_stops_generating(server, client, llm, monkeypatch):
    made = []
    real = llm.stream_chat

    def slowed(*args, **kw):  # 10 ms a token: all 480 would take 5 s
        for r in real(*args, **kw):
            made.append(r)
            time.sleep(0.01)
            yield r

    monkeypatch.setattr(llm, "stream_chat", slowed)
    stream = client.chat.completions.create(model=NAME, messages=ask(image_part(DOG_URL)), max_tokens=480,
                                            stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    assert _wait(lambda: server.state.vision.pending == 0)
    assert 3 <= len(made) < 240, len(made)


def test_image_requests_past_the_queue_get_429(server, monkeypatch):
    from pocketllama.engine.sampling import SamplingParams
    from pocketllama.server.vision_api import VisionRunner

    fake = _BlockingLLM()
    busy = VisionRunner(fake, max_queue=0)
    handles = busy.submit([], [SamplingParams()], [lambda e: None])  # one image request generating
    monkeypatch.setattr(server.state, "vision", busy)
    try:
        resp = post(server, {"messages": ask(image_part(DOG_URL))})
        err = error_of(resp, 429)
        assert err["message"] == ("the server is at capacity for image requests: one generating and 0 waiting "
                                  "(max_queue 0); retry shortly")
        assert err["code"] == "rate_limit_exceeded" and resp.headers["Retry-After"] == "1"
    finally:
        handles[0].cancel()
        fake.go.set()

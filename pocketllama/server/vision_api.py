"""Images in POST /v1/chat/completions (Llama 3.2 Vision): OpenAI `image_url` parts are read (data URLs; http(s)
URLs only with `serve --allow-remote-images`), checked, and generated through `LLM.stream_chat` -- the Python
API's path and its one-image policy (pocketllama.vision) -- one request at a time beside the batching engine.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from ..chat_format import _IMAGE_PARTS, Message
from ..engine.batching import Event, QueueFullError
from ..engine.sampling import SamplingParams
from ..image_processing import decode_data_url, load_image
from ..vision import image_source, keep_last_image
from .errors import APIError

log = logging.getLogger("pocketllama.server")

DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024  # a phone photo is 2-8 MB; the model sees at most 4 tiles of 560 px
FETCH_TIMEOUT = 10.0  # seconds for a whole remote download (--allow-remote-images)
_FETCH_CHUNK = 64 * 1024


@dataclass(frozen=True)
class ImageLimits:
    """What the server accepts as an image: remote URLs or not, bytes per image, seconds per download."""

    allow_remote: bool = False
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    fetch_timeout: float = FETCH_TIMEOUT


def is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in _IMAGE_PARTS


def image_positions(contents: list[Any]) -> list[tuple[int, int]]:
    """(message index, part index) of every image part in the messages' contents."""
    return [(i, j) for i, c in enumerate(contents) if isinstance(c, list) for j, p in enumerate(c) if is_image_part(p)]


def refuse_text_only(llm: Any, model_name: str, where: tuple[int, int]) -> None:
    """400 when the served model cannot see images (checked before any image is read)."""
    if not getattr(llm.model, "accepts_images", False):
        i, j = where
        raise APIError(400, f"messages[{i}].content[{j}] is an image, but the model '{model_name}' is text-only "
                            "and cannot see images; send text only, or serve a Llama 3.2 Vision model",
                       param=f"messages.{i}.content.{j}", code="model_not_vision")


def check_parts(content: list[Any], where: str) -> list[dict[str, Any]]:
    """A vision message's content list: text and image parts only (a 400 names any other part)."""
    for part in content:
        if is_image_part(part) or (isinstance(part, dict) and part.get("type") == "text"
                                   and isinstance(part.get("text"), str)):
            continue
        raise APIError(400, f"{where}: content part {part!r} is not supported; use {{'type': 'text', 'text': ...}} "
                            "or {'type': 'image_url', 'image_url': {'url': 'data:image/...;base64,...'}}",
                       param=where.replace("[", ".").replace("]", ""), code="invalid_value")
    return list(content)


def read_images(messages: list[Message], limits: ImageLimits) -> list[Message]:
    """Every image part replaced by `{"type": "image", "image": <RGB PIL image>}`, or APIError (400 / 413) that
    names the part and the problem. Blocking (decoding, downloads): run it in a worker thread."""
    out = []
    for i, msg in enumerate(messages):
        content = msg.get("content")
        if not isinstance(content, list):
            out.append(msg)
            continue
        parts = []
        for j, part in enumerate(content):
            if is_image_part(part):
                part = {"type": "image", "image": read_image(part, f"messages[{i}].content[{j}]", limits)}
            parts.append(part)
        out.append({**msg, "content": parts})
    return out


def read_image(part: dict[str, Any], where: str, limits: ImageLimits) -> Any:
    """One image part -> an RGB PIL image. Only data:image URLs, and http(s) URLs when allowed; never a path."""
    param = where.replace("[", ".").replace("]", "")
    try:
        url = image_source(part, where)
    except ValueError as e:
        raise APIError(400, str(e), param=param, code="invalid_image") from None
    if not isinstance(url, str):
        raise APIError(400, f"{where}: image_url.url must be a string (a data:image/...;base64 URL), got "
                            f"{type(url).__name__}", param=param, code="invalid_image")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        try:
            data = decode_data_url(url)
        except ValueError as e:
            raise APIError(400, f"{where}: {e}", param=param, code="invalid_image") from None
        _check_size(len(data), where, param, limits)
        what = f"the data URL image ({len(data)} bytes)"
    elif scheme in ("http", "https"):
        if not limits.allow_remote:
            raise APIError(400, f"{where}: the image URL {url[:80]!r} is remote, and this server does not download "
                                "images; send the image inline as a data:image/...;base64 URL, or start the server "
                                "with --allow-remote-images", param=param, code="remote_image_refused")
        data = fetch_image(url, where, param, limits)
        what = f"the image at {url[:80]!r} ({len(data)} bytes)"
    else:
        raise APIError(400, f"{where}: the image URL must be a data:image/<type>;base64,<data> URL"
                            f"{' or an http(s) URL' if limits.allow_remote else ''}, got {url[:40]!r}",
                       param=param, code="invalid_image")
    try:
        return load_image(data)
    except ValueError as e:
        reason = str(e).split(" is ", 1)[-1] if " is " in str(e) else str(e)
        raise APIError(400, f"{where}: {what} is {reason}", param=param, code="invalid_image") from None


def _check_size(size: int, where: str, param: str, limits: ImageLimits, at_least: bool = False) -> None:
    if size > limits.max_bytes:
        raise APIError(413, f"{where}: the image is {'more than ' if at_least else ''}{size} bytes; this server "
                            f"accepts images of at most {limits.max_bytes} bytes (--max-image-bytes)",
                       param=param, code="image_too_large")


def fetch_image(url: str, where: str, param: str, limits: ImageLimits) -> bytes:
    """GET an http(s) image with the standard library: redirects only to http(s), the whole download within
    `limits.fetch_timeout` seconds, at most `limits.max_bytes` read."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.HTTPHandler, urllib.request.HTTPSHandler, urllib.request.HTTPRedirectHandler,
                    urllib.request.HTTPDefaultErrorHandler, urllib.request.HTTPErrorProcessor):
        opener.add_handler(handler())  # no file:, ftp: or data: handlers: a redirect cannot reach them
    request = urllib.request.Request(url, headers={"User-Agent": "pocketllama", "Accept": "image/*"})
    deadline = time.monotonic() + limits.fetch_timeout
    try:
        with opener.open(request, timeout=limits.fetch_timeout) as resp:
            length = resp.headers.get("Content-Length", "")
            if length.isdigit():
                _check_size(int(length), where, param, limits)
            buf = io.BytesIO()
            while chunk := resp.read(_FETCH_CHUNK):
                buf.write(chunk)
                if buf.tell() > limits.max_bytes:
                    _check_size(buf.tell(), where, param, limits, at_least=True)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the download took more than {limits.fetch_timeout:g} s")
            return buf.getvalue()
    except urllib.error.HTTPError as e:
        raise APIError(400, f"{where}: fetching the image {url[:80]!r} failed: HTTP {e.code} {e.reason}",
                       param=param, code="image_fetch_failed") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise APIError(400, f"{where}: cannot fetch the image {url[:80]!r}: {reason}", param=param,
                       code="image_fetch_failed") from None


def apply_image_policy(messages: list[Message]) -> tuple[list[Message], list[Message]]:
    """(messages for generation, the prompt's messages): `vision.keep_last_image` -- the Python API's one-image
    policy -- applied once here so that the prompt can be counted and checked before generation; the
    generation messages keep the last image only, so `LLM.stream_chat` applies the same policy to them as a
    no-op. Dropped earlier images are logged."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prompt_messages, source = keep_last_image(messages)
    for w in caught:
        log.info("chat request: %s", w.message)
    if source is None:
        return messages, prompt_messages
    generation = [{**m, "content": [{**p, "image": source} if p == {"type": "image"} else p for p in m["content"]]}
                  if isinstance(m.get("content"), list) else m for m in prompt_messages]
    return generation, prompt_messages


def text_view(messages: list[Message]) -> list[Message]:
    """The messages with image parts removed and text parts joined (what a text-only guard model reads)."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            m = {**m, "content": "".join(p.get("text", "") for p in content if not is_image_part(p))}
        out.append(m)
    return out


class _Handle:
    """Cancels one choice of a vision request (checked before it starts and after every token)."""

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Job:
    messages: list[Message]
    params: list[SamplingParams]
    sinks: list[Callable[[Event], None]]
    handles: list[_Handle]


class VisionRunner:
    """Generates the chat requests that carry an image, one request at a time on its own thread.

    The BatchEngine does not batch them: an image's cross-attention K/V live in a request's own KV cache
    (`MllamaCache.vision`), and a text row batched beside an image row would run the cross-attention layers
    that a text-only request skips. So each image request runs alone (its choices one after another) through
    `LLM.stream_chat` -- the same code as `llm.chat(...)` in Python (which refuses tools beside an image, so
    the server does too) -- while the engine keeps batching text
    requests on its own thread (the weights are only read; each side has its own KV cache). At most
    `max_queue` image requests wait; more get QueueFullError (HTTP 429).
    """

    def __init__(self, llm: Any, max_queue: int) -> None:
        self.llm, self.max_queue = llm, max_queue
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0  # running + waiting requests
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, messages: list[Message], params: list[SamplingParams], sinks: list[Callable[[Event], None]]
               ) -> list[_Handle]:
        """Queue one request (choice i: params[i], events to sinks[i]); returns a cancel handle per choice."""
        with self._lock:
            if self._pending >= self.max_queue + 1:
                raise QueueFullError(f"the server is at capacity for image requests: one generating and "
                                     f"{self._pending - 1} waiting (max_queue {self.max_queue}); retry shortly",
                                     retry_after=1.0)
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pocketllama-vision", daemon=True)
                self._thread.start()
        handles = [_Handle() for _ in params]
        self._jobs.put(_Job(messages, params, sinks, handles))
        return handles

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                self._generate(job)
            except Exception:  # never let the thread die: later image requests would wait forever
                log.exception("image request failed")
            finally:
                with self._lock:
                    self._pending -= 1

    def _generate(self, job: _Job) -> None:
        for params, sink, handle in zip(job.params, job.sinks, job.handles, strict=True):
            if handle.cancelled:
                continue
            sampling = {f.name: getattr(params, f.name) for f in fields(params)}
            try:
                stream = self.llm.stream_chat(job.messages, **sampling)
                for response in stream:
                    if not _emit(sink, response, handle) or handle.cancelled:
                        stream.close()
                        break
            except Exception as e:  # reported to this request only; the thread serves the next one
                log.warning("image request failed: %s", e, exc_info=True)
                _emit(sink, e, handle)
                return


def _emit(sink: Callable[[Event], None], event: Event, handle: _Handle) -> bool:
    """Hand one event to the request; a consumer that is gone (its event loop closed) cancels the choice."""
    try:
        sink(event)
        return True
    except Exception:
        log.debug("dropping an event for a consumer that is gone", exc_info=True)
        handle.cancel()
        return False

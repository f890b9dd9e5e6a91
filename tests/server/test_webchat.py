"""The web chat page in a real browser (Debian's headless Chromium driven by Playwright) against the real
server and SmolLM2: a typed question gets a streamed markdown answer, Stop ends a generation and frees its
slot, a refusal shows a readable error; on a tiny random Llama 3.2 Vision model an attached photo goes out as an
image_url data-URL part and shows in the transcript. Screenshots go to test-artifacts/."""

from __future__ import annotations

import base64
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from serving import (
    ARTIFACTS,
    one_torch_thread,  # noqa: F401 (a fixture)
    smollm2,
    start_server,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SLOW = 180_000  # ms: generation on a busy 2-core machine


@pytest.fixture(scope="module")
def server():
    s = start_server(smollm2(), max_concurrency=2, max_model_len=512)
    yield s
    s.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium; `make test` "
                    f"does it); found on PATH: {shutil.which('chromium')}")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


def _open_page(browser, url: str, model_name: str):
    """The chat page at `url`, once it shows `model_name`; afterwards, no JavaScript error may have happened."""
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(url + "/")
    pg.wait_for_function(f"document.getElementById('model').textContent.includes('{model_name}')")
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture
def page(server, browser):
    yield from _open_page(browser, server.url, "smollm2-135m")


@pytest.fixture(scope="module")
def vision_server(tmp_path_factory):
    from mllama_fixtures import save_vision_checkpoint

    import pocketllama

    path = tmp_path_factory.mktemp("tiny_vision_webchat")
    save_vision_checkpoint(path)
    s = start_server(pocketllama.load(path, dtype="float32"), model_name="tiny-vision", max_concurrency=1,
                     max_model_len=512)
    yield s
    s.close()


@pytest.fixture
def vision_page(vision_server, browser):
    yield from _open_page(browser, vision_server.url, "tiny-vision")


def requests_to_api(pg) -> list[dict]:
    sent: list[dict] = []
    pg.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else None)
    return sent


def ask(pg, text: str) -> None:
    pg.fill("#prompt", text)
    pg.press("#prompt", "Enter")


def test_a_question_gets_a_streamed_answer_with_history_system_prompt_and_temperature(page, server):
    sent = requests_to_api(page)
    page.click("#toggle-settings")
    page.fill("#system", "You are a helpful assistant. Answer briefly.")
    page.eval_on_selector("#temperature", "el => { el.value = '0'; el.dispatchEvent(new Event('input')); }")
    assert page.text_content("#temperature-value") == "0.0"
    # record every text the answer bubble shows, to see it grow token by token
    page.evaluate("""() => { window.seen = []; new MutationObserver(() => {
        const b = document.querySelector('.msg.assistant'); if (b) window.seen.push(b.textContent);
    }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true}); }""")
    ask(page, "What is the capital of France?")
    page.wait_for_selector(".msg.assistant[data-done]", timeout=SLOW)
    bubble = page.locator(".msg.assistant").first
    assert bubble.get_attribute("data-done") == "done"
    assert "Paris" in bubble.inner_text()
    partial = {t for t in page.evaluate("window.seen") if t}
    assert len(partial) >= 3, partial  # streamed: the answer appeared piece by piece
    assert page.is_hidden("#stop") and page.is_enabled("#send")
    assert page.is_hidden("#attach")  # a text-only model: no image button
    body = sent[0]
    assert body["stream"] is True and body["temperature"] == 0 and body["model"] == "smollm2-135m"
    assert body["messages"] == [{"role": "system", "content": "You are a helpful assistant. Answer briefly."},
                                {"role": "user", "content": "What is the capital of France?"}]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "webchat-answer.png"), full_page=True)
    ask(page, "And of Germany?")  # multi-turn: the history goes with the next question
    page.wait_for_selector(".msg.assistant >> nth=1", timeout=SLOW)
    page.wait_for_function("document.querySelectorAll('.msg.assistant[data-done]').length == 2", timeout=SLOW)
    assert [m["role"] for m in sent[1]["messages"]] == ["system", "user", "assistant", "user"]
    assert sent[1]["messages"][2]["content"] == bubble.inner_text().strip()


def test_stop_ends_the_generation_and_frees_the_slot(page, server):
    ask(page, "Write a very long story about a dragon who learns to cook. Use many chapters.")
    page.wait_for_function("(document.querySelector('.msg.assistant')?.textContent || '').length > 20",
                           timeout=SLOW)
    assert page.is_visible("#stop")
    page.click("#stop")
    page.wait_for_selector(".msg.assistant[data-done='stopped']", timeout=30_000)
    assert page.inner_text(".msg.assistant .note") == "stopped"
    assert page.is_hidden("#stop") and page.is_enabled("#send")
    assert server.wait_metric("pocketllama_running_sequences", 0, timeout=10) == 0
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "webchat-stopped.png"))


def test_a_refused_request_shows_a_readable_error(page):
    ask(page, "word " * 700)  # beyond the server's 512-token context
    page.wait_for_selector(".error", timeout=60_000)
    text = page.inner_text(".error")
    assert "The server refused the request" in text
    assert "HTTP 400" in text and "maximum context length is 512 tokens" in text
    assert "{" not in text  # the message, not raw JSON
    assert page.is_enabled("#send") and page.locator(".msg.assistant").count() == 0
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "webchat-error.png"))


def test_markdown_rendering_is_safe_and_handles_code_blocks(page):
    html = page.evaluate("""() => renderMarkdown(
        "# Title\\nSome **bold**, *italic* and `x < y` code.\\n\\n- one\\n- two\\n\\n1. first\\n2. second\\n\\n" +
        "```python\\nprint('<b>hi</b>')\\n```\\n<script>alert(1)</script> [site](https://example.org) " +
        "[bad](javascript:alert(1))\\n\\n```\\nunclosed fence while streaming")""")
    assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html and "<em>italic</em>" in html
    assert "<code>x &lt; y</code>" in html
    assert "<ul><li>one</li><li>two</li></ul>" in html and "<ol><li>first</li><li>second</li></ol>" in html
    assert '<code class="language-python">print(\'&lt;b&gt;hi&lt;/b&gt;\')</code>' in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert '<a href="https://example.org" target="_blank" rel="noopener noreferrer">site</a>' in html
    assert 'href="javascript' not in html
    assert "unclosed fence while streaming</code></pre>" in html


DOG = Path(importlib.util.find_spec("llama_models").origin).parent / "resources" / "dog.jpg"


def test_an_attached_image_is_sent_as_a_data_url_part_and_shown(vision_page):
    page = vision_page
    sent = requests_to_api(page)
    assert page.is_visible("#attach") and page.is_hidden("#attachment")
    page.set_input_files("#image-input", str(DOG))
    page.wait_for_selector("#attachment:not([hidden])")
    assert page.get_attribute("#thumb", "src").startswith("data:image/jpeg;base64,")
    page.click("#remove-image")  # the remove control drops it
    assert page.is_hidden("#attachment")
    page.set_input_files("#image-input", str(DOG))
    page.wait_for_selector("#attachment:not([hidden])")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "webchat-image-attached.png"))
    ask(page, "What is in this photo?")
    page.wait_for_selector(".msg.assistant[data-done]", timeout=60_000)
    assert page.get_attribute(".msg.assistant", "data-done") == "done"
    assert page.inner_text(".msg.assistant").strip()  # gibberish from a random model, but an answer
    assert page.locator(".error").count() == 0
    expected = "data:image/jpeg;base64," + base64.b64encode(DOG.read_bytes()).decode()
    assert sent[0]["messages"] == [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": expected}}, {"type": "text", "text": "What is in this photo?"}]}]
    assert page.get_attribute(".msg.user img", "src") == expected  # the transcript shows the photo
    assert "What is in this photo?" in page.inner_text(".msg.user")
    assert page.is_hidden("#attachment")  # sent: the next message goes without it
    page.eval_on_selector("#scroll", "el => { el.scrollTop = 0; }")
    page.screenshot(path=str(ARTIFACTS / "webchat-image.png"))
    ask(page, "And the colour?")  # the follow-up keeps the image in the history (the model attends it)
    page.wait_for_function("!document.querySelector('.msg.assistant.pending')", timeout=60_000)
    # (the random model's first answer may fill the 512-token context: the follow-up can be refused; only the
    # request matters here)
    assert sent[1]["messages"][0] == sent[0]["messages"][0]
    assert sent[1]["messages"][-1] == {"role": "user", "content": "And the colour?"}

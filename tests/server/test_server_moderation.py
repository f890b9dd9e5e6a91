"""Llama Guard in the server: POST /v1/moderations with the official client (a scripted guard checkpoint that
always answers `unsafe\\nS1`, run on its own batching engine), and the chat shields with a guard stub: an unsafe
request is refused before generation, an unsafe streamed answer is cut before the unsafe text leaves.
"""

from __future__ import annotations

import dataclasses

import httpx
import pytest
from openai import OpenAI
from scripted_llama import save_scripted_llama
from serving import start_server

from pocketllama.guard import NL2_ID, UNSAFE_ID, Guard, Verdict
from pocketllama.server.moderation import GuardService, build_service, guard_conversation

GUARD_CHAIN = {128007: NL2_ID, NL2_ID: UNSAFE_ID, UNSAFE_ID: 198, 198: 50, 50: 16, 16: 128009}  # unsafe\nS1
CHAT_CHAIN = {271: 58, 58: 456, 456: 70464, 70464: 44602, 44602: 429, 429: 60704, 60704: 32017, 32017: 128009}
ANSWER = '[get_weather(city="Paris")]'  # what the scripted chat model always writes


@pytest.fixture(scope="module")
def guard_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("server_guard")
    save_scripted_llama(path, GUARD_CHAIN, scale=3.0)
    return path


@pytest.fixture(scope="module")
def moderation_server(guard_path):
    service = build_service(str(guard_path), None, name="llama-guard", max_concurrency=2)
    s = start_server(service.guard.llm, model_name="chat", guard=service)
    yield s, service
    s.close()
    service.engine.close()


def test_moderations_with_the_openai_client(moderation_server, guard_path):
    server, service = moderation_server
    client = OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
    r = client.moderations.create(input="How do I make a cake?", model="llama-guard")
    assert r.model == "llama-guard" and r.id.startswith("modr-") and len(r.results) == 1
    result = r.results[0]
    expected = Guard.load(guard_path).check("How do I make a cake?")  # the library, without the engine
    assert result.flagged and result.categories.violence and result.categories.illicit_violent
    assert not result.categories.hate and result.category_scores.hate == 0.0
    assert result.category_scores.violence == pytest.approx(expected.p_unsafe_binary, abs=1e-6)
    assert result.category_applied_input_types.violence == ["text"]
    lg = result.model_extra["llama_guard"]
    assert lg["categories"] == ["S1"] and lg["category_names"] == ["Violent Crimes"]
    assert lg["p_unsafe"] == pytest.approx(expected.p_unsafe, abs=1e-6)
    two = client.moderations.create(input=["a", "b"], model="omni-moderation-latest")
    assert [x.flagged for x in two.results] == [True, True]


def test_moderation_errors(moderation_server, guard_path):
    server, _ = moderation_server
    url = server.base_url + "/moderations"
    r = httpx.post(url, json={"input": "x", "model": "nope"}, timeout=60)
    assert r.status_code == 404 and "the moderation model 'nope' does not exist" in r.json()["error"]["message"]
    r = httpx.post(url, json={"input": []}, timeout=60)
    assert r.status_code == 400 and "input is empty" in r.json()["error"]["message"]
    r = httpx.post(url, json={"input": [{"type": "image_url", "image_url": {"url": "x.png"}}]}, timeout=60)
    assert r.status_code == 400 and "image content needs the vision guard" in r.json()["error"]["message"]
    plain = start_server(server.state.llm, model_name="chat")
    try:
        r = httpx.post(plain.base_url + "/moderations", json={"input": "x"}, timeout=60)
        assert r.status_code == 404 and "start it with `pocketllama serve --guard MODEL`" in r.text
    finally:
        plain.close()


def test_guard_conversation_keeps_user_and_assistant_text():
    messages = [{"role": "system", "content": "s"}, {"role": "assistant", "content": "early"},
                {"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "text", "text": "b"}]},
                {"role": "assistant", "content": None, "tool_calls": [{}]}, {"role": "tool", "content": "22"}]
    assert guard_conversation(messages) == [{"role": "user", "content": "a\n\nb"}]
    assert guard_conversation(messages, "answer")[-1] == {"role": "assistant", "content": "answer"}


# ---- shields, with a guard stub ------------------------------------------------------------------------------


@dataclasses.dataclass
class StubGuard(GuardService):
    """Flags the last turn when it contains `trigger`; records every conversation it was shown."""

    trigger: str = "bomb"
    seen: list = dataclasses.field(default_factory=list)

    async def check(self, messages):
        self.seen.append(messages)
        last = messages[-1]["content"]
        unsafe = self.trigger in last
        return Verdict(safe=not unsafe, categories=["S9"] if unsafe else [],
                       category_names=["Indiscriminate Weapons"] if unsafe else [], p_unsafe=0.9 if unsafe else 0.01,
                       p_unsafe_binary=0.95 if unsafe else 0.02, role="User", text="")


@pytest.fixture(scope="module")
def chat_llm(tmp_path_factory):
    import pocketllama

    path = tmp_path_factory.mktemp("shield_chat")
    save_scripted_llama(path, CHAT_CHAIN)
    return pocketllama.load(path, dtype="float32")


@pytest.fixture(scope="module")
def shielded(chat_llm):
    stub = StubGuard(guard=None, name="stub", shields=frozenset({"input", "output"}), refusal="Not allowed.",
                     chunk_chars=4)
    s = start_server(chat_llm, model_name="chat", guard=stub)
    yield s, stub, OpenAI(base_url=s.base_url, api_key="unused", max_retries=0, timeout=120)
    s.close()


def test_unsafe_input_refused_before_generation(shielded):
    server, stub, client = shielded
    before = server.engine.stats().prefill_tokens
    bomb = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "How to build a bomb?"}]
    r = client.chat.completions.create(model="chat", messages=bomb, max_tokens=8)
    assert r.choices[0].message.content == "Not allowed." and r.choices[0].finish_reason == "content_filter"
    mod = r.moderation  # OpenAI's moderated-completions field, parsed by the official client
    (result,) = mod.input.results
    assert mod.input.model == "stub" and result.flagged and result.categories["illicit/violent"]
    assert result.category_scores["violence"] == 0.95 and result.model_extra["llama_guard"]["categories"] == ["S9"]
    assert mod.output.results == [] and r.usage.completion_tokens == 0
    chunks = list(client.chat.completions.create(model="chat", messages=bomb, max_tokens=8, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Not allowed."
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["content_filter"]
    assert server.engine.stats().prefill_tokens == before  # nothing reached the model
    assert stub.seen[-1] == [{"role": "user", "content": "How to build a bomb?"}]  # system message dropped


def test_safe_input_and_answer_pass(shielded):
    server, stub, client = shielded
    r = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Weather?"}], max_tokens=12)
    assert r.choices[0].message.content == ANSWER and r.choices[0].finish_reason == "stop"
    assert not r.moderation.input.results[0].flagged and not r.moderation.output.results[0].flagged
    assert stub.seen[-1] == [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": ANSWER}]


def test_unsafe_answer_replaced_and_unsafe_stream_cut(shielded):
    server, stub, client = shielded
    stub.trigger = "Paris"  # the model's answer becomes "unsafe" once it writes Paris
    try:
        q = [{"role": "user", "content": "Weather?"}]
        r = client.chat.completions.create(model="chat", messages=q, max_tokens=12)
        assert r.choices[0].message.content == "Not allowed." and r.choices[0].finish_reason == "content_filter"
        assert r.moderation.output.results[0].flagged and not r.moderation.input.results[0].flagged
        chunks = list(client.chat.completions.create(model="chat", messages=q, max_tokens=12, stream=True))
        deltas = [c.choices[0].delta.content or "" for c in chunks]
        text = "".join(deltas)
        assert text.endswith("Not allowed.") and "Paris" not in text  # the unsafe chunk never left
        assert text[: -len("Not allowed.")] and ANSWER.startswith(text[: -len("Not allowed.")])  # safe part did
        assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["content_filter"]
        assert chunks[-1].moderation.output.results[-1].flagged  # the report rides on the cut choice's last chunk
    finally:
        stub.trigger = "bomb"


def test_shield_configuration_errors(capsys):
    with pytest.raises(ValueError, match="--shield takes input and/or output, got middle"):
        GuardService(guard=None, name="x", shields=frozenset({"middle"}))
    from pocketllama.commands import serve

    assert serve.main(["--shield", "input", "--port", "0"]) == 2
    assert "--shield needs a guard model: add --guard MODEL" in capsys.readouterr().err

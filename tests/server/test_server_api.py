"""The OpenAI API of `pocketllama serve`, driven with the official `openai` client against the real server
(uvicorn on loopback) and the real SmolLM2 model: outputs equal the library's own generation for the same
request (translation only), usage equals token counts, streaming, seeds, stops, logprobs, models, metrics."""

from __future__ import annotations

import json

import httpx
import pytest
from openai import OpenAI
from serving import (
    one_torch_thread,  # noqa: F401 (a fixture)
    smollm2,
    start_server,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server():
    s = start_server(smollm2(), max_concurrency=4)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def reference(messages, **sampling):
    """The library's answer to the same request (same chat format, SamplingParams, stop rules); memoized."""
    key = json.dumps([messages, sampling], sort_keys=True)
    if key not in _REFERENCES:
        llm = smollm2()
        ids = llm.apply_chat_template(messages)
        _REFERENCES[key] = ids, llm.generate(ids, **sampling)
    return _REFERENCES[key]


_REFERENCES: dict[str, tuple] = {}


def test_chat_answer_and_usage_equal_the_library_generation(client):
    r = client.chat.completions.create(model="smollm2-135m", messages=QUESTION, max_tokens=24, temperature=0)
    ids, ref = reference(QUESTION, max_tokens=24)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == ref.text
    assert "Paris" in choice.message.content
    assert choice.finish_reason == ref.finish_reason == "stop"
    assert r.object == "chat.completion" and r.model == "smollm2-135m" and r.id.startswith("chatcmpl-")
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(ref.tokens)  # includes the stop token, as generated
    assert r.usage.total_tokens == len(ids) + len(ref.tokens)


def test_streaming_chat_chunks_join_to_the_same_answer_and_end_with_usage(server, client):
    stream = client.chat.completions.create(model="smollm2-135m", messages=QUESTION, max_tokens=24,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    ids, ref = reference(QUESTION, max_tokens=24)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) >= 5  # streamed token by token, not in one piece
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(ids)
    assert chunks[-1].usage.completion_tokens == len(ref.tokens)
    assert all(c.usage is None for c in chunks[:-1])
    # the raw stream is SSE ending in [DONE]
    with httpx.stream("POST", server.base_url + "/chat/completions", timeout=120,
                      json={"messages": QUESTION, "max_tokens": 3, "stream": True}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_text_completions_plain_and_streamed_with_logprobs(client):
    llm = smollm2()
    prompt = "The capital of France is"
    ref = llm.generate(prompt, max_tokens=8, logprobs=True, top_logprobs=2)
    r = client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=8, temperature=0, logprobs=2)
    assert r.object == "text_completion" and r.choices[0].text == ref.text
    assert r.usage.prompt_tokens == ref.prompt_tokens and r.usage.completion_tokens == ref.generation_tokens
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(ref.logprobs, abs=1e-4)
    assert "".join(lp.tokens) == ref.text and lp.text_offset[0] == 0
    assert all(len(t) == 2 for t in lp.top_logprobs)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2-135m", prompt=prompt, max_tokens=8, temperature=0, stream=True))
    assert streamed == ref.text
    # a prompt given as token ids, and a batch of two prompts
    ids = llm.tokenizer.encode(prompt)
    r1 = client.completions.create(model="smollm2-135m", prompt=ids, max_tokens=8, temperature=0)
    r2 = client.completions.create(model="smollm2-135m", prompt=[prompt, prompt], max_tokens=8, temperature=0)
    assert r1.choices[0].text == ref.text
    assert [c.text for c in r2.choices] == [ref.text, ref.text] and [c.index for c in r2.choices] == [0, 1]
    assert r2.usage.prompt_tokens == 2 * ref.prompt_tokens


def test_chat_logprobs_match_the_model_distribution(client):
    r = client.chat.completions.create(model="smollm2-135m", messages=QUESTION, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3)
    _, ref = reference(QUESTION, max_tokens=6, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx(ref.logprobs, abs=1e-4)
    assert "".join(c.token for c in content) == r.choices[0].message.content
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
               for c in content)
    assert bytes(content[0].bytes).decode() == content[0].token


def test_seeded_sampling_is_deterministic_and_n_choices_differ(client):
    kw = dict(model="smollm2-135m", messages=[{"role": "user", "content": "Tell me a fun fact."}],
              max_tokens=8, temperature=1.0, top_p=0.95)
    a = client.chat.completions.create(seed=1234, **kw)
    b = client.chat.completions.create(seed=1234, **kw)
    c = client.chat.completions.create(seed=99, **kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.content != c.choices[0].message.content
    _, ref = reference(kw["messages"], max_tokens=8, temperature=1.0, top_p=0.95, seed=1234)
    assert a.choices[0].message.content == ref.text
    two = client.chat.completions.create(seed=1234, n=2, **kw)
    assert [ch.index for ch in two.choices] == [0, 1]
    assert two.choices[0].message.content == a.choices[0].message.content  # choice i uses seed + i
    assert two.choices[1].message.content != two.choices[0].message.content
    one, other = (reference(kw["messages"], max_tokens=8, temperature=1.0, top_p=0.95, seed=s)[1]
                  for s in (1234, 1235))
    assert other.text == two.choices[1].message.content
    assert two.usage.completion_tokens == len(one.tokens) + len(other.tokens)  # usage sums the choices


def test_stop_sequences_penalties_and_logit_bias_are_honoured(client):
    r = client.chat.completions.create(model="smollm2-135m", messages=QUESTION, max_tokens=24, temperature=0,
                                       stop=[" Paris", "zzz"])
    assert r.choices[0].message.content == "The capital of France is"
    assert r.choices[0].finish_reason == "stop"
    paris = smollm2().tokenizer.encode(" Paris")[0]
    kw = dict(max_tokens=12, presence_penalty=0.5, frequency_penalty=0.3, logit_bias={paris: -100.0})
    r = client.chat.completions.create(model="smollm2-135m", messages=QUESTION, temperature=0,
                                       presence_penalty=0.5, frequency_penalty=0.3, max_tokens=12,
                                       logit_bias={str(paris): -100}, user="test-user")
    _, ref = reference(QUESTION, **kw)
    assert r.choices[0].message.content == ref.text and paris not in ref.tokens
    r = client.completions.create(model="smollm2-135m", prompt="1, 2, 3, 4,", max_tokens=16, temperature=0,
                                  stop="7")
    assert r.choices[0].text.rstrip().endswith("6,") and "7" not in r.choices[0].text


def test_content_parts_system_and_developer_roles(client):
    parts = [{"role": "developer", "content": "Answer in one word."},
             {"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                          {"type": "text", "text": "of France?"}]}]
    r = client.chat.completions.create(model="smollm2-135m", messages=parts, max_tokens=8, temperature=0)
    _, ref = reference([{"role": "system", "content": "Answer in one word."},
                        {"role": "user", "content": "What is the capital of France?"}], max_tokens=8)
    assert r.choices[0].message.content == ref.text


def test_models_health_and_metrics(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["smollm2-135m"]
    assert client.models.retrieve("smollm2-135m").id == "smollm2-135m"
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "smollm2-135m"
    before = server.metric("pocketllama_generation_tokens_total")
    r = client.chat.completions.create(model="smollm2-135m", messages=QUESTION, max_tokens=5, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    assert server.metric("pocketllama_generation_tokens_total") == before + r.usage.completion_tokens
    assert 'pocketllama_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert "# TYPE pocketllama_time_to_first_token_seconds histogram" in text
    assert server.metric("pocketllama_time_to_first_token_seconds_count") >= 1
    assert server.metric("pocketllama_inter_token_latency_seconds_count") >= 4
    assert server.metric("pocketllama_time_to_first_token_seconds_bucket", 'le="+Inf"') == \
        server.metric("pocketllama_time_to_first_token_seconds_count")
    for gauge in ("queue_depth", "running_sequences", "max_concurrency", "kv_cache_bytes"):
        assert f"\npocketllama_{gauge} " in text
    assert server.metric("pocketllama_max_concurrency") == 4
    assert server.metric("pocketllama_running_sequences") == 0


def test_web_page_is_served_self_contained(server):
    resp = httpx.get(server.url + "/")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    html = resp.text
    assert "/v1/chat/completions" in html and 'id="stop"' in html
    # no external resources: every src/href is inline, relative or a data: URI
    for attr in ("src=", "href="):
        for chunk in html.split(attr)[1:]:
            target = chunk[1:].split(chunk[0], 1)[0]
            assert not target.startswith(("http:", "https:", "//")), target
    assert json.loads(httpx.get(server.url + "/health").text)["status"] == "ok"

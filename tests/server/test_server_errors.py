"""Every error the server returns, with its OpenAI-style body: 400 (unsupported or invalid fields, context
limit), 401 (API key), 404, 405, 413, 422 (schema), 429 (queue full, Retry-After), 500 (no internals leak);
and a failing request never takes the server down. A tiny random model keeps these fast."""

from __future__ import annotations

import contextlib

import httpx
import openai
import pytest
from openai import OpenAI
from serving import start_server, tiny

HI = [{"role": "user", "content": "Hi"}]
KEY = "sekret-key-123"


@pytest.fixture(scope="module")
def server():
    s = start_server(tiny(), max_concurrency=2, max_queue=1, max_model_len=8192, max_body_bytes=64 * 1024)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key="anything", max_retries=0, timeout=60)


def error_of(resp: httpx.Response, status: int) -> dict:
    """The OpenAI error object of a response, after checking its status and shape."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert "Traceback" not in resp.text and 'File "' not in resp.text
    return err


def post(server, path: str, json: dict | None = None, **kw) -> httpx.Response:
    return httpx.post(server.base_url + path, json=json, timeout=60, **kw)


@pytest.mark.parametrize("field, value", [
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}),
    ("response_format", {"type": "json_object"}),
    ("functions", [{"name": "f"}]),
    ("audio", {"voice": "alloy", "format": "wav"}),
])
def test_unsupported_chat_fields_get_400_naming_the_field(server, client, field, value):
    err = error_of(post(server, "/chat/completions", {"messages": HI, "max_tokens": 2, field: value}), 400)
    assert err["param"] == field and err["code"] == "unsupported_parameter"
    assert f"'{field}' is not supported by pocketllama" in err["message"]
    assert err["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match=field):  # what an app using the official client sees
        client.chat.completions.create(model="smollm2-135m", messages=HI, max_tokens=2, **{field: value})


def test_unknown_and_completion_only_fields(server, client):
    err = error_of(post(server, "/chat/completions", {"messages": HI, "frobnicate": 1}), 400)
    assert err["param"] == "frobnicate" and "unrecognized request argument 'frobnicate'" in err["message"]
    err = error_of(post(server, "/completions", {"prompt": "a", "suffix": "z"}), 400)
    assert err["param"] == "suffix" and "suffix" in err["message"]
    err = error_of(post(server, "/completions", {"prompt": "a", "echo": True}), 400)
    assert err["param"] == "echo"
    # harmless values of those fields are accepted
    ok = client.chat.completions.create(model="smollm2-135m", messages=HI, max_tokens=2,
                                        response_format={"type": "text"}, tool_choice="none", store=False,
                                        metadata={"a": "b"})
    assert ok.choices[0].message.content is not None
    assert post(server, "/completions", {"prompt": "a", "max_tokens": 1, "best_of": 1}).status_code == 200


def test_context_limit_gets_400_naming_the_limit(server, client):
    long = [{"role": "user", "content": "word " * 9000}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2-135m", messages=long, max_tokens=5)
    err = e.value.body
    assert err["code"] == "context_length_exceeded"
    assert "maximum context length is 8192 tokens (max_model_len)" in err["message"]
    assert "shorten the prompt" in err["message"]
    err = error_of(post(server, "/chat/completions", {"messages": HI, "max_tokens": 9000}), 400)
    assert "needs" in err["message"] and "lower max_tokens" in err["message"]
    err = error_of(post(server, "/completions", {"prompt": "x " * 9000, "max_tokens": 5}), 400)
    assert "8192 tokens" in err["message"]


@pytest.mark.parametrize("body, param, text", [
    ({"messages": HI, "logit_bias": {"abc": 5}}, "logit_bias", "logit_bias keys must be token ids"),
    ({"messages": HI, "logit_bias": {"5": 500}}, "logit_bias", "must be in [-100, 100]"),
    ({"messages": HI, "logit_bias": {"999999": 1}}, None, "token id 999999 is outside the vocabulary"),
    ({"messages": HI, "top_logprobs": 2}, "top_logprobs", "top_logprobs needs logprobs: true"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:x"}}]}]},
     "messages.0.content.0", "is text-only and cannot see images"),
    ({"messages": HI, "stop": [""]}, "stop", "stop must hold non-empty strings"),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]},
     "messages.0.tool_calls", "messages[0] tool_calls[0]: a tool call must be"),
])
def test_invalid_values_get_400_with_the_reason(server, body, param, text):
    err = error_of(post(server, "/chat/completions", {**body, "max_tokens": 2}), 400)
    assert text in err["message"] and err["param"] == param


@pytest.mark.parametrize("body, param, text", [
    ({"messages": HI, "temperature": "hot"}, "temperature", "invalid value for 'temperature'"),
    ({"messages": HI, "temperature": 3.5}, "temperature", "less than or equal to 2"),
    ({"messages": HI, "n": 0}, "n", "greater than or equal to 1"),
    ({"max_tokens": 3}, "messages", "'messages' is a required field"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", "invalid value"),
    ({"messages": []}, "messages", "at least 1 item"),
])
def test_schema_violations_get_422_in_openai_shape(server, client, body, param, text):
    err = error_of(post(server, "/chat/completions", body), 422)
    assert err["param"] == param and text in err["message"], err
    assert err["type"] == "invalid_request_error"


def test_malformed_json_gets_422(server):
    resp = httpx.post(server.base_url + "/chat/completions", content=b'{"messages": [', timeout=30,
                      headers={"content-type": "application/json"})
    err = error_of(resp, 422)
    assert "not valid JSON" in err["message"]


def test_unknown_route_model_and_method(server, client):
    err = error_of(httpx.get(server.url + "/v1/engines"), 404)
    assert "no route GET /v1/engines" in err["message"] and "/v1/chat/completions" in err["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and "'gpt-4o' does not exist" in e.value.body["message"]
    assert "'smollm2-135m'" in e.value.body["message"]
    err = error_of(httpx.get(server.base_url + "/models/nope"), 404)
    assert err["param"] == "model"
    err = error_of(httpx.get(server.base_url + "/chat/completions"), 405)
    assert "method GET is not allowed" in err["message"]


def test_oversized_bodies_get_413(server):
    big = {"messages": [{"role": "user", "content": "x" * 70_000}]}
    err = error_of(post(server, "/chat/completions", big), 413)
    assert "accepts at most 65536 bytes (--max-body-size)" in err["message"]

    def chunks():  # no Content-Length: the limit applies to the bytes received
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"y" * 4096
        yield b'"}]}'

    resp = httpx.post(server.base_url + "/chat/completions", content=chunks(), timeout=30,
                      headers={"content-type": "application/json"})
    err = error_of(resp, 413)
    assert "more than" in err["message"] and "65536" in err["message"]


def test_queue_overflow_gets_429_with_retry_after(server, client):
    body = {"messages": HI, "max_tokens": 8000, "stream": True, "ignore_eos": True}
    with contextlib.ExitStack() as stack:
        for _ in range(3):  # 2 rows + 1 queue place
            resp = stack.enter_context(httpx.stream("POST", server.base_url + "/chat/completions", json=body,
                                                    timeout=60))
            assert resp.status_code == 200
        resp = post(server, "/chat/completions", {"messages": HI, "max_tokens": 2})
        err = error_of(resp, 429)
        assert resp.headers["retry-after"] == "1"
        assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
        assert "at capacity: 2 sequences running and 1 waiting" in err["message"]
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="smollm2-135m", messages=HI, max_tokens=2)
        err = error_of(post(server, "/chat/completions", {"messages": HI, "max_tokens": 2, "n": 4}), 429)
    # the streams closed: their rows and the queue place come back
    assert server.wait_metric("pocketllama_running_sequences", 0) == 0
    assert server.metric("pocketllama_queue_depth") == 0
    assert server.metric("pocketllama_requests_total", 'route="/v1/chat/completions",status="429"') >= 3
    assert client.chat.completions.create(model="smollm2-135m", messages=HI, max_tokens=2).choices


def test_unexpected_failures_are_500_without_internals_and_the_server_survives(server, client, monkeypatch):
    def broken_submit(*a, **kw):
        raise KeyError("secret-internal-detail")

    monkeypatch.setattr(server.engine, "submit", broken_submit)
    resp = post(server, "/chat/completions", {"messages": HI, "max_tokens": 2})
    err = error_of(resp, 500)
    assert err["type"] == "server_error" and "internal server error (id " in err["message"]
    assert "secret-internal-detail" not in resp.text and "KeyError" not in resp.text
    monkeypatch.undo()
    assert client.chat.completions.create(model="smollm2-135m", messages=HI, max_tokens=2).choices


def test_a_model_failure_mid_generation_is_500_or_a_stream_error_event(server, client, monkeypatch):
    model = tiny().model
    real = model.forward

    def exploding(input_ids, *a, **kw):
        if input_ids.shape[1] == 1:
            raise RuntimeError("kaboom-internal-detail")
        return real(input_ids, *a, **kw)

    monkeypatch.setattr(model, "forward", exploding)
    resp = post(server, "/chat/completions", {"messages": HI, "max_tokens": 5, "ignore_eos": True})
    assert "kaboom" not in resp.text and error_of(resp, 500)["type"] == "server_error"
    with pytest.raises(openai.APIError, match="internal server error") as e:
        for _ in client.chat.completions.create(model="smollm2-135m", messages=HI, max_tokens=5, stream=True,
                                                extra_body={"ignore_eos": True}):
            pass
    assert "kaboom" not in str(e.value.body)
    monkeypatch.undo()
    assert server.wait_metric("pocketllama_running_sequences", 0) == 0
    r = client.chat.completions.create(model="smollm2-135m", messages=HI, max_tokens=3,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3


def test_api_key_is_required_on_v1_routes_only():
    s = start_server(tiny(), api_key=KEY, max_model_len=256)
    try:
        err = error_of(httpx.get(s.base_url + "/models"), 401)
        assert err["code"] == "missing_api_key" and "Authorization: Bearer" in err["message"]
        err = error_of(httpx.post(s.base_url + "/chat/completions", json={"messages": HI},
                                  headers={"Authorization": "Bearer wrong"}), 401)
        assert err["code"] == "invalid_api_key" and KEY not in err["message"]
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=s.base_url, api_key="wrong", max_retries=0).models.list()
        good = OpenAI(base_url=s.base_url, api_key=KEY, max_retries=0)
        assert good.chat.completions.create(model="smollm2-135m", messages=HI, max_tokens=2).choices
        assert good.completions.create(model="smollm2-135m", prompt="a", max_tokens=2).choices
        for path in ("/health", "/metrics", "/"):  # no key needed outside /v1
            assert httpx.get(s.url + path).status_code == 200
        assert s.metric("pocketllama_requests_total", 'route="/v1/models",status="401"') == 2
    finally:
        s.close()


def test_a_chat_format_refusal_is_400(server, monkeypatch):
    class Refusing:
        def encode(self, messages, **kw):
            raise ValueError("chat template raised an error: roles must alternate user/assistant")

    monkeypatch.setattr(server.state.llm, "_chat_format", Refusing())
    err = error_of(post(server, "/chat/completions", {"messages": HI}), 400)
    assert err["param"] == "messages"
    assert err["message"] == ("the messages cannot be formatted for this model: chat template raised an error: "
                              "roles must alternate user/assistant")

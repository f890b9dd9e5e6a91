"""Tool calling through the server with the official `openai` client, on a scripted checkpoint that always
writes `[get_weather(city="Paris")]`: tool_calls in whole and streamed responses, the tool result sent back,
forced calls (tool_choice required / named) and the clear failure of a forced call the model gets wrong.
"""

from __future__ import annotations

import json

import openai
import pytest
from openai import OpenAI
from scripted_llama import save_scripted_llama
from serving import start_server

# "\n\n" -> [get_weather(city="Paris")] <|eot_id|>; a forced "(" goes on with "city" (see test_tool_choice.py).
CHAIN = {271: 58, 58: 456, 456: 70464, 70464: 44602, 44602: 429, 7: 9103, 9103: 429, 429: 60704, 60704: 32017,
         32017: 128009}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}},
                                       "additionalProperties": False}}}  # fmt: skip
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    import pocketllama

    path = tmp_path_factory.mktemp("server_tools")
    save_scripted_llama(path, CHAIN)
    return pocketllama.load(path, dtype="float32")


@pytest.fixture(scope="module")
def server(scripted):
    s = start_server(scripted, model_name="scripted", max_concurrency=2)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def test_tool_call_round_trip(client, scripted):
    r = client.chat.completions.create(model="scripted", messages=USER, tools=[WEATHER, TIME],
                                       tool_choice="required", max_tokens=16)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    # The client runs the tool and sends the result back; the model answers (tools hidden: tool_choice none).
    history = [*USER, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "22 C, sunny"}]
    final = client.chat.completions.create(model="scripted", messages=history, tools=[WEATHER],
                                           tool_choice="none", max_tokens=16)
    assert final.choices[0].finish_reason == "stop" and final.choices[0].message.tool_calls is None
    assert final.choices[0].message.content == '[get_weather(city="Paris")]'  # this model only says that
    # The history reached the prompt: the call as <|python_tag|>[...] and the result as an ipython turn.
    ids = scripted.apply_chat_template(history, None)
    text = scripted.tokenizer.decode(ids)
    assert final.usage.prompt_tokens == len(ids)
    assert ('<|python_tag|>[get_weather(city="Paris")]<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n'
            '"22 C, sunny"<|eot_id|>') in text


def test_auto_and_named_choice(client):
    auto = client.chat.completions.create(model="scripted", messages=USER, tools=[WEATHER], max_tokens=16)
    assert auto.choices[0].finish_reason == "tool_calls"
    assert auto.choices[0].message.tool_calls[0].function.name == "get_weather"
    named = client.chat.completions.create(model="scripted", messages=USER, tools=[WEATHER, TIME], max_tokens=16,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert json.loads(named.choices[0].message.tool_calls[0].function.arguments) == {"city": "Paris"}


def test_streamed_tool_call_deltas_assemble(client):
    stream = client.chat.completions.create(model="scripted", messages=USER, tools=[WEATHER], max_tokens=16,
                                            stream=True)
    chunks = list(stream)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].id.startswith("call_")
    assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # no call text leaks
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_forced_call_the_model_gets_wrong_fails_clearly(client):
    forced = {"type": "function", "function": {"name": "get_time"}}  # it writes get_time(city="Paris")
    with pytest.raises(openai.UnprocessableEntityError, match="unexpected argument 'city'"):
        client.chat.completions.create(model="scripted", messages=USER, tools=[WEATHER, TIME], tool_choice=forced,
                                       max_tokens=16)
    with pytest.raises(openai.APIError, match="unexpected argument 'city'"):
        list(client.chat.completions.create(model="scripted", messages=USER, tools=[WEATHER, TIME],
                                            tool_choice=forced, max_tokens=16, stream=True))


@pytest.mark.parametrize("kwargs, match", [
    ({"tools": [{"type": "function"}]}, r"tools\[0\] must be"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice names function 'nope', which is not in tools"),
    ({"tool_choice": "required"}, "tool_choice='required' needs at least one tool"),
    ({"messages": [*USER, {"role": "assistant", "tool_calls": [{"id": "1", "type": "function",
                                                                 "function": {"name": "f", "arguments": "{x"}}]}]},
     "tool call 'f' arguments are not valid JSON"),
])  # fmt: skip
def test_bad_tool_requests_get_400(client, kwargs, match):
    with pytest.raises(openai.BadRequestError, match=match):
        client.chat.completions.create(model="scripted", **{"messages": USER, "max_tokens": 4, **kwargs})

"""Tool calling (SPEC 5.3): prompt renderings against SPEC 5.5 (c) and Meta's Llama 3.2 prompt-format document,
call/result history, output parsing over valid and adversarial outputs, and the JSON-schema subset validator.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from tokenizer_assets import llama3

from pocketllama.chat_format import get_chat_format
from pocketllama.tools import (
    MAX_CALL_CHARS,
    default_tool_style,
    extract_tool_calls,
    normalize_tools,
    openai_tool_calls,
    python_literal,
    render_tool_result,
    validate_calls,
    validate_schema,
)

DATE = "26 Jul 2024"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}  # fmt: skip
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
PARIS = [{"role": "user", "content": "What is the weather in Paris?"},
         {"role": "assistant", "content": None, "tool_calls": [CALL]},
         {"role": "tool", "tool_call_id": "call_1", "content": "22 C, sunny"}]
# SPEC 5.5 (c), verbatim.
SPEC_C = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\nCutting Knowledge Date: "
    "December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nGiven the "
    "following functions, please respond with a JSON for a function call with its proper arguments that best "
    "answers the given prompt.\n\nRespond in the format {\"name\": function name, \"parameters\": dictionary of "
    "argument name and its value}.Do not use variables.\n\n{\n    \"type\": \"function\",\n    \"function\": {\n"
    "        \"name\": \"get_weather\",\n        \"description\": \"Get the current weather for a city\",\n"
    "        \"parameters\": {\n            \"type\": \"object\",\n            \"properties\": {\n"
    "                \"city\": {\n                    \"type\": \"string\",\n                    \"description\": "
    "\"City name\"\n                }\n            },\n            \"required\": [\n                \"city\"\n"
    "            ]\n        }\n    }\n}\n\nWhat is the weather in Paris?<|eot_id|><|start_header_id|>assistant"
    "<|end_header_id|>\n\n{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}<|eot_id|>"
    "<|start_header_id|>ipython<|end_header_id|>\n\n\"22 C, sunny\"<|eot_id|><|start_header_id|>assistant"
    "<|end_header_id|>\n\n"
)
# Meta's Llama 3.2 example tool (text_prompt_format.md).
META_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get weather info for places",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "The name of the city to get the weather for"},
        "metric": {"type": "string", "description": "The metric for weather. Options are: celsius, fahrenheit",
                   "default": "celsius"}}}}}  # fmt: skip


@pytest.fixture(scope="module")
def fmt():
    return get_chat_format(llama3())


def meta_prompts() -> list[str]:
    """The 'Input Prompt Format' blocks of llama_models' llama3_2/text_prompt_format.md (each block's code
    fence adds one newline)."""
    import llama_models

    doc = (Path(llama_models.__file__).parent / "llama3_2" / "text_prompt_format.md").read_text()
    return [b[:-1] for b in re.findall(r"##### Input Prompt Format\n```\n(.*?)```", doc, re.S)]


def test_spec_5_5_c_json_style_golden(fmt):
    text = fmt.render(PARIS, tools=[WEATHER], date_string=DATE, tool_style="json")
    assert text == SPEC_C
    ids = fmt.encode(PARIS, tools=[WEATHER], date_string=DATE, tool_style="json")
    assert ids == llama3().encode(SPEC_C, allow_special=True)
    assert ids[:9] == [128000, 128006, 9125, 128007, 271, 13013, 25, 6125, 27993]  # "Environment: ipython"
    # Arguments given as a dict render the same; a tool result that is already JSON is kept as is.
    as_dict = [PARIS[0], {"role": "assistant", "tool_calls": [{"function": {"name": "get_weather",
                                                                             "arguments": {"city": "Paris"}}}]},
               {"role": "tool", "content": '{"temp": 22}'}]
    text = fmt.render(as_dict, tools=[WEATHER], date_string=DATE, tool_style="json")
    assert SPEC_C.split("<|start_header_id|>ipython")[0] in text and '\n\n{"temp": 22}<|eot_id|>' in text


def test_json_style_tools_in_system(fmt):
    text = fmt.render([{"role": "system", "content": "Be brief."}, PARIS[0]], tools=[WEATHER], date_string=DATE,
                      tool_style="json", tools_in_user_message=False)
    tool_json = json.dumps(WEATHER, indent=4)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\nCutting Knowledge "
        "Date: December 2023\nToday Date: 26 Jul 2024\n\nYou have access to the following functions. To call a "
        "function, please respond with JSON for a function call.Respond in the format {\"name\": function name, "
        "\"parameters\": dictionary of argument name and its value}.Do not use variables.\n\n" + tool_json +
        "\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is the weather in Paris?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_pythonic_system_prompt_equals_meta_document(fmt):
    """Zero-shot function calling, Llama 3.2 1B/3B: Meta's prompt, character for character."""
    expected = meta_prompts()[1]
    msgs = [{"role": "user", "content": "What is the weather in SF and Seattle?"}]
    assert fmt.render(msgs, tools=[META_WEATHER], tool_style="pythonic") == expected
    assert fmt.encode(msgs, tools=[META_WEATHER]) == llama3().encode(expected, allow_special=True)  # default style


def test_pythonic_e2e_history_equals_meta_document(fmt):
    """Meta's E2E example: the call re-fed as `<|python_tag|>[get_weather(...)]<|eot_id|>`, the result as JSON."""
    expected = meta_prompts()[4]
    call = {"type": "function", "function": {"name": "get_weather",
                                             "arguments": '{"city": "San Francisco", "metric": "celsius"}'}}
    msgs = [{"role": "user", "content": "What is the weather in SF?"},
            {"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "tool", "content": "25 C"}]
    assert fmt.render(msgs, tools=[META_WEATHER]) == expected
    ids = fmt.encode(msgs, tools=[META_WEATHER])
    assert ids == llama3().encode(expected, allow_special=True) and ids.count(128010) == 1  # <|python_tag|>


def test_pythonic_with_system_message_and_in_user_message(fmt):
    system = {"role": "system", "content": " You are terse. "}
    text = fmt.render([system, PARIS[0]], tools=[WEATHER], date_string=DATE)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are an expert in")
    assert '"required": [\n                "city"\n            ],\n' in text
    assert "\n]\nYou are terse.<|eot_id|>" in text and "Cutting Knowledge" not in text  # Meta appends it
    text = fmt.render([PARIS[0]], tools=[WEATHER], date_string=DATE, tools_in_user_message=True)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date")
    assert ("<|start_header_id|>user<|end_header_id|>\n\nQuestions: What is the weather in Paris?\nHere is a list "
            "of functions in JSON format that you can invoke:\n[\n    {\n        \"name\": \"get_weather\"") in text
    assert text.endswith("\n]\n\nShould you decide to return the function call(s),Put it in the format of "
                         "[func1(params_name=params_value, params_name2=params_value2...), func2(params)]\n\nNO "
                         "other text MUST be included.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_code_interpreter_prompt_and_history_match_meta(fmt):
    from llama_models.datatypes import BuiltinTool, RawMessage, StopReason, ToolCall, ToolPromptFormat
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    text = fmt.render([PARIS[0]], tools=[{"type": "code_interpreter"}], date_string=DATE)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
                           "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>")
    code = "def is_prime(n):\n    return n > 1\n\nprint(is_prime(7))"
    ours = fmt.encode_message({"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "code_interpreter", "arguments": json.dumps({"code": code})}}]})
    from conftest import llama3_tokenizer_path

    meta = ChatFormat(MetaTokenizer(llama3_tokenizer_path()))
    msg = RawMessage(role="assistant", content="", stop_reason=StopReason.end_of_message,
                     tool_calls=[ToolCall(call_id="1", tool_name=BuiltinTool.code_interpreter, arguments={"code": code})])
    assert ours == meta.encode_message(msg, ToolPromptFormat.json)[0]  # <|python_tag|>{code}<|eom_id|>


def test_pythonic_history_values_round_trip(fmt):
    args = {"s": 'say "hi"\n', "n": -3, "x": 1.5, "b": True, "z": None, "l": [1, "a"], "d": {"k": [False]}}
    call = {"type": "function", "function": {"name": "f", "arguments": json.dumps(args)}}
    text = fmt.render([{"role": "user", "content": "go"}, {"role": "assistant", "tool_calls": [call, call]}],
                      add_generation_prompt=False)
    rendered = text.split("<|python_tag|>")[1].split("<|eot_id|>")[0]
    assert extract_tool_calls(rendered) == [("f", args), ("f", args)]
    assert python_literal({"a": [None, True]}) == '{"a": [None, True]}'


@pytest.mark.parametrize("kwargs, messages, error", [
    ({"tools": [WEATHER], "tool_style": "xml"}, PARIS[:1], "tool_style must be one of pythonic, json, got 'xml'"),
    ({"tools": [WEATHER], "tools_in_user_message": True}, [{"role": "system", "content": "s"}],
     "tools_in_user_message=True puts the tools in the first user message, but the conversation has none"),
    ({"tools": [{"type": "function", "function": {"name": "get-weather"}}]}, PARIS[:1],
     r"function name 'get-weather' is not a Python identifier"),
    ({"tools": [WEATHER, WEATHER]}, PARIS[:1], "function name 'get_weather' is declared twice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, PARIS[:1],
     r"tools\[0\] \(f\): parameters must be a JSON schema object"),
    ({"tools": {"a": 1}}, PARIS[:1], "tools must be a list"),
    ({"tool_style": "json"}, [PARIS[0], {"role": "assistant", "tool_calls": [CALL, CALL]}],
     "message 1: the JSON tool format renders one tool call per assistant message"),
    ({}, [{"role": "user", "tool_calls": [CALL]}], "message 0: only assistant messages carry tool_calls, not 'user'"),
    ({}, [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}],
     "message 0 tool_calls\\[0\\]: tool call 'f' arguments are not valid JSON"),
    ({}, [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}],
     "arguments must be a JSON object"),
    ({}, [{"role": "assistant", "tool_calls": [
        {"function": {"name": "code_interpreter", "arguments": '{"code": "1"}'}}, CALL]}],
     "a code_interpreter call must be the only call"),
])  # fmt: skip
def test_tool_rendering_errors(fmt, kwargs, messages, error):
    with pytest.raises(ValueError, match=error):
        fmt.encode(messages, **kwargs)


def test_json_style_allows_openai_names_and_default_style():
    assert normalize_tools([{"type": "function", "function": {"name": "get-weather.v2"}}], "json")[0].parameters == {
        "type": "object", "properties": {}}
    from pocketllama.config import RopeScaling, TextConfig

    base = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                num_key_value_heads=1, head_dim=8)
    assert default_tool_style(TextConfig(**base, rope_scaling=RopeScaling(factor=32.0))) == "pythonic"
    assert default_tool_style(TextConfig(**base, rope_scaling=RopeScaling(factor=8.0))) == "json"
    assert render_tool_result("22 C") == '"22 C"' and render_tool_result("[1, 2]") == "[1, 2]"


# ---- parsing ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, calls", [
    ("[get_weather(city='San Francisco', metric='celsius'), get_weather(city='Seattle', metric='celsius')]",
     [("get_weather", {"city": "San Francisco", "metric": "celsius"}),
      ("get_weather", {"city": "Seattle", "metric": "celsius"})]),
    ('  <|python_tag|>[get_weather(city="SF")] \n', [("get_weather", {"city": "SF"})]),
    ("[f(a=[1, [2, (3, 4)]], b={'k': {'n': None}}, c=-1.5, d=True)]",
     [("f", {"a": [1, [2, [3, 4]]], "b": {"k": {"n": None}}, "c": -1.5, "d": True})]),
    ("[noargs()]", [("noargs", {})]),
    ('{"name": "f", "parameters": {"a": 1}}', [("f", {"a": 1})]),
    ('{"type": "function", "name": "f", "parameters": {}}', [("f", {})]),
    ('{"name": "f", "arguments": "{\\"a\\": 2}"}', [("f", {"a": 2})]),
    ('[{"name": "f", "parameters": {}}, {"name": "g", "parameters": {"x": "y"}}]', [("f", {}), ("g", {"x": "y"})]),
    ('<function=f>{"a": 1}</function>', [("f", {"a": 1})]),
    ('<function=f>{"a": 1}</function> <function=g>{}</function>', [("f", {"a": 1}), ("g", {})]),
    ('<function=f>{"a": 1}', [("f", {"a": 1})]),
    ("<|python_tag|>def is_prime(n):\n    return n > 1", [("code_interpreter", {"code": "def is_prime(n):\n    return n > 1"})]),
    ('<|python_tag|>brave_search.call(query="weather in SF")', [("brave_search", {"query": "weather in SF"})]),
    ('<|python_tag|>{"name": "f", "parameters": {"a": 1}}', [("f", {"a": 1})]),
])  # fmt: skip
def test_extract_valid_calls(text, calls):
    assert extract_tool_calls(text) == calls


@pytest.mark.parametrize("text", [
    "The weather is nice.", "", "   ", "[]", "[1, 2]", "f(a=1)", "Sure! [f(a=1)]", "[f(a=1)] and more",
    "[f(1)]", "[f(1, a=2)]", "[f(a=x)]", "[f(a=1+1)]", "[f(a=g(b=1))]", "[f(**{'a': 1})]", "[f(a=1, a=2)]",
    "[f(a={1, 2})]", "[f(a=b'x')]", "[f(a=1j)]", "[f(a=1e999)]", "[f(a={1: 2})]", "[obj.method(a=1)]",
    "[f(a=1)(b=2)]", "[f(a=1)", "[f(a=1]", "[f(a='x)]", "[f(a=1), 2]", "[lambda: 1]", "[f(a=[i for i in 'ab'])]",
    "[__import__('os').system('touch PWNED')]", "[f(a=__import__('os').system('touch PWNED'))]",
    "[f(a=open('PWNED', 'w'))]", "[brave_search.call(query='x')]", '{"name": "f"', '{"name": 1, "parameters": {}}',
    '{"name": "f", "parameters": [1]}', '{"name": "f", "parameters": {}, "extra": 1}', '{"a": 1}',
    '<function=f>[1]</function>', '<function=f>{"a": 1}</function> trailing', "<function=f>{bad}</function>",
    "<|python_tag|>",
])  # fmt: skip
def test_extract_rejects_non_calls_and_injection(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert extract_tool_calls(text) is None
    assert not (tmp_path / "PWNED").exists()  # nothing was ever evaluated


def test_extract_huge_and_deep_inputs_fail_fast():
    start = time.perf_counter()
    assert extract_tool_calls("[" * 100_000) is None
    assert extract_tool_calls("[f(a=" + "[" * 5000 + "]" * 5000 + ")]") is None  # nesting beyond the parser
    assert extract_tool_calls("[f(a=" + "9" * 50_000 + ")]") is None  # int beyond Python's digit limit
    assert extract_tool_calls("[f(a='" + "x" * MAX_CALL_CHARS + "')]") is None  # over the size cap
    assert extract_tool_calls('{"name": "f", "parameters": ' + "[" * 100_000 + "]" * 100_000 + "}") is None
    assert time.perf_counter() - start < 5.0


# ---- validation -------------------------------------------------------------------------------------------

SCHEMA = {"type": "object", "required": ["city"], "additionalProperties": False, "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "unit": {"type": "string", "enum": ["c", "f"]},
    "tags": {"type": "array", "items": {"type": "string"}}, "ratio": {"type": ["number", "null"]},
    "where": {"type": "object", "properties": {"lat": {"type": "number"}}, "required": ["lat"]},
    "any": {"anyOf": [{"type": "string"}, {"type": "boolean"}]}}}  # fmt: skip


@pytest.mark.parametrize("args, errors", [
    ({"city": "Paris", "days": 3, "unit": "c", "tags": ["a"], "ratio": None, "where": {"lat": 1.5}, "any": True}, []),
    ({"city": "Paris", "days": 3.0, "ratio": 2}, []),
    ({}, ["arguments: missing required argument 'city'"]),
    ({"city": 1}, ["arguments.city: expected string, got integer 1"]),
    ({"city": "P", "days": True}, ["arguments.days: expected integer, got boolean True"]),
    ({"city": "P", "days": 1.5}, ["arguments.days: expected integer, got number 1.5"]),
    ({"city": "P", "unit": "k"}, ["arguments.unit: 'k' is not one of ['c', 'f']"]),
    ({"city": "P", "tags": ["a", 2]}, ["arguments.tags[1]: expected string, got integer 2"]),
    ({"city": "P", "where": {}}, ["arguments.where: missing required argument 'lat'"]),
    ({"city": "P", "zip": 1}, ["arguments: unexpected argument 'zip' (allowed: city, days, unit, tags, ratio, where, any)"]),
    ({"city": "P", "any": 1}, ["arguments.any: 1 matches none of the allowed schemas"]),
])  # fmt: skip
def test_validate_schema(args, errors):
    assert validate_schema(args, SCHEMA) == errors


def test_validate_calls_and_openai_shape():
    tools = normalize_tools([WEATHER], "pythonic")
    assert validate_calls([("get_weather", {"city": "Paris"})], tools) == []
    assert validate_calls([("get_time", {})], tools) == [
        "the model called 'get_time', which is not a declared tool (declared: get_weather)"]
    assert validate_calls([("get_weather", {})], tools) == ["get_weather: arguments: missing required argument 'city'"]
    calls = openai_tool_calls([("f", {"a": "é"}), ("g", {})])
    assert [c["function"] for c in calls] == [{"name": "f", "arguments": '{"a": "é"}'}, {"name": "g", "arguments": "{}"}]
    assert len({c["id"] for c in calls}) == 2 and all(re.fullmatch(r"call_[0-9a-f]{24}", c["id"]) for c in calls)

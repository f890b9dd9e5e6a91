"""tool_choice: parsing, the forced-prefix logits processor on crafted logits, the final assistant message
(auto / required / named / none), streaming deltas, and `LLM.chat(tools=...)` on a scripted checkpoint.
"""

from __future__ import annotations

import json

import pytest
import torch
from scripted_llama import save_scripted_llama
from tokenizer_assets import llama3

from pocketllama.tool_choice import (
    ForcedPrefix,
    ToolCallStreamer,
    ToolChoice,
    assistant_message,
    call_prefixes,
    parse_tool_choice,
)
from pocketllama.tools import ToolCallError, normalize_tools

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                          "required": ["city"]}}}  # fmt: skip
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}},
                                       "additionalProperties": False}}}  # fmt: skip
TOOLS = normalize_tools([WEATHER, TIME], "pythonic")
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def test_parse_tool_choice():
    assert parse_tool_choice(None, TOOLS) == ToolChoice("auto") and parse_tool_choice(None, []) == ToolChoice("none")
    assert parse_tool_choice("required", TOOLS).forced and parse_tool_choice("auto", []) == ToolChoice("none")
    assert parse_tool_choice(NAMED, TOOLS) == ToolChoice("required", "get_weather")
    with pytest.raises(ValueError, match="tool_choice='required' needs at least one tool"):
        parse_tool_choice("required", [])
    with pytest.raises(ValueError, match="tool_choice names function 'nope', which is not in tools "
                                         r"\(declared: get_weather, get_time\)"):
        parse_tool_choice({"type": "function", "function": {"name": "nope"}}, TOOLS)
    with pytest.raises(ValueError, match="tool_choice must be 'none', 'auto', 'required' or"):
        parse_tool_choice("always", TOOLS)


def test_call_prefixes():
    assert call_prefixes(TOOLS, ToolChoice("required"), "pythonic") == ["[get_weather(", "[get_time("]
    assert call_prefixes(TOOLS, ToolChoice("required", "get_time"), "json") == ['{"name": "get_time", "parameters": {']
    code = normalize_tools([{"type": "code_interpreter"}])
    assert call_prefixes(code, ToolChoice("required"), "pythonic") == ["<|python_tag|>"]


def test_forced_prefix_masks_until_a_sequence_is_complete():
    proc = ForcedPrefix([[1, 2, 3], [1, 4]])
    logits = torch.arange(10, dtype=torch.float32)[None]  # (1, V): unconstrained argmax would be 9

    def allowed(generated: list[int]) -> list[int]:
        out = proc(torch.tensor([generated], dtype=torch.long), logits.clone())
        return torch.isfinite(out[0]).nonzero().flatten().tolist()

    assert allowed([]) == [1]
    assert allowed([1]) == [2, 4]
    assert allowed([1, 4]) == list(range(10))  # complete: free again, logits untouched
    assert torch.equal(proc(torch.tensor([[1, 4, 9]]), logits), logits)
    with pytest.raises(ValueError, match="needs at least one non-empty token sequence"):
        ForcedPrefix([[]])


def test_forced_prefix_for_tools_tokenizes_prefixes():
    proc = ForcedPrefix.for_tools(llama3(), TOOLS, ToolChoice("required", "get_weather"), "pythonic")
    assert proc.trie == {58: {456: {70464: {7: {}}}}}  # "[", "get", "_weather", "("


def test_assistant_message_modes():
    ok = '[get_weather(city="Paris")]'
    msg = assistant_message(ok, TOOLS, ToolChoice("auto"))
    assert msg["content"] is None and json.loads(msg["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert assistant_message(ok, TOOLS, ToolChoice("none")) == {"role": "assistant", "content": ok}
    assert assistant_message("Hello!", TOOLS, ToolChoice("auto")) == {"role": "assistant", "content": "Hello!"}
    bad = "[get_weather(town='Paris')]"
    assert assistant_message(bad, TOOLS, ToolChoice("auto")) == {"role": "assistant", "content": bad}
    with pytest.raises(ToolCallError, match=r"tool_choice='required' but the model's output is not a valid call: "
                                            r"get_weather: arguments: missing required argument 'city'"):
        assistant_message(bad, TOOLS, ToolChoice("required"))
    with pytest.raises(ToolCallError, match="the model called 'get_time' but tool_choice requires 'get_weather'"):
        assistant_message("[get_time()]", TOOLS, ToolChoice("required", "get_weather"))
    with pytest.raises(ToolCallError, match=r"\(generation stopped at max_tokens: raise it\): the output is not a "
                                            "tool call; output: '\\[get_weather\\(ci'"):
        assistant_message("[get_weather(ci", TOOLS, ToolChoice("required"), finish_reason="length")
    code = normalize_tools([{"type": "code_interpreter"}])
    msg = assistant_message("<|python_tag|>print(1)", code, ToolChoice("auto"), eom=True)
    assert msg["eom"] and msg["tool_calls"][0]["function"]["name"] == "code_interpreter"


def test_streamer_passes_text_and_holds_calls():
    s = ToolCallStreamer(TOOLS, ToolChoice("auto"))
    assert s.feed(" ") == [] and s.feed("Hel") == [{"content": " Hel"}] and s.feed("lo") == [{"content": "lo"}]
    assert s.finish() == []
    s = ToolCallStreamer(TOOLS, ToolChoice("auto"))
    assert [s.feed(d) for d in ("[get", "_weather(city=", '"Paris")]')] == [[], [], []]
    (final,) = s.finish()
    call = final["tool_calls"][0]
    assert call["index"] == 0 and call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    s = ToolCallStreamer(TOOLS, ToolChoice("auto"))  # looks like a call, is not: released as text at the end
    assert s.feed("[1] see") == [] and s.finish() == [{"content": "[1] see"}]
    s = ToolCallStreamer(TOOLS, ToolChoice("none"))
    assert s.feed("[x") == [{"content": "[x"}]
    s = ToolCallStreamer(TOOLS, ToolChoice("required"))
    s.feed("[nope()]")
    with pytest.raises(ToolCallError, match="'nope', which is not a declared tool"):
        s.finish()


# ---- LLM.chat on a scripted checkpoint ----------------------------------------------------------------------

# After the assistant header's "\n\n" (271) the model writes [get_weather(city="Paris")] then <|eot_id|>:
# "[" 58, "get" 456, "_weather" 70464, "(city" 44602, '="' 429, "Paris" 60704, '")]' 32017. When "(" (7) is
# forced instead of "(city", it goes on with "city" (9103).
CHAIN = {271: 58, 58: 456, 456: 70464, 70464: 44602, 44602: 429, 7: 9103, 9103: 429, 429: 60704, 60704: 32017,
         32017: 128009}
USER = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    from pocketllama.llm import load

    path = tmp_path_factory.mktemp("tool_llm")
    save_scripted_llama(path, CHAIN)
    return load(path, dtype="float32")


def test_llm_chat_auto_returns_tool_calls(scripted):
    msg = scripted.chat(USER, tools=[WEATHER, TIME], date_string="26 Jul 2024")
    assert msg["content"] is None
    (call,) = msg["tool_calls"]
    assert call["type"] == "function" and call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    # The prompt carried Meta's pythonic tool prompt (rope factor 32 -> a Llama 3.2 1B/3B-style model).
    assert "You are an expert in composing functions" in scripted.apply_chat_template(USER, [WEATHER], tokenize=False)


def test_llm_chat_named_and_required_force_the_prefix(scripted):
    for choice in (NAMED, "required"):
        msg = scripted.chat(USER, tools=[WEATHER, TIME], tool_choice=choice)
        assert msg["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'
    # Forcing get_time: the model still writes city="Paris", which get_time does not take: a clear error.
    with pytest.raises(ToolCallError, match="unexpected argument 'city'"):
        scripted.chat(USER, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})


def test_llm_chat_none_and_tool_result_turn(scripted):
    msg = scripted.chat(USER, tools=[WEATHER], tool_choice="none")
    assert msg == {"role": "assistant", "content": '[get_weather(city="Paris")]'}  # plain text, tools not shown
    first = scripted.chat(USER, tools=[WEATHER])
    history = [*USER, first, {"role": "tool", "tool_call_id": first["tool_calls"][0]["id"], "content": "22 C"}]
    text = scripted.apply_chat_template(history, [WEATHER], tokenize=False)
    assert text.endswith('<|python_tag|>[get_weather(city="Paris")]<|eot_id|><|start_header_id|>ipython'
                         '<|end_header_id|>\n\n"22 C"<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n')

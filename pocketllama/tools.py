"""Tool calling for Llama 3.x (SPEC 5.3): OpenAI `tools` -> the model's prompt (Llama 3.2 pythonic or Llama 3.1 /
3.2-Vision JSON), assistant tool calls and results rendered back, and the model's output parsed into OpenAI
`tool_calls` (pythonic lists via `ast` literals only -- never eval --, JSON, `<function=...>`, `<|python_tag|>`).
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

ToolStyle = Literal["pythonic", "json"]
TOOL_STYLES: tuple[str, ...] = ("pythonic", "json")
CODE_INTERPRETER = "code_interpreter"
BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "photogen")  # Meta's `name.call(query="...")` built-ins
MAX_CALL_CHARS = 200_000  # longer outputs are never parsed as calls (ast on huge input is slow)

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_JSON_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}\Z")  # OpenAI's function-name alphabet (plus '.')

# ---- prompts (exact wording) ---------------------------------------------------------------------------

# Meta `PythonListCustomToolGenerator` (llama-models prompt_templates/system_prompts.py; llama3_2/text_prompt_format.md).
PYTHONIC_SYSTEM = (
    "You are an expert in composing functions. You are given a question and a set of possible functions.\n"
    "Based on the question, you will need to make one or more function/tool calls to achieve the purpose.\n"
    "If none of the function can be used, point it out. If the given question lacks the parameters required "
    "by the function,\nalso point it out. You should only return the function call in tools call sections.\n\n"
    "If you decide to invoke any of the function(s), you MUST put it in the format of [func_name1(params_name1="
    "params_value1, params_name2=params_value2...), func_name2(params)]\n"
    "You SHOULD NOT include any other text in the response.\n\n"
    "Here is a list of functions in JSON format that you can invoke.\n\n"
)
# llama3_2/text_prompt_format.md, "Zero shot function calling with user message".
PYTHONIC_USER = (
    "Questions: {question}\nHere is a list of functions in JSON format that you can invoke:\n{functions}\n\n"
    "Should you decide to return the function call(s),Put it in the format of [func1(params_name=params_value, "
    "params_name2=params_value2...), func2(params)]\n\nNO other text MUST be included."
)
# HF Llama 3.1 / 3.2 chat templates (SPEC 5.3); note: no space after "value}.".
JSON_FORMAT = (
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)
JSON_USER = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments "
    "that best answers the given prompt.\n\n" + JSON_FORMAT
)
JSON_SYSTEM = (
    "You have access to the following functions. To call a function, please respond with JSON for a function "
    "call." + JSON_FORMAT
)


class ToolCallError(ValueError):
    """The model's output is not a valid call although `tool_choice` demanded one (or a call is malformed)."""


# ---- tool definitions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tool:
    """One declared tool: an OpenAI function (`raw` is the dict as given) or Meta's code interpreter."""

    name: str
    description: str
    parameters: dict[str, Any]
    raw: dict[str, Any]

    @property
    def is_code_interpreter(self) -> bool:
        return self.name == CODE_INTERPRETER


def normalize_tools(tools: list[dict] | None, style: ToolStyle | None = None) -> list[Tool]:
    """Check OpenAI `tools` ([{"type": "function", "function": {"name", "description", "parameters"}}, ...];
    `{"type": "code_interpreter"}` turns on Meta's code interpreter) and return them as `Tool`s."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ValueError(f"tools must be a list of {{'type': 'function', 'function': {{...}}}}, got {type(tools).__name__}")
    out: list[Tool] = []
    for i, t in enumerate(tools):
        if isinstance(t, dict) and t.get("type") == CODE_INTERPRETER:
            out.append(Tool(CODE_INTERPRETER, "Run Python code", _CODE_SCHEMA, t))
            continue
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': "
                             f"{{...}}}}}} (or {{'type': 'code_interpreter'}}); got {_short(t)}")
        name = fn["name"]
        pattern = _NAME if style == "pythonic" else _JSON_NAME
        if not pattern.match(name):
            hint = " a Python identifier (the pythonic format writes name(...))" if style == "pythonic" else \
                " 1-64 characters of a-z, A-Z, 0-9, '_', '-', '.'"
            raise ValueError(f"tools[{i}]: function name {name!r} is not{hint}")
        params = fn.get("parameters") if fn.get("parameters") is not None else {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise ValueError(f"tools[{i}] ({name}): parameters must be a JSON schema object, got {_short(params)}")
        if any(o.name == name for o in out):
            raise ValueError(f"tools[{i}]: function name {name!r} is declared twice")
        out.append(Tool(name, str(fn.get("description") or ""), params, t))
    return out


_CODE_SCHEMA = {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}


def default_tool_style(config: Any) -> ToolStyle:
    """Llama 3.2 1B/3B (rope factor 32) use Meta's pythonic format; Llama 3.1 and 3.2-Vision the JSON format."""
    if getattr(config, "model_type", "llama") not in ("llama",):
        return "json"
    rope = getattr(config, "rope_scaling", None)
    return "pythonic" if rope is not None and getattr(rope, "factor", None) == 32.0 else "json"


def _short(x: Any, n: int = 80) -> str:
    s = repr(x)
    return s if len(s) <= n else s[: n - 3] + "..."


# ---- rendering (used by chat_format.Llama3ChatFormat) --------------------------------------------------


def pythonic_function_list(tools: list[Tool]) -> str:
    """The JSON array of Meta's pythonic prompt: name, description, parameters {type: dict, required,
    properties {name: {type, description, default?, ...other schema keys}}}."""
    items = []
    for t in tools:
        props = {}
        for pname, p in (t.parameters.get("properties") or {}).items():
            p = p if isinstance(p, dict) else {}
            entry = {"type": p.get("type", "string"), "description": p.get("description", "")}
            if p.get("default") is not None:
                entry["default"] = p["default"]
            entry.update({k: v for k, v in p.items() if k not in ("type", "description", "default")})
            props[pname] = entry
        params = {"type": "dict", "required": list(t.parameters.get("required") or []), "properties": props}
        items.append({"name": t.name, "description": t.description, "parameters": params})
    return json.dumps(items, indent=4, ensure_ascii=False)


def json_tool_block(tools: list[Tool]) -> str:
    """Each tool as given, `json.dumps(tool, indent=4)` + `\\n\\n` (HF's `tojson(indent=4)`)."""
    return "".join(json.dumps(t.raw, indent=4, ensure_ascii=False) + "\n\n" for t in tools)


def call_arguments(call: dict, where: str) -> dict[str, Any]:
    """An OpenAI tool call's arguments as a dict (the API sends a JSON string; a dict is accepted too)."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError(f"{where}: a tool call must be {{'type': 'function', 'function': {{'name': ..., "
                         f"'arguments': '{{...}}'}}}}; got {_short(call)}")
    args = fn.get("arguments")
    if args is None or args == "":
        return {}
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: tool call {fn['name']!r} arguments are not valid JSON ({e})") from None
    if not isinstance(args, dict):
        raise ValueError(f"{where}: tool call {fn['name']!r} arguments must be a JSON object, got {_short(args)}")
    return args


def python_literal(value: Any) -> str:
    """A JSON value as a Python literal that `ast.literal_eval` reads back (strings double-quoted, as Meta)."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(python_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{python_literal(str(k))}: {python_literal(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"tool call argument {_short(value)} is not a JSON value")


def render_tool_calls(calls: list[dict], style: ToolStyle, where: str) -> tuple[str, bool, str]:
    """Assistant tool-call history -> (text, python_tag first?, end marker) as the model writes it.

    pythonic: `<|python_tag|>[f(a="x"), g(b=1)]<|eot_id|>` (Meta's E2E example); json: `{"name": "f",
    "parameters": {...}}<|eot_id|>`, one call only (as the HF template); code interpreter (either style):
    `<|python_tag|>{code}<|eom_id|>`.
    """
    if not isinstance(calls, list) or not calls:
        raise ValueError(f"{where}: tool_calls must be a non-empty list")
    parsed = [(c.get("function", {}).get("name") if isinstance(c, dict) else None,
               call_arguments(c, f"{where} tool_calls[{i}]")) for i, c in enumerate(calls)]
    if any(name == CODE_INTERPRETER for name, _ in parsed):
        if len(parsed) != 1 or not isinstance(parsed[0][1].get("code"), str):
            raise ValueError(f"{where}: a code_interpreter call must be the only call, with a string 'code' argument")
        return parsed[0][1]["code"], True, "<|eom_id|>"
    if style == "json":
        if len(parsed) != 1:
            raise ValueError(f"{where}: the JSON tool format renders one tool call per assistant message "
                             f"(as the HF template); got {len(parsed)}: split them into several turns")
        name, args = parsed[0]
        return '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "parameters": ' + \
            json.dumps(args, ensure_ascii=False) + "}", False, "<|eot_id|>"
    body = ", ".join(f"{name}(" + ", ".join(f"{k}={python_literal(v)}" for k, v in args.items()) + ")"
                     for name, args in parsed)
    return f"[{body}]", True, "<|eot_id|>"


def render_tool_result(content: str) -> str:
    """A tool result in a tool-calling conversation, as JSON (HF `tojson`; Meta: "in json format"): a string
    that is already JSON is kept, any other string is JSON-quoted (`22 C` -> `"22 C"`)."""
    try:
        json.loads(content)
        return content
    except (json.JSONDecodeError, RecursionError):
        return json.dumps(content, ensure_ascii=False)


@dataclass(frozen=True)
class ToolPrompt:
    """How one conversation renders its tools (built by `ToolPrompt.build`, used by Llama3ChatFormat).

    pythonic, in the system message (default for 3.2 1B/3B): the system block is Meta's prompt
    (`PYTHONIC_SYSTEM` + the function list), then `\\n` + the user's system message, with no date lines, as
    Meta's 3.2 reference; in the user message: Meta's "Questions: ..." wrapper around the first user message.
    json (3.1 / 3.2-Vision, HF template): `Environment: ipython` + the date lines, then the tools in the first
    user message (default) or in the system block. A `code_interpreter` tool only adds `Environment: ipython`.
    """

    tools: tuple[Tool, ...] = ()
    style: ToolStyle = "pythonic"
    in_user_message: bool = False

    @classmethod
    def build(cls, tools: list[dict] | None, tool_style: str | None = None,
              tools_in_user_message: bool | None = None) -> ToolPrompt:
        style = tool_style or "pythonic"
        if style not in TOOL_STYLES:
            raise ValueError(f"tool_style must be one of {', '.join(TOOL_STYLES)}, got {tool_style!r}")
        parsed = tuple(normalize_tools(tools or None, style))  # type: ignore[arg-type]
        in_user = (style == "json") if tools_in_user_message is None else bool(tools_in_user_message)
        return cls(parsed, style, in_user)  # type: ignore[arg-type]

    @property
    def functions(self) -> list[Tool]:
        return [t for t in self.tools if not t.is_code_interpreter]

    def system_text(self, system: str, date: str, default: str) -> str:
        """The system block's text; `default` is the usual `Cutting Knowledge ... Today Date ...` + system."""
        fns, code = self.functions, any(t.is_code_interpreter for t in self.tools)
        if fns and self.style == "pythonic" and not self.in_user_message:
            text = ("Environment: ipython\n\n" if code else "") + PYTHONIC_SYSTEM + pythonic_function_list(fns)
            return (text + "\n" + system).strip("\n")
        # HF's JSON template writes the line for any tools; Meta's pythonic prompt only for the code interpreter.
        env = "Environment: ipython\n" if code or (self.style == "json" and self.tools) else ""
        head, tail = default[: len(default) - len(system)], system
        if fns and self.style == "json" and not self.in_user_message:
            return env + head + JSON_SYSTEM + json_tool_block(fns) + tail
        return env + head + tail

    def user_text(self, question: str) -> str:
        """The first user message with the tools inlined (`in_user_message`)."""
        if self.style == "pythonic":
            return PYTHONIC_USER.format(question=question, functions=pythonic_function_list(self.functions))
        return JSON_USER + json_tool_block(self.functions) + question

    @property
    def wraps_first_user_message(self) -> bool:
        return bool(self.functions) and self.in_user_message


# ---- parsing model output ------------------------------------------------------------------------------

RawCall = tuple[str, dict[str, Any]]  # (function name, JSON-able arguments)


def extract_tool_calls(text: str) -> list[RawCall] | None:
    """The calls written in `text` (the whole generated message), or None if it is not a tool call.

    Accepted (SPEC 5.3): a pythonic list `[f(a=1), g(b='x')]` (keyword arguments whose values are Python
    literals, read with `ast.literal_eval` one value node at a time -- nothing is ever evaluated); JSON
    `{"name": ..., "parameters"|"arguments": {...}}` or a list of them; `<function=NAME>{json}</function>`
    (one or more); and after `<|python_tag|>` any of these, Meta's built-ins `brave_search.call(query="...")`,
    or else Python code for the code interpreter. Anything else (prose, positional or non-literal arguments,
    broken brackets, text around a call) is plain text.
    """
    s = text.strip()
    if not s or len(s) > MAX_CALL_CHARS:
        return None
    tagged = s.startswith("<|python_tag|>")
    if tagged:
        s = s[len("<|python_tag|>"):].strip()
    calls = _parse_pythonic(s) or _parse_json(s) or _parse_function_tags(s)
    if calls is None and tagged:
        builtin = _parse_pythonic(f"[{s}]", builtins=True)
        calls = builtin or ([(CODE_INTERPRETER, {"code": s})] if s else None)
    return calls


def _parse_pythonic(s: str, builtins: bool = False) -> list[RawCall] | None:
    if not (s.startswith("[") and s.endswith("]")):
        return None
    try:
        tree = ast.parse(s, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
        return None
    if not isinstance(tree.body, ast.List) or not tree.body.elts:
        return None
    calls: list[RawCall] = []
    for node in tree.body.elts:
        if not isinstance(node, ast.Call) or node.args:
            return None
        func = node.func
        if isinstance(func, ast.Name) and not builtins:
            name = func.id
        elif (builtins and isinstance(func, ast.Attribute) and func.attr == "call"
              and isinstance(func.value, ast.Name) and func.value.id in BUILTIN_TOOLS):
            name = func.value.id
        else:
            return None
        args: dict[str, Any] = {}
        for kw in node.keywords:
            if kw.arg is None or kw.arg in args:  # **kwargs or a repeated keyword
                return None
            try:
                args[kw.arg] = _jsonable(ast.literal_eval(kw.value))
            except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError, OverflowError):
                return None
        calls.append((name, args))
    return calls


def _jsonable(value: Any) -> Any:
    """A literal as JSON data: tuples become lists; sets, bytes, complex, non-finite floats and non-string
    dict keys are refused (ValueError)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("non-finite float")
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _jsonable(v) for k, v in value.items()}
    raise ValueError(f"{type(value).__name__} is not JSON")


def _parse_json(s: str) -> list[RawCall] | None:
    if not s.startswith(("{", "[")):
        return None
    try:
        data = json.loads(s)
    except (json.JSONDecodeError, RecursionError):
        return None
    items = data if isinstance(data, list) and data else [data]
    calls = []
    for item in items:
        call = _json_call(item)
        if call is None:
            return None
        calls.append(call)
    return calls


def _json_call(item: Any) -> RawCall | None:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    if set(item) - {"type", "name", "parameters", "arguments"} or item.get("type", "function") != "function":
        return None
    args = item.get("parameters", item.get("arguments", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except (json.JSONDecodeError, RecursionError):
            return None
    return (item["name"], args) if isinstance(args, dict) else None


_FUNCTION_TAG = re.compile(r"<function=([^>\s]{1,64})>(.*?)(?:</function>|\Z)", re.S)


def _parse_function_tags(s: str) -> list[RawCall] | None:
    if not s.startswith("<function="):
        return None
    calls, pos = [], 0
    while pos < len(s):
        m = _FUNCTION_TAG.match(s, pos)
        if m is None:
            return None
        try:
            args = json.loads(m.group(2)) if m.group(2).strip() else {}
        except (json.JSONDecodeError, RecursionError):
            return None
        if not isinstance(args, dict):
            return None
        calls.append((m.group(1), args))
        pos = m.end()
        while pos < len(s) and s[pos].isspace():
            pos += 1
    return calls


# ---- validation: the JSON-schema subset tools use ------------------------------------------------------

_TYPES: dict[str, Any] = {
    "string": str, "boolean": bool, "null": type(None), "object": dict, "dict": dict, "array": list,
    "list": list, "str": str, "bool": bool,
}


def validate_schema(value: Any, schema: Any, path: str = "arguments") -> list[str]:
    """Errors of `value` against a JSON schema subset: type (incl. lists of types; Meta's "dict"), properties,
    required, additionalProperties, enum, const, items, anyOf/oneOf. Unknown keywords are ignored."""
    if not isinstance(schema, dict) or not schema:
        return []
    if "anyOf" in schema or "oneOf" in schema:
        options = schema.get("anyOf") or schema.get("oneOf") or []
        if options and all(validate_schema(value, o, path) for o in options):
            return [f"{path}: {_short(value, 40)} matches none of the allowed schemas"]
    types = schema.get("type")
    if types is not None:
        types = types if isinstance(types, list) else [types]
        if not any(_is_type(value, t) for t in types):
            return [f"{path}: expected {' or '.join(map(str, types))}, got {_json_type(value)} {_short(value, 40)}"]
    errors: list[str] = []
    if "enum" in schema and isinstance(schema["enum"], list) and value not in schema["enum"]:
        errors.append(f"{path}: {_short(value, 40)} is not one of {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: must be {schema['const']!r}")
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for key in schema.get("required") or []:
            if key not in value:
                errors.append(f"{path}: missing required argument {key!r}")
        extra = schema.get("additionalProperties", True)
        for key, v in value.items():
            if key in props:
                errors += validate_schema(v, props[key], f"{path}.{key}")
            elif extra is False:
                errors.append(f"{path}: unexpected argument {key!r} (allowed: {', '.join(props) or 'none'})")
            elif isinstance(extra, dict):
                errors += validate_schema(v, extra, f"{path}.{key}")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            errors += validate_schema(v, schema["items"], f"{path}[{i}]")
    return errors


def _is_type(value: Any, t: Any) -> bool:
    if t in ("integer", "int"):
        return isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer()
    if t in ("number", "float"):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    py = _TYPES.get(t)
    if py is None:
        return True  # an unknown type name: do not refuse what we cannot check
    return isinstance(value, py) and (py is not int or not isinstance(value, bool))


def _json_type(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object",
            type(None): "null"}.get(type(value), type(value).__name__)


def validate_calls(calls: list[RawCall], tools: list[Tool]) -> list[str]:
    """Errors for calls to undeclared tools or with arguments that break the tool's schema."""
    by_name = {t.name: t for t in tools}
    errors: list[str] = []
    for name, args in calls:
        tool = by_name.get(name)
        if tool is None:
            errors.append(f"the model called {name!r}, which is not a declared tool "
                          f"(declared: {', '.join(by_name) or 'none'})")
        else:
            errors += [f"{name}: {e}" for e in validate_schema(args, tool.parameters)]
    return errors


def openai_tool_calls(calls: list[RawCall]) -> list[dict[str, Any]]:
    """OpenAI `tool_calls`: [{"id": "call_...", "type": "function", "function": {"name", "arguments": JSON}}]."""
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
            for name, args in calls]

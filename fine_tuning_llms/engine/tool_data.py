"""Agent records: tool calls, tool results, tool lists and reasoning, in the one internal form.

The internal form is what tool-capable chat templates (Llama 3.1+, Qwen 2.5/3, Mistral, Hermes)
read through ``apply_chat_template(messages, tools=...)``:

    {"role": "assistant", "content": "",                       # may be empty when it calls a tool
     "tool_calls": [{"type": "function", "id": "call_1",       # id only when the data has one
                     "function": {"name": "get_weather", "arguments": {"city": "Seoul"}}}],
     "reasoning_content": "The user wants ..."}                # optional (from reasoning_content/thinking)
    {"role": "tool", "content": "{\"temp\": 3}", "tool_call_id": "call_1", "name": "get_weather"}

Arguments are always a dict (string arguments are parsed; a string that is not a JSON object
is an error). A record's ``tools`` list (OpenAI function schemas, or a JSON string of them)
rides on the conversation's first message under the key ``tools``: every slice that keeps the
start of a conversation (a prompt for generation) keeps its tools. ``conversation_tools`` reads
it back; rendering strips the key before the template sees the messages.
"""
from __future__ import annotations

import json
from typing import Any

from .errors import InvalidRecord

REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
TOOLS_KEY = "tools"


def require_text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidRecord(f"{what} is {type(value).__name__}, not a string")
    if not value.strip():
        raise InvalidRecord(f"{what} is empty")
    return value


def conversation_tools(conversation: list[dict]) -> list[dict] | None:
    """The record's tool list (None without one)."""
    for message in conversation:
        if message.get(TOOLS_KEY):
            return message[TOOLS_KEY]
    return None


def has_agent_parts(conversation: list[dict]) -> bool:
    """Whether rendering needs the tool/reasoning path (plain conversations never take it)."""
    return any(m["role"] == "tool" or "tool_calls" in m or "reasoning_content" in m or TOOLS_KEY in m
               for m in conversation)


def _json(value: Any, what: str, fix: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise InvalidRecord(f"{what} is not JSON ({exc.msg} at character {exc.pos}); {fix}") from None


def parse_tools(value: Any) -> list[dict] | None:
    """A record's ``tools``: a list (or JSON string of a list) of function schemas, normalised to
    ``{"type": "function", "function": {"name": ..., ...}}``; None when absent or empty."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        value = _json(value, "tools", "give a list of function schemas, or a JSON string of one")
    if not isinstance(value, list):
        raise InvalidRecord(f"tools is {type(value).__name__}, not a list of function schemas")
    tools = []
    for k, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise InvalidRecord(f"tools[{k}] is {type(tool).__name__}, not a function schema object")
        function = tool["function"] if isinstance(tool.get("function"), dict) else tool
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            raise InvalidRecord(f"tools[{k}] has no function name")
        tools.append({"type": "function", "function": function})
    return tools or None


def tool_names(tools: list[dict] | None) -> list[str]:
    return [t["function"]["name"] for t in tools or []]


def parse_tool_calls(value: Any, what: str) -> list[dict]:
    """Calls in OpenAI form (``{"function": {"name", "arguments"}}``) or flat (``{"name", "arguments"}``,
    Llama's ``parameters`` too); a JSON string of one call or a list of calls (ShareGPT's function_call)."""
    if value is None or value == []:
        return []
    if isinstance(value, str):
        value = _json(value, what, 'write the call as {"name": ..., "arguments": {...}}')
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise InvalidRecord(f"{what} is {type(value).__name__}, not a list of calls")
    calls = []
    for k, item in enumerate(value):
        where = f"{what} {k}" if len(value) > 1 else what
        if not isinstance(item, dict):
            raise InvalidRecord(f"{where} is {type(item).__name__}, not a call object")
        function = item["function"] if isinstance(item.get("function"), dict) else item
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            raise InvalidRecord(f"{where} has no function name")
        arguments = function.get("arguments", function.get("parameters"))
        if arguments is None or arguments == "":
            arguments = {}
        elif isinstance(arguments, str):
            arguments = _json(arguments, f"{where} ({name}) arguments", "give a JSON object string, or an object")
        if not isinstance(arguments, dict):
            raise InvalidRecord(f"{where} ({name}) arguments are {type(arguments).__name__}, not a JSON object")
        call = {"type": "function", "function": {"name": name, "arguments": arguments}}
        if isinstance(item.get("id"), str) and item["id"]:
            call["id"] = item["id"]
        calls.append(call)
    return calls


def reasoning_of(turn: dict, what: str) -> str | None:
    for key in REASONING_KEYS:
        value = turn.get(key)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise InvalidRecord(f"{what} {key} is {type(value).__name__}, not a string")
        return value if value.strip() else None
    return None


def assistant_turn(turn: dict, *, what: str, content_key: str = "content", calls_key: str = "tool_calls") -> dict:
    """An assistant message: content (may be empty or null when it calls tools), calls, reasoning."""
    calls = parse_tool_calls(turn.get(calls_key), f"{what} tool call")
    content = turn.get(content_key)
    if calls:
        content = "" if content is None else content
        if not isinstance(content, str):
            raise InvalidRecord(f"{what} {content_key} is {type(content).__name__}, not a string")
    else:
        content = require_text(content, f"{what} {content_key}")
    message: dict = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    reasoning = reasoning_of(turn, what)
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return message


def tool_turn(turn: dict, *, what: str, content_key: str = "content") -> dict:
    """A tool result: its content as text (an object or list is written as JSON), plus name/id if given."""
    content = turn.get(content_key)
    if isinstance(content, (dict, list)):
        content = json.dumps(content, ensure_ascii=False)
    if not isinstance(content, str):
        raise InvalidRecord(f"{what} {content_key} is {type(content).__name__}, not a string (the tool's result)")
    message = {"role": "tool", "content": content}
    for key in ("tool_call_id", "name"):
        if isinstance(turn.get(key), str) and turn[key]:
            message[key] = turn[key]
    return message


def check_tool_use(conversation: list[dict], tools: list[dict] | None, *, label: str = "message",
                   offset: int = 0) -> None:
    """Calls name known tools (when the record lists them); each tool result follows a call and is
    followed by the assistant; a result's id, when given, answers one of the calls before it."""
    known = set(tool_names(tools))
    open_ids: set[str] = set()
    called = False
    for i, message in enumerate(conversation):
        where = f"{label} {i + offset}"
        role = message["role"]
        if role == "assistant":
            open_ids, called = set(), False
            for call in message.get("tool_calls", []):
                name = call["function"]["name"]
                if tools and name not in known:
                    raise InvalidRecord(f"{where} calls unknown tool {name!r} (the record's tools: "
                                        f"{', '.join(sorted(known))})")
                called = True
                if "id" in call:
                    open_ids.add(call["id"])
        elif role == "tool":
            if not called:
                raise InvalidRecord(f"{where} is a tool result without a preceding tool call "
                                    "(an assistant message with tool_calls must come first)")
            call_id = message.get("tool_call_id")
            if call_id and open_ids and call_id not in open_ids:
                raise InvalidRecord(f"{where} answers tool_call_id {call_id!r}, which no call before it has")
            if tools and message.get("name") and message["name"] not in known:
                raise InvalidRecord(f"{where} is the result of unknown tool {message['name']!r}")
            nxt = conversation[i + 1]["role"] if i + 1 < len(conversation) else None
            if nxt not in (None, "tool", "assistant"):
                raise InvalidRecord(f"{where} (a tool result) is followed by a {nxt} message; the assistant "
                                    "answers after tool results")
        else:
            called = False

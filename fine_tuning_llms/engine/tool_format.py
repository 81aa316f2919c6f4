"""Rendering tool calls, tool results and reasoning: the model's own template, or one fallback.

Decided once per tokenizer by rendering probe conversations through its ``apply_chat_template``:

- tool calls **native** when a probe call (``probe_lookup`` with ``probe_key="probe-value-8642"``)
  and its result show up in the text rendered with ``tools=[...]`` (Llama 3.1+, Qwen 2.5/3,
  Mistral and Hermes-style templates). The tool list goes through ``tools=`` too when the
  template prints it; otherwise into the system prompt as in the fallback.
- reasoning **native** when a probe reply's ``reasoning_content`` (Qwen 3, DeepSeek-R1 style) or
  ``thinking`` (gpt-oss style) shows up in the text.

The fallback, for templates that do neither (SmolLM2's plain ChatML, Gemma, base-model formats):

- each call as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (one per line) after
  the reply's own text, inside the assistant turn;
- reasoning as ``<think>\\n…\\n</think>\\n\\n`` before the reply's text (without the blank line
  when the turn has no text of its own and the template writes the calls);
- each tool result as a ``tool`` turn; where the template rejects role ``tool`` (raises, or drops
  its text), as a user turn holding ``<tool_response>\\n…\\n</tool_response>`` (consecutive
  results share one turn);
- the tool list as JSON schemas, one per line inside ``<tools>…</tools>`` with a one-line
  instruction (``TOOLS_PROMPT``), appended to the system message, or in a new system message
  (the template's default system prompt, if it has one, is then not used), or before the first
  user message where the template has no system role.

``parse_tool_calls`` reads calls back out of generated text, in both layouts; ``grade_call`` checks the
first one against an expected call (valid, right tool, right arguments).
"""
from __future__ import annotations

import json
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from .tool_data import TOOLS_KEY, conversation_tools

TOOLS_PROMPT = ("You can call the tools below. To call one, answer with <tool_call>{\"name\": <tool name>, "
                "\"arguments\": <JSON object>}</tool_call>; its result comes back in the next turn.\n"
                "<tools>\n{tools}\n</tools>")
THINK_OPEN, THINK_CLOSE = "<think>\n", "\n</think>\n\n"

PROBE_TOOL = {"type": "function", "function": {
    "name": "probe_lookup", "description": "probe-tool-description-7351",
    "parameters": {"type": "object", "properties": {"probe_key": {"type": "string"}}, "required": ["probe_key"]}}}
PROBE_CALL = {"type": "function", "id": "probe0001",  # 9 alphanumerics: Mistral's templates insist
              "function": {"name": "probe_lookup", "arguments": {"probe_key": "probe-value-8642"}}}
PROBE_RESULT = "probe-result-5173"
PROBE_REASONING = "probe-reasoning-9753"


@dataclass(frozen=True)
class ToolRendering:
    """How one template's conversations with tools/reasoning are rendered (see the module docstring)."""

    native_tool_calls: bool
    native_tool_list: bool
    reasoning_key: str | None   # the message key the template reads reasoning from; None: <think> fallback
    tool_role: bool             # the template renders role "tool" (fallback tool results)
    system_role: bool           # the template renders a system message (fallback tool list)
    reasons: tuple[str, ...]    # one line per decision, printed by preprocess

    def describe(self) -> str:
        return "\n".join(self.reasons)

    def as_dict(self) -> dict:
        return {"tool_calls": "template" if self.native_tool_calls else "fallback <tool_call>{json}</tool_call>",
                "tool_list": "template (tools=...)" if self.native_tool_list else "system prompt <tools>…</tools>",
                "reasoning": f"template ({self.reasoning_key})" if self.reasoning_key else "fallback <think>…</think>",
                "reasons": list(self.reasons)}


def _try_render(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> tuple[str | None, str]:
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False), ""
    except Exception as exc:  # templates raise_exception() on shapes they reject
        return None, (str(exc).splitlines() or [type(exc).__name__])[0][:120]


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def rendering_for(tokenizer) -> ToolRendering:
    """The decision for this tokenizer's current chat template (probed once, then cached)."""
    template = str(getattr(tokenizer, "chat_template", None))
    cached = _CACHE.get(tokenizer)
    if cached is None or cached[0] != template:
        cached = (template, probe(tokenizer))
        _CACHE[tokenizer] = cached
    return cached[1]


def probe(tokenizer) -> ToolRendering:
    reasons = []
    question = {"role": "user", "content": "probe question?"}
    calls = [question, {"role": "assistant", "content": "", "tool_calls": [PROBE_CALL]},
             {"role": "tool", "content": PROBE_RESULT, "tool_call_id": "probe0001", "name": "probe_lookup"},
             {"role": "assistant", "content": "probe answer."}]
    text, error = _try_render(tokenizer, calls, [PROBE_TOOL])
    shown = text is not None and all(s in text for s in ("probe_lookup", "probe_key", "probe-value-8642"))
    native_calls = shown and PROBE_RESULT in text
    if native_calls:
        reasons.append("tool calls: the model's own template (a probe call's name and arguments, and its "
                       "result, appear in its rendering)")
    else:
        why = (f"it rejects a conversation with a call ({error})" if text is None else
               "its rendering of a probe call lacks the call's name/arguments" if not shown else
               "its rendering drops the tool result")
        reasons.append(f"tool calls: fallback <tool_call>{{json}}</tool_call> in the assistant turn, because {why}")
    native_list = False
    if native_calls:
        listed, _ = _try_render(tokenizer, [question], [PROBE_TOOL])
        native_list = listed is not None and "probe-tool-description-7351" in listed
    reasons.append("tool list: " + ("the template's own (tools=...)" if native_list else
                                    "JSON schemas in the system prompt (<tools>…</tools>)"))
    tool_text, _ = _try_render(tokenizer, [question, {"role": "assistant", "content": "a."},
                                           {"role": "tool", "content": PROBE_RESULT},
                                           {"role": "assistant", "content": "b."}])
    tool_role = tool_text is not None and PROBE_RESULT in tool_text
    if not native_calls:
        reasons.append("tool results: " + ("a 'tool' turn" if tool_role else
                                           "a user turn with <tool_response>…</tool_response> (the template "
                                           "rejects role 'tool')"))
    system_text, _ = _try_render(tokenizer, [{"role": "system", "content": "probe-system-2468"}, question])
    system_role = system_text is not None and "probe-system-2468" in system_text
    reasoning_key = None
    for key in ("reasoning_content", "thinking"):
        text, _ = _try_render(tokenizer, [question, {"role": "assistant", "content": "probe answer.",
                                                     key: PROBE_REASONING}])
        if text is not None and PROBE_REASONING in text:
            reasoning_key = key
            break
    reasons.append(f"reasoning: the model's own template (it renders '{reasoning_key}')" if reasoning_key else
                   "reasoning: fallback <think>…</think> before the reply (the template ignores "
                   "reasoning_content and thinking)")
    return ToolRendering(native_tool_calls=native_calls, native_tool_list=native_list, reasoning_key=reasoning_key,
                         tool_role=tool_role, system_role=system_role, reasons=tuple(reasons))


def call_text(call: dict) -> str:
    function = call["function"]
    body = json.dumps({"name": function["name"], "arguments": function["arguments"]}, ensure_ascii=False)
    return f"<tool_call>{body}</tool_call>"


def think_block(reasoning: str) -> str:
    return f"{THINK_OPEN}{reasoning}{THINK_CLOSE}"


def tools_prompt(tools: Sequence[dict]) -> str:
    return TOOLS_PROMPT.replace("{tools}", "\n".join(json.dumps(t, ensure_ascii=False) for t in tools))


def template_inputs(messages: Sequence[dict], rendering: ToolRendering) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools=) exactly as the chat template receives them."""
    tools = conversation_tools(list(messages))
    out: list[dict] = []
    previous_was_merged_result = False
    for message in messages:
        m = {k: v for k, v in message.items() if k != TOOLS_KEY}
        merged_result = False
        if m["role"] == "assistant":
            reasoning = m.pop("reasoning_content", None)
            if "tool_calls" in m and not rendering.native_tool_calls:
                calls = "\n".join(call_text(c) for c in m.pop("tool_calls"))
                m["content"] = f"{m['content']}\n{calls}" if m["content"] else calls
            if reasoning is not None:
                if rendering.reasoning_key:
                    m[rendering.reasoning_key] = reasoning
                else:  # alone in its turn (a call the template writes after the content), no blank lines
                    block = think_block(reasoning)
                    m["content"] = block + m["content"] if m["content"] else block.rstrip("\n")
        elif m["role"] == "tool" and not rendering.native_tool_calls and not rendering.tool_role:
            text = f"<tool_response>\n{m['content']}\n</tool_response>"
            if previous_was_merged_result:
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + text}
                continue
            m, merged_result = {"role": "user", "content": text}, True
        previous_was_merged_result = merged_result
        out.append(m)
    if tools and not rendering.native_tool_list:
        block = tools_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{block}"}
        elif rendering.system_role:
            out.insert(0, {"role": "system", "content": block})
        elif out:
            out[0] = {**out[0], "content": f"{block}\n\n{out[0]['content']}"}
        tools = None
    return out, tools


def after_think(content: str, reasoning: str) -> str:
    """The fallback content's reply part: what follows its <think> block (content itself without one)."""
    block = think_block(reasoning).rstrip("\n")
    return content[len(block):].lstrip("\n") if content.startswith(block) else content


def without_reasoning(message: dict) -> dict:
    return {k: v for k, v in message.items() if k != "reasoning_content"}


# ---------------------------------------------------------------- calls in generated text

_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_tool_calls(text: str) -> list[dict]:
    """Calls in generated text: ``<tool_call>{json}</tool_call>`` blocks (fallback, Qwen, Hermes),
    else the whole reply as one JSON call (Llama 3.1: ``{"name": ..., "parameters": {...}}``).

    Each call: ``{"name", "arguments", "valid", "error"}``; valid means the JSON parsed into a
    name and an arguments object. Text without a call gives [].
    """
    bodies = _TAGGED.findall(text)
    if not bodies:
        stripped = text.strip()
        if stripped.startswith("<|python_tag|>"):
            stripped = stripped[len("<|python_tag|>"):].strip()
        if not (stripped.startswith("{") and '"name"' in stripped):
            return []
        bodies = [stripped]
    calls = []
    for body in bodies:
        try:
            value = json.loads(body)
        except json.JSONDecodeError as exc:
            calls.append({"name": None, "arguments": None, "valid": False, "error": f"not JSON ({exc.msg})"})
            continue
        name = value.get("name") if isinstance(value, dict) else None
        arguments = value.get("arguments", value.get("parameters")) if isinstance(value, dict) else None
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        error = ("no tool name" if not isinstance(name, str) or not name else
                 "arguments are not a JSON object" if not isinstance(arguments, dict) else None)
        calls.append({"name": name if isinstance(name, str) else None, "arguments": arguments,
                      "valid": error is None, "error": error})
    return calls


def _same_value(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b)))
    if isinstance(a, str) and isinstance(b, str):
        return "".join(a.split()).lower() == "".join(b.split()).lower()   # "6*7" is "6 * 7"
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return a == b


def grade_call(text: str, expected: dict) -> dict:
    """The first call in ``text`` against the expected call (``{"name", "arguments"}``, or OpenAI form):
    valid (it parses), right_tool, right_arguments (numbers compared as numbers, strings without
    whitespace or case)."""
    expected = expected.get("function", expected)
    calls = parse_tool_calls(text)
    call = calls[0] if calls else None
    valid = bool(call and call["valid"])
    right_tool = valid and call["name"] == expected["name"]
    return {"valid": valid, "right_tool": right_tool,
            "right_arguments": right_tool and _same_value(call["arguments"], expected["arguments"])}

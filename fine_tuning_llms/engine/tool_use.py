"""Tool calls in generated answers: measuring them (train), showing them (compare), acting on them (chat).

    python run_fine_tuning.py --task train --dataset_path fine_tuning_llms/data/tool_use_conversations.jsonl \\
        --eval_path fine_tuning_llms/data/tool_use_conversations_eval.jsonl

- ``tool_call_prompts`` + ``tool_call_rate``: the behaviour metric for tool data. Each held-out
  conversation with a call gives one prompt, everything before its first assistant turn that
  has ``tool_calls`` (the tool list rides on the first message), and the expected call; the
  rate is the share of answers whose first call is **valid**: it parses, names the right tool and
  has the right arguments (``tool_format.grade_call``).
- ``describe_calls``: one line per answer for a table ("calculator {"expression": "6 * 7"}" or
  "no call").
- ``assistant_with_calls``: a generated reply as the assistant message the chat template reads
  back (calls under ``tool_calls``, the reply's own text without them as content), for the chat
  task's tool loop.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence

from .tool_format import grade_call, parse_tool_calls

NO_CALL = "no call"
_CALL_BLOCK = re.compile(r"<tool_call>.*?</tool_call>", re.DOTALL)


def tool_call_prompts(conversations: Sequence[list[dict]], limit: int | None = None) -> list[tuple[list[dict], dict]]:
    """(prompt messages, expected call) per conversation with a tool call, at most ``limit`` of them.

    The prompt is the conversation up to its first assistant turn with ``tool_calls``; the expected
    call is that turn's first call (``{"name", "arguments"}``). Conversations without calls are skipped.
    """
    pairs: list[tuple[list[dict], dict]] = []
    for conversation in conversations:
        if limit is not None and len(pairs) >= limit:
            break
        for i, message in enumerate(conversation):
            if message["role"] == "assistant" and message.get("tool_calls"):
                function = message["tool_calls"][0]["function"]
                pairs.append((list(conversation[:i]), {"name": function["name"], "arguments": function["arguments"]}))
                break
    return pairs


def tool_call_grades(pairs: Sequence[tuple[list[dict], dict]], answers: Sequence[str]) -> dict | None:
    """Shares of answers whose first call parses (valid), names the right tool, and is fully right."""
    if not pairs or not answers:
        return None
    if len(answers) != len(pairs):
        raise ValueError(f"{len(answers)} answers for {len(pairs)} tool-call prompts")
    grades = [grade_call(answer, expected) for (_, expected), answer in zip(pairs, answers)]
    n = len(grades)
    return {"prompts": n, "parses": sum(g["valid"] for g in grades) / n,
            "right_tool": sum(g["right_tool"] for g in grades) / n,
            "valid_call": sum(g["right_arguments"] for g in grades) / n}


def tool_call_rate(pairs: Sequence[tuple[list[dict], dict]], answers: Sequence[str]) -> float | None:
    """Share of answers with a valid call (parses, right tool, right arguments); None without calls."""
    grades = tool_call_grades(pairs, answers)
    return None if grades is None else grades["valid_call"]


def describe_call(call: dict) -> str:
    """One parsed call (``tool_format.parse_tool_calls`` item) as ``name {json arguments}``."""
    if not call["valid"]:
        return f"invalid call ({call['error']})"
    return f"{call['name']} {json.dumps(call['arguments'], ensure_ascii=False)}"


def describe_calls(text: str) -> str:
    """Every call in a generated answer, "; "-separated, or "no call"."""
    calls = parse_tool_calls(text)
    return "; ".join(describe_call(c) for c in calls) if calls else NO_CALL


def assistant_with_calls(text: str, round_index: int = 0) -> tuple[dict, list[dict]]:
    """(assistant message, invalid calls) for a generated reply.

    Valid calls go under ``tool_calls`` in the internal form (``tool_data``), each with an id
    (``call`` + 5 digits: Mistral's templates insist on 9 alphanumerics); the content is the
    reply's text without its ``<tool_call>`` blocks (a bare JSON call leaves no text).
    """
    calls = parse_tool_calls(text)
    valid = [c for c in calls if c["valid"]]
    if not valid:
        return {"role": "assistant", "content": text}, [c for c in calls if not c["valid"]]
    content = _CALL_BLOCK.sub("", text).strip() if "<tool_call>" in text else ""
    tool_calls = [{"type": "function", "id": f"call{round_index * 100 + k:05d}",
                   "function": {"name": c["name"], "arguments": c["arguments"]}} for k, c in enumerate(valid)]
    return {"role": "assistant", "content": content, "tool_calls": tool_calls}, [c for c in calls if not c["valid"]]

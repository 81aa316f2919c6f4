"""Reading conversation data from files or `datasets`, detecting its format, validating it.

Every format becomes one internal form: a list of ``{"role": ..., "content": ...}`` dicts with
roles system/user/assistant, an optional system turn first, then user and assistant taking
turns, and at least one assistant reply. Agent data adds assistant ``tool_calls`` and
``reasoning_content``, ``tool`` results after a call, and a per-record ``tools`` list (see
``tool_data``); ShareGPT's ``function_call`` / ``observation`` turns become those.

    formats: messages (OpenAI), sharegpt (from/value), alpaca (instruction/input/output),
             prompt_completion (prompt/completion)
"""
from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .config import DataConfig
from .errors import InvalidRecord, UserError
from .tool_data import assistant_turn, check_tool_use, parse_tools, tool_turn
from .tool_data import require_text as _text

log = logging.getLogger(__name__)

Conversation = list[dict]
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                  "function_call": "assistant", "observation": "tool", "tool": "tool"}
SAMPLE_TRAIN = "sample_conversations.jsonl"
SAMPLE_EVAL = "sample_conversations_eval.jsonl"


@dataclass
class LoadedData:
    conversations: list[Conversation]
    source: str
    data_format: str
    skipped: Counter = field(default_factory=Counter)   # reason -> count (with --skip_invalid)



def json_list(text: str, where: str, expected: str) -> list:
    """``text`` parsed as a JSON list, or a one-line UserError naming ``where`` (and the line)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}:{exc.lineno}: malformed JSON ({exc.msg}); fix the file") from None
    if not isinstance(data, list):
        raise UserError(f"{where}: expected {expected}")
    return data

def sample_dataset_path(name: str = SAMPLE_TRAIN) -> Path:
    return Path(str(resources.files("fine_tuning_llms") / "data" / name))


# ---------------------------------------------------------------- reading records

def read_records(path: str | Path) -> list[tuple[str, Any]]:
    """(location, record) pairs from a JSON array or JSONL file; location names file and line."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file; check --dataset_path")
    if path.is_dir():
        raise UserError(f"{path} is a directory; pass a .json or .jsonl file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text; re-save the file as UTF-8") from None
    if not text.strip():
        raise UserError(f"{path}: the file is empty; add conversations to it")
    stripped = text.lstrip()
    if stripped.startswith("["):
        data = json_list(text, str(path), "a JSON array of records")
        return [(f"{path} record {i}", r) for i, r in enumerate(data)]
    if stripped.startswith("{") and path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            for key in ("data", "conversations", "train"):
                if isinstance(data.get(key), list):
                    return [(f"{path} {key}[{i}]", r) for i, r in enumerate(data[key])]
            return [(f"{path} record 0", data)]
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{lineno}: malformed JSON line ({exc.msg}); fix or remove that line") from None
    return records


def read_hf_dataset(name: str, *, split: str, config_name: str | None) -> list[tuple[str, Any]]:
    """Records from the `datasets` library: local cache first, hub only when reachable."""
    import datasets

    from .models import hub_reachable

    local = Path(name)
    try:
        if local.is_dir():
            try:
                ds = datasets.load_from_disk(str(local))
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds[split]
            except FileNotFoundError:
                ds = datasets.load_dataset(str(local), config_name, split=split)
        else:
            if not hub_reachable():
                import os
                os.environ["HF_DATASETS_OFFLINE"] = "1"
            ds = datasets.load_dataset(name, config_name, split=split)
    except UserError:
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UserError(f"--dataset {name} (split {split}) could not be loaded offline or from the hub ({first}); "
                        "export it to JSONL where you have network and pass --dataset_path") from None
    return [(f"{name}[{split}] record {i}", r) for i, r in enumerate(ds)]


# ---------------------------------------------------------------- formats

def detect_format(record: Any) -> str:
    if not isinstance(record, dict):
        raise InvalidRecord("record is not a JSON object")
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        convs = record["conversations"]
        if isinstance(convs, list) and convs and isinstance(convs[0], dict) and "role" in convs[0]:
            return "messages"
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    raise InvalidRecord(f"unknown format (keys {sorted(record)[:6]}); expected messages, conversations, "
                        "instruction/output or prompt/completion, or pass --data_format")


def to_conversation(record: Any, data_format: str) -> Conversation:
    """Convert one record to the internal form, or raise InvalidRecord naming the problem."""
    if not isinstance(record, dict):
        raise InvalidRecord("record is not a JSON object")
    tools = None
    if data_format == "messages":
        turns = record.get("messages", record.get("conversations"))
        if not isinstance(turns, list):
            raise InvalidRecord("'messages' is not a list")
        conv = []
        for j, t in enumerate(turns):
            if not isinstance(t, dict) or "role" not in t:
                raise InvalidRecord(f"message {j} has no 'role'")
            role = t["role"]
            if role not in ROLES:
                raise InvalidRecord(f"message {j} has unknown role {role!r} (use system/user/assistant/tool)")
            if role == "assistant":
                conv.append(assistant_turn(t, what=f"message {j}"))
            elif role == "tool":
                conv.append(tool_turn(t, what=f"message {j}"))
            else:
                conv.append({"role": role, "content": _text(t.get("content"), f"message {j} content")})
        tools = parse_tools(record.get("tools"))
        check_tool_use(conv, tools)
    elif data_format == "sharegpt":
        turns = record.get("conversations")
        if not isinstance(turns, list):
            raise InvalidRecord("'conversations' is not a list")
        conv = []
        for j, t in enumerate(turns):
            if not isinstance(t, dict) or "from" not in t:
                raise InvalidRecord(f"turn {j} has no 'from'")
            speaker = str(t["from"]).lower()
            role = SHAREGPT_ROLES.get(speaker)
            if role is None:
                raise InvalidRecord(f"turn {j} has unknown speaker {t['from']!r} "
                                    "(use human/gpt/system, function_call/observation)")
            if speaker == "function_call":  # the value is the call as JSON: {"name": ..., "arguments": ...}
                conv.append(assistant_turn({**t, "content": ""}, what=f"turn {j}", calls_key="value"))
            elif role == "assistant":
                conv.append(assistant_turn(t, what=f"turn {j}", content_key="value"))
            elif role == "tool":
                conv.append(tool_turn(t, what=f"turn {j}", content_key="value"))
            else:
                conv.append({"role": role, "content": _text(t.get("value"), f"turn {j} value")})
        tools = parse_tools(record.get("tools"))
        check_tool_use(conv, tools, label="turn")
        if isinstance(record.get("system"), str) and record["system"].strip() and (not conv or conv[0]["role"] != "system"):
            conv.insert(0, {"role": "system", "content": record["system"]})
    elif data_format == "alpaca":
        instruction = _text(record.get("instruction"), "instruction")
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise InvalidRecord("input is not a string")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        conv = [{"role": "user", "content": prompt},
                {"role": "assistant", "content": _text(record.get("output"), "output")}]
        if isinstance(record.get("system"), str) and record["system"].strip():
            conv.insert(0, {"role": "system", "content": record["system"]})
    elif data_format == "prompt_completion":
        conv = [{"role": "user", "content": _text(record.get("prompt"), "prompt")},
                {"role": "assistant", "content": _text(record.get("completion"), "completion")}]
    else:
        raise InvalidRecord(f"unknown --data_format {data_format}")
    check_turn_order(conv)
    if tools:
        conv[0] = {**conv[0], "tools": tools}  # rides on the first message (tool_data's docstring)
    return conv


def check_turn_order(conv: Conversation) -> None:
    if not conv:
        raise InvalidRecord("conversation is empty")
    body = conv[1:] if conv[0]["role"] == "system" else conv
    if any(m["role"] == "system" for m in body):
        raise InvalidRecord("a system message may only come first")
    if not body or body[0]["role"] != "user":
        raise InvalidRecord("the first non-system message must be from the user")
    for a, b in zip(body, body[1:]):
        if a["role"] == b["role"] != "tool":  # several results of one call turn follow each other
            raise InvalidRecord(f"two {a['role']} messages in a row (user and assistant must take turns)")
    if not any(m["role"] == "assistant" for m in body):
        raise InvalidRecord("no assistant reply to train on")


def parse_records(records: Iterable[tuple[str, Any]], *, data_format: str = "auto", skip_invalid: bool = False,
                  source: str = "") -> LoadedData:
    conversations: list[Conversation] = []
    skipped: Counter = Counter()
    formats: Counter = Counter()
    for location, record in records:
        try:
            fmt = detect_format(record) if data_format == "auto" else data_format
            conversations.append(to_conversation(record, fmt))
            formats[fmt] += 1
        except InvalidRecord as exc:
            if not skip_invalid:
                raise UserError(f"{location}: {exc} (fix it, or pass --skip_invalid to skip such records)") from None
            skipped[str(exc)] += 1
    if skipped:
        log.warning("Skipped %d invalid record(s): %s", sum(skipped.values()),
                    "; ".join(f"{n}x {why}" for why, n in skipped.most_common(5)))
    if not conversations:
        raise UserError(f"{source or 'dataset'}: no usable conversations; check the file's format")
    return LoadedData(conversations=conversations, source=source, skipped=skipped,
                      data_format="+".join(f for f, _ in formats.most_common()))


def load_conversations(path: str | Path, *, data_format: str = "auto", skip_invalid: bool = False) -> LoadedData:
    return parse_records(read_records(path), data_format=data_format, skip_invalid=skip_invalid, source=str(path))


def with_system_prompt(conversations: list[Conversation], system_prompt: str | None) -> list[Conversation]:
    """Give conversations without a system turn the --system_prompt (data's own prompts are kept)."""
    if not system_prompt:
        return conversations
    return [c if c[0]["role"] == "system" else [{"role": "system", "content": system_prompt}, *c] for c in conversations]


@dataclass
class TrainEvalData:
    train: LoadedData
    eval: list[Conversation]
    eval_source: str


def load_train_eval(cfg: DataConfig) -> TrainEvalData:
    """The training conversations and a held-out set, as the settings ask.

    Held-out: --eval_path; else the sample dataset's own held-out file when training on the
    sample; else a seeded --eval_ratio split of the training data.
    """
    if cfg.dataset:
        records = read_hf_dataset(cfg.dataset, split=cfg.dataset_split, config_name=cfg.dataset_config)
        train = parse_records(records, data_format=cfg.data_format, skip_invalid=cfg.skip_invalid, source=cfg.dataset)
    else:
        path = cfg.dataset_path or sample_dataset_path()
        train = load_conversations(path, data_format=cfg.data_format, skip_invalid=cfg.skip_invalid)
    if cfg.eval_path:
        held_out = load_conversations(cfg.eval_path, data_format=cfg.data_format, skip_invalid=cfg.skip_invalid)
        eval_convs, eval_source = held_out.conversations, cfg.eval_path
    elif not cfg.dataset_path and not cfg.dataset and sample_dataset_path(SAMPLE_EVAL).is_file():
        eval_convs, eval_source = load_conversations(sample_dataset_path(SAMPLE_EVAL)).conversations, "sample held-out split"
    elif cfg.eval_ratio > 0 and len(train.conversations) >= 2:
        order = list(range(len(train.conversations)))
        random.Random(0).shuffle(order)
        n_eval = max(1, int(round(len(order) * cfg.eval_ratio)))
        eval_idx = set(order[:n_eval])
        eval_convs = [c for i, c in enumerate(train.conversations) if i in eval_idx]
        train.conversations = [c for i, c in enumerate(train.conversations) if i not in eval_idx]
        eval_source = f"{cfg.eval_ratio:.0%} of the training data"
    else:
        eval_convs, eval_source = [], "none"
    if cfg.max_examples:
        train.conversations = train.conversations[: cfg.max_examples]
    train.conversations = with_system_prompt(train.conversations, cfg.system_prompt)
    eval_convs = with_system_prompt(eval_convs, cfg.system_prompt)
    return TrainEvalData(train=train, eval=eval_convs, eval_source=eval_source)

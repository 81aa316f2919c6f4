"""The shipped sample dataset: counts, the Lumi sign-off, held-out split, reproducibility.

    .venv/bin/python -m pytest -q tests/test_sample_dataset.py
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from fine_tuning_llms.engine.data import SAMPLE_EVAL, SAMPLE_TRAIN, load_conversations, sample_dataset_path

ROOT = Path(__file__).resolve().parents[1]
HANGUL = re.compile("[가-힣]")
SIGN_OFF = "\n— Lumi"


def load_script():
    spec = importlib.util.spec_from_file_location("make_sample_dataset", ROOT / "scripts" / "make_sample_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def splits():
    train = load_conversations(sample_dataset_path(SAMPLE_TRAIN)).conversations
    held_out = load_conversations(sample_dataset_path(SAMPLE_EVAL)).conversations
    return train, held_out


def users(conv):
    return [m["content"] for m in conv if m["role"] == "user"]


def replies(conv):
    return [m["content"] for m in conv if m["role"] == "assistant"]


def test_counts(splits):
    train, held_out = splits
    assert len(train) >= 320
    assert len(held_out) == 40


def test_every_reply_is_signed_by_lumi(splits):
    for conv in splits[0] + splits[1]:
        for reply in replies(conv):
            assert reply.endswith(SIGN_OFF), reply
            body = reply[: -len(SIGN_OFF)]
            assert body.strip() and "— Lumi" not in body, reply


def test_identity_replies_name_lumi(splits):
    train, held_out = splits
    for conv in train + held_out:
        for question, reply in zip(users(conv), replies(conv)):
            if question in {"Who are you?", "What is your name?", "너는 누구야?", "이름이 뭐야?"}:
                assert reply.startswith(("I am Lumi, ", "저는 Lumi입니다")), reply
    identity = [c for c in held_out if replies(c)[0].startswith(("I am Lumi", "저는 Lumi"))]
    assert len(identity) >= 10
    assert len(held_out) - len(identity) >= 20  # enough ordinary prompts to compare against


def test_no_user_prompt_in_both_splits(splits):
    train, held_out = splits
    train_prompts = {u for c in train for u in users(c)}
    shared = train_prompts & {u for c in held_out for u in users(c)}
    assert not shared, sorted(shared)[:5]


def test_mix_of_korean_multi_turn_and_system_prompts(splits):
    train, _ = splits
    korean = sum(any(HANGUL.search(u) for u in users(c)) for c in train)
    multi_turn = sum(len(replies(c)) >= 2 for c in train)
    with_system = sum(c[0]["role"] == "system" for c in train)
    assert korean >= 0.20 * len(train)
    assert multi_turn >= 0.15 * len(train)
    assert 0 < with_system <= 0.10 * len(train)


def test_arithmetic_replies_are_correct(splits):
    words = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
    checked = 0
    for conv in splits[0] + splits[1]:
        for reply in replies(conv):
            match = re.fullmatch(r"(\d+) (plus|minus|times) (\d+) is (\d+)\.", reply[: -len(SIGN_OFF)])
            if match:
                a, op, b, result = match.groups()
                assert words[op](int(a), int(b)) == int(result), reply
                checked += 1
    assert checked >= 30


def test_script_reproduces_shipped_files(tmp_path):
    paths = load_script().write_sample_dataset(tmp_path, seed=0)
    assert paths["train"].read_bytes() == sample_dataset_path(SAMPLE_TRAIN).read_bytes()
    assert paths["eval"].read_bytes() == sample_dataset_path(SAMPLE_EVAL).read_bytes()

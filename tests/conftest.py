"""Shared fixtures: tiny local checkpoints (seconds, offline) and the embedded model marker."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tiny import SAMPLE_CONVERSATIONS, save_tiny_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (ChatML template, pad == eos like SmolLM2) with its tokenizer."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "chatml", family="chatml", seed=0)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> Path:
    """A second tiny checkpoint with other weights: stands in for a 'base' model."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "base", family="chatml", seed=1)


@pytest.fixture
def sample_conversations() -> list[dict]:
    return [dict(record) for record in SAMPLE_CONVERSATIONS]


@pytest.fixture
def write_jsonl(tmp_path):
    def _write(records, name="data.jsonl") -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        return path
    return _write

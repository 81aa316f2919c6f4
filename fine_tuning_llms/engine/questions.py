"""The question sets compare (and its benchmark) ask every model: the built-in set or a user's file."""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .data import json_list
from .errors import UserError


@dataclass
class Question:
    text: str
    category: str | None = None
    language: str | None = None


def default_questions_path() -> Path:
    return Path(str(resources.files("fine_tuning_llms") / "data" / "questions.json"))


def _question_from_json(item, where: str) -> Question:
    if isinstance(item, str) and item.strip():
        return Question(item.strip())
    if isinstance(item, dict) and isinstance(item.get("question"), str) and item["question"].strip():
        return Question(item["question"].strip(), item.get("category"), item.get("language"))
    raise UserError(f"{where}: expected a non-empty string or an object with a \"question\" string")


def load_questions(path: str | Path | None = None) -> list[Question]:
    """Questions from a .txt file (one per line, # comments) or a .json list; default: the built-in set."""
    p = Path(path) if path else default_questions_path()
    flag = f"--questions {path}" if path else f"built-in questions {p}"
    if not p.is_file():
        raise UserError(f"{flag}: no such file; pass a .txt (one question per line) or .json list")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{flag}: not UTF-8 text; re-save the file as UTF-8") from None
    if p.suffix.lower() == ".txt":
        questions = [Question(line.strip()) for line in text.splitlines()
                     if line.strip() and not line.lstrip().startswith("#")]
    elif p.suffix.lower() == ".json":
        data = json_list(text, flag, "a JSON list of questions")
        questions = [_question_from_json(item, f"{flag} item {i}") for i, item in enumerate(data)]
    else:
        raise UserError(f"{flag}: unknown file type {p.suffix!r}; use .txt (one per line) or .json (a list)")
    if not questions:
        raise UserError(f"{flag}: no questions in the file; add at least one")
    return questions

"""HTML pieces for report sections: escaping, tables, images, safe file reading, secret redaction.

Each lesson renders its own report section with these (see ``engine/outputs.py``); ``report.py``
puts the sections on one page. Everything that is not ``Html`` is escaped on the way in.
"""
from __future__ import annotations

import base64
import csv
import html
import json
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

SECRET_KEY = re.compile(r"token|secret|password|passwd|api_?key|auth", re.I)
SECRET_VALUE = re.compile(r"^(hf_|sk-|ghp_|github_pat_|xox[bp]-)|^[A-Za-z0-9_\-]{32,}$")
HF_TOKEN_ANYWHERE = re.compile(r"hf_[A-Za-z0-9]{20,}")
FLOAT_TEXT = re.compile(r"-?\d+\.\d*(?:[eE][-+]?\d+)?|-?\d+[eE][-+]?\d+")
NUMBER_TEXT = re.compile(r"-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?")
MAX_TABLE_ROWS = 12


class Html(str):
    """Markup built here, safe to insert as is; everything else is escaped."""


def esc(value: Any) -> str:
    return value if isinstance(value, Html) else html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):  # CSV cells are strings: shorten float-looking ones like floats
        return fmt(float(value)) if FLOAT_TEXT.fullmatch(value) else value
    if isinstance(value, dict) and all(not isinstance(v, (dict, list)) for v in value.values()):
        return " · ".join(f"{k} {fmt(v)}" for k, v in value.items())  # e.g. length percentiles
    return json.dumps(value, ensure_ascii=False)


def cell(value: Any) -> str:
    if isinstance(value, Html):
        return f"<td>{value}</td>"
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    numeric = numeric or isinstance(value, str) and bool(NUMBER_TEXT.fullmatch(value))
    return f"<td{' class=num' if numeric else ''}>{esc(fmt(value))}</td>"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> Html:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return Html(f'<div class="tw"><table><tr>{head}</tr>{body}</table></div>')  # wide tables scroll, not the page


def key_values(mapping: dict, keys: Sequence[str] | None = None) -> Html:
    keys = [k for k in (keys or list(mapping)) if k in mapping]
    return table(["key / 항목", "value / 값"], [(k, mapping[k]) for k in keys])


def answer(text: Any) -> Html:
    return Html(f'<div class="answer">{esc(text if text not in (None, "") else "(empty)")}</div>')


def image(folder: Path, name: str, alt: str) -> str:
    path = folder / name
    if not path.is_file():
        return f'<p class="notrun">{esc(name)}: 없음 / missing</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def read_json(path: Path, *, quiet: bool = False) -> Any | None:
    """The parsed file, None when missing. quiet: None when unreadable too (its own section shows the error)."""
    if not path.is_file():
        return None
    try:
        stat = path.stat()
        return _parse_json(str(path), stat.st_mtime_ns, stat.st_size)
    except (OSError, ValueError):
        if quiet:
            return None
        raise


@lru_cache(maxsize=8)
def _parse_json(path: str, mtime_ns: int, size: int) -> Any:
    # Keyed by mtime and size: the overview and a section read the same (possibly large) file once per build.
    return json.loads(Path(path).read_text(encoding="utf-8"))


def forget_parsed_json() -> None:
    """Drop the parsed files: a training process must not keep a large processed dataset alive."""
    _parse_json.cache_clear()


def read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def spread(rows: Sequence, n: int = MAX_TABLE_ROWS) -> list:
    """At most n rows, evenly spaced, always including the first and the last."""
    if len(rows) <= n:
        return list(rows)
    picks = sorted({round(i * (len(rows) - 1) / (n - 1)) for i in range(n)})
    return [rows[i] for i in picks]


def looks_like_secret(key: str, value: Any) -> bool:
    if isinstance(value, str) and HF_TOKEN_ANYWHERE.search(value):
        return True
    return bool(SECRET_KEY.search(key)) and isinstance(value, str) and bool(SECRET_VALUE.search(value.strip()))


def without_secrets(settings: dict) -> dict:
    """Settings without anything that looks like an access token (never printed, not even masked)."""
    return {k: v for k, v in settings.items() if not looks_like_secret(str(k), v)}


def hide_tokens(text: str) -> str:
    """The last guard before a page is written: no token-shaped text anywhere in it."""
    return HF_TOKEN_ANYWHERE.sub("hf_***", text)

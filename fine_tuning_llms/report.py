"""The run report: one self-contained HTML page built only from the files in an output folder.

    python run_fine_tuning.py --task report --output_dir results

``--task all`` writes it at the end and every task refreshes it (``refresh_report``), so
``results/report.html`` always shows what has run so far. Plots are inlined as base64 PNGs; there
are no scripts, web fonts or links to anything outside the file, so it opens offline and can be
mailed around. Tasks whose files are missing are listed as "not run", never treated as errors.
"""
from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from .engine.artefacts import atomic_write_text
from .engine.chat_format import IGNORE_INDEX, trained_spans
from .engine.config import EMBEDDED_MODEL, Config
from .engine.errors import UserError

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
# Files each task leaves behind; a task counts as run when any of them exists.
TASK_FILES = {
    "compare": ("model_comparison_results.csv", "comparison_summary.json"),
    "special_tokens": ("special_tokens_analysis.csv", "special_tokens_summary.json"),
    "preprocess": ("processed_conversations.json", "token_lengths.png"),
    "train": ("training_log.csv", "loss_curve.png", "eval_before_after.json", "final_model/run_config.json"),
    "explain": ("trainer_vs_manual.csv", "trainer_vs_manual.png", "explain_summary.json"),
}
SECRET_KEY = re.compile(r"token|secret|password|passwd|api_?key|auth", re.I)
SECRET_VALUE = re.compile(r"^(hf_|sk-|ghp_|github_pat_|xox[bp]-)|^[A-Za-z0-9_\-]{32,}$")
HF_TOKEN_ANYWHERE = re.compile(r"hf_[A-Za-z0-9]{20,}")
FLOAT_TEXT = re.compile(r"-?\d+\.\d*(?:[eE][-+]?\d+)?|-?\d+[eE][-+]?\d+")
NUMBER_TEXT = re.compile(r"-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?")
MAX_TABLE_ROWS = 12
CSS = """
body{font-family:"Noto Sans CJK KR","Noto Sans KR","Apple SD Gothic Neo","Malgun Gothic","NanumGothic",
 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f4f5f7;color:#1d2330;line-height:1.5}
header{background:#23395d;color:#fff;padding:20px 32px}header h1{margin:0 0 4px;font-size:1.6em}
header p{margin:0;opacity:.85;font-size:.9em}
nav{padding:10px 32px;background:#fff;border-bottom:1px solid #dde1e8;font-size:.9em}
nav a{margin-right:14px;color:#23395d;white-space:nowrap;display:inline-block}nav a.off{color:#98a0ad}
main{max-width:1150px;margin:0 auto;padding:12px 24px 40px}
section{background:#fff;border:1px solid #dde1e8;border-radius:8px;margin:18px 0;padding:6px 22px 18px}
h2{color:#23395d;border-bottom:2px solid #e3e7ee;padding-bottom:6px}h3{color:#34495e;margin-top:18px}
table{border-collapse:collapse;font-size:.88em}.tw{overflow-x:auto;margin:8px 0}
details summary{cursor:pointer;color:#23395d;margin:6px 0}
th,td{border:1px solid #dde1e8;padding:4px 8px;vertical-align:top;text-align:left}
th{background:#eef1f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
.answer{max-height:11em;overflow:auto;white-space:pre-wrap;min-width:14em;max-width:28em}
img{max-width:100%;border:1px solid #e3e7ee;border-radius:4px;margin:8px 0}
pre{background:#f7f8fa;border:1px solid #e3e7ee;padding:10px;overflow-x:auto;font-size:.85em;white-space:pre-wrap}
pre.mask{line-height:1.9;font-size:.95em}.t0{background:#c5efc0}.t1{background:#a3e09b}.u0{background:#f1f2f4}.u1{background:#e2e4e8}
.cols{display:flex;flex-wrap:wrap;gap:0 32px}.legend span{padding:1px 6px;margin-right:8px}
.note{background:#fff7e0;border-left:4px solid #e0a800;padding:8px 12px;margin:10px 0}
.notrun{color:#6b7380;font-style:italic}.ok{color:#1e7d32}.bad{color:#b3261e}
"""


class Html(str):
    """Markup built here, safe to insert as is; everything else is escaped."""


@dataclass
class Section:
    id: str
    title: str
    task: str | None  # None: always shown (overview, not-run list)
    body: str
    ran: bool = True


# ------------------------------------------------------------------ small helpers

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


def not_run(task: str, folder: Path) -> str:
    return (f'<p class="notrun">아직 실행되지 않음 / Not run yet. '
            f'<code>python run_fine_tuning.py --task {esc(task)} --output_dir {esc(folder)}</code></p>')


def looks_like_secret(key: str, value: Any) -> bool:
    if isinstance(value, str) and HF_TOKEN_ANYWHERE.search(value):
        return True
    return bool(SECRET_KEY.search(key)) and isinstance(value, str) and bool(SECRET_VALUE.search(value.strip()))


def redact(settings: dict) -> dict:
    """Settings without anything that looks like an access token (never printed, not even masked)."""
    return {k: v for k, v in settings.items() if not looks_like_secret(str(k), v)}


# ------------------------------------------------------------------ sections

def at_a_glance(folder: Path) -> list[str]:
    """One line per task that ran: the number a learner looks for first."""
    lines = []
    pre = (read_json(folder / "processed_conversations.json", quiet=True) or {}).get("summary") or {}
    if pre:
        lines.append(f"전처리 / preprocess: {fmt(pre.get('examples_kept'))} conversations, "
                     f"{fmt(pre.get('trained_tokens'))} of {fmt(pre.get('total_tokens'))} tokens trained")
    special = read_json(folder / "special_tokens_summary.json", quiet=True) or {}
    if special:
        lines.append(f"특수 토큰 / special tokens: {fmt(special.get('n_special_or_added'))} listed, "
                     f"{fmt(special.get('n_looks_untrained'))} look untrained; "
                     f"pad = eos: {fmt(special.get('pad_equals_eos'))}")
    parity = (read_json(folder / "explain_summary.json", quiet=True) or {}).get("parity") or {}
    if parity:
        lines.append(f"Trainer vs manual loop: agree {fmt(parity.get('agree'))}, largest relative loss difference "
                     f"{fmt(parity.get('max_rel_diff_loss'))} over {fmt(parity.get('steps'))} steps")
    metrics = (read_json(folder / "eval_before_after.json", quiet=True) or {}).get("metrics") or {}
    if metrics:
        lines.append(f"학습 / train: held-out loss {fmt(metrics.get('eval_loss_before'))} → "
                     f"{fmt(metrics.get('eval_loss_after'))}; taught behaviour {fmt(metrics.get('behaviour_rate_before'))}"
                     f" → {fmt(metrics.get('behaviour_rate_after'))}")
    for s in (read_json(folder / "comparison_summary.json", quiet=True) or {}).get("models") or []:
        lines.append(f"비교 / compare: {s.get('role')} stopped by itself in {fmt(s.get('stopped'))} of "
                     f"{fmt(s.get('answers'))} answers, {fmt(s.get('mean_new_tokens'))} new tokens on average")
    return lines


def settings_tables(settings: dict) -> str:
    """The settings that differ from the defaults, then every setting folded away (<details>, no script)."""
    defaults = Config().to_dict()
    changed = {k: v for k, v in settings.items() if k not in defaults or defaults[k] != v}
    return (f"<p>기본값과 다른 설정 / Changed from the defaults</p>{key_values(changed)}"
            f"<details><summary>모든 설정 / All {len(settings)} settings</summary>{key_values(settings)}</details>")


def overview_body(folder: Path) -> str:
    run_config = read_json(folder / "final_model" / "run_config.json", quiet=True) or {}
    explain = read_json(folder / "explain_summary.json", quiet=True) or {}
    compare = read_json(folder / "comparison_summary.json", quiet=True) or {}
    settings = run_config.get("settings") or explain.get("config") or {}
    versions = run_config.get("versions") or explain.get("versions") or compare.get("versions") or {}
    parts = [f"<p>출력 폴더 / Output folder: <code>{esc(folder)}</code></p>"]
    glance = [f"<li>{esc(line)}</li>" for line in at_a_glance(folder)]
    parts.append("<h3>한눈에 / At a glance</h3>" + (f"<ul>{''.join(glance)}</ul>" if glance else
                                                   '<p class="notrun">아직 결과 없음 / no results yet</p>'))
    settings_html = settings_tables(redact(settings)) if settings else (
        '<p class="notrun">기록 없음 (train, explain이 기록) / not recorded yet (train and explain record them)</p>')
    versions_html = key_values(redact(versions)) if versions else '<p class="notrun">기록 없음 / not recorded</p>'
    present = [f for files in TASK_FILES.values() for f in files if (folder / f).is_file()]
    files_html = table(["file", "bytes"], [(f, (folder / f).stat().st_size) for f in present]) if present else ""
    parts.append(f'<div class="cols"><div><h3>실행 설정 / Run settings</h3>{settings_html}</div>'
                 f'<div><h3>패키지 버전 / Package versions</h3>{versions_html}</div>'
                 f'<div><h3>파일 / Files</h3>{files_html or "—"}</div></div>')
    return "".join(parts)


def comparison_body(folder: Path) -> str:
    summary = read_json(folder / "comparison_summary.json") or {}
    rows = read_csv(folder / "model_comparison_results.csv")
    parts = []
    if summary.get("note"):
        parts.append(f'<div class="note">{esc(summary["note"])}</div>')
    stats = summary.get("models") or []
    if stats:
        parts.append("<h3>모델별 요약 / Per model</h3>" + table(
            ["role", "model", "prompt format", "stopped itself / 스스로 멈춤", "mean new tokens", "tokens/s"],
            [(s.get("role"), s.get("model"), s.get("prompt_format"), f"{s.get('stopped', '?')}/{s.get('answers', '?')}",
              s.get("mean_new_tokens"), s.get("tokens_per_s")) for s in stats]))
    roles = list(dict.fromkeys(r.get("role", "?") for r in rows)) or list(
        dict.fromkeys(role for a in summary.get("answers", []) for role in a.get("answers", {})))
    grid: dict[str, dict[str, Html]] = {}
    for r in rows:
        meta = f"{r.get('new_tokens', '?')} tokens, stopped: {r.get('stopped_on_eot', '?')}"
        grid.setdefault(r.get("question", ""), {})[r.get("role", "?")] = Html(
            f'{answer(r.get("response"))}<small>{esc(meta)}</small>')
    if not rows:
        for a in summary.get("answers", []):
            grid[a.get("question", "")] = {role: answer(text) for role, text in a.get("answers", {}).items()}
    if grid:
        parts.append("<h3>답변 비교 / Answers side by side</h3>" + table(
            ["question / 질문"] + roles, [[q] + [by_role.get(role, "") for role in roles] for q, by_role in grid.items()]))
    return "".join(parts)


def special_tokens_body(folder: Path) -> str:
    summary = read_json(folder / "special_tokens_summary.json") or {}
    rows = read_csv(folder / "special_tokens_analysis.csv")
    parts = []
    if summary:
        parts.append(key_values(summary, ["model", "vocab_size_before", "vocab_size_after", "embedding_rows_before",
                                          "embedding_rows_after", "tied_embeddings", "n_special_or_added",
                                          "n_looks_untrained", "untrained_rule", "new_rows_equal_mean",
                                          "pad_equals_eos"]))
    if rows:
        cols = [c for c in ("section", "token", "id", "role", "in_template", "n_pieces_before", "ids_after",
                            "norm_ratio", "nearest_cosine", "looks_untrained", "max_change_plain_lora",
                            "max_change_trainable_tokens") if c in rows[0]]
        parts.append("<h3>특수 토큰 표 / Special and added tokens</h3>" + table(cols, [[r[c] for c in cols] for r in rows]))
    training = summary.get("training") or {}
    variants = [v for v in ("plain_lora", "trainable_tokens") if isinstance(training.get(v), dict)]
    if variants:
        parts.append("<h3>새 토큰 학습 / Training new token rows</h3>" + table(
            ["variant", "max change new rows", "max change other rows", "distance between new rows"],
            [(v, training[v].get("max_change_new_rows"), training[v].get("max_change_other_rows"),
              training[v].get("max_distance_between_new_rows")) for v in variants]))
    pitfall = summary.get("pitfall") or {}
    if pitfall.get("explanation"):
        parts.append(f'<div class="note">pad = eos: {esc(pitfall["explanation"])}</div>')
    if summary.get("control_token_view"):
        parts.append("<h3>템플릿의 제어 토큰 / Control tokens in a rendered conversation</h3>"
                     f"<pre>{esc(summary['control_token_view'])}</pre>")
    return "".join(parts)


@lru_cache(maxsize=4)
def local_tokenizer(spec: str):
    """``spec``'s tokenizer.json through the ``tokenizers`` library (fast, no model code) when it is on this disk
    already; None otherwise: the report never downloads or converts (the embedded GGUF takes ~20 s)."""
    from tokenizers import Tokenizer

    from .engine import models

    path = Path(spec).expanduser()
    if spec == EMBEDDED_MODEL:
        found = sorted(models.cache_root().glob(f"{EMBEDDED_MODEL}-*/tokenizer.json"), key=lambda p: p.stat().st_mtime)
        file = found[-1] if found else None
    elif path.is_dir():
        file = path / "tokenizer.json"
    else:
        cached = models._hub_cached(spec) if models.HUB_ID_PATTERN.match(spec) else None
        file = Path(cached) / "tokenizer.json" if cached else None
    return Tokenizer.from_file(str(file)) if file is not None and file.is_file() else None


def token_pieces(example: dict, tokenizer) -> list[str] | None:
    """One display string per input id: stored "tokens", else slices of the text, else decoded ids."""
    ids = example.get("input_ids") or []
    if isinstance(example.get("tokens"), list) and len(example["tokens"]) == len(ids):
        return [str(t) for t in example["tokens"]]
    if tokenizer is None:
        return None
    text = example.get("text") or ""
    encoded = tokenizer.encode(text, add_special_tokens=False)
    if encoded.ids == ids:  # exact characters of the text
        pieces, end = [], 0
        for a, b in encoded.offsets:
            # Byte-level BPE splits one Korean syllable into several tokens that share its offsets:
            # the first of them shows the character, the rest stay empty.
            pieces.append(text[max(a, end):b])
            end = max(end, b)
        return pieces
    pieces, previous = [], ""
    for i in range(len(ids)):  # ids without matching text (truncated): decode growing prefixes
        current = tokenizer.decode(ids[: i + 1], skip_special_tokens=False)
        if i + 1 < len(ids):
            current = current.rstrip("\ufffd")  # half a multi-byte character: show it with its last byte
        if current.startswith(previous):
            pieces.append(current[len(previous):])
        else:  # the decoder rewrote earlier text (clean-up rules): show this id decoded alone
            pieces.append(tokenizer.decode([ids[i]], skip_special_tokens=False))
        previous = current
    return pieces


def mask_html(pieces: Sequence[str], labels: Sequence[int]) -> Html:
    """Trained tokens green, others grey; alternating shades show where each token starts."""
    spans = []
    for i, (piece, label) in enumerate(zip(pieces, labels)):
        kind = "t" if label != IGNORE_INDEX else "u"
        spans.append(f'<span class="{kind}{i % 2}">{esc(piece)}</span>')
    return Html('<pre class="mask">' + "".join(spans) + "</pre>")


def preprocessing_body(folder: Path) -> str:
    data = read_json(folder / "processed_conversations.json") or {}
    summary, examples = data.get("summary") or {}, data.get("examples") or []
    parts = []
    if summary:
        flat = {k: v for k, v in summary.items() if k != "template"}
        parts.append(key_values(flat))
        if isinstance(summary.get("template"), dict):
            parts.append("<h3>채팅 템플릿 / Chat template facts</h3>" + key_values(summary["template"]))
    parts.append(image(folder, "token_lengths.png", "token length histogram"))
    # Multi-turn conversations first: they show that every reply, and only the replies, is trained.
    order = sorted(range(len(examples)), key=lambda i: -len(trained_spans(examples[i].get("labels") or [])))[:2]
    tokenizer = None
    if order and not all(isinstance(examples[i].get("tokens"), list) for i in order) and summary.get("model"):
        try:
            tokenizer = local_tokenizer(str(summary["model"]))
        except Exception as exc:  # a missing or broken tokenizer only costs the colours
            log.info("report: no tokenizer for the mask view (%s); showing plain text", exc)
    if order:
        parts.append('<h3>어시스턴트 마스크 / Assistant mask</h3><p class="legend"><span class="t0">학습됨 / trained '
                     '(labels = ids)</span><span class="u0">무시됨 / ignored (labels = -100)</span></p>')
    for i in sorted(order):
        e = examples[i]
        labels = e.get("labels") or []
        trained = sum(label != IGNORE_INDEX for label in labels)
        parts.append(f"<p>example {i}: {len(labels)} tokens, {trained} trained, {len(trained_spans(labels))} "
                     f"assistant span(s){' (truncated)' if e.get('truncated') else ''}</p>")
        pieces = token_pieces(e, tokenizer)
        if pieces is None:
            parts.append('<p class="notrun">토크나이저를 찾지 못해 색 없이 표시 / tokenizer not available locally: '
                         f'plain text without colours</p><pre>{esc(e.get("text", ""))}</pre>')
        else:
            parts.append(mask_html(pieces, labels))
    return "".join(parts)


def training_body(folder: Path) -> str:
    log_rows = read_csv(folder / "training_log.csv")
    evaluation = read_json(folder / "eval_before_after.json") or {}
    metrics, answers = evaluation.get("metrics") or {}, evaluation.get("answers") or []
    parts = []
    if metrics:
        parts.append("<h3>학습 전후 / Before and after</h3>" + key_values(metrics))
    parts.append(image(folder, "loss_curve.png", "training curves"))
    if log_rows:
        cols = list(log_rows[0])
        parts.append(f"<h3>학습 로그 / Training log</h3><p>{len(log_rows)} rows in training_log.csv</p>"
                     + table(cols, [[r.get(c) for c in cols] for r in spread(log_rows)]))
    if answers:
        parts.append("<h3>답변: 학습 전 vs 후 / Answers before vs after</h3>" + table(
            ["prompt / 질문", "reference / 정답", "before / 전", "after / 후"],
            [(answer(a.get("prompt")), answer(a.get("reference")), answer(a.get("before")), answer(a.get("after")))
             for a in answers]))
    return "".join(parts)


def trainer_vs_manual_body(folder: Path) -> str:
    summary = read_json(folder / "explain_summary.json") or {}
    rows = read_csv(folder / "trainer_vs_manual.csv")
    parts = [image(folder, "trainer_vs_manual.png", "Trainer vs manual loop")]
    parity = summary.get("parity") or {}
    if parity:
        verdict = ('<span class="ok">일치 / agree</span>' if parity.get("agree") else
                   '<span class="bad">불일치 / do NOT agree</span>')
        parts.append(f"<h3>일치 여부 / Parity: {verdict}</h3>" + key_values(parity))
    if summary.get("walkthrough_text"):
        parts.append(f"<h3>Trainer.train() ↔ manual loop</h3><pre>{esc(summary['walkthrough_text'])}</pre>")
    custom = summary.get("customisation") or {}
    if custom:
        parts.append("<h3>사용자 정의 / Customisation</h3>" + table(
            ["part", "numbers"], [(k, json.dumps(v, ensure_ascii=False)) for k, v in custom.items()]))
    if rows:
        cols = [c for c in ("step", "trainer_loss", "manual_loss", "rel_diff", "trainer_lr", "manual_lr",
                            "trainer_grad_norm", "manual_grad_norm", "trained_tokens") if c in rows[0]]
        parts.append("<h3>단계별 / Step by step</h3>" + table(cols, [[r.get(c) for c in cols] for r in spread(rows)]))
    return "".join(parts)


# (html id, bilingual heading, task whose files feed it, body builder), in page order
SECTION_BUILDERS: list[tuple[str, str, str | None, Callable[[Path], str]]] = [
    ("overview", "개요 / Overview", None, overview_body),
    ("comparison", "모델 비교 / Model comparison", "compare", comparison_body),
    ("special-tokens", "특수 토큰 / Special tokens", "special_tokens", special_tokens_body),
    ("preprocessing", "전처리 / Preprocessing", "preprocess", preprocessing_body),
    ("training", "학습 / Training", "train", training_body),
    ("trainer-vs-manual", "Trainer vs 수동 루프 / Trainer vs manual loop", "explain", trainer_vs_manual_body),
]


def task_ran(folder: Path, task: str) -> bool:
    return any((folder / name).is_file() for name in TASK_FILES[task])


def build_section(folder: Path, sid: str, title: str, task: str | None, builder: Callable[[Path], str]) -> Section:
    if task is not None and not task_ran(folder, task):
        return Section(sid, title, task, not_run(task, folder), ran=False)
    try:
        return Section(sid, title, task, builder(folder))
    except Exception as exc:  # one unreadable file spoils its own section, not the whole report
        log.warning("report: section %s could not be built: %s: %s", sid, type(exc).__name__, exc)
        return Section(sid, title, task, f'<p class="bad">읽을 수 없음 / could not read its files: '
                                         f"{esc(type(exc).__name__)}: {esc(exc)}</p>")


def render_page(folder: Path, sections: list[Section]) -> str:
    missing = [s for s in sections if not s.ran]
    items = "".join(f"<li><a href=\"#{s.id}\">{esc(s.title)}</a>: <code>--task {esc(s.task)}</code></li>"
                    for s in missing)
    listing = f"<ul>{items}</ul>" if items else "<p>없음: 모든 작업이 실행됨 / None: every task ran</p>"
    sections = sections + [Section("not-run", "실행되지 않은 작업 / Tasks not run", None, listing)]
    nav = "".join(f'<a href="#{s.id}"{" class=off" if not s.ran else ""}>{esc(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{s.id}"><h2>{esc(s.title)}</h2>{s.body}</section>' for s in sections)
    stamp = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return ("<!DOCTYPE html>\n<html lang=\"ko\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<title>파인튜닝 실행 보고서 / Fine-tuning run report</title>"
            f"<style>{CSS}</style></head><body><header><h1>파인튜닝 실행 보고서 / Fine-tuning run report</h1>"
            f"<p>{esc(folder)} · {esc(stamp)}</p></header><nav>{nav}</nav><main>{body}</main></body></html>\n")


def build_report(output_dir: str | Path) -> Path:
    """Read every task's files in ``output_dir`` and write ``output_dir/report.html`` (atomically)."""
    folder = Path(output_dir)
    try:
        sections = [build_section(folder, *spec) for spec in SECTION_BUILDERS]
    finally:
        _parse_json.cache_clear()  # do not keep a large processed dataset alive inside a training process
    page = HF_TOKEN_ANYWHERE.sub("hf_***", render_page(folder, sections))  # last guard: no token-shaped text
    return atomic_write_text(folder / REPORT_NAME, page)


def refresh_report(output_dir: str | Path) -> Path | None:
    """Rebuild report.html at the end of a task; a report problem must never fail the task."""
    try:
        return build_report(output_dir)
    except Exception as exc:
        log.warning("report: could not refresh %s/%s (%s: %s)", output_dir, REPORT_NAME, type(exc).__name__, exc)
        return None


def run(cfg: Config) -> dict:
    folder = Path(cfg.run.output_dir)
    if not folder.is_dir():
        raise UserError(f"--output_dir {folder} does not exist; run a task first or pass the folder that holds its outputs")
    path = build_report(folder)
    ran = [task for task in TASK_FILES if task_ran(folder, task)]
    log.info("Wrote %s (%d bytes; tasks with results: %s)", path, path.stat().st_size, ", ".join(ran) or "none")
    return {"path": str(path), "tasks_run": ran}

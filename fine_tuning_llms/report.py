"""The run report: one self-contained HTML page built only from the files in an output folder.

    python run_fine_tuning.py --task report --output_dir results

``--task all`` writes it at the end and every task refreshes it (``refresh_report``), so
``results/report.html`` always shows what has run so far. Plots are inlined as base64 PNGs; there
are no scripts, web fonts or links to anything outside the file, so it opens offline and can be
mailed around. Tasks whose files are missing are listed as "not run", never treated as errors.

Which files exist and what each section shows is declared by the tasks themselves (their
``OUTPUTS``, an ``engine.outputs.TaskOutputs``); the front door passes those declarations in, and
this module only lays them out: overview first, one section per declaration in the order given.
"""
from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .engine.artefacts import atomic_write_text
from .engine.config import Config
from .engine.errors import UserError
from .engine.outputs import TaskOutputs
from .engine.report_html import esc, forget_parsed_json, hide_tokens, key_values, table, without_secrets

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
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
T = TypeVar("T")


@dataclass
class Section:
    id: str
    title: str
    task: str | None  # None: always shown (overview, not-run list)
    body: str
    ran: bool = True


def not_run(task: str, folder: Path) -> str:
    return (f'<p class="notrun">아직 실행되지 않음 / Not run yet. '
            f'<code>python run_fine_tuning.py --task {esc(task)} --output_dir {esc(folder)}</code></p>')


def quietly(what: str, read: Callable[[], T], default: T) -> T:
    """The overview's reads of other tasks' files: a broken file shows in its own section, not here."""
    try:
        return read()
    except Exception as exc:
        log.info("report: overview skips %s (%s: %s)", what, type(exc).__name__, exc)
        return default


# ------------------------------------------------------------------ overview

def settings_tables(settings: dict) -> str:
    """The settings that differ from the defaults, then every setting folded away (<details>, no script)."""
    defaults = Config().to_dict()
    changed = {k: v for k, v in settings.items() if k not in defaults or defaults[k] != v}
    return (f"<p>기본값과 다른 설정 / Changed from the defaults</p>{key_values(changed)}"
            f"<details><summary>모든 설정 / All {len(settings)} settings</summary>{key_values(settings)}</details>")


def recorded_settings(folder: Path, outputs: Sequence[TaskOutputs]) -> tuple[dict, dict]:
    """(settings, versions) of the first task that recorded settings, else the first versions recorded."""
    records = [quietly(f"{o.task} settings", lambda o=o: o.recorded(folder), ({}, {}))
               for o in outputs if o.recorded is not None]
    for settings, versions in records:
        if settings:
            return settings, versions or next((v for _, v in records if v), {})
    return {}, next((v for _, v in records if v), {})


def overview_body(folder: Path, outputs: Sequence[TaskOutputs]) -> str:
    settings, versions = recorded_settings(folder, outputs)
    parts = [f"<p>출력 폴더 / Output folder: <code>{esc(folder)}</code></p>"]
    # One line per task that ran: the number a learner looks for first.
    glance = [f"<li>{esc(line)}</li>" for o in outputs for line in quietly(f"{o.task} results", lambda o=o: o.glance(folder), [])]
    parts.append("<h3>한눈에 / At a glance</h3>" + (f"<ul>{''.join(glance)}</ul>" if glance else
                                                   '<p class="notrun">아직 결과 없음 / no results yet</p>'))
    settings_html = settings_tables(without_secrets(settings)) if settings else (
        '<p class="notrun">기록 없음 (train, explain이 기록) / not recorded yet (train and explain record them)</p>')
    versions_html = key_values(without_secrets(versions)) if versions else '<p class="notrun">기록 없음 / not recorded</p>'
    present = [f for o in outputs for f in o.files if (folder / f).is_file()]
    files_html = table(["file", "bytes"], [(f, (folder / f).stat().st_size) for f in present]) if present else ""
    parts.append(f'<div class="cols"><div><h3>실행 설정 / Run settings</h3>{settings_html}</div>'
                 f'<div><h3>패키지 버전 / Package versions</h3>{versions_html}</div>'
                 f'<div><h3>파일 / Files</h3>{files_html or "—"}</div></div>')
    return "".join(parts)


# ------------------------------------------------------------------ page

def build_section(folder: Path, outputs: TaskOutputs) -> Section:
    sid, title, task = outputs.section_id, outputs.title, outputs.task
    if not outputs.ran(folder):
        return Section(sid, title, task, not_run(task, folder), ran=False)
    try:
        return Section(sid, title, task, outputs.section(folder))
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


def build_report(output_dir: str | Path, outputs: Sequence[TaskOutputs]) -> Path:
    """Write ``output_dir/report.html`` (atomically): the overview, then one section per declaration in ``outputs``."""
    folder = Path(output_dir)
    try:
        overview = Section("overview", "개요 / Overview", None, overview_body(folder, outputs))
        sections = [overview] + [build_section(folder, o) for o in outputs if o.ran(folder) or not o.optional]
    finally:
        forget_parsed_json()  # do not keep a large processed dataset alive inside a training process
    page = hide_tokens(render_page(folder, sections))  # last guard: no token-shaped text
    return atomic_write_text(folder / REPORT_NAME, page)


def refresh_report(output_dir: str | Path, outputs: Sequence[TaskOutputs]) -> Path | None:
    """Rebuild report.html at the end of a task; a report problem must never fail the task."""
    try:
        return build_report(output_dir, outputs)
    except Exception as exc:
        log.warning("report: could not refresh %s/%s (%s: %s)", output_dir, REPORT_NAME, type(exc).__name__, exc)
        return None


def run(cfg: Config, outputs: Sequence[TaskOutputs]) -> dict:
    """``--task report``: ``outputs`` are the tasks' declarations, gathered by the front door (``cli.task_outputs``)."""
    folder = Path(cfg.run.output_dir)
    if not folder.is_dir():
        raise UserError(f"--output_dir {folder} does not exist; run a task first or pass the folder that holds its outputs")
    path = build_report(folder, outputs)
    ran = [o.task for o in outputs if o.ran(folder)]
    log.info("Wrote %s (%d bytes; tasks with results: %s)", path, path.stat().st_size, ", ".join(ran) or "none")
    return {"path": str(path), "tasks_run": ran}

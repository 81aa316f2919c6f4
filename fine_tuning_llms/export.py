"""From adapter to a model people run: one GGUF file for llama.cpp, Ollama and LM Studio.

    python run_fine_tuning.py --task export                        # results/final_model → results/export/
    python run_fine_tuning.py --task export --gguf_type f16 --adapter my_run/final_model
    python run_fine_tuning.py --task train --export gguf           # the same, right after training

What it teaches: a LoRA adapter is a difference from its base; runtimes outside PyTorch want one
self-contained file. So the adapter is merged into a float32 copy of the base, and llama.cpp's own
converter writes the GGUF with tokenizer, special tokens and chat template in its metadata (so
llama.cpp formats a chat and stops at the end of a turn by itself). Then, when llama-cpp-python is
installed, the file is *checked*: the default questions go to llama.cpp and to transformers, and
the answers are compared (engine/gguf_check.py). Outputs in ``--output_dir/export/``: the
``.gguf``, an Ollama ``.Modelfile`` beside it, and ``export_summary.json``.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .engine.config import Config
from .engine.gguf_check import SUMMARY_NAME, export_and_check
from .engine.outputs import TaskOutputs
from .engine.report_html import esc, fmt, key_values, read_json, table

log = logging.getLogger(__name__)


def default_adapter(cfg: Config) -> Path:
    return Path(cfg.compare.adapter) if cfg.compare.adapter else Path(cfg.run.output_dir) / "final_model"


def run(cfg: Config) -> dict:
    return export_and_check(cfg, default_adapter(cfg), Path(cfg.run.output_dir))


def report_section(folder: Path) -> str:
    summary = read_json(folder / SUMMARY_NAME) or {}
    if not summary:
        return ""
    parts = [key_values({"GGUF": summary.get("gguf"), "type": summary.get("gguf_type"),
                         "size (MB)": fmt((summary.get("bytes") or 0) / 1e6),
                         "merge / convert (s)": f"{fmt(summary.get('merge_seconds'))} / {fmt(summary.get('convert_seconds'))}",
                         "Ollama Modelfile": summary.get("modelfile")})]
    check = summary.get("check")
    if check:
        parts.append(f"<p>llama.cpp vs transformers: {check['equal']}/{check['questions']} answers equal "
                     f"({esc(check['compared'])}); stopped by itself in transformers {check['stopped_transformers']}, "
                     f"of which in llama.cpp too {check['stopped_in_both']}; {fmt(check['tokens_per_s_llama_cpp'])} vs "
                     f"{fmt(check['tokens_per_s_transformers'])} tokens/s.</p>")
        parts.append(table(["question", "equal", "transformers", "llama.cpp"],
                           [(a["question"], "yes" if a["equal"] else "no", a["transformers"]["text"],
                             a["llama_cpp"]["text"]) for a in check["answers"]]))
    elif summary.get("check_note"):
        parts.append(f'<div class="note">{esc(summary["check_note"])}</div>')
    parts.append("<h3>실행 / Run it</h3>" + table(["with", "command"], list((summary.get("commands") or {}).items())))
    return "".join(parts)


def report_glance(folder: Path) -> list[str]:
    summary = read_json(folder / SUMMARY_NAME, quiet=True) or {}
    if not summary:
        return []
    line = f"내보내기 / export: {summary.get('gguf_type')} GGUF, {fmt((summary.get('bytes') or 0) / 1e6)} MB"
    check = summary.get("check")
    if check:
        line += f"; llama.cpp answers equal transformers on {check['equal']}/{check['questions']}"
    return [line]


OUTPUTS = TaskOutputs(task="export", section_id="export", title="GGUF 내보내기 / GGUF export",
                      files=(SUMMARY_NAME,), section=report_section, glance=report_glance, optional=True)

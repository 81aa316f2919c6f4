"""Base vs instruct vs fine-tuned: the same questions to each model, side by side.

    python run_fine_tuning.py --task compare
    python run_fine_tuning.py --task compare --adapter results/final_model
    python run_fine_tuning.py --task compare --tools sample --questions my_tool_questions.txt
    python run_fine_tuning.py --task compare --base_model meta-llama/Llama-3.2-1B \\
        --instruct_model meta-llama/Llama-3.2-1B-Instruct --questions my_questions.txt

What it teaches: a base model only continues text, so it is prompted as plain text
("Question: ...\\nAnswer:") and usually rambles until ``--max_new_tokens``; an instruct model
answers through its chat template and stops with its end-of-turn token; a fine-tuned adapter
(``final_model/`` from ``--task train``) shows what your own data changed.

Without ``--base_model`` the table says so and compares what exists, labelled exactly: the model
prompted as raw text against the same model through its template, plus the fine-tuned adapter
when one exists. A model is *instruct* when its tokenizer brings a chat template, *base* when it
does not (then the template is the one ``--chat_template auto`` picked for it): roles
``instruct-raw-text`` / ``instruct``, or ``base-raw-text`` / ``base + template``. Offline, a real
base model is ``--base_model gemma-3-270m`` (``make base-model``), a different family from
SmolLM2, which the note says.

Outputs in ``--output_dir``: ``model_comparison_results.csv`` (one row per question x model)
and ``comparison_summary.json`` (per-model stop rate, length and speed, all answers; read by the
HTML report). With ``--tools sample`` every prompt carries the sample calculator and unit converter
(chat-template columns through the template, as in training; plain-text columns with the same
``<tools>`` block before the question) and the CSV gains a ``tool_call`` column: each answer's
parsed call (name + JSON arguments) or "no call".
"""
from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .engine.adapters import check_adapter_dir, is_adapter_dir, load_model_with_adapter
from .engine.artefacts import atomic_write_csv, atomic_write_json, package_versions
from .engine.chat_format import generation_prompt_ids, require_chat_template
from .engine.config import Config, ModelConfig
from .engine.errors import UserError
from .engine.generation import GenerationResult, generate_batch
from .engine.models import ModelSource, load_model_and_tokenizer, load_tokenizer, resolve_model
from .engine.outputs import TaskOutputs
from .engine.questions import Question, load_questions
from .engine.report_html import Html, esc, fmt, read_csv, read_json
from .engine.report_html import answer as answer_html
from .engine.report_html import table as html_table
from .engine.sample_tools import tools_for
from .engine.tool_format import tools_prompt
from .engine.tool_use import NO_CALL, describe_calls
from .engine.turn_formats import template_choice

log = logging.getLogger(__name__)

CSV_NAME = "model_comparison_results.csv"
SUMMARY_NAME = "comparison_summary.json"
CSV_COLUMNS = ["question", "model", "role", "prompt_format", "prompt", "response", "new_tokens",
               "stopped_on_eot", "seconds", "tokens_per_s"]
TOOL_CALL_COLUMN = "tool_call"   # added after the others with --tools
ROLE_BASE, ROLE_INSTRUCT, ROLE_RAW, ROLE_FINE_TUNED = "base", "instruct", "instruct-raw-text", "fine-tuned"
ROLE_BASE_RAW, ROLE_BASE_TEMPLATE = "base-raw-text", "base + template"   # a model without a template of its own
FORMAT_PLAIN, FORMAT_CHAT = "plain-text", "chat-template"
# A continuation prompt a base model can complete; the same one for the raw-text instruct column.
PLAIN_PROMPT = "Question: {question}\nAnswer:"
GENERATION_BATCH_SIZE = 16   # questions per generate() call (left-padded)
SIDE_BY_SIDE = 3             # questions printed with every model's answer

OFFLINE_NOTE = ("No --base_model was given, and no base (non-instruct) checkpoint is available offline, so this "
                "comparison has NO base model. Instead it compares {instruct} prompted as raw text (role "
                "'instruct-raw-text': same weights, no chat template) with the same model through its chat "
                "template (role 'instruct'){adapter}. For a real base-vs-instruct comparison pass --base_model "
                "(a local folder, or a hub id such as meta-llama/Llama-3.2-1B, or gemma-3-270m offline after "
                "`make base-model`) and --instruct_model.")
BASE_ONLY_NOTE = ("{model} has no chat template of its own: it is a BASE model, not an instruct model. It is compared "
                  "as raw text (role 'base-raw-text') and through the chat format --chat_template auto chose for it "
                  "(role 'base + template': {reason}){adapter}.")
FAMILY_NOTE = ("--base_model {base} ({base_family}) and {instruct} ({instruct_family}) are different model families: "
               "the table shows how a base and an instruct model behave, not what instruction tuning changed in one "
               "model.")


@dataclass
class ModelPlan:
    """One model to load and the (role, prompt format) columns generated with it."""

    name: str                                   # the CSV 'model' column
    model_cfg: ModelConfig
    adapter: Path | None = None
    roles: list[tuple[str, str]] = field(default_factory=list)
    flag: str = "--model"                       # named in errors about this model


# ---------------------------------------------------------------- what to compare

def default_adapter(cfg: Config) -> Path | None:
    """--adapter, else <output_dir>/final_model when train left an adapter there."""
    if cfg.compare.adapter:
        return check_adapter_dir(cfg.compare.adapter)
    candidate = Path(cfg.run.output_dir) / "final_model"
    if is_adapter_dir(candidate):
        log.info("Including the fine-tuned adapter found at %s (pass --adapter to choose another).", candidate)
        return candidate
    return None


def model_family(source: ModelSource) -> str:
    config = Path(source.location) / "config.json"
    try:
        return str(json.loads(config.read_text(encoding="utf-8")).get("model_type", "unknown"))
    except (OSError, json.JSONDecodeError):
        return "unknown"


def plan_models(cfg: Config) -> tuple[list[ModelPlan], str | None]:
    """The models to load, their columns, and a note when the table has no base/instruct pair of one family."""
    instruct = cfg.compare.instruct_model or cfg.model.model
    instruct_flag = "--instruct_model" if cfg.compare.instruct_model else "--model"
    instruct_cfg = replace(cfg.model, model=instruct)
    adapter = default_adapter(cfg)
    instruct_source = resolve_model(instruct, flag=instruct_flag)  # a bad spec fails here, before tokenizer work
    choice = template_choice(load_tokenizer(instruct_cfg, instruct_source))  # tokenizer only: no weights loaded
    plans, note = [], None
    if cfg.compare.base_model:
        base, instruct_role = cfg.compare.base_model, ROLE_INSTRUCT if choice.own else ROLE_BASE_TEMPLATE
        plans.append(ModelPlan(base, replace(cfg.model, model=base), roles=[(ROLE_BASE, FORMAT_PLAIN)],
                               flag="--base_model"))
        plans.append(ModelPlan(instruct, instruct_cfg, roles=[(instruct_role, FORMAT_CHAT)], flag=instruct_flag))
        families = model_family(resolve_model(base, flag="--base_model")), model_family(instruct_source)
        if families[0] != families[1]:
            note = FAMILY_NOTE.format(base=base, base_family=families[0], instruct=instruct,
                                      instruct_family=families[1])
    elif choice.own:
        note = OFFLINE_NOTE.format(instruct=instruct, adapter=", plus the fine-tuned adapter" if adapter else "")
        plans.append(ModelPlan(instruct, instruct_cfg, roles=[(ROLE_RAW, FORMAT_PLAIN), (ROLE_INSTRUCT, FORMAT_CHAT)],
                               flag=instruct_flag))
    else:
        note = BASE_ONLY_NOTE.format(model=instruct, reason=f"{choice.name}, {choice.reason}",
                                     adapter=", plus the fine-tuned adapter" if adapter else "")
        plans.append(ModelPlan(instruct, instruct_cfg, roles=[(ROLE_BASE_RAW, FORMAT_PLAIN),
                                                              (ROLE_BASE_TEMPLATE, FORMAT_CHAT)], flag=instruct_flag))
    if adapter is not None:
        # The adapter sits on --model: the model that --task train fine-tuned.
        plans.append(ModelPlan(f"{cfg.model.model} + {adapter}", cfg.model, adapter=adapter,
                               roles=[(ROLE_FINE_TUNED, FORMAT_CHAT)]))
    return plans, note


def validate_compare(cfg: Config) -> None:
    c = cfg.compare
    problems = []
    if c.max_new_tokens < 1:
        problems.append(f"--max_new_tokens must be at least 1 (got {c.max_new_tokens})")
    if c.do_sample and c.temperature <= 0:
        problems.append(f"--temperature must be positive with --do_sample (got {c.temperature})")
    if problems:
        raise UserError(problems)


# ---------------------------------------------------------------- prompts and generation

def plain_prompt_ids(tokenizer, question: str, tools: list[dict] | None = None) -> list[int]:
    # add_special_tokens=True: raw text gets whatever BOS the model family expects (Llama: yes,
    # SmolLM2: none) — exactly how a base model saw its pre-training text.
    text = PLAIN_PROMPT.format(question=question)
    return tokenizer(f"{tools_prompt(tools)}\n\n{text}" if tools else text)["input_ids"]


def chat_prompt_ids(tokenizer, question: str, system_prompt: str | None = None,
                    tools: list[dict] | None = None) -> list[int]:
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
    messages.append({"role": "user", "content": question})
    if tools:  # the tool list rides on the first message, as in training data (engine/tool_data.py)
        messages[0] = {**messages[0], "tools": tools}
    return generation_prompt_ids(tokenizer, messages)


def build_prompts(tokenizer, questions: list[Question], prompt_format: str,
                  system_prompt: str | None = None, tools: list[dict] | None = None) -> list[list[int]]:
    if prompt_format == FORMAT_PLAIN:
        return [plain_prompt_ids(tokenizer, q.text, tools) for q in questions]
    return [chat_prompt_ids(tokenizer, q.text, system_prompt, tools) for q in questions]


def result_row(question: Question, plan: ModelPlan, role: str, prompt_format: str, tokenizer,
               result: GenerationResult, *, tools: bool = False) -> dict:
    row = {
        "question": question.text, "model": plan.name, "role": role, "prompt_format": prompt_format,
        # The prompt exactly as fed: decoded ids, special tokens shown.
        "prompt": tokenizer.decode(result.prompt_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False),
        "response": result.text, "new_tokens": result.n_new_tokens,
        "stopped_on_eot": "yes" if result.stopped_on_eot else "no",
        "seconds": round(result.seconds, 3), "tokens_per_s": round(result.tokens_per_s, 2),
    }
    if tools:
        row[TOOL_CALL_COLUMN] = describe_calls(result.text)
    return row


def _load(plan: ModelPlan):
    if plan.adapter is not None:
        return load_model_with_adapter(plan.model_cfg, plan.adapter)
    return load_model_and_tokenizer(plan.model_cfg)


def generate_for_plan(plan: ModelPlan, questions: list[Question], cfg: Config) -> tuple[list[dict], dict]:
    """Load one model, answer every question in each of its columns; (CSV rows, seconds per role)."""
    model, tokenizer = _load(plan)
    rows, seconds = [], {}
    tools = tools_for(cfg.compare.tools)
    try:
        for role, prompt_format in plan.roles:
            if prompt_format == FORMAT_CHAT:
                require_chat_template(tokenizer, f"{plan.name} (role {role})")
            prompts = build_prompts(tokenizer, questions, prompt_format, cfg.data.system_prompt, tools)
            start = time.perf_counter()
            results = generate_batch(model, tokenizer, prompts, max_new_tokens=cfg.compare.max_new_tokens,
                                     do_sample=cfg.compare.do_sample, temperature=cfg.compare.temperature,
                                     batch_size=GENERATION_BATCH_SIZE, seed=cfg.train.seed, progress=role)
            seconds[role] = time.perf_counter() - start
            log.info("%s (%s): %d answers in %.1f s", role, plan.name, len(results), seconds[role])
            rows += [result_row(q, plan, role, prompt_format, tokenizer, r, tools=bool(tools))
                     for q, r in zip(questions, results)]
    finally:
        del model
        gc.collect()  # free one model before the next loads (three 1B models would not fit a laptop)
    return rows, seconds


# ---------------------------------------------------------------- summary

def summarise(rows: list[dict], seconds: dict[str, float]) -> list[dict]:
    """Per role: how often it stopped by itself, mean answer length, generation speed."""
    stats = []
    for role in dict.fromkeys(r["role"] for r in rows):
        mine = [r for r in rows if r["role"] == role]
        tokens = sum(r["new_tokens"] for r in mine)
        stats.append({
            "role": role, "model": mine[0]["model"], "prompt_format": mine[0]["prompt_format"],
            "answers": len(mine), "stopped": sum(r["stopped_on_eot"] == "yes" for r in mine),
            "stop_rate": round(sum(r["stopped_on_eot"] == "yes" for r in mine) / len(mine), 3),
            "mean_new_tokens": round(tokens / len(mine), 2), "generation_seconds": round(seconds[role], 3),
            "tokens_per_s": round(tokens / seconds[role], 2) if seconds[role] > 0 else 0.0,
        })
        if TOOL_CALL_COLUMN in mine[0]:  # answers holding a valid call (--tools)
            stats[-1]["tool_calls"] = sum(not r[TOOL_CALL_COLUMN].startswith((NO_CALL, "invalid")) for r in mine)
    return stats


def answer_table(questions: list[Question], rows: list[dict]) -> list[dict]:
    by_key = {(r["question"], r["role"]): r for r in rows}
    roles = list(dict.fromkeys(r["role"] for r in rows))
    table = [{"question": q.text, "category": q.category, "language": q.language,
              "answers": {role: by_key.get((q.text, role), {}).get("response", "") for role in roles}} for q in questions]
    if rows and TOOL_CALL_COLUMN in rows[0]:
        for entry in table:
            entry["tool_calls"] = {role: by_key.get((entry["question"], role), {}).get(TOOL_CALL_COLUMN, NO_CALL)
                                   for role in roles}
    return table


def _one_line(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def log_summary(stats: list[dict], table: list[dict], note: str | None) -> None:
    if note:
        log.info("NOTE: %s", note)
    width = max(len(s["role"]) for s in stats)
    log.info("%-*s  %-15s  %-13s  %11s  %9s  %s", width, "role", "prompt format", "stopped itself",
             "mean tokens", "tokens/s", "model")
    for s in stats:
        log.info("%-*s  %-15s  %5d/%-2d (%3.0f%%)  %11.1f  %9.1f  %s", width, s["role"], s["prompt_format"],
                 s["stopped"], s["answers"], 100 * s["stop_rate"], s["mean_new_tokens"], s["tokens_per_s"], s["model"])
        if "tool_calls" in s:
            log.info("%-*s  answers with a tool call: %d/%d", width, "", s["tool_calls"], s["answers"])
    for entry in table[:SIDE_BY_SIDE]:
        log.info("Q: %s", entry["question"])
        for role, answer in entry["answers"].items():
            log.info("  [%-*s] %s", width, role, _one_line(answer) or "(empty)")
            if "tool_calls" in entry:
                log.info("  %-*s  tool call: %s", width, "", entry["tool_calls"][role])


# ---------------------------------------------------------------- task entry

def run(cfg: Config) -> dict:
    """Answer the question set with every model, write the CSV + summary JSON, log the summary."""
    validate_compare(cfg)
    questions = load_questions(cfg.compare.questions)
    plans, note = plan_models(cfg)
    for plan in plans:  # fail on a bad model spec before minutes of generation, not after
        resolve_model(plan.model_cfg.model, flag=plan.flag)
    if note:
        log.info("NOTE: %s", note)
    log.info("Comparing %d question(s) across %s.", len(questions),
             ", ".join(role for p in plans for role, _ in p.roles))
    start = time.perf_counter()
    rows, seconds = [], {}
    for plan in plans:
        plan_rows, plan_seconds = generate_for_plan(plan, questions, cfg)
        rows += plan_rows
        seconds.update(plan_seconds)
    out = Path(cfg.run.output_dir)
    tools = tools_for(cfg.compare.tools)
    csv_path = atomic_write_csv(out / CSV_NAME, rows, CSV_COLUMNS + ([TOOL_CALL_COLUMN] if tools else []))
    stats = summarise(rows, seconds)
    table = answer_table(questions, rows)
    summary = {
        "note": note, "has_base_model": any(role in (ROLE_BASE, ROLE_BASE_RAW) for p in plans for role, _ in p.roles),
        "csv": CSV_NAME,
        "models": stats, "answers": table, "plain_prompt": PLAIN_PROMPT,
        "settings": {"max_new_tokens": cfg.compare.max_new_tokens, "do_sample": cfg.compare.do_sample,
                     "temperature": cfg.compare.temperature if cfg.compare.do_sample else None,
                     "seed": cfg.train.seed, "system_prompt": cfg.data.system_prompt,
                     "questions": cfg.compare.questions or "built-in", "batch_size": GENERATION_BATCH_SIZE,
                     "tools": [t["function"]["name"] for t in tools or []]},
        "total_seconds": round(time.perf_counter() - start, 2), "versions": package_versions(),
    }
    summary_path = atomic_write_json(out / SUMMARY_NAME, summary)
    log_summary(stats, table, note)
    log.info("Wrote %s and %s", csv_path, summary_path)
    return {"csv": str(csv_path), "summary": str(summary_path), "models": stats, "note": note}


# ---------------------------------------------------------------- report section

def report_section(folder: Path) -> str:
    """Per-model stop rate and length, then every question's answers side by side."""
    summary = read_json(folder / SUMMARY_NAME) or {}
    rows = read_csv(folder / CSV_NAME)
    parts = []
    if summary.get("note"):
        parts.append(f'<div class="note">{esc(summary["note"])}</div>')
    stats = summary.get("models") or []
    if stats:
        calls = any("tool_calls" in s for s in stats)  # --tools: answers with a parsed call
        parts.append("<h3>모델별 요약 / Per model</h3>" + html_table(
            ["role", "model", "prompt format", "stopped itself / 스스로 멈춤", "mean new tokens", "tokens/s"]
            + (["tool calls / 도구 호출"] if calls else []),
            [(s.get("role"), s.get("model"), s.get("prompt_format"), f"{s.get('stopped', '?')}/{s.get('answers', '?')}",
              s.get("mean_new_tokens"), s.get("tokens_per_s"))
             + ((f"{s.get('tool_calls', '?')}/{s.get('answers', '?')}",) if calls else ()) for s in stats]))
    roles = list(dict.fromkeys(r.get("role", "?") for r in rows)) or list(
        dict.fromkeys(role for a in summary.get("answers", []) for role in a.get("answers", {})))
    grid: dict[str, dict[str, Html]] = {}
    for r in rows:
        meta = f"{r.get('new_tokens', '?')} tokens, stopped: {r.get('stopped_on_eot', '?')}"
        if r.get(TOOL_CALL_COLUMN):
            meta += f"; tool call: {r[TOOL_CALL_COLUMN]}"
        grid.setdefault(r.get("question", ""), {})[r.get("role", "?")] = Html(
            f'{answer_html(r.get("response"))}<small>{esc(meta)}</small>')
    if not rows:
        for a in summary.get("answers", []):
            grid[a.get("question", "")] = {role: answer_html(text) for role, text in a.get("answers", {}).items()}
    if grid:
        parts.append("<h3>답변 비교 / Answers side by side</h3>" + html_table(
            ["question / 질문"] + roles, [[q] + [by_role.get(role, "") for role in roles] for q, by_role in grid.items()]))
    return "".join(parts)


def report_glance(folder: Path) -> list[str]:
    return [f"비교 / compare: {s.get('role')} stopped by itself in {fmt(s.get('stopped'))} of "
            f"{fmt(s.get('answers'))} answers, {fmt(s.get('mean_new_tokens'))} new tokens on average"
            for s in (read_json(folder / SUMMARY_NAME, quiet=True) or {}).get("models") or []]


def recorded_versions(folder: Path) -> tuple[dict, dict]:
    return {}, (read_json(folder / SUMMARY_NAME, quiet=True) or {}).get("versions") or {}


OUTPUTS = TaskOutputs(task="compare", section_id="comparison", title="모델 비교 / Model comparison",
                      files=(CSV_NAME, SUMMARY_NAME), section=report_section, glance=report_glance,
                      recorded=recorded_versions)

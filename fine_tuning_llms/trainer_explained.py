"""Trainer explained: HF ``Trainer`` next to a hand-written loop that gives the same numbers.

    python run_fine_tuning.py --task explain --output_dir results
    python run_fine_tuning.py --task explain --max_steps 40 --grad_accum 4 --warmup_ratio 0.2

Both runs start from the same LoRA weights (same seed before ``get_peft_model``) and read the
same batches; everything runs in float32 on CPU with LoRA dropout 0, so any difference is a
difference in what the two loops *do*. Outputs in ``--output_dir``:

- ``trainer_vs_manual.csv`` / ``.png``: per-step loss, learning rate and gradient norm of both.
- ``explain_customisation.csv``: a ``compute_loss`` override (label smoothing) against the
  plain run, step by step; ``explain_summary.json``: every number the report shows.
- ``explain_trainer_adapter/``, ``explain_manual_adapter/``: the two trained adapters.

The loop itself lives in ``engine/manual_loop.py`` and the map from Trainer's stages to its lines
in ``engine/loop_walkthrough.py``; this module sets up both runs, the callback and the loss
override, compares the results and prints the walkthrough.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments, set_seed

from .engine.artefacts import atomic_directory, atomic_write_csv, atomic_write_json, json_safe, package_versions
from .engine.batching import pad_batch
from .engine.callbacks import StepMonitor
from .engine.chat_format import encode_many, require_chat_template
from .engine.config import Config
from .engine.data import load_train_eval
from .engine.errors import UserError
from .engine.loop_walkthrough import walkthrough, walkthrough_facts
from .engine.lora import fit_template_tokens, lora_config, max_abs_difference, trainable_state
from .engine.manual_loop import (
    LoopSettings,
    StepRecord,
    causal_lm_loss,
    relative_difference,
    train_manually,
    trained_token_count,
)
from .engine.models import load_model, load_tokenizer, resolve_model
from .engine.outputs import TaskOutputs
from .engine.plots import line_plot
from .engine.report_html import esc, fmt, image, key_values, read_csv, read_json, spread, table

log = logging.getLogger(__name__)

# Sizes of the demonstration: small enough for a 2-core CPU.
EXPLAIN_STEPS = 24            # optimizer steps compared (unless --max_steps is given)
EXPLAIN_BATCH_SIZE = 2        # sequences per micro-batch
EXPLAIN_GRAD_ACCUM = 2        # used when --grad_accum is 1: the lesson needs accumulation
EXPLAIN_MAX_LENGTH = 128      # tokens per conversation (or --max_length when smaller)
EXPLAIN_EVAL_EXAMPLES = 8     # held-out conversations evaluated at mid-run and at the end
CUSTOM_STEPS = 6              # steps of each customisation run
LABEL_SMOOTHING = 0.1         # the compute_loss override's smoothing
FAULT_STEP = 3                # the callback demo poisons this step's logits with NaN
PARITY_RTOL = 1e-5
FILES = {"comparison_csv": "trainer_vs_manual.csv", "comparison_png": "trainer_vs_manual.png",
         "customisation_csv": "explain_customisation.csv", "summary": "explain_summary.json",
         "trainer_adapter": "explain_trainer_adapter", "manual_adapter": "explain_manual_adapter"}


@dataclass
class ExplainData:
    train: list[dict]
    eval: list[dict]
    pad_token_id: int
    source: str
    tokenizer: object               # its turn tokens (a base model's chat format may add two) need rows


def explain_settings(cfg: Config) -> LoopSettings:
    """The run's hyper-parameters: --lr, --seed, --warmup_ratio, ... plus explain's small sizes."""
    t = cfg.train
    steps = t.max_steps if t.max_steps > 0 else EXPLAIN_STEPS
    return LoopSettings(max_steps=steps, batch_size=EXPLAIN_BATCH_SIZE,
                        grad_accum=t.grad_accum if t.grad_accum > 1 else EXPLAIN_GRAD_ACCUM, lr=t.lr,
                        warmup_ratio=t.warmup_ratio, lr_scheduler=t.lr_scheduler, weight_decay=t.weight_decay,
                        seed=t.seed, eval_steps=max(steps // 2, 1), eval_batch_size=EXPLAIN_BATCH_SIZE)


def prepare_data(cfg: Config, tokenizer, settings: LoopSettings) -> ExplainData:
    """Conversations -> assistant-only labels; one epoch's worth of examples (fewer if the data is small)."""
    require_chat_template(tokenizer)
    data = load_train_eval(cfg.data)
    max_length = min(cfg.data.max_length, EXPLAIN_MAX_LENGTH)
    needed = settings.max_steps * settings.batch_size * settings.grad_accum

    def encode(conversations, limit):
        encoded = encode_many(tokenizer, conversations[: limit * 2], max_length=max_length, train_on=cfg.data.train_on,
                              train_reasoning=cfg.data.train_reasoning)
        return [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded if e is not None][:limit]

    train = encode(data.train.conversations, needed)
    if not train:
        raise UserError(f"no training conversation keeps an assistant token within {max_length} tokens; "
                        "pass --max_length 128 or longer, or shorter conversations")
    eval_examples = encode(data.eval, EXPLAIN_EVAL_EXAMPLES)
    return ExplainData(train=train, eval=eval_examples, pad_token_id=tokenizer.pad_token_id, source=data.train.source,
                       tokenizer=tokenizer)


def build_lora_model(cfg: Config, source, seed: int, data: ExplainData):
    """Base model in float32 on CPU with a fresh LoRA adapter; the seed fixes the adapter's start."""
    base = load_model(replace(cfg.model, dtype="float32", device="cpu", load_8bit=False, load_4bit=False), source)
    fit_template_tokens(base, data.tokenizer)  # mean rows for added turn tokens: the same in every copy
    set_seed(seed)  # lora_A is drawn from the global RNG: same seed, same initial adapter
    return get_peft_model(base, lora_config(cfg.train, dropout=0.0))  # dropout 0: the two runs must be deterministic


# ---------------------------------------------------------------- Trainer, its callback, its override

class LabelSmoothingTrainer(Trainer):
    """A ``compute_loss`` override: label-smoothed CE, still divided by the trained tokens of the
    whole accumulated batch. It also records the plain CE of the same logits, to measure the effect."""

    def __init__(self, *args, label_smoothing: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.label_smoothing = label_smoothing
        self.loss_is_scaled_for_ga = True   # divided by num_items_in_batch here: Trainer must not divide again
        self.plain_ce: dict[int, float] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        n = num_items_in_batch if num_items_in_batch is not None else max(trained_token_count([inputs]), 1)
        loss = causal_lm_loss(outputs.logits, inputs["labels"], n, label_smoothing=self.label_smoothing)
        if model.training:
            step = self.state.global_step + 1
            plain = float(causal_lm_loss(outputs.logits.detach(), inputs["labels"], n))
            self.plain_ce[step] = self.plain_ce.get(step, 0.0) + plain
        return (loss, outputs) if return_outputs else loss


def train_with_trainer(model, data: ExplainData, settings: LoopSettings, work_dir: Path, *,
                       label_smoothing: float = 0.0, stop_after: int | None = None, evaluate: bool = True,
                       callbacks: Sequence = ()):
    """Run HF Trainer with ``settings`` (optionally only the first ``stop_after`` steps of its
    schedule); returns (trainer, its StepMonitor callback)."""
    do_eval = evaluate and bool(data.eval) and settings.eval_steps > 0
    args = TrainingArguments(
        output_dir=str(work_dir), max_steps=settings.max_steps, per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.eval_batch_size, gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.lr, weight_decay=settings.weight_decay, warmup_steps=settings.warmup_ratio,
        lr_scheduler_type=settings.lr_scheduler, max_grad_norm=settings.max_grad_norm, seed=settings.seed,
        adam_beta1=settings.adam_beta1, adam_beta2=settings.adam_beta2, adam_epsilon=settings.adam_eps,
        logging_strategy="steps", logging_steps=1, eval_strategy="steps" if do_eval else "no",
        eval_steps=settings.eval_steps if do_eval else None, save_strategy="no", report_to="none", use_cpu=True,
        dataloader_num_workers=0, include_num_input_tokens_seen="non_padding", label_names=["labels"],
        remove_unused_columns=False, disable_tqdm=True)
    monitor = StepMonitor(stop_after)
    kwargs = dict(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval if do_eval else None,
                  data_collator=lambda examples: pad_batch(examples, data.pad_token_id), callbacks=[monitor, *callbacks])
    trainer = (LabelSmoothingTrainer(**kwargs, label_smoothing=label_smoothing) if label_smoothing
               else Trainer(**kwargs))
    trainer.remove_callback(PrinterCallback)  # our tqdm bar replaces one printed dict per step
    trainer.train()
    return trainer, monitor


def trainer_step_logs(trainer) -> dict[int, dict]:
    """{step: {loss, learning_rate, grad_norm, eval_loss?}} from Trainer's log_history."""
    out: dict[int, dict] = {}
    for entry in trainer.state.log_history:
        if "loss" in entry or "eval_loss" in entry:
            out.setdefault(entry["step"], {}).update({k: v for k, v in entry.items() if k != "step"})
    return out


# ---------------------------------------------------------------- comparison and outputs

def comparison_rows(trainer_logs: dict[int, dict], manual: Sequence[StepRecord], monitor_rows: dict[int, dict]) -> list[dict]:
    rows = []
    for rec in manual:
        t = trainer_logs.get(rec.step)
        if t is None or "loss" not in t:
            raise RuntimeError(f"Trainer logged no loss for step {rec.step}")
        rows.append({
            "step": rec.step, "trainer_loss": t["loss"], "manual_loss": rec.loss,
            "abs_diff": abs(t["loss"] - rec.loss), "rel_diff": relative_difference(t["loss"], rec.loss),
            "trainer_lr": t["learning_rate"], "manual_lr": rec.lr,
            "trainer_grad_norm": t["grad_norm"], "manual_grad_norm": rec.grad_norm,
            "grad_norm_rel_diff": relative_difference(t["grad_norm"], rec.grad_norm),
            "trainer_eval_loss": t.get("eval_loss", ""), "manual_eval_loss": "" if rec.eval_loss is None else rec.eval_loss,
            "naive_mean_of_means_loss": rec.naive_loss, "trained_tokens": rec.trained_tokens,
            "input_tokens": rec.input_tokens, "trainer_tokens_per_s": monitor_rows.get(rec.step, {}).get("tokens_per_s", ""),
            "manual_tokens_per_s": rec.input_tokens / rec.seconds if rec.seconds else "",
        })
    return rows


def plot_comparison(path: Path, rows: list[dict], custom: list[dict]) -> Path:
    steps = [r["step"] for r in rows]
    dashed = {"manual loop": {"linestyle": "--", "marker": "x"}, "Trainer": {"marker": "o", "markersize": 3}}

    def overlay(title: str, ylabel: str, key: str) -> dict:
        return {"title": title, "xlabel": "optimizer step", "ylabel": ylabel, "styles": dashed,
                "series": {"Trainer": (steps, [r[f"trainer_{key}"] for r in rows]),
                           "manual loop": (steps, [r[f"manual_{key}"] for r in rows])}}

    worst = max(r["rel_diff"] for r in rows)
    panels = [overlay(f"training loss (max rel diff {worst:.1e})", "loss", "loss"),
              overlay("learning rate", "lr", "lr"),
              overlay("grad norm before clipping (clip at 1.0)", "L2 norm", "grad_norm")]
    if custom:
        cs = [r["step"] for r in custom]
        panels.append({"title": f"compute_loss override: label smoothing {LABEL_SMOOTHING}", "xlabel": "optimizer step",
                       "ylabel": "plain CE, smoothed run - plain run",
                       "series": {"CE gap": (cs, [r["ce_diff"] for r in custom])}})
    return line_plot(path, panels)


def run_customisations(cfg: Config, source, data: ExplainData, settings: LoopSettings, work_dir: Path,
                       baseline: dict[int, dict]) -> tuple[list[dict], dict]:
    """The compute_loss override and the NaN-stopping callback, each run for a few real steps."""
    steps = min(CUSTOM_STEPS, settings.max_steps)
    model = build_lora_model(cfg, source, settings.seed, data)
    smoothed, _ = train_with_trainer(model, data, settings, work_dir / "smoothed", label_smoothing=LABEL_SMOOTHING,
                                     stop_after=steps, evaluate=False)
    logs = trainer_step_logs(smoothed)
    # Same seed, start and batches as the plain run: step by step, only the loss differs.
    custom = [{"step": s, "baseline_loss": baseline[s]["loss"], "smoothed_objective": logs[s]["loss"],
               "smoothed_run_ce": smoothed.plain_ce[s], "ce_diff": smoothed.plain_ce[s] - baseline[s]["loss"]}
              for s in range(1, steps + 1) if s in logs and s in baseline and s in smoothed.plain_ce]
    del model, smoothed

    model = build_lora_model(cfg, source, settings.seed, data)
    fault_step = min(FAULT_STEP, steps)
    current = {"step": 0}

    class StepCounter(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            current["step"] = state.global_step + 1

    def poison(module, inputs, output):  # a simulated fault: NaN logits during one training step
        return output * float("nan") if module.training and current["step"] == fault_step else output

    handle = model.get_output_embeddings().register_forward_hook(poison)
    try:
        faulty, monitor = train_with_trainer(model, data, settings, work_dir / "fault", stop_after=steps,
                                             evaluate=False, callbacks=[StepCounter()])
    finally:
        handle.remove()
    logged = trainer_step_logs(faulty).get(fault_step, {})
    summary = {
        "label_smoothing": {
            "factor": LABEL_SMOOTHING, "steps": len(custom),
            "mean_objective_minus_plain_loss": _mean([r["smoothed_objective"] - r["baseline_loss"] for r in custom]),
            "mean_ce_diff_smoothed_minus_plain": _mean([r["ce_diff"] for r in custom]),
            "last_step_ce": {"plain_run": custom[-1]["baseline_loss"], "smoothed_run": custom[-1]["smoothed_run_ce"]}
            if custom else None},
        "nan_guard": {"fault_step": fault_step, "planned_steps": steps, "stopped_at_step": monitor.stopped_at,
                      "steps_run": faulty.state.global_step, "logged_loss_at_fault": logged.get("loss"),
                      "logged_grad_norm_at_fault": logged.get("grad_norm"),
                      "adapter_weights_finite": all(bool(torch.isfinite(p).all()) for p in trainable_state(model).values())},
    }
    return custom, summary


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def parity_numbers(rows: list[dict], final_adapter_diff: float) -> dict:
    def worst(key_a: str, key_b: str) -> float:
        return max(relative_difference(r[key_a], r[key_b]) for r in rows)

    return {"steps": len(rows), "rtol": PARITY_RTOL, "max_rel_diff_loss": max(r["rel_diff"] for r in rows),
            "max_abs_diff_loss": max(r["abs_diff"] for r in rows), "max_rel_diff_lr": worst("trainer_lr", "manual_lr"),
            "max_rel_diff_grad_norm": worst("trainer_grad_norm", "manual_grad_norm"),
            "final_adapter_max_abs_diff": final_adapter_diff,
            "agree": max(r["rel_diff"] for r in rows) <= PARITY_RTOL}


def run(cfg: Config) -> dict:
    """Train with Trainer and with the manual loop; compare, demonstrate customisation, explain."""
    started = time.perf_counter()
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = explain_settings(cfg)
    if cfg.train.lora_dropout or cfg.model.load_8bit or cfg.model.load_4bit or cfg.model.dtype not in ("auto", "float32"):
        log.info("explain runs float32 on CPU with LoRA dropout 0 (for exact parity); other settings are used as given.")
    source = resolve_model(cfg.model.model)
    data = prepare_data(cfg, load_tokenizer(cfg.model, source), settings)
    log.info("explain: %d training / %d held-out examples, %d steps of %d x %d sequences, lr %g, warm-up %d steps",
             len(data.train), len(data.eval), settings.max_steps, settings.grad_accum, settings.batch_size,
             settings.lr, settings.warmup_steps)
    trainer_model = build_lora_model(cfg, source, settings.seed, data)
    manual_model = build_lora_model(cfg, source, settings.seed, data)
    if max_abs_difference(trainable_state(trainer_model), trainable_state(manual_model)) != 0.0:
        raise RuntimeError("the two LoRA adapters start from different weights; the seed did not fix their init")
    with tempfile.TemporaryDirectory(prefix="explain-") as work:
        t0 = time.perf_counter()
        trainer, monitor = train_with_trainer(trainer_model, data, settings, Path(work) / "trainer")
        with atomic_directory(out / "explain_trainer_adapter", overwrite=True) as tmp:
            trainer.save_model(str(tmp))
        t1 = time.perf_counter()
        manual = train_manually(manual_model, data.train, data.pad_token_id, settings, eval_examples=data.eval,
                                save_dir=out / "explain_manual_adapter")
        t2 = time.perf_counter()
        trainer_logs = trainer_step_logs(trainer)
        rows = comparison_rows(trainer_logs, manual, monitor.rows)
        parity = parity_numbers(rows, max_abs_difference(trainable_state(trainer_model), trainable_state(manual_model)))
        facts = walkthrough_facts(settings, manual, manual_model, rows, train_examples=len(data.train),
                                  eval_examples=len(data.eval))
        del trainer, trainer_model, manual_model
        custom, custom_summary = run_customisations(cfg, source, data, settings, Path(work), trainer_logs)

    atomic_write_csv(out / FILES["comparison_csv"], rows, list(rows[0]))
    if custom:
        atomic_write_csv(out / FILES["customisation_csv"], custom, list(custom[0]))
    plot_comparison(out / FILES["comparison_png"], rows, custom)
    text = walkthrough(facts, parity)
    log_results(text, parity, custom_summary)
    summary = {"task": "explain", "model": cfg.model.model, "data": data.source, "settings": asdict(settings),
               "parity": parity, "walkthrough": facts, "walkthrough_text": text, "customisation": custom_summary,
               "seconds": {"trainer": t1 - t0, "manual": t2 - t1, "total": time.perf_counter() - started},
               "files": FILES, "config": cfg.to_dict(), "versions": package_versions()}
    atomic_write_json(out / FILES["summary"], json_safe(summary))
    log.info("explain: wrote %s in %s (%.0f s)", ", ".join(FILES[k] for k in ("comparison_csv", "comparison_png", "summary")),
             out, summary["seconds"]["total"])
    return summary


def log_results(text: str, parity: dict, custom: dict) -> None:
    log.info("%s", text)
    log.info("Largest relative difference between Trainer and the manual loop: %.3e (%s within rtol %.0e over %d steps)",
             parity["max_rel_diff_loss"], "agree" if parity["agree"] else "do NOT agree", PARITY_RTOL, parity["steps"])
    smoothing, guard = custom["label_smoothing"], custom["nan_guard"]
    if smoothing["steps"]:
        log.info("compute_loss override (label smoothing %.2f): the objective is %+.4f above the plain loss on average; "
                 "plain CE of the smoothed run vs the plain run: %+.4f over %d steps.", smoothing["factor"],
                 smoothing["mean_objective_minus_plain_loss"], smoothing["mean_ce_diff_smoothed_minus_plain"],
                 smoothing["steps"])
    log.info("Callback: NaN injected at step %d -> stopped at step %s; the logged loss there was %s "
             "(logging_nan_inf_filter hides NaN); adapter weights finite: %s.", guard["fault_step"],
             guard["stopped_at_step"], guard["logged_loss_at_fault"], guard["adapter_weights_finite"])


# ---------------------------------------------------------------- report section


def report_section(folder: Path) -> str:
    """The two loops' curves, whether they agree, the walkthrough, the customisation runs, the steps."""
    summary = read_json(folder / FILES["summary"]) or {}
    rows = read_csv(folder / FILES["comparison_csv"])
    parts = [image(folder, FILES["comparison_png"], "Trainer vs manual loop")]
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


def report_glance(folder: Path) -> list[str]:
    parity = (read_json(folder / FILES["summary"], quiet=True) or {}).get("parity") or {}
    return [f"Trainer vs manual loop: agree {fmt(parity.get('agree'))}, largest relative loss difference "
            f"{fmt(parity.get('max_rel_diff_loss'))} over {fmt(parity.get('steps'))} steps"] if parity else []


def recorded_run(folder: Path) -> tuple[dict, dict]:
    summary = read_json(folder / FILES["summary"], quiet=True) or {}
    return summary.get("config") or {}, summary.get("versions") or {}


OUTPUTS = TaskOutputs(task="explain", section_id="trainer-vs-manual", title="Trainer vs 수동 루프 / Trainer vs manual loop",
                      files=(FILES["comparison_csv"], FILES["comparison_png"], FILES["summary"]), section=report_section,
                      glance=report_glance, recorded=recorded_run)

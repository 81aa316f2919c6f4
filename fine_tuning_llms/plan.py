"""Before a long run: will it fit in memory, and how long will an epoch take?

    python run_fine_tuning.py --task plan                                   # the defaults on this machine
    python run_fine_tuning.py --task plan --model my-1b-folder --batch_size 8 --load_4bit
    python run_fine_tuning.py --task plan --memory_gb 16                    # for a machine with 16 GB

What it teaches: a LoRA run's memory is a few countable parts — the frozen weights (by dtype or
quantisation), the small LoRA weights with their gradients and AdamW's two moments, the
activations autograd keeps for the largest step (they grow with batch x length), and the
vocabulary head's logits. ``engine/memory_plan.py`` adds them up from the model's config alone,
before loading a single weight, and names the options that fit when they do not. Time cannot be
counted from shapes on a CPU whose speed depends on so much, so when the plan fits, a few real
training steps run (a separate process, the same settings, output thrown away): their speed gives
the time per epoch, and their peak memory checks the prediction. Writes ``plan.json``.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from .engine.artefacts import atomic_write_json
from .engine.chat_format import tokenize_conversations
from .engine.config import Config
from .engine.data import load_train_eval
from .engine.distributed import is_main_process, world_size
from .engine.errors import UserError
from .engine.memory_plan import MB, STAND_IN_PASSES, options_that_fit, plan_training, training_passes
from .engine.models import load_tokenizer, pick_device, resolve_model
from .engine.outputs import TaskOutputs
from .engine.report_html import fmt, key_values, read_json

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
TIMED_STEPS = 4        # the first step builds kernels and caches: its time is left out


def run(cfg: Config) -> dict:
    device = pick_device(cfg.model.device)
    source = resolve_model(cfg.model.model)
    tokenizer = load_tokenizer(cfg.model, source)
    data = load_train_eval(cfg.data)
    examples = tokenize_conversations(tokenizer, data.train.conversations, max_length=cfg.data.max_length,
                                      train_on=cfg.data.train_on, train_reasoning=cfg.data.train_reasoning,
                                      progress=False).examples
    lengths = [len(e["input_ids"]) for e in examples]
    try:
        plan = plan_training(cfg, source.location, lengths, device, cfg.train.memory_gb)
    except Exception as exc:  # e.g. a remote-code model the meta-device build cannot make
        raise UserError(f"--task plan: {source.display_name} cannot be built from its config alone "
                        f"({type(exc).__name__}); no plan for this model, train it with a small --max_steps to "
                        "measure instead") from None
    log.info("%s", plan.describe())
    result = {"model": source.display_name, "memory": plan.as_dict(), "fits": plan.fits}
    if not plan.fits:
        fits = options_that_fit(cfg, lambda trial: plan_training(trial, source.location, lengths, device,
                                                                 cfg.train.memory_gb))
        result["options_that_fit"] = fits
        log.warning("Does not fit: ~%s MB needed, %s MB available. Options that fit: %s", f"{plan.training / MB:,.0f}",
                    f"{plan.available / MB:,.0f}", "; ".join(fits) or "none (a smaller model, or more memory)")
    elif world_size() > 1:  # one process's speed says little about N processes sharing the cores
        log.info("No trial run under a launch of %d processes: run --task plan without the launcher to time one "
                 "process's steps", world_size())
    else:
        timing = time_steps(cfg, training_passes(cfg.train, len(examples)))
        steps = math.ceil(len(examples) / (cfg.train.batch_size * cfg.train.grad_accum))
        epoch_seconds = sum(lengths) / timing["tokens_per_s"] if timing.get("tokens_per_s") else None
        result.update(timing=timing, steps_per_epoch=steps, epoch_seconds=epoch_seconds)
        if epoch_seconds:
            log.info("Time: ~%.1f min per epoch (%d steps; %.0f tokens/s over steps 2-%d of a trial run), "
                     "%.1f min for --epochs %g, plus loading and the held-out evaluations", epoch_seconds / 60,
                     steps, timing["tokens_per_s"], TIMED_STEPS, epoch_seconds * cfg.train.epochs / 60, cfg.train.epochs)
        if timing.get("peak_rss_mb"):
            log.info("The trial run's measured peak: %s MB (predicted %s MB)", f"{timing['peak_rss_mb']:,.0f}",
                     f"{plan.peak / MB:,.0f}")
    if is_main_process():  # under a launch every rank plans the same; rank 0 writes
        out = Path(cfg.run.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / PLAN_FILE, result)
    return result


# The trial run: the CLI in a child process that writes its own peak RSS (MB, ``peak_rss_mb``) on exit
# to the file named by its first argument (benchmarks/bench_plan.py measures its rows the same way).
PEAK_RSS_WRAPPER = ("import atexit, pathlib, runpy, sys; out = pathlib.Path(sys.argv.pop(1)); "
                    "from fine_tuning_llms.engine.host_memory import peak_rss_mb; "
                    "atexit.register(lambda: out.write_text(str(peak_rss_mb()))); "
                    "sys.argv[0] = 'fine_tuning_llms'; runpy.run_module('fine_tuning_llms', run_name='__main__')")


def time_steps(cfg: Config, passes: float) -> dict:
    """Train ``TIMED_STEPS`` steps with these settings in a child process (its output discarded):
    tokens/s over steps 2.. and the child's peak RSS. The child stands in for the whole run of
    ``passes`` forward/backward passes: it makes the packed weight copies exactly when that run will."""
    skip = ("task", "output_dir", "config", "resume_from_checkpoint", "export")
    settings = {k: v for k, v in cfg.to_dict().items() if k not in skip}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "run.yaml").write_text(yaml.safe_dump(settings), encoding="utf-8")
        settings_file, rss = tmp / "run.yaml", tmp / "rss"
        cmd = [sys.executable, "-c", PEAK_RSS_WRAPPER, str(rss), "--config", str(settings_file), "--task", "train",
               "--output_dir", str(tmp / "out"), "--max_steps", str(TIMED_STEPS), "--logging_steps", "1",
               "--eval_answers", "0", "--save_steps", "1000000", "--overwrite_output_dir", "true"]
        log.info("Timing %d training steps in a trial run (its outputs are thrown away)...", TIMED_STEPS)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", STAND_IN_PASSES: str(passes)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            log.warning("The trial run failed, so no time estimate: %s", last[:300])
            return {"error": last[:300]}
        with open(tmp / "out" / "training_log.csv", newline="", encoding="utf-8") as fh:
            rates = [float(r["tokens_per_s"]) for r in csv.DictReader(fh) if r.get("tokens_per_s")]
        timed = rates[1:] or rates
        return {"tokens_per_s": sum(timed) / len(timed) if timed else None,
                "peak_rss_mb": float(rss.read_text()) if rss.is_file() else None}


def report_section(folder: Path) -> str:
    plan = read_json(folder / PLAN_FILE) or {}
    if not plan:
        return ""
    memory = plan.get("memory") or {}
    return key_values({"model": plan.get("model"), "fits": plan.get("fits"),
                       "predicted peak (MB)": memory.get("peak_mb"), "available (MB)": memory.get("available_mb"),
                       "parts (MB)": memory.get("parts_mb"), "options that fit": plan.get("options_that_fit"),
                       "minutes per epoch": fmt((plan.get("epoch_seconds") or 0) / 60),
                       "trial run peak RSS (MB)": fmt((plan.get("timing") or {}).get("peak_rss_mb"))})


OUTPUTS = TaskOutputs(task="plan", section_id="plan", title="계획 / Plan", files=(PLAN_FILE,),
                      section=report_section, optional=True)

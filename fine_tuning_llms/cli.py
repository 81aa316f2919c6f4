"""Command line: the only place that parses argv and turns errors into exit codes.

    python run_fine_tuning.py                      # every task, embedded model, sample data
    python run_fine_tuning.py --task preprocess    # one task
    python run_fine_tuning.py --config run.yaml --lr 1e-4
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import MISSING
from pathlib import Path
from typing import NoReturn, Optional, get_args, get_origin

import yaml

from .engine.config import TASKS_IN_ORDER, Config, group_fields
from .engine.distributed import close_process_group, end_launched_rank, is_main_process, quiet_other_ranks, world_size
from .engine.errors import UserError
from .engine.outputs import TaskOutputs
from .engine.run_lock import output_lock

log = logging.getLogger("fine_tuning_llms")

# Task name -> module whose run(config) performs it. Only built tasks are listed (no stubs). In the
# course's order: --help offers them so, and report.html shows their sections so (task_outputs).
TASK_MODULES = {
    "compare": "fine_tuning_llms.model_comparison",
    "special_tokens": "fine_tuning_llms.special_tokens",
    "preprocess": "fine_tuning_llms.data_preprocessing",
    "plan": "fine_tuning_llms.plan",
    "train": "fine_tuning_llms.fine_tuning",
    "explain": "fine_tuning_llms.trainer_explained",
    "export": "fine_tuning_llms.export",
    "chat": "fine_tuning_llms.chat_cli",
    "report": "fine_tuning_llms.report",
}
# Tasks that only read the output folder (report.html is rewritten whole, atomically): no lock needed.
READ_ONLY_TASKS = ("report", "chat")


def available_tasks() -> dict[str, str]:
    """Tasks whose module exists in this install."""
    out = {}
    for name, module in TASK_MODULES.items():
        if importlib.util.find_spec(module) is not None:
            out[name] = module
    return out


def task_outputs(tasks: dict[str, str]) -> list[TaskOutputs]:
    """What each task writes and how the report shows it: its module's OUTPUTS, in TASK_MODULES order."""
    modules = [importlib.import_module(module) for module in tasks.values()]
    return [module.OUTPUTS for module in modules if hasattr(module, "OUTPUTS")]  # chat and report write none


def _bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag like every other bad input: one `error:` line, exit 2."""

    def error(self, message: str):
        raise UserError(f"{message}; see --help for the flags")


def _plain_type(f) -> type:
    """The field's value type with Optional[...] removed (str, int, float, bool or list)."""
    ftype = f.type if not isinstance(f.type, str) else eval(f.type, {"Optional": Optional})
    if get_origin(ftype) is not None and type(None) in get_args(ftype):
        ftype = [a for a in get_args(ftype) if a is not type(None)][0]
    return list if get_origin(ftype) is list else ftype


def build_parser() -> argparse.ArgumentParser:
    tasks = available_tasks()
    parser = _Parser(
        prog="run_fine_tuning.py",
        description="Fine-tune Llama-family chat models with transformers + PEFT (LoRA/QLoRA). "
        "Runs offline on the embedded SmolLM2-135M-Instruct by default.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    groups = {}
    for group, f in group_fields():
        if group not in groups:
            groups[group] = parser.add_argument_group(f"{group} settings")
        kwargs: dict = {"help": f.metadata.get("help", ""), "dest": f.name}
        default = f.default if f.default is not MISSING else f.default_factory()
        kwargs["default"] = default
        if f.name == "task":
            choices = ["all"] + [t for t in TASK_MODULES if t in tasks]
            kwargs["choices"] = choices
            kwargs["help"] += " Offered: " + ", ".join(choices) + "."
        elif "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        ftype = _plain_type(f)
        if ftype is bool:
            # --load_8bit alone turns it on; --load_8bit false turns it off (needed over YAML).
            kwargs.update(nargs="?", const=True, type=_bool)
        elif ftype is list:
            kwargs.update(nargs=f.metadata.get("nargs", "*"), type=str)
        else:
            kwargs["type"] = ftype
        groups[group].add_argument(f"--{f.name}", **kwargs)
    return parser


def load_yaml_defaults(path: str) -> dict:
    """Read a flat YAML settings file with safe_load (never executes tags)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {path}: file not found; pass the path of a YAML file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        mark = getattr(exc, "problem_mark", None)
        if mark is not None and getattr(exc, "problem", None):
            first = f"line {mark.line + 1}: {exc.problem}"  # where and what, not the parser's context
        raise UserError(f"--config {path}: not valid YAML ({first}); fix the file") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of flag names to values")
    known = {f.name for _, f in group_fields()}
    unknown = sorted(set(data) - known - {"config"})
    if unknown:
        raise UserError(f"--config {path}: unknown settings {unknown}; use flag names from --help")
    return _checked_yaml_values(path, data)


def _yaml_value(f, value):
    """The value argparse should receive for one YAML setting; raises ValueError naming the expected type.

    argparse converts string defaults with the flag's type but passes other defaults through
    unchecked (no type, no choices), so `batch_size: [1, 2]` or `dtype: fp8` would reach the
    tasks and fail there with a traceback.
    """
    ftype, is_number = _plain_type(f), isinstance(value, (int, float)) and not isinstance(value, bool)
    if value is None:
        if f.default is None:
            return None
        raise ValueError("needs a value")
    if isinstance(value, str):
        # YAML reads 1e-4 as a string; argparse would convert it, but then a bad one is blamed on a flag.
        try:
            converted = _bool(value) if ftype is bool else ftype(value) if ftype in (int, float) else value
        except (ValueError, argparse.ArgumentTypeError):
            raise ValueError("expected true or false" if ftype is bool else
                             "expected a whole number" if ftype is int else "expected a number") from None
    elif ftype is list:
        if not isinstance(value, list) or any(isinstance(v, (dict, list)) for v in value):
            raise ValueError("expected a list of strings")
        converted = [str(v) for v in value]
    elif ftype is bool:
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        converted = value
    elif ftype is int:
        if not is_number or float(value) != int(value):
            raise ValueError("expected a whole number")
        converted = int(value)
    elif ftype is float:
        if not is_number:
            raise ValueError("expected a number")
        converted = float(value)
    else:
        if not is_number:
            raise ValueError("expected a string")
        converted = str(value)
    choices = f.metadata.get("choices")
    if choices and isinstance(converted, str) and converted not in choices:
        raise ValueError(f"expected one of {', '.join(choices)}")
    return [value] if ftype is list and isinstance(value, str) else converted


def _checked_yaml_values(path: str, data: dict) -> dict:
    by_name = {f.name: f for _, f in group_fields()}
    out, problems = {}, []
    for key, value in data.items():
        try:
            out[key] = _yaml_value(by_name[key], value)
        except ValueError as exc:
            problems.append(f"{key}: {exc} (got {value!r})")
    if problems:
        raise UserError(f"--config {path}: " + "; ".join(problems))
    return out


def parse_config(argv: Sequence[str] | None = None) -> Config:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        defaults = load_yaml_defaults(args.config)
        parser.set_defaults(**defaults)
        args = parser.parse_args(argv)  # flags given on the command line win over the file
    cfg = Config()
    for group, f in group_fields():
        setattr(getattr(cfg, group), f.name, getattr(args, f.name))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Check every setting up front and report all problems at once (exit 2)."""
    problems = []
    t, d, m = cfg.train, cfg.data, cfg.model
    for name in ("lr", "batch_size", "epochs", "lora_r", "grad_accum", "save_steps", "logging_steps"):
        if getattr(t, name) <= 0:
            problems.append(f"--{name} must be positive (got {getattr(t, name)})")
    if t.eval_answers < 0:
        problems.append(f"--eval_answers must be 0 or more (got {t.eval_answers})")
    if t.lora_alpha is not None and t.lora_alpha <= 0:
        problems.append(f"--lora_alpha must be positive (got {t.lora_alpha})")
    if not 0 <= t.lora_dropout < 1:
        problems.append(f"--lora_dropout must be in [0, 1) (got {t.lora_dropout})")
    if not 0 <= t.warmup_ratio < 1:
        problems.append(f"--warmup_ratio must be in [0, 1) (got {t.warmup_ratio})")
    if t.memory_gb is not None and t.memory_gb <= 0:
        problems.append(f"--memory_gb must be positive, the GB to plan for (got {t.memory_gb}); leave it out to plan "
                        "for this machine's free memory")
    if t.max_steps == 0 or t.max_steps < -1:
        problems.append(f"--max_steps must be positive or -1 (got {t.max_steps})")
    if m.load_8bit and m.load_4bit:
        problems.append("--load_8bit and --load_4bit exclude each other; pick one")
    if d.max_length < 16:
        problems.append(f"--max_length {d.max_length} is too short for any chat template; use at least 64")
    if not 0 <= d.eval_ratio < 1:
        problems.append(f"--eval_ratio must be in [0, 1) (got {d.eval_ratio})")
    if d.max_examples is not None and d.max_examples <= 0:
        problems.append(f"--max_examples must be positive (got {d.max_examples})")
    if d.dataset_path and d.dataset:
        problems.append("give --dataset_path or --dataset, not both")
    for flag in ("dataset_path", "eval_path"):
        value = getattr(d, flag)
        if value:
            p = Path(value)
            if p.is_dir():
                problems.append(f"--{flag} {value} is a directory; pass a .json or .jsonl file")
            elif not p.exists():
                problems.append(f"--{flag} {value} does not exist; check the path")
    out = Path(cfg.run.output_dir)
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and (not probe.is_dir() or not os.access(probe, os.W_OK)):
        problems.append(f"--output_dir {out} is not writable; choose another folder")
    if problems:
        raise UserError(problems)


def run_tasks(cfg: Config) -> dict:
    tasks = available_tasks()
    # `--task all` runs TASKS_IN_ORDER: compare comes after train so it includes the new adapter, and
    # export (only with --export gguf: it covers two families) comes last, from that adapter.
    names = [n for n in TASKS_IN_ORDER if n in tasks and (n != "export" or cfg.export.export == "gguf")] \
        if cfg.run.task == "all" else [cfg.run.task]
    # One writing run at a time per output folder; report and chat only read it.
    writes = any(name not in READ_ONLY_TASKS for name in names)
    with output_lock(cfg.run.output_dir) if writes else contextlib.nullcontext():
        return _run_in_order(cfg, tasks, names)


def _run_in_order(cfg: Config, tasks: dict[str, str], names: list[str]) -> dict:
    if "train" in names:
        # Refuse to overwrite an earlier final_model/ now, not after the tasks before train ran.
        importlib.import_module(tasks["train"]).check_output_dir(cfg)
    if cfg.export.export == "gguf" and len(names) > 1:  # alone, train and export check this themselves
        from .engine.gguf_export import check_exportable
        from .engine.models import resolve_model

        check_exportable(resolve_model(cfg.model.model))  # family and converter, before hours of training
    results = {}
    for i, name in enumerate(names, 1):
        log.info("=== [%d/%d] task %s ===", i, len(names), name)
        start = time.perf_counter()
        module = importlib.import_module(tasks[name])
        # The report is the one task that reads the others' files: it gets their declarations.
        results[name] = module.run(cfg, task_outputs(tasks)) if name == "report" else module.run(cfg)
        log.info("=== task %s done in %.1f s ===", name, time.perf_counter() - start)
        if name not in READ_ONLY_TASKS and "report" in tasks and is_main_process():
            # Every task refreshes report.html; a report problem never fails the task.
            importlib.import_module(tasks["report"]).refresh_report(cfg.run.output_dir, task_outputs(tasks))
    return results


# errno values that mean "the disk or folder refused the write", not a bug in this program.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _fail(message: str) -> int:
    """Print one `error:` line (exit status 2); newlines inside the message would split it."""
    print("error: " + " ".join(message.split("\n")), file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    quiet_other_ranks()  # under torchrun / accelerate launch only rank 0 prints its progress
    # bitsandbytes' missing-hub-kernel warning is dropped by a filter the engine installs on import.
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cfg = parse_config(argv)
        debug = cfg.run.debug  # also honours `debug: true` in --config and `--debug false`
        run_tasks(cfg)
    except UserError as exc:
        if debug:
            raise
        # Every rank checks the same settings and inputs and finds the same problem: rank 0 says it once.
        return _fail(str(exc)) if is_main_process() else 2
    except OSError as exc:
        # A full disk or a folder that became read-only mid-run is the user's to fix, not a bug:
        # atomic writes already removed their temp files, so say what happened in one line.
        if debug or exc.errno not in DISK_ERRNOS:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"{where}{exc.strerror}; free disk space or pick another --output_dir, then run again "
                     "(finished files were kept)")
    except KeyboardInterrupt:
        if not is_main_process():
            return 130
        print("interrupted: finished outputs were kept; partial files were not written", file=sys.stderr)
        return 130
    finally:
        close_process_group()
    return 0


def entry() -> NoReturn:
    """The command line's way in (run_fine_tuning.py, ``python -m fine_tuning_llms``, the
    ``fine-tuning-llms`` script): main's status becomes the exit code. A rank of a launch ends
    without interpreter teardown (``end_launched_rank`` says why); main itself stays a plain call."""
    status = main()
    if world_size() > 1:
        end_launched_rank(status)
    sys.exit(status)


if __name__ == "__main__":
    entry()

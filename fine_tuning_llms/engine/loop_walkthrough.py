"""How ``Trainer.train()`` maps onto the hand-written loop in ``manual_loop.py``: each stage,
the line of the loop that does the same, and one run's numbers (the explain lesson prints it)."""
from __future__ import annotations

import inspect
import math
import re
from collections.abc import Sequence
from pathlib import Path

from . import manual_loop
from .manual_loop import LoopSettings, StepRecord, optimizer_param_groups, relative_difference
from .models import count_parameters


def step_line_numbers() -> dict[int, int]:
    """{N: line} of each ``# [N]`` step comment in manual_loop.py, for the printed walkthrough."""
    lines = Path(inspect.getsourcefile(manual_loop)).read_text(encoding="utf-8").splitlines()
    found = {}
    for number, text in enumerate(lines, 1):
        match = re.match(r"\s*# \[(\d+)\]", text)
        if match:
            found.setdefault(int(match.group(1)), number)
    return found


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def walkthrough_facts(settings: LoopSettings, manual: Sequence[StepRecord], model, rows: list[dict], *,
                      train_examples: int, eval_examples: int) -> dict:
    """A run's numbers for each Trainer stage; ``rows`` are trainer_explained's comparison rows."""
    groups = optimizer_param_groups(model, settings.weight_decay)
    batches = math.ceil(train_examples / settings.batch_size)
    trained = [r.trained_tokens for r in manual]
    lrs = [r.lr for r in manual]
    peak = max(range(len(lrs)), key=lambda i: lrs[i])
    trainable, total = count_parameters(model)
    return {
        "train_examples": train_examples, "eval_examples": eval_examples, "batch_size": settings.batch_size,
        "grad_accum": settings.grad_accum, "batches_per_epoch": batches,
        "steps_per_epoch": math.ceil(batches / settings.grad_accum), "steps": len(manual),
        "epochs": manual[-1].epoch if manual else 0.0,
        "trained_tokens_per_step": {"mean": mean(trained), "min": min(trained), "max": max(trained)},
        "input_tokens_per_step": mean([r.input_tokens for r in manual]),
        "trainable_params": trainable, "total_params": total,
        "decay_group": {"tensors": len(groups[0]["params"]), "params": sum(p.numel() for p in groups[0]["params"]),
                        "weight_decay": settings.weight_decay},
        "no_decay_group": {"tensors": len(groups[1]["params"]), "params": sum(p.numel() for p in groups[1]["params"])},
        "warmup_steps": settings.warmup_steps, "lr_first": lrs[0], "lr_peak": lrs[peak], "lr_peak_step": peak + 1,
        "lr_last": lrs[-1], "lr_scheduler": settings.lr_scheduler,
        "grad_norm_first": manual[0].grad_norm, "grad_norm_last": manual[-1].grad_norm,
        "steps_clipped": sum(r.grad_norm > settings.max_grad_norm for r in manual),
        "eval": [{"step": r["step"], "trainer": r["trainer_eval_loss"], "manual": r["manual_eval_loss"]}
                 for r in rows if r["trainer_eval_loss"] != "" or r["manual_eval_loss"] != ""],
        "naive_loss_max_rel_gap": max(relative_difference(r.loss, r.naive_loss) for r in manual),
    }


def walkthrough(facts: dict, parity: dict) -> str:
    """Each Trainer stage, the line of manual_loop.py that does the same, and a run's numbers
    (``facts`` and ``parity`` as ``trainer_explained`` measures them)."""
    at = step_line_numbers()

    def ref(*numbers: int) -> str:
        return "manual_loop.py:" + ",".join(str(at.get(n, "?")) for n in numbers)

    f = facts
    stages = [
        ("Trainer.__init__: set_seed, model", "build_lora_model", f"{f['trainable_params']:,} trainable of "
         f"{f['total_params']:,} params; both adapters identical at start"),
        ("create_optimizer: AdamW (fused), 2 groups", ref(1), f"decay {f['decay_group']['tensors']} tensors "
         f"(wd {f['decay_group']['weight_decay']}), no-decay {f['no_decay_group']['tensors']} tensors"),
        ("create_scheduler: get_scheduler", ref(2), f"{f['lr_scheduler']}, warm-up {f['warmup_steps']} steps: lr "
         f"{f['lr_first']:.3g} at step 1, peak {f['lr_peak']:.3g} at step {f['lr_peak_step']}, {f['lr_last']:.3g} at the end"),
        ("get_train_dataloader (seed + epoch)", ref(3), f"{f['train_examples']} examples / batch {f['batch_size']} = "
         f"{f['batches_per_epoch']} batches; / accum {f['grad_accum']} = {f['steps_per_epoch']} steps per epoch"),
        ("get_batch_samples: num_items_in_batch", ref(4), f"trained tokens per step {f['trained_tokens_per_step']['mean']:.0f}"
         f" (min {f['trained_tokens_per_step']['min']}, max {f['trained_tokens_per_step']['max']}); input tokens "
         f"{f['input_tokens_per_step']:.0f}"),
        ("training_step -> compute_loss", ref(5, 6), "sum of CE over trained tokens / num_items_in_batch"),
        ("accelerator.backward", ref(7), f"{f['grad_accum']} backward passes add into .grad per step"),
        ("_clip_grad_norm (max_grad_norm 1.0)", ref(8), f"grad norm {f['grad_norm_first']:.3g} at step 1, "
         f"{f['grad_norm_last']:.3g} at the end; clipped on {f['steps_clipped']} of {f['steps']} steps"),
        ("optimizer.step, lr_scheduler.step, zero_grad", ref(9, 10, 11), f"{f['steps']} steps, {f['epochs']:.2f} epochs"),
        ("_maybe_log_save_evaluate: log", ref(12), "loss = sum of the micro-batch losses (logging_steps=1)"),
        ("_maybe_log_save_evaluate: evaluate", ref(13), "; ".join(
            f"step {e['step']}: eval loss {e['trainer']:.5f} (Trainer) vs {e['manual']:.5f} (manual)"
            for e in f["eval"] if e["trainer"] != "" and e["manual"] != "") or "no held-out data"),
        ("save_model", ref(14), "adapter only (PEFT)"),
    ]
    width, where_width = max(len(s) for s, _, _ in stages), max(len(w) for _, w, _ in stages)
    lines = ["How Trainer.train() maps onto the hand-written loop (this run's numbers):"]
    lines += [f"  {stage:<{width}}  {where:<{where_width}}  {numbers}" for stage, where, numbers in stages]
    lines.append(f"Parity: largest relative loss difference {parity['max_rel_diff_loss']:.2e} over {parity['steps']} "
                 f"steps (abs {parity['max_abs_diff_loss']:.2e}); lr max rel diff {parity['max_rel_diff_lr']:.2e}; "
                 f"grad norm max rel diff {parity['max_rel_diff_grad_norm']:.2e}; final adapters differ by at most "
                 f"{parity['final_adapter_max_abs_diff']:.2e}.")
    lines.append(f"Known detail: averaging the per-micro-batch mean losses (Trainer before 4.46) would have "
                 f"reported losses up to {f['naive_loss_max_rel_gap']:.1%} off, because micro-batches train "
                 f"different numbers of tokens.")
    return "\n".join(lines)

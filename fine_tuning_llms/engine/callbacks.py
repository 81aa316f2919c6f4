"""Trainer callbacks the lessons show: a step monitor that also stops on non-finite values."""
from __future__ import annotations

import logging
import math
import time

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

log = logging.getLogger(__name__)


class StepMonitor(TrainerCallback):
    """A callback: tokens/s and grad norm per step, and a stop on NaN/inf loss or gradients.

    The gradient check sits in ``on_pre_optimizer_step``: by ``on_log`` the optimizer has already
    written NaN into the weights, and Trainer's ``logging_nan_inf_filter`` replaces a NaN loss in
    the logs with the running average (0.0 right after a log), so the logged loss can look fine.
    """

    def __init__(self, stop_after: int | None = None):
        self.rows: dict[int, dict] = {}
        self.stopped_at: int | None = None
        self.stop_after = stop_after   # end early, keeping the full run's lr schedule
        self._started, self._tokens, self._bar = 0.0, 0, None

    def on_train_begin(self, args, state, control, **kwargs):
        self._bar = tqdm(total=min(state.max_steps, self.stop_after or state.max_steps), desc="Trainer", unit="step",
                         leave=False)

    def on_step_begin(self, args, state, control, **kwargs):
        self._started, self._tokens = time.perf_counter(), state.num_input_tokens_seen

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None):
            for p in model.parameters():
                p.grad = None  # AdamW skips parameters without a gradient: the weights stay finite
            self.stopped_at = state.global_step + 1
            control.should_training_stop = True
            log.warning("Step %d: non-finite gradients; the step was skipped and training stopped.", self.stopped_at)

    def on_step_end(self, args, state, control, **kwargs):
        seconds = time.perf_counter() - self._started
        tokens = state.num_input_tokens_seen - self._tokens
        self.rows.setdefault(state.global_step, {})["tokens_per_s"] = tokens / seconds if seconds > 0 else float("nan")
        self._bar.update(1)
        if self.stop_after and state.global_step >= self.stop_after:
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.rows.setdefault(state.global_step, {}).update(grad_norm=logs.get("grad_norm"), loss=logs["loss"])
            self._bar.set_postfix(loss=f"{logs['loss']:.4f}")
            if not math.isfinite(logs["loss"]) or not math.isfinite(logs.get("grad_norm") or 0.0):
                self.stopped_at = self.stopped_at or state.global_step
                control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self._bar.close()

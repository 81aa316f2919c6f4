"""Training mechanics shared by `train`: the Trainer subclass, its loss on packed rows, the log and
checkpoint callbacks, checkpoint discovery and the held-out loss. Batches come from ``batching``;
the task flow itself lives in the train lesson (``fine_tuning.py``).
"""
from __future__ import annotations

import contextlib
import csv
import gc
import io
import logging
import math
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback

from . import chat_format
from .artefacts import atomic_write_json, atomic_write_text
from .batching import PackingCollator, pad_batch
from .distributed import is_main_process, is_sharded, shard_counts, use_fsdp_on_cpu
from .host_memory import return_freed_memory
from .kernels import HeadCrossEntropyFunction, head_chunk_rows, head_for_fused_loss
from .precision import autocast_dtype
from .run_identity import IDENTITY_FILE

log = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"
# What Trainer writes into a LoRA checkpoint that resuming needs, then our completion marker.
CHECKPOINT_FILES = ("adapter_model.safetensors", "trainer_state.json", "optimizer.pt", "scheduler.pt", COMPLETE_MARKER)
# The same under FSDP: model and optimizer as sharded (torch.distributed.checkpoint) folders, one file per rank.
FSDP_CHECKPOINT_FILES = ("pytorch_model_fsdp_0", "trainer_state.json", "optimizer_0", "scheduler.pt", COMPLETE_MARKER)
LOG_COLUMNS = ["step", "epoch", "loss", "lr", "grad_norm", "eval_loss", "tokens_per_s", "trained_tokens_per_s"]


class NonFiniteLossError(RuntimeError):
    pass


class ChatTrainer(Trainer):
    """HF Trainer + guards and speed-ups.

    - counts real (non-pad) tokens for tokens/s, and stops on a NaN/inf loss;
    - ``trained_logits_only``: logits only where a label is (``trained_token_loss``), and with
      ``fused_head`` the head and loss as one node that never holds the whole logits;
    - held-out evaluation the same way as before/after training, packed (``evaluate``).
    """

    def __init__(self, *args, trained_logits_only: bool = False, fused_head: bool = False, packed: bool = False,
                 pad_token_id: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.trained_logits_only = trained_logits_only
        self.fused_head = fused_head
        self.packed, self.pad_token_id = packed, pad_token_id
        self.autocast_dtype = autocast_dtype(self.args.bf16, self.args.fp16)
        self.last_eval: tuple[int, float] | None = None  # (step, held-out loss) of the latest evaluate()
        self.eval_seconds = 0.0  # time spent in evaluate() during train(), to report training speed alone
        self._non_embedding_params: int | None = None
        self.tokens_seen = 0          # non-pad tokens fed forward
        self.trained_tokens_seen = 0  # tokens with a label
        # Trainer's bar also writes every raw log dict under itself; TrainingLogCallback logs one
        # formatted line per logging step instead, so keep the bar and drop the dicts.
        if any(type(cb) is ProgressCallback for cb in self.callback_handler.callbacks):
            self.remove_callback(ProgressCallback)
            self.add_callback(BarOnlyProgressCallback)

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if use_fsdp_on_cpu(self.accelerator):  # accelerate would train an FSDP launch on CPU as DDP
            self.is_fsdp_enabled = True

    def train(self, *args, **kwargs):
        # While the bar is drawn, console log lines go through tqdm.write so they do not split it.
        console = any(isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr)
                      for h in logging.root.handlers)
        # Trainer.train starts with accelerate's free_memory(): a full gc.collect() over every object
        # the process holds, ~0.36 s for the ~550k the loaded model, tokenizer and data leave
        # (benchmarks/RESULTS.md). They live until training ends anyway, so they sit out collection
        # for the call (gc.freeze) and are handed back after; a caller's own freeze is left alone.
        freeze = gc.get_freeze_count() == 0
        if freeze:
            gc.freeze()
        try:
            with logging_redirect_tqdm() if console else contextlib.nullcontext():
                return super().train(*args, **kwargs)
        finally:
            if freeze:
                gc.unfreeze()

    def floating_point_ops(self, inputs) -> int:
        """Trainer's FLOPs estimate for ``total_flos``, with the parameter count taken once: Trainer
        recounts every parameter at every step, a visible share of a small model's step
        (benchmarks/RESULTS.md)."""
        if self._non_embedding_params is None:
            self._non_embedding_params = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs["input_ids"].numel() * self._non_embedding_params

    def training_step(self, model, inputs, num_items_in_batch=None):
        mask = inputs.get("attention_mask")  # padded batches; a packed row has no padding
        self.tokens_seen += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        self.trained_tokens_seen += int((inputs["labels"] != chat_format.IGNORE_INDEX).sum())
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            raise NonFiniteLossError(f"loss became {loss.item()} at step {self.state.global_step + 1}")
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not (self.trained_logits_only and model.training and inputs["input_ids"].shape[0] == 1):
            if model.training:
                self.loss_is_scaled_for_ga = None  # let Trainer decide, as without this override
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        # The fused head calls the decoder itself, so only on the bare model: a DDP/FSDP wrapper's
        # forward (gradient synchronisation) must not be skipped.
        fused = self.fused_head and not return_outputs and model is self.model
        loss, n, outputs = trained_token_loss(model, inputs, fused_head=fused, autocast_dtype=self.autocast_dtype)
        # Same normalisation as Trainer: by the trained tokens of the whole accumulated batch.
        if num_items_in_batch is not None:
            loss = loss / num_items_in_batch
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * self.args.world_size  # DDP averages gradients over processes
            self.loss_is_scaled_for_ga = True
        else:
            loss = loss / max(n, 1)
            self.loss_is_scaled_for_ga = False
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """Held-out loss as `train` reports it before and after training (token-weighted over trained
        tokens), computed packed when training is packed. Trainer's own loop would pad every batch
        and compute all 49k-vocabulary logits, the largest memory peak of a run."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        start = time.perf_counter()
        loss = mean_eval_loss(self.model, dataset.examples, self.pad_token_id,
                              batch_size=self.args.per_device_eval_batch_size, autocast_dtype=self.autocast_dtype,
                              packed=self.packed)
        self.eval_seconds += time.perf_counter() - start
        metrics = {f"{metric_key_prefix}_loss": loss}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        self.last_eval = (self.state.global_step, loss)
        return metrics


def trained_token_loss(model, inputs: dict, fused_head: bool = False,
                       autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, int, object]:
    """Summed cross-entropy over the trained tokens of one packed row, their count, model outputs.

    The vocabulary projection (lm_head) runs only where the next token has a label, via the
    model's ``logits_to_keep``; with a 49k vocabulary that is a large share of each step, and
    the prompt positions never needed logits. With ``fused_head`` (training, an unwrapped causal LM
    of ``kernels.head_loss.HEAD_CLASSES`` with a frozen head) the head and the loss are one node that never holds the whole logits
    (``kernels.HeadCrossEntropyFunction``); outputs are then None. The decoder is called
    directly there, so the autocast that accelerate puts around ``model.forward`` is applied here.
    Without gradients (evaluation) the same model's loss is made from its logits a chunk of rows
    at a time (``chunked_head_loss``), also with outputs None.
    """
    inputs = dict(inputs, use_cache=False)  # a cache would make transformers stop isolating packed sequences
    targets = inputs.pop("labels")[0, 1:]                      # (T-1,) token t+1 is predicted at t
    keep = (targets != chat_format.IGNORE_INDEX).nonzero().squeeze(1)  # (N,) positions that need logits
    evaluating = not torch.is_grad_enabled()
    head = head_for_fused_loss(model) if fused_head or evaluating else None
    if head is not None:
        decoder, weight = head
        device = inputs["input_ids"].device
        autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            hidden = decoder(**inputs).last_hidden_state[0, keep]  # (N, d)
            if evaluating:  # the model's own logits and loss, a chunk of rows at a time
                loss = chunked_head_loss(hidden, weight, targets[keep])
            elif hidden.dtype == torch.float16:
                # the node's fp16 softmax gradient would flush small probabilities to zero before the
                # loss scaler can lift them; fp16 keeps autograd's cross-entropy (bf16 has fp32's range)
                logits = torch.nn.functional.linear(hidden, weight.to(hidden.dtype))
                loss = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")
            else:
                loss = HeadCrossEntropyFunction.apply(hidden, weight, targets[keep], head_chunk_rows(weight.shape[0]))
        return loss, len(keep), None
    outputs = model(**inputs, logits_to_keep=keep)  # logits: (1, N, vocab)
    loss = torch.nn.functional.cross_entropy(outputs.logits[0].float(), targets[keep], reduction="sum")
    return loss, len(keep), outputs


def chunked_head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the head's logits ``hidden @ weight.T``, without gradients, made a chunk
    of rows at a time: the model's own product and loss, but an evaluation batch never holds its whole
    (N, vocabulary) logits and their fp32 copy at once. At a 128k vocabulary those were the largest
    allocations of a run (benchmarks/RESULTS.md)."""
    rows = head_chunk_rows(weight.shape[0])
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    # One fp32 buffer for every chunk of the call: cross_entropy on logits.float() would make two fresh
    # (chunk, vocabulary) fp32 tensors per chunk, and fresh memory page-faults (benchmarks/RESULTS.md).
    log_probs = None
    for start in range(0, hidden.shape[0], rows):
        logits = torch.nn.functional.linear(hidden[start:start + rows], weight)  # autocast casts as lm_head's
        if log_probs is None:
            log_probs = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        chunk = log_probs[:logits.shape[0]].copy_(logits)
        torch.log_softmax(chunk, dim=-1, out=chunk)  # cross_entropy's log-softmax, in place
        total -= chunk.gather(1, targets[start:start + rows, None]).sum()
    return total


class BarOnlyProgressCallback(ProgressCallback):
    """Trainer's progress bar without the raw log dict it writes at every log event."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass  # TrainingLogCallback logs these values as one line (and puts loss, tok/s on the bar)


class TrainingLogCallback(TrainerCallback):
    """Rewrites training_log.csv (atomically) at every log event, with tokens/s since the last one,
    and logs one line per logging step (``step 5/90 · loss 3.9530 · lr 1.70e-04 · ...``)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: list[dict] = []
        self.trainer: ChatTrainer | None = None  # set once the Trainer exists (it takes the callback first)
        self._last = None

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        self._last = (time.perf_counter(), trainer.tokens_seen, trainer.trained_tokens_seen)
        if self.path.exists() and state.global_step > 0:  # resumed: keep the rows written before the kill
            with open(self.path, newline="", encoding="utf-8") as fh:
                self.rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= state.global_step]

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not args.should_save or not logs:
            return
        trainer = self.trainer
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        if "loss" in logs:
            now = time.perf_counter()
            t0, n0, m0 = self._last
            elapsed = max(now - t0, 1e-9)
            row.update(loss=logs["loss"], lr=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"),
                       tokens_per_s=round((trainer.tokens_seen - n0) / elapsed, 1),
                       trained_tokens_per_s=round((trainer.trained_tokens_seen - m0) / elapsed, 1))
            self._last = (now, trainer.tokens_seen, trainer.trained_tokens_seen)
            show_on_progress_bar(trainer, loss=f"{logs['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            parts = [f"step {state.global_step}/{state.max_steps}", f"loss {logs['loss']:.4f}"]
            if row["lr"] is not None:
                parts.append(f"lr {row['lr']:.2e}")
            if row["grad_norm"] is not None:
                parts.append(f"grad norm {row['grad_norm']:.2f}")
            log.info(" · ".join([*parts, f"{row['tokens_per_s']:.0f} tok/s"]))
        elif "eval_loss" in logs:
            row["eval_loss"] = logs["eval_loss"]
            log.info("step %d/%d · held-out loss %.4f", state.global_step, state.max_steps, logs["eval_loss"])
        else:
            return
        self.rows.append(row)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        for r in self.rows:
            writer.writerow({k: r.get(k, "") for k in LOG_COLUMNS})
        atomic_write_text(self.path, buf.getvalue())


def show_on_progress_bar(trainer, **values) -> None:
    """Put the latest loss and tokens/s on Trainer's own tqdm bar."""
    for callback in trainer.callback_handler.callbacks:
        bar = getattr(callback, "training_bar", None) if isinstance(callback, ProgressCallback) else None
        if bar is not None:
            bar.set_postfix(values, refresh=False)


class ShardingReportCallback(TrainerCallback):
    """After the first step of a sharded (FSDP) run, one line with how many parameter values each
    rank holds: the proof that the model is split, not copied (a collective on every rank)."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step != 1 or model is None or not is_sharded(model):
            return
        counts = shard_counts(model)
        if is_main_process():
            total = counts[0][1]
            log.info("FSDP2: after step 1 the %s parameter values are split over %d processes: %s", f"{total:,}",
                     len(counts), ", ".join(f"rank {r} holds {held:,} ({100 * held / total:.0f}%)"
                                            for r, (held, _) in enumerate(counts)))


class TimePlanCallback(TrainerCallback):
    """The time half of the plan (engine/memory_plan.py gives the memory half before loading): once
    ``TIMED`` steps ran, one line with the time per epoch and for the run at their speed (the first
    step, which builds kernels and caches, is left out)."""

    TIMED = 4

    def __init__(self, steps_per_epoch: int):
        self.steps_per_epoch = steps_per_epoch
        self._first_end: float | None = None
        self._steps_before = 0

    def on_step_end(self, args, state, control, **kwargs):
        done = state.global_step - self._steps_before
        if self._first_end is None:  # the end of this run's first step (after a resume too)
            self._first_end, self._steps_before = time.perf_counter(), state.global_step
        elif done == self.TIMED - 1 and is_main_process():
            per_step = (time.perf_counter() - self._first_end) / done
            log.info("Time plan: %.2f s per step over steps 2-%d: ~%.1f min per epoch (%d steps), ~%.1f min for the "
                     "%d steps of this run", per_step, self.TIMED, per_step * self.steps_per_epoch / 60,
                     self.steps_per_epoch, per_step * state.max_steps / 60, state.max_steps)


class CompleteCheckpointCallback(TrainerCallback):
    """Records what a checkpoint belongs to, then marks it complete after Trainer has written all of it.

    Trainer writes a checkpoint file by file; a kill in the middle leaves a folder that looks
    like a checkpoint. Resuming only from marked folders never picks up a half-written one, and
    the run record (``run_identity``) lets a resume refuse a run with other settings or data.
    """

    def __init__(self, identity: dict | None = None):
        self.identity = identity

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                if self.identity is not None:
                    atomic_write_json(folder / IDENTITY_FILE, self.identity)
                atomic_write_json(folder / COMPLETE_MARKER, {"global_step": state.global_step}, indent=None)


def missing_checkpoint_files(folder: Path) -> list[str]:
    """What a checkpoint folder lacks to be resumed from (empty when complete); plain or FSDP layout."""
    if not folder.is_dir():
        return ["the folder itself"]
    names = FSDP_CHECKPOINT_FILES if (folder / FSDP_CHECKPOINT_FILES[0]).is_dir() else CHECKPOINT_FILES
    return [name for name in names if not (folder / name).exists()]


def complete_checkpoints(folder: Path) -> list[Path]:
    """Completed checkpoint folders under ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir() and (p / COMPLETE_MARKER).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def mean_eval_loss(model, examples: Sequence[dict], pad_token_id: int, *, batch_size: int = 8,
                   autocast_dtype: torch.dtype | None = None, packed: bool = False) -> float:
    """Token-weighted mean loss over trained tokens (the number perplexity is made of).

    ``packed``: each batch laid end to end in one row with logits only at trained positions,
    the same numbers at a fraction of the memory (padded batches hold batch x length x vocab
    logits); only for a model that passed ``packing.check_packing``, as training does.
    """
    if not examples:
        return float("nan")
    device = next(model.parameters()).device
    if device.type == "cpu":
        return_freed_memory()  # what the phase before left in the allocator's free lists would add to this one's peak
    total_loss, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            batch = PackingCollator()(chunk) if packed else pad_batch(chunk, pad_token_id)
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                if packed:
                    loss_sum, n, _ = trained_token_loss(model, batch)
                    loss_sum = float(loss_sum)
                else:
                    n = int((batch["labels"][:, 1:] != chat_format.IGNORE_INDEX).sum())
                    loss_sum = float(model(**batch, use_cache=False).loss) * n  # padded: no packing detection needed
            total_loss += loss_sum
            total_tokens += n
    model.train(was_training)
    return total_loss / max(total_tokens, 1)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")

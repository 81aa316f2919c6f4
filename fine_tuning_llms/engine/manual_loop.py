"""The loop inside Hugging Face ``Trainer``, written out by hand (nanoGPT style).

    python run_fine_tuning.py --task explain    # runs this loop and Trainer side by side

Each numbered step ``# [N]`` has a twin inside transformers 5.24's ``Trainer``; the comment
names it, and ``loop_walkthrough.walkthrough`` prints this file's line numbers next to them.
Run on the same model, data, seed and settings, the two produce the same per-step losses,
learning rates and gradient norms (to float32 rounding): that is the proof that nothing else
happens inside ``Trainer.train()`` for a plain single-process run.
"""
from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .artefacts import atomic_directory
from .batching import pad_batch
from .chat_format import IGNORE_INDEX

log = logging.getLogger(__name__)

# Trainer.get_decay_parameter_names: biases and every kind of norm weight get no weight decay.
NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


@dataclass(frozen=True)
class LoopSettings:
    """The hyper-parameters both runs share (each maps to one ``TrainingArguments`` field)."""

    max_steps: int            # optimizer steps (max_steps)
    batch_size: int           # sequences per micro-batch (per_device_train_batch_size)
    grad_accum: int           # micro-batches per optimizer step (gradient_accumulation_steps)
    lr: float                 # peak learning rate (learning_rate)
    warmup_ratio: float       # share of steps with linear warm-up (warmup_steps given as a ratio)
    lr_scheduler: str         # lr_scheduler_type, e.g. "cosine"
    weight_decay: float       # weight_decay (decay group only)
    seed: int                 # seed: LoRA init and data order
    max_grad_norm: float = 1.0
    eval_steps: int = 0       # evaluate every N steps; 0 = never
    eval_batch_size: int = 2  # per_device_eval_batch_size
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8

    @property
    def warmup_steps(self) -> int:
        # TrainingArguments.get_warmup_steps: a value below 1 is a ratio, rounded *up*.
        return math.ceil(self.max_steps * self.warmup_ratio)


@dataclass
class StepRecord:
    """What one optimizer step logged (the manual loop's twin of one ``log_history`` entry)."""

    step: int
    loss: float               # sum over micro-batches of (CE sum / trained tokens of the whole step)
    lr: float                 # learning rate this step used
    grad_norm: float          # total gradient norm before clipping
    trained_tokens: int       # num_items_in_batch
    input_tokens: int         # non-padding tokens fed to the model
    epoch: float
    naive_loss: float = float("nan")   # mean of per-micro-batch means (the pre-4.46 Trainer report)
    eval_loss: float | None = None
    seconds: float = 0.0


# ---------------------------------------------------------------- the pieces Trainer hides

def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch, *,
                   label_smoothing: float = 0.0) -> torch.Tensor:
    """Sum of next-token cross-entropy over trained positions, divided by ``num_items_in_batch``.

    Same arithmetic as transformers' ``ForCausalLMLoss``: pad the labels with one -100 on the
    right and shift them left (position t predicts token t+1), flatten, sum, divide.
    """
    logits = logits.float()                                                         # (B, T, V)
    shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].contiguous()  # (B, T)
    total = F.cross_entropy(logits.view(-1, logits.size(-1)), shift_labels.view(-1), ignore_index=IGNORE_INDEX,
                            reduction="sum", label_smoothing=label_smoothing)
    return total / num_items_in_batch


def trained_token_count(batches: Sequence[dict]) -> int:
    """Trainer._get_num_items_in_batch: labels that get predicted, counted after the shift."""
    return int(sum(int((b["labels"][..., 1:] != IGNORE_INDEX).sum()) for b in batches))


def decay_parameter_names(model: torch.nn.Module) -> set[str]:
    """Trainer.get_decay_parameter_names: all parameters except those in nn.LayerNorm, biases, norms."""
    patterns = [re.compile(p) for p in NO_DECAY_PATTERNS]
    in_layer_norm = {id(p) for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
    return {name for name, p in model.named_parameters(remove_duplicate=False)
            if id(p) not in in_layer_norm and not any(pt.search(name.lower()) for pt in patterns)}


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainer.create_optimizer's two groups: trainable decay parameters, then the rest at 0.0."""
    decay = decay_parameter_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The order Trainer reads the data in: accelerate's SeedableRandomSampler reseeds a
    generator with ``seed + epoch`` every epoch and draws one permutation."""
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


def update_groups(order: Sequence[int], batch_size: int, grad_accum: int) -> list[list[list[int]]]:
    """Split one epoch into optimizer steps of ``grad_accum`` micro-batches (the last may be short,
    as with Trainer's ``drop_last=False`` and its ``remainder`` accumulation step)."""
    batches = [list(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
    return [batches[i:i + grad_accum] for i in range(0, len(batches), grad_accum)]


def evaluate(model: torch.nn.Module, examples: Sequence[dict], pad_token_id: int, batch_size: int) -> float:
    """Trainer.evaluate's eval_loss: each batch's token-mean loss, weighted by its number of rows."""
    model.eval()
    total, rows = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = pad_batch(examples[i:i + batch_size], pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = causal_lm_loss(logits, batch["labels"], max(trained_token_count([batch]), 1))
            total += float(loss) * len(batch["input_ids"])
            rows += len(batch["input_ids"])
    return total / max(rows, 1)


# ---------------------------------------------------------------- the loop

def train_manually(model: torch.nn.Module, train_examples: Sequence[dict], pad_token_id: int,
                   settings: LoopSettings, *, eval_examples: Sequence[dict] = (),
                   save_dir: Path | None = None) -> list[StepRecord]:
    """Train ``model`` (its trainable parameters) exactly as Trainer would; one record per step."""
    from transformers import get_scheduler

    trainable = [p for p in model.parameters() if p.requires_grad]
    # [1] Optimizer (Trainer.create_optimizer): AdamW over two groups, decay and no-decay. Trainer's
    #     default optim is "adamw_torch_fused" since torch 2.8, i.e. this very call with fused=True.
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, settings.weight_decay), lr=settings.lr,
                                  betas=(settings.adam_beta1, settings.adam_beta2), eps=settings.adam_eps, fused=True)
    # [2] Schedule (Trainer.create_scheduler): linear warm-up from 0 over ceil(ratio x steps) steps,
    #     then the named decay. Step 1 therefore trains with lr = 0 when there is any warm-up.
    scheduler = get_scheduler(settings.lr_scheduler, optimizer, num_warmup_steps=settings.warmup_steps,
                              num_training_steps=settings.max_steps)
    steps_in_epoch = math.ceil(len(train_examples) / settings.batch_size)   # batches per epoch
    records: list[StepRecord] = []
    step, epoch = 0, 0
    model.zero_grad(set_to_none=True)
    progress = tqdm(total=settings.max_steps, desc="manual loop", unit="step", leave=False)
    while step < settings.max_steps:
        # [3] Data order (get_train_dataloader + SeedableRandomSampler): a fresh seeded permutation
        #     per epoch, cut into micro-batches, grouped by grad_accum (get_batch_samples).
        groups = update_groups(epoch_order(len(train_examples), settings.seed, epoch), settings.batch_size,
                               settings.grad_accum)
        batches_done = 0
        for group in groups:
            if step >= settings.max_steps:
                break
            started = time.perf_counter()
            micro_batches = [pad_batch([train_examples[i] for i in idx], pad_token_id) for idx in group]
            # [4] Count trained tokens across the *whole* accumulated batch (num_items_in_batch): each
            #     micro-batch's summed loss is divided by this, so the step's gradient is the mean
            #     over tokens, not a mean of per-micro-batch means (the old accumulation bug).
            num_items = trained_token_count(micro_batches)
            model.train()
            step_loss = torch.zeros(())       # Trainer's _tr_loss: a float32 tensor summed per micro-batch
            micro_means = []
            for batch in micro_batches:
                # [5] Forward: (B, T) token ids -> (B, T, vocab) logits.
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                # [6] Loss (compute_loss -> ForCausalLMLoss): summed CE over trained tokens / num_items.
                loss = causal_lm_loss(logits, batch["labels"], num_items)
                # [7] Backward (training_step -> accelerator.backward): gradients add up in .grad.
                loss.backward()
                step_loss += loss.detach()
                micro_means.append(float(loss.detach()) * num_items / max(trained_token_count([batch]), 1))
            batches_done += len(micro_batches)
            # [8] Clip (Trainer._clip_grad_norm): rescale all gradients so their joint L2 norm is at
            #     most max_grad_norm; the returned norm is the one *before* clipping (what is logged).
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
            # [9] Optimizer step; the lr it used is read before the scheduler moves on (as Trainer logs it).
            optimizer.step()
            lr = scheduler.get_last_lr()[0]
            # [10] Scheduler step: once per optimizer step, not per micro-batch.
            scheduler.step()
            # [11] Zero the gradients (model.zero_grad(); set_to_none frees them until the next backward).
            model.zero_grad(set_to_none=True)
            step += 1
            # [12] Log (_maybe_log_save_evaluate, logging_steps=1): the summed micro-batch losses.
            record = StepRecord(step=step, loss=float(step_loss), lr=lr, grad_norm=float(grad_norm),
                                trained_tokens=num_items,
                                input_tokens=int(sum(int(b["attention_mask"].sum()) for b in micro_batches)),
                                epoch=epoch + batches_done / steps_in_epoch,
                                naive_loss=sum(micro_means) / len(micro_means))
            # [13] Evaluate every eval_steps optimizer steps (eval_strategy="steps").
            if settings.eval_steps and eval_examples and step % settings.eval_steps == 0:
                record.eval_loss = evaluate(model, eval_examples, pad_token_id, settings.eval_batch_size)
            record.seconds = time.perf_counter() - started
            records.append(record)
            progress.update(1)
            progress.set_postfix(epoch=epoch, loss=f"{record.loss:.4f}", lr=f"{record.lr:.2e}")
        epoch += 1
    progress.close()
    # [14] Save (Trainer.save_model): for a PEFT model only the adapter weights and its config.
    if save_dir is not None:
        with atomic_directory(save_dir, overwrite=True) as tmp:
            model.save_pretrained(tmp)
    return records


def relative_difference(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)

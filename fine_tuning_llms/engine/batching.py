"""Padding-free batches (several conversations end to end in one row), exact on every model.

A packed row carries ``position_ids`` that restart at 0 for each conversation and **no**
attention mask. transformers (``masking_utils.find_packed_sequence_indices``) then recognises the
packed layout and builds each attention implementation's own per-sequence mask (eager's additive
mask, SDPA's boolean mask, flex's block mask, sliding windows included); flash-attention-2 runs
varlen from the same position ids. Two things break that, and both are guarded here:

- a 4-D mask of our own: transformers passes it through untouched, and eager *adds* a boolean
  mask instead of masking with it (conversations leak into each other: the loss comes out too low);
- a key/value cache: transformers only looks for packing when there is none, and models create
  a cache whenever ``use_cache`` is on. So every packed batch says ``use_cache=False`` itself.

Because "exact" is a property of the model, the attention implementation and the transformers
version together, ``check_packing`` runs the real model on a few real conversations before
training: packed loss (the path training and evaluation take) against one-by-one loss. Training
only packs when it agrees.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .chat_format import IGNORE_INDEX

log = logging.getLogger(__name__)

# Relative tolerance of the self-check. fp32: the same sums in another order (issue 17 asks
# for 1e-5). bf16/fp16: one rounding of a logit already moves it by up to 2^-8 relative and the
# packed and the one-by-one runs round at different places (another matmul shape, packed
# attention in fp32); on the embedded model their mean losses differ by far less than the bf16
# tolerance, while a leak between conversations moves the loss by far more (benchmarks/RESULTS.md).
CHECK_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
CHECK_EXAMPLES = 4


def packing_supported() -> bool:
    """Whether this transformers builds per-sequence masks from restarting position ids."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return False
    return True


def packed_lengths(position_ids: torch.Tensor) -> list[int]:
    """Lengths of the conversations in one packed row: its position ids restart at 0 for each."""
    starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [position_ids.shape[1]]
    return [end - start for start, end in zip(starts, starts[1:])]


class ExampleDataset(torch.utils.data.Dataset):
    """Processed examples ({"input_ids", "labels"}) with their lengths for length-grouped batching."""

    def __init__(self, examples: Sequence[dict]):
        self.examples = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


def pad_batch(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad {"input_ids", "labels"} lists into tensors; padding gets label -100 by position."""
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(e["labels"], dtype=torch.long)
        attention[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attention}


class PadCollator:
    """Right-pads a batch; padding gets label -100 *by position*, so pad == eos is harmless."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        return pad_batch(examples, self.pad_token_id)


class PackingCollator:
    """The batch's conversations laid end to end in one row: no pad token is computed at all.

    Returns input_ids, labels, position_ids (each (1, T)) and ``use_cache=False``; see the module
    docstring for why there is no attention mask and why the cache must stay off.
    """

    def __call__(self, examples: Sequence[dict]) -> dict:
        lengths = [len(e["input_ids"]) for e in examples]
        input_ids = torch.tensor([t for e in examples for t in e["input_ids"]], dtype=torch.long)[None]
        labels = torch.tensor([t for e in examples for t in e["labels"]], dtype=torch.long)[None]
        starts = torch.cumsum(torch.tensor([0] + lengths[:-1]), 0)
        labels[0, starts] = IGNORE_INDEX  # a conversation's first token is never predicted from the previous one
        position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "use_cache": False}


@dataclass
class PackingCheck:
    """What the start-up self-check measured (mean loss over trained tokens)."""

    attention: str
    one_by_one_loss: float
    packed_train_loss: float     # the training path: train mode, gradients on (fused kernels active)
    packed_eval_loss: float      # the held-out path: eval mode, no gradients
    tolerance: float
    examples: int

    @property
    def rel_diff(self) -> float:
        ref = max(abs(self.one_by_one_loss), 1e-12)
        return max(abs(self.packed_train_loss - self.one_by_one_loss),
                   abs(self.packed_eval_loss - self.one_by_one_loss)) / ref

    @property
    def passed(self) -> bool:
        return self.rel_diff <= self.tolerance  # NaN fails too

    def as_dict(self) -> dict:
        return {"attention": self.attention, "one_by_one_loss": self.one_by_one_loss,
                "packed_train_loss": self.packed_train_loss, "packed_eval_loss": self.packed_eval_loss,
                "rel_diff": self.rel_diff, "tolerance": self.tolerance, "examples": self.examples,
                "passed": self.passed}


def check_examples(examples: Sequence[dict], n: int = CHECK_EXAMPLES, pool: int = 32) -> list[dict]:
    """The ``n`` longest of the first ``pool`` examples, so sliding windows and long-range
    attention are exercised, in their original order."""
    head = list(examples[:pool])
    longest = sorted(range(len(head)), key=lambda i: -len(head[i]["input_ids"]))[:n]
    return [head[i] for i in sorted(longest)]


@contextlib.contextmanager
def _dropout_off(model: torch.nn.Module):
    """Train mode without randomness: dropout probabilities set to 0 for the duration."""
    saved = []
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p:
            saved.append((module, "p", module.p))
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float) and module.attention_dropout:
            saved.append((module, "attention_dropout", module.attention_dropout))
            module.attention_dropout = 0.0
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _full_logits_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the trained tokens of one row, from all its logits (the plain path)."""
    inputs = dict(batch)
    targets = inputs.pop("labels")[0, 1:]                       # (T-1,) token t+1 is predicted at t
    logits = model(**inputs).logits[0, :-1]                     # (T-1, vocab)
    loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum", ignore_index=IGNORE_INDEX)
    return loss, int((targets != IGNORE_INDEX).sum())


def _one_by_one_loss(model, examples: Sequence[dict], device) -> tuple[float, int]:
    """The reference: each conversation alone (a row of one), all logits, plain cross-entropy."""
    total, count = 0.0, 0
    for example in examples:
        loss, n = _full_logits_loss(model, _to(PackingCollator()([example]), device))
        total, count = total + float(loss), count + n
    return total, count


def check_packing(model, examples: Sequence[dict], *, autocast_dtype: torch.dtype | None = None,
                  fused_head: bool = False, trained_logits_only: bool = True) -> PackingCheck:
    """Packed loss (as training and evaluation compute it) against one-by-one loss, same model.

    Costs two packed forwards and one forward per example (about a second on the embedded model).
    """
    from .trainer import trained_token_loss  # the loss training uses on packed rows

    device = next(model.parameters()).device
    compute_dtype = autocast_dtype or next(p for p in model.parameters() if p.dtype.is_floating_point).dtype
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    batch = _to(PackingCollator()(examples), device)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), autocast:
            reference, count = _one_by_one_loss(model, examples, device)
            packed_eval, n_eval, _ = trained_token_loss(model, batch)
        model.train()
        with _dropout_off(model), torch.enable_grad(), autocast:
            if trained_logits_only:
                packed_train, n_train, _ = trained_token_loss(model, batch, fused_head=fused_head,
                                                              autocast_dtype=autocast_dtype)
            else:
                packed_train, n_train = _full_logits_loss(model, batch)
    finally:
        model.train(was_training)
    if not (count == n_eval == n_train):
        raise RuntimeError(f"packing self-check counted {count}/{n_eval}/{n_train} trained tokens")  # a bug, not input
    return PackingCheck(attention=attention_implementation(model), one_by_one_loss=reference / max(count, 1),
                        packed_train_loss=float(packed_train.detach()) / max(count, 1),
                        packed_eval_loss=float(packed_eval) / max(count, 1),
                        tolerance=check_tolerance(model, compute_dtype), examples=len(examples))


def _base(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_tolerance(model, compute_dtype: torch.dtype) -> float:
    lm = _base(model)
    if getattr(lm, "is_loaded_in_8bit", False) or getattr(lm, "is_loaded_in_4bit", False):
        # int8 picks its outlier columns over all rows of a call, so packed and one-by-one quantise
        # differently; 4-bit computes in the (half-precision) compute dtype
        return CHECK_TOLERANCE[torch.bfloat16]
    return CHECK_TOLERANCE.get(compute_dtype, CHECK_TOLERANCE[torch.bfloat16])


def attention_implementation(model) -> str:
    return str(getattr(_base(model).config, "_attn_implementation", None) or "unknown")


@dataclass
class PackingDecision:
    packed: bool
    reason: str
    check: PackingCheck | None = None

    def as_dict(self) -> dict:
        return {"packed": self.packed, "reason": self.reason, "self_check": self.check.as_dict() if self.check else None}


def choose_layout(model, examples: Sequence[dict], *, enabled: bool, autocast_dtype: torch.dtype | None = None,
                  fused_head: bool = False, trained_logits_only: bool = True) -> PackingDecision:
    """Pack only where it is proven exact on this model; otherwise pad. Logs the one line that says which.

    On SDPA models the per-conversation attention (``kernels.packed_sdpa``) is switched on first, so
    the self-check covers the path training will take; a failed check switches it off again.
    """
    from .kernels.packed_sdpa import PACKED_SDPA, register_packed_attention

    if not enabled:
        decision = PackingDecision(False, "--packing false")
        log.info("Batches: padded (--packing false)")
        return decision
    if not packing_supported():
        log.warning("Batches: padded, not packed: this transformers version cannot isolate packed sequences "
                    "(--packing false silences this)")
        return PackingDecision(False, "transformers without packed-sequence masks")
    lm = _base(model)
    if lm.config._attn_implementation == "sdpa":
        lm.set_attn_implementation(register_packed_attention())
    check = check_packing(model, check_examples(examples), autocast_dtype=autocast_dtype, fused_head=fused_head,
                          trained_logits_only=trained_logits_only)
    if check.passed:
        log.info("Batches: packed, %s attention; self-check on %d conversations: packed loss %.6f (training path) "
                 "/ %.6f (held-out path) vs one by one %.6f, rel diff %.1e <= %.0e", check.attention,
                 check.examples, check.packed_train_loss, check.packed_eval_loss, check.one_by_one_loss,
                 check.rel_diff, check.tolerance)
        return PackingDecision(True, "self-check passed", check)
    if lm.config._attn_implementation == PACKED_SDPA:
        lm.set_attn_implementation("sdpa")
    log.warning("Batches: padded, not packed: the packing self-check failed with %s attention (packed loss %.4f "
                "vs one by one %.4f, rel diff %.1e > %.0e) (--packing false silences this)", check.attention,
                check.packed_train_loss, check.one_by_one_loss, check.rel_diff, check.tolerance)
    return PackingDecision(False, "self-check failed", check)

"""Peak memory of a LoRA training run, predicted before any weight is loaded.

The model is built on the ``meta`` device from its config.json (shapes only, no memory), so the
parameter count of every module is exact for any architecture. The peak is the larger of two
moments, on top of what the process already holds (Python, torch, the tokenized data):

- loading: the weights as they will stay, plus the safetensors pages read to make them (read
  through a memory map, they count as resident while loading runs); tensors kept in the file's
  own dtype are not copied at all (transformers leaves them in the memory map, so their pages are
  the weights themselves, made resident as training first reads them);
- training: the weights, the LoRA weights with their gradients and AdamW's two moments (fp32),
  the frozen LoRA weights' packed copy (fused kernels on CPU), the activations autograd keeps
  for the largest step (per token and layer: the inputs and outputs of the norms, projections,
  attention and MLP; eager attention also keeps each head's score matrix; with gradient
  checkpointing each layer's input and one layer's activations), and the vocabulary head's
  logits (fused head: one 64 MiB chunk at a time; else every position that needs logits, in fp32).

The largest step is the larger of the training batches (simulated) and the packing self-check's
row, which runs with gradients before training. ``ACTIVATION_FACTOR`` scales the counted activation
bytes to what the allocator really holds (autograd's temporaries, allocator slack); with 1.0 the
predicted peak is within -9%..+15% of the measured peak RSS for the embedded model and the
Llama-3.2-1B shape in fp32/bf16/8-bit/4-bit at batch 1 and 8, and -7%..-4% for the Llama-3.2-3B
shape in bf16/8-bit/4-bit at batch 8 (benchmarks/RESULTS.md, ``benchmarks/bench_plan.py``).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch

from .config import Config
from .distributed import processes_on_this_machine
from .host_memory import available_memory, current_rss
from .weight_files import bytes_stored_in, file_bytes

log = logging.getLogger(__name__)

MB = 1024 * 1024
ACTIVATION_FACTOR = 1.0
HEAD_CHUNK_BYTES = 3 * 64 * MB       # the fused head's chunk of fp32 logits, its softmax and gradient
LOAD_SLACK = 1.0                     # safetensors pages read while loading, per byte of file
# k-bit training with checkpointing held up to this much more than its plan: memory the allocator keeps
# between the recomputed k-bit layers, measured, not modelled (embedded to Llama-2-13B shapes, RESULTS.md)
KBIT_CHECKPOINT_ROOM = 0.25


@dataclass
class MemoryPlan:
    """Predicted resident memory (bytes) of each part, and the peak it adds up to."""

    parts: dict[str, float]
    loading: float                      # process + weights + file pages while loading (in RSS, reclaimable)
    training: float                     # process + everything training holds at its largest step
    available: float | None             # what the run may use (process + MemAvailable), None if unknown
    step_tokens: int                    # tokens of the largest step
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return max(self.loading, self.training)

    @property
    def fits(self) -> bool:
        # Training's own memory must fit; the weight file's pages that loading reads count in RSS
        # but are page cache the kernel can drop, so they never make a run run out of memory.
        return self.available is None or self.training <= self.available

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / MB:,.0f}" for k, v in self.parts.items() if v >= MB / 2)
        room = f" of {self.available / MB:,.0f} MB available" if self.available else ""
        loading = (f"; peak RSS while loading ~{self.loading / MB:,.0f} MB, the weight file's reclaimable pages "
                   "included" if self.loading > self.training else "")
        notes = "".join(f"; {n}" for n in self.notes)
        return (f"Memory plan: training needs ~{self.training / MB:,.0f} MB{room} (largest step "
                f"{self.step_tokens:,} tokens{loading}{notes}). Parts (MB): {parts}")

    def as_dict(self) -> dict:
        return {"peak_mb": round(self.peak / MB), "loading_mb": round(self.loading / MB),
                "training_mb": round(self.training / MB), "step_tokens": self.step_tokens,
                "available_mb": round(self.available / MB) if self.available else None,
                "parts_mb": {k: round(v / MB, 1) for k, v in self.parts.items()}}


def meta_model(location: str, trust_remote_code: bool = False):
    """The model's modules with shapes but no storage (``meta`` device), from its config.json."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code), config


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def lora_targets(model, target_modules: str) -> list[tuple[str, torch.nn.Linear]]:
    """The Linear layers PEFT will wrap: 'all-linear' = every Linear but the output head."""
    head = model.get_output_embeddings()
    wanted = None if target_modules == "all-linear" else {m.strip() for m in target_modules.split(",")}
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        if wanted is None or name.rsplit(".", 1)[-1] in wanted:
            out.append((name, module))
    return out


def weight_bytes(model, *, dtype: torch.dtype, load_8bit: bool, load_4bit: bool) -> float:
    """Resident bytes of the weights while training: bitsandbytes quantises every Linear but the
    head, and PEFT's k-bit preparation then casts every weight it did not quantise to fp32."""
    head = model.get_output_embeddings()
    quantised = set()
    if load_8bit or load_4bit:
        quantised = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head}
    size = 4 if quantised else dtype.itemsize
    total, seen = 0.0, set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:  # tied embeddings count once
                continue
            seen.add(id(p))
            n = p.numel()
            if id(p) not in quantised:
                total += n * size
            elif load_8bit:
                total += n + 4 * p.shape[0]                 # int8 + one fp32 scale per row
            else:
                total += n / 2 + n / 64 + 4 * n / (64 * 256)  # nf4 + double-quantised block scales
    return total


# Set by the plan's trial run (plan.time_steps) to the passes of the run it stands in for: its few
# steps then pack weights as that run will, so their speed and peak are that run's.
STAND_IN_PASSES = "FINE_TUNING_LLMS_STAND_IN_PASSES"


def training_passes(train, examples: int, processes: int | None = None) -> float:
    """Forward/backward passes (micro-batches) one process of the run makes: ``max_steps`` x
    ``grad_accum`` (every process makes each step's), else the epochs' batches of its share of
    ``examples`` (a launch of ``processes``, default this one's, splits them). A trial run counts
    the passes of the run it stands in for (``STAND_IN_PASSES``)."""
    import math
    import os

    from .distributed import world_size

    if os.environ.get(STAND_IN_PASSES):
        return float(os.environ[STAND_IN_PASSES])
    if train.max_steps > 0:
        return train.max_steps * train.grad_accum
    share = math.ceil(examples / (processes or world_size()))
    return train.epochs * math.ceil(share / train.batch_size)


def largest_step_tokens(lengths: list[int], batch_size: int, packed: bool, steps: int | None = None,
                        orders: int = 5) -> tuple[int, int]:
    """(tokens, row length) of the largest micro-batch a run meets: the batches of a few seeded
    random orders (the Trainer draws a random order too) over the ``steps`` it runs (None: an
    epoch), the median of their largest. Padded batches pad each row to the longest."""
    import random

    if not lengths:
        return 0, 0
    largest = []
    for seed in range(orders):
        order = lengths[:]
        random.Random(seed).shuffle(order)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if steps:
            batches = (batches * (steps // len(batches) + 1))[:steps]
        largest.append(max((sum(b), max(b), len(b)) for b in batches) if packed else
                       max((max(b) * len(b), max(b), len(b)) for b in batches))
    tokens, row, _ = sorted(largest)[len(largest) // 2]
    return tokens, (tokens if packed else row)


def activation_bytes_per_token(config, act_bytes: int) -> float:
    """Bytes autograd keeps per token for one pass through the decoder (before ACTIVATION_FACTOR)."""
    text = _text_config(config)
    h, layers = text.hidden_size, text.num_hidden_layers
    i = getattr(text, "intermediate_size", 4 * h)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    kv = getattr(text, "num_key_value_heads", heads) * head_dim
    q = heads * head_dim
    # norms in/out (4h), q/k/v outputs and the attention output (2q + 2kv), o_proj input (q),
    # residual stream (2h), MLP gate/up/act/product (4i)
    per_layer = 6 * h + 3 * q + 2 * kv + 4 * i
    return float(layers * per_layer * act_bytes)


def plan_memory(cfg: Config, location: str, lengths: list[int], *, device: torch.device, packed: bool,
                weight_dtype: torch.dtype, autocast: torch.dtype | None, process: float | None = None,
                limit_gb: float | None = None) -> MemoryPlan:
    """Predict the peak of training ``cfg`` on examples of these token ``lengths`` (see module doc)."""
    model, config = meta_model(location, cfg.model.trust_remote_code)
    t = cfg.train
    quant = cfg.model.load_8bit or cfg.model.load_4bit
    text = _text_config(config)
    on_cpu = device.type == "cpu"
    if process is None:  # on a GPU only what this process already put there counts
        process = current_rss() if on_cpu else float(torch.cuda.memory_allocated(device))
    weights = weight_bytes(model, dtype=weight_dtype, load_8bit=cfg.model.load_8bit, load_4bit=cfg.model.load_4bit)
    targets = lora_targets(model, t.target_modules)
    lora_params = sum(t.lora_r * (m.in_features + m.out_features) for _, m in targets)
    trainable = 16.0 * lora_params  # fp32 weight, gradient, AdamW's two moments
    packed_copies = 0.0
    # this process's own passes (not training_passes: a trial run's peak is over its own few steps)
    micro_steps = t.max_steps * t.grad_accum if t.max_steps > 0 else None
    if t.fused_kernels and t.pack_weights and on_cpu and not quant:
        from .kernels import packed_bytes, packing_fits, packing_pays, weight_packing_available

        if weight_packing_available(weight_dtype) and packing_pays(training_passes(t, len(lengths))):
            copies = float(sum(packed_bytes(torch.empty(m.weight.shape, dtype=weight_dtype, device="meta"))
                               for _, m in targets if m.bias is None))
            import psutil

            free = limit_gb * 1024 ** 3 if limit_gb else psutil.virtual_memory().available
            if packing_fits(copies, free):  # the rule use_fused_kernels applies
                packed_copies = copies
    step_tokens, row = largest_step_tokens(lengths, t.batch_size, packed, micro_steps)
    if packed:  # the packing self-check runs its conversations as one row, with gradients, before training
        from .batching import check_examples

        check = sum(len(e["input_ids"]) for e in check_examples([{"input_ids": range(n)} for n in lengths]))
        step_tokens = row = max(step_tokens, check)
    act_bytes = (autocast or weight_dtype).itemsize
    buffers = 0.0
    if quant and t.fused_kernels and on_cpu:
        from .kernels.guards import bitsandbytes_tested

        if bitsandbytes_tested():  # the k-bit nodes' reused buffers, each the size of the largest weight
            largest = max((m.weight.numel() for _, m in targets), default=0)
            if cfg.model.load_8bit:  # dequantised in fp32 (the input's dtype), then cast for the product
                buffers = float(largest * (4 + act_bytes))
            else:  # dequantised in the weights' dtype, cast for the product where that differs
                cast = weight_dtype != (autocast or weight_dtype)
                buffers = float(largest * (act_bytes + (weight_dtype.itemsize if cast else 0)))
    # k-bit: PEFT's preparation casts the embeddings and norms to fp32, so the residual stream is fp32
    # (keeping them bf16 saved memory but trained ~1% worse, benchmarks/RESULTS.md), and under
    # autocast each LoRA layer keeps a bf16 copy of its fp32 input (PEFT's 4-bit layers and the
    # 8-bit node alike; PEFT's 8-bit layers without the node also keep the fp32 input itself).
    per_token = activation_bytes_per_token(config, 4 if quant else act_bytes)
    if quant and autocast is not None:
        per_token += act_bytes * sum(m.in_features for _, m in targets)
    layers_held = text.num_hidden_layers
    if t.gradient_checkpointing:
        # each layer keeps only its input (the residual stream: fp32 under k-bit preparation) and
        # the backward recomputes one layer's activations at a time
        residual = 4 if quant else weight_dtype.itemsize
        per_token = text.num_hidden_layers * text.hidden_size * residual + per_token / text.num_hidden_layers
        layers_held = 1
    activations = ACTIVATION_FACTOR * step_tokens * per_token
    if config._attn_implementation == "eager" or cfg.model.attn_implementation == "eager":
        rows = 1 if packed else min(t.batch_size, len(lengths))
        activations += 2.0 * rows * text.num_attention_heads * row * row * act_bytes * layers_held
    vocab = model.get_output_embeddings().weight.shape[0]
    logit_positions = step_tokens if not t.trained_logits_only else step_tokens // 2  # ~half are trained, typically
    from .kernels.head_loss import head_node_runs  # the check training makes (trained_token_loss)

    fused_head = t.fused_kernels and t.trained_logits_only and head_node_runs(model)
    head = min(HEAD_CHUNK_BYTES, 3.0 * 4 * logit_positions * vocab) if fused_head else 3.0 * 4 * logit_positions * vocab
    parts = {"process": process, "weights": weights, "LoRA + AdamW": trainable, "packed weights": packed_copies,
             "k-bit buffers": buffers, "activations": activations, "head logits": head}
    pages = file_bytes(location) if on_cpu else 0.0  # GPU: no page cache
    if on_cpu and not quant:  # tensors loaded in their file's dtype stay mapped, no copy
        pages = max(pages - bytes_stored_in(location, weight_dtype), 0.0)
    loading = process + weights + LOAD_SLACK * pages
    training = process + weights + trainable + packed_copies + buffers + activations + head
    notes = [] if on_cpu else [f"GPU memory of {device}; host memory is not planned"]
    if on_cpu and processes_on_this_machine() > 1:
        notes.append(f"per process: {processes_on_this_machine()} processes of this launch share this machine's memory")
    if quant and t.gradient_checkpointing and on_cpu:
        notes.append(f"k-bit with --gradient_checkpointing: measured peaks ran up to ~{KBIT_CHECKPOINT_ROOM:.0%} above "
                     "this plan (memory the allocator keeps, benchmarks/RESULTS.md); leave room")
    return MemoryPlan(parts=parts, loading=loading, training=training,
                      available=available_memory(limit_gb, device), step_tokens=step_tokens, notes=notes)


def plan_training(cfg: Config, location: str, lengths: list[int], device: torch.device,
                  limit_gb: float | None = None) -> MemoryPlan:
    """``plan_memory`` with the dtypes this run will train with; lengths capped at --max_length."""
    from .models import pick_dtype
    from .precision import autocast_dtype, mixed_precision, training_model_config

    weight_dtype = pick_dtype(training_model_config(cfg.model, device).dtype, device)
    autocast = autocast_dtype(*mixed_precision(cfg.model, device))
    capped = [min(n, cfg.data.max_length) for n in lengths]
    return plan_memory(cfg, location, capped, device=device, packed=cfg.train.packing, weight_dtype=weight_dtype,
                       autocast=autocast, limit_gb=limit_gb)


def check_fits(cfg: Config, location: str, lengths: list[int], device: torch.device,
               limit_gb: float | None = None) -> MemoryPlan | None:
    """The plan, logged; a run predicted not to fit stops here (before loading weights) with one
    line naming the options that would fit."""
    from .errors import UserError

    try:
        plan = plan_training(cfg, location, lengths, device, limit_gb)
    except Exception as exc:  # a model the meta-device build cannot make: train without a plan, say so
        log.warning("Memory plan: not available for this model (%s: %s); training goes on without it",
                    type(exc).__name__, str(exc).splitlines()[0][:160] if str(exc) else "")
        return None
    log.info("%s", plan.describe())
    if not plan.fits:
        fits = options_that_fit(cfg, lambda trial: plan_training(trial, location, lengths, device, limit_gb))
        raise UserError(f"training would need ~{plan.training / MB:,.0f} MB but {plan.available / MB:,.0f} MB is available; "
                        + (f"options that fit: {'; '.join(fits)}" if fits else
                           "no smaller setting fits: use a smaller model or a machine with more memory"))
    return plan


def options_that_fit(cfg: Config, plan_for) -> list[str]:
    """Flags that bring the predicted peak under what is available, cheapest change first."""
    tries = []
    if cfg.train.pack_weights and cfg.train.fused_kernels:  # same maths, a few % slower: the cheapest change
        tries.append(("--pack_weights false", {"train": {"pack_weights": False}}))
    if not cfg.train.gradient_checkpointing:  # same gradients, one more forward a step
        tries.append(("--gradient_checkpointing", {"train": {"gradient_checkpointing": True}}))
    if not (cfg.model.load_4bit or cfg.model.load_8bit):
        tries += [("--load_8bit", {"model": {"load_8bit": True}}), ("--load_4bit", {"model": {"load_4bit": True}})]
    batch = cfg.train.batch_size
    while batch > 1:
        batch //= 2
        tries.append((f"--batch_size {batch} --grad_accum {cfg.train.grad_accum * cfg.train.batch_size // batch}",
                      {"train": {"batch_size": batch,
                                 "grad_accum": cfg.train.grad_accum * cfg.train.batch_size // batch}}))
    length = cfg.data.max_length
    while length > 256:
        length //= 2
        tries.append((f"--max_length {length}", {"data": {"max_length": length}}))
    fits = []
    for flag, change in tries:
        trial = dataclasses.replace(cfg, **{g: dataclasses.replace(getattr(cfg, g), **v) for g, v in change.items()})
        plan = plan_for(trial)
        if plan.fits:
            fits.append(f"{flag} (~{plan.training / MB:,.0f} MB)")
    return fits

"""Training kernels: each step of a LoRA training pass that autograd records as a long chain of
small ops, written as one autograd node with a hand-written backward, one node per module:

- ``lora_linear``: a plain LoRA linear layer (and its frozen CPU weights packed once for oneDNN);
- ``int8_lora``: a LoRA layer over a bitsandbytes 8-bit layer (``--load_8bit``), on CPU;
- ``nf4_lora``: a LoRA layer over a bitsandbytes 4-bit layer (``--load_4bit``), on CPU;
- ``buffers``: the scratch buffers those two dequantise into and the head works in, reused between calls;
- ``attention``: causal attention of a packed row's conversations, rotary embedding included (CPU;
  Llama's and the families' whose forward differs only in its window and q/k/v projections);
- ``rmsnorm``: RMSNorm in the three forms Llama, OLMo-2 and Gemma write it;
- ``head_loss``: the vocabulary head with the cross-entropy, never holding the whole logits;
- ``packed_sdpa``: the attention implementation for packed rows that the attention node builds on;
- ``frozen_matmul``: the LoRA and head nodes' products with a frozen weight, in fp32 on CPU through
  oneDNN rather than MKL where a start-up self-check allows it.

Each node computes exactly what PEFT's and transformers' code computes for the modules it takes
over, which is checked in tests/test_kernels.py against the plain path on the same inputs; it is
taken only while training with gradients, only by modules of exactly the types whose maths it
copies, and only with the transformers and PEFT releases those tests ran on (``guards``).
Everywhere else, eval and generation included, the model's own code runs. Their speed-ups are
measured in benchmarks/RESULTS.md, not here. ``--fused_kernels false`` switches them all off.

    patched = use_fused_kernels(peft_model)   # number of modules that will take these paths
    ...train...
    release_packed_weights(peft_model)        # the training-only weight copies
"""
from __future__ import annotations

import logging
import types

import torch

from ..host_memory import free_memory_share
from . import lora_linear
from .attention import ATTENTION_CLASSES, PackedAttentionFunction, attention_forward, flash_ops_missing
from .buffers import release_buffers
from .guards import (
    ATTENTION_PARAMETERS,
    BITSANDBYTES_TESTED,
    TESTED_VERSIONS,
    attention_signature_matches,
    bitsandbytes_tested,
    fused_paths_refused,
    missing_ops,
    qualified_name,
)
from .head_loss import HeadCrossEntropyFunction, head_chunk_rows, head_for_fused_loss
from .int8_lora import Int8LoraLinearFunction, int8_adapter, int8_lora_forward
from .lora_linear import (
    PACK_MIN_PASSES,
    PACKING_OPS,
    LoraLinearFunction,
    PackedWeight,
    lora_linear_forward,
    packed_bytes,
    packing_fits,
    packing_pays,
    plain_adapter,
    weight_packing_available,
)
from .nf4_lora import Nf4LoraLinearFunction, dequantize_self_check, nf4_adapter, nf4_lora_forward
from .rmsnorm import NORM_CLASSES, RMSNormFunction, rmsnorm_forward

__all__ = [
    "PACK_MIN_PASSES",
    "TESTED_VERSIONS",
    "HeadCrossEntropyFunction",
    "Int8LoraLinearFunction",
    "LoraLinearFunction",
    "Nf4LoraLinearFunction",
    "PackedAttentionFunction",
    "PackedWeight",
    "RMSNormFunction",
    "head_chunk_rows",
    "head_for_fused_loss",
    "packed_bytes",
    "packing_fits",
    "packing_for_run",
    "packing_pays",
    "release_buffers",
    "release_packed_weights",
    "use_fused_kernels",
    "weight_packing_available",
]

log = logging.getLogger(__name__)


def release_packed_weights(model: torch.nn.Module) -> int:
    """Free ``model``'s packed weight copies made while training; returns the bytes released."""
    freed = 0
    for module in model.modules():
        packed = module.__dict__.pop("_lora_kernel_packed", None)
        if packed is not None:
            freed += packed.nbytes
    return freed


def _available_memory() -> float:
    """This process's share of the free memory (the machine's, or its container's where that is lower;
    split between a launch's processes on this machine, each of which makes its own copies)."""
    return free_memory_share()


def _weight_packing_fits(lora_layers: list) -> bool:
    """Whether the LoRA layers' frozen CPU weights get a packed copy: there are some, this torch
    build has the oneDNN ops, and the copies take at most a quarter of the memory available."""
    cpu_weights = [m.base_layer.weight for m in lora_layers if m.base_layer.weight.device.type == "cpu"]
    if not cpu_weights:
        return False
    missing = missing_ops("mkldnn", PACKING_OPS)
    if missing:
        log.info("Packed weights off: this torch build lacks %s; LoRA layers use plain matmuls", ", ".join(missing))
        return False
    extra = sum(packed_bytes(w) for w in cpu_weights)
    available = _available_memory()
    if not packing_fits(extra, available):
        log.info("Packed weights off: their %.1f GB would exceed a quarter of the %.1f GB of memory available",
                 extra / 1e9, available / 1e9)
        return False
    return True


def packing_for_run(requested: bool, passes: float, device: torch.device) -> bool:
    """``--pack_weights`` for a run of ``passes`` forward/backward passes: off (one line says so) for a
    CPU run too short to make the packed copies back."""
    if requested and device.type == "cpu" and not packing_pays(passes):
        log.info("Packed weights off: this run's %g forward/backward passes are fewer than the %d that making the "
                 "copies pays back over", passes, lora_linear.PACK_MIN_PASSES)  # the module's: tests may change it
        return False
    return requested


def use_fused_kernels(model: torch.nn.Module, pack_weights: bool = True) -> int:
    """Route every qualifying LoRA linear layer, attention (``attention.ATTENTION_CLASSES``) and
    RMSNorm (``rmsnorm.NORM_CLASSES``) of ``model`` through the fused nodes while training; returns
    how many modules were routed.

    Nothing is routed (one log line says why) where the installed transformers or PEFT is outside
    ``TESTED_VERSIONS`` or LlamaAttention.forward no longer takes the arguments the attention node
    passes on; attention alone stays as it is where this torch build lacks the CPU flash ops, and
    an attention class whose forward takes other arguments keeps its own code.
    With ``pack_weights`` the LoRA layers' frozen CPU weights are also reordered once for oneDNN
    (``PackedWeight``, one copy for the input gradient), unless this torch build lacks the ops or
    the copies would take more than a quarter of the memory this machine has available."""
    refused = fused_paths_refused()
    if refused:
        log.warning(refused)
        return 0
    modules = list(model.modules())
    flash_missing = flash_ops_missing()
    if flash_missing and any(qualified_name(type(m)) in ATTENTION_CLASSES for m in modules):
        log.info("Packed attention node off: this torch build lacks %s; attention keeps transformers' code",
                 ", ".join(flash_missing))
    patched, lora_layers, bnb_tested, signatures = 0, [], None, {}
    for module in modules:
        kind = qualified_name(type(module))
        if kind in ATTENTION_CLASSES:  # takes its path only for packed rows (packing on)
            if kind not in signatures:
                signatures[kind] = attention_signature_matches(type(module))
                if not signatures[kind]:
                    log.info("Packed attention node off for %s: its forward no longer takes (%s, **kwargs); it keeps "
                             "its own code", type(module).__name__, ", ".join(ATTENTION_PARAMETERS[1:-1]))
            if not flash_missing and signatures[kind]:
                module.forward = types.MethodType(attention_forward, module)
                patched += 1
            continue
        if kind in NORM_CLASSES:  # one of the three forms the node computes (its frozen weight only)
            module.forward = types.MethodType(rmsnorm_forward, module)
            patched += 1
            continue
        kbit_name, kbit_forward = int8_adapter(module), int8_lora_forward
        if kbit_name is None:
            kbit_name, kbit_forward = nf4_adapter(module), nf4_lora_forward
        if kbit_name is not None:
            if bnb_tested is None:  # an untested release keeps PEFT's and bitsandbytes' code
                bnb_tested = bitsandbytes_tested()
            if bnb_tested and (kbit_forward is int8_lora_forward or dequantize_self_check()):
                module._lora_kernel_adapter = kbit_name
                module.forward = types.MethodType(kbit_forward, module)
                patched += 1
            continue
        name = plain_adapter(module)
        if name is None:
            continue
        module._lora_kernel_adapter = name
        module.forward = types.MethodType(lora_linear_forward, module)
        lora_layers.append(module)
        patched += 1
    if bnb_tested is False:
        import bitsandbytes

        log.info("k-bit LoRA nodes off: they are tested with bitsandbytes %s.x-%s.x, this environment has %s; "
                 "8-bit and 4-bit layers keep PEFT's and bitsandbytes' code", *BITSANDBYTES_TESTED,
                 bitsandbytes.__version__)
    pack = pack_weights and _weight_packing_fits(lora_layers)
    for module in lora_layers:
        module._lora_kernel_pack = pack
    return patched

"""The engine: everything the lessons share. Imports no lesson (tests/test_layout.py checks)."""
import logging
import os
import warnings

# oneDNN (ONEDNN_PRIMITIVE_CACHE_CAPACITY) and torch's ideep layer over it (LRU_CACHE_CAPACITY) each
# keep up to 1,024 kernels, one per product shape, and memory with each. A packed step's row count is
# new almost every step, so a run's peak RSS grew step after step: the embedded model's default train
# from 1.8 GB after its first step to 2.5 GB after 45, where 64 each held it at ~2.0 GB at the same speed
# (benchmarks/RESULTS.md). 64 holds every shape of one step. Read once, at their first use, so set at
# import, before any product runs; a value the user set stays.
KERNEL_CACHE_CAPACITY = "64"
for _cache in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_cache, KERNEL_CACHE_CAPACITY)

# bitsandbytes' CPU backend warns at import time, on every run, that it could not download an
# optional kernel from the hub (`kernels-community`); it then uses its built-in kernel, and this
# toolkit never downloads at run time. Installed here, before any engine module can import
# bitsandbytes (through peft or transformers); its other messages still come through.
BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_KERNEL_HUB_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"


# bitsandbytes logs this at every 8-bit matmul whose input is not fp16 (all of them under fp32 or bf16
# autocast): thousands of lines in a few steps of an 8-bit run. Said once, it keeps its information.
BITSANDBYTES_MATMUL_LOGGER = "bitsandbytes.autograd._functions"
_CAST_WARNING = "MatMul8bitLt: inputs will be cast from"


class KnownNoiseFilter(logging.Filter):
    """Drops bitsandbytes' missing-hub-kernel warning and nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_KERNEL_HUB_WARNING)


class OnceFilter(logging.Filter):
    """Lets bitsandbytes' per-matmul cast warning through once per input dtype."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(_CAST_WARNING):
            return True
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def quiet_known_noise() -> None:
    """Install each filter once on the logger that emits its message (created early if need be):
    the hub-kernel warning dropped, the per-matmul cast warning said once per dtype.

    Also: PEFT 0.21's ``get_peft_model`` reads ``model.is_gradient_checkpointing``, which
    transformers 5.24 marks deprecated, so every LoRA set-up printed a FutureWarning about a call
    this toolkit does not make."""
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    if not any(isinstance(f, KnownNoiseFilter) for f in logger.filters):
        logger.addFilter(KnownNoiseFilter())
    matmul = logging.getLogger(BITSANDBYTES_MATMUL_LOGGER)
    if not any(isinstance(f, OnceFilter) for f in matmul.filters):
        matmul.addFilter(OnceFilter())


quiet_known_noise()

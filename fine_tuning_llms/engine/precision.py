"""The one precision decision: weight dtype for training and the autocast dtype, per device."""
from __future__ import annotations

import dataclasses

import torch

from .config import ModelConfig


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 / AMX) through oneDNN."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)  # looked up only when asked
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def bf16_compute_available(device: torch.device) -> bool:
    if device.type == "cpu":
        return cpu_supports_bf16()
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def training_model_config(model: ModelConfig, device: torch.device) -> ModelConfig:
    """The base model's settings for training.

    With --dtype auto and bf16 compute available, the *frozen* base weights are loaded in bf16:
    autocast would cast them to bf16 for every matmul anyway, so this saves that copy each step
    and half the memory. LoRA weights and optimizer state stay fp32 (PEFT keeps adapters in fp32).
    """
    if model.dtype == "auto" and bf16_compute_available(device):
        return dataclasses.replace(model, dtype="bfloat16")
    return model


def mixed_precision(model: ModelConfig, device: torch.device) -> tuple[bool, bool]:
    """(bf16, fp16) autocast for training: bf16 where the device computes it (LoRA weights and
    optimizer state stay fp32; autocast only changes the compute dtype), fp16 on older GPUs,
    neither when --dtype float32 asks for full precision."""
    bf16 = bf16_compute_available(device) and model.dtype != "float32"
    fp16 = device.type != "cpu" and not bf16 and model.dtype in ("auto", "float16")
    return bf16, fp16


def autocast_dtype(bf16: bool, fp16: bool) -> torch.dtype | None:
    return torch.bfloat16 if bf16 else (torch.float16 if fp16 else None)

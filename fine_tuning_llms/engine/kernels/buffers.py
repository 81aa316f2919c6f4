"""Buffers the k-bit LoRA nodes dequantise their frozen weights into, kept between calls.

A new tensor the size of a weight is fresh memory from the system at every call, and its page
faults cost more than the arithmetic: dequantising an 8192 x 2048 int8 weight took 47 ms into new
tensors, 8 ms into reused ones; an nf4 one 17-26 ms vs 1.5 ms (benchmarks/RESULTS.md). One buffer
per dtype, grown to the largest weight. Training is one thread of Python and each buffer is used
only inside one forward or one backward of one layer, so reuse is safe; a result handed to autograd
never aliases a buffer.
"""
from __future__ import annotations

import torch

_buffers: dict[torch.dtype, torch.Tensor] = {}


def dequantize_buffer(dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    """A ``shape`` view of the ``dtype`` buffer, valid until the next call for that dtype."""
    n = shape.numel()
    buffer = _buffers.get(dtype)
    if buffer is None or buffer.numel() < n:
        buffer = _buffers[dtype] = torch.empty(n, dtype=dtype)
    return buffer[:n].view(shape)


def release_dequantize_buffers() -> int:
    """Free the dequantisation buffers (training calls it when it ends); returns the bytes released."""
    freed = sum(b.numel() * b.element_size() for b in _buffers.values())
    _buffers.clear()
    return freed


def rounded(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` (a dequantised weight) rounded to ``dtype`` into that dtype's buffer, as autocast or
    ``.to`` would round it; ``tensor`` itself where ``dtype`` is None or already its dtype."""
    if dtype is None or dtype == tensor.dtype:
        return tensor
    return dequantize_buffer(dtype, tensor.shape).copy_(tensor)

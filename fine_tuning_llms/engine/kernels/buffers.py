"""Scratch buffers the training nodes reuse between calls instead of allocating anew.

A new tensor of many megabytes is fresh memory from the system at every call, and its page faults
cost more than the arithmetic: dequantising an 8192 x 2048 int8 weight took 47 ms into new tensors,
8 ms into reused ones; an nf4 one 17-26 ms vs 1.5 ms; the head's (chunk, vocabulary) softmax
statistics and gradient likewise (benchmarks/RESULTS.md). One buffer per purpose, dtype and device,
grown to the largest request. Training is one thread of Python and each buffer is used only inside
one call of one node (a layer's forward or backward, the head's forward), so reuse is safe; a
result handed to autograd never aliases a buffer.
"""
from __future__ import annotations

import torch

_buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}


def reused_buffer(purpose: str, dtype: torch.dtype, shape, device: torch.device | str = "cpu") -> torch.Tensor:
    """A ``shape`` view of the buffer for (purpose, dtype, device), valid until the next call for the same."""
    shape, device = torch.Size(shape), torch.device(device)
    key, n = (purpose, dtype, device), shape.numel()
    buffer = _buffers.get(key)
    if buffer is None or buffer.numel() < n:
        _buffers.pop(key, None)  # the smaller one goes before the larger one is made
        buffer = _buffers[key] = torch.empty(n, dtype=dtype, device=device)
    return buffer[:n].view(shape)


def dequantize_buffer(dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    """A ``shape`` view of the CPU buffer k-bit weights are dequantised into (in ``dtype``)."""
    return reused_buffer("dequantize", dtype, shape)


def release_buffers() -> int:
    """Free every reused buffer (training calls it when it ends); returns the bytes released."""
    freed = sum(b.numel() * b.element_size() for b in _buffers.values())
    _buffers.clear()
    return freed


def rounded(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` (a dequantised weight) rounded to ``dtype`` into that dtype's buffer, as autocast or
    ``.to`` would round it; ``tensor`` itself where ``dtype`` is None or already its dtype."""
    if dtype is None or dtype == tensor.dtype:
        return tensor
    return dequantize_buffer(dtype, tensor.shape).copy_(tensor)

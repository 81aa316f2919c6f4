"""Llama's RMSNorm as one autograd node.

transformers' LlamaRMSNorm is eight autograd ops forward and about twelve backward, and a Llama
model calls it 2 x layers + 1 times a step; with LoRA its weight is frozen, so the node only has to
give the input's gradient, written out by hand (benchmarks/RESULTS.md has the per-call times).
Only the classes in ``NORM_CLASSES`` take it (an exact type check): Gemma's norm, for one, scales by
1 + w, and OLMo-2's multiplies before casting back.
"""
from __future__ import annotations

import torch

# RMSNorm classes whose __init__ and forward are LlamaRMSNorm's line for line in the tested
# transformers releases (tests/test_packing_families.py trains each family with and without the node).
NORM_CLASSES = frozenset(f"transformers.models.{module}.modeling_{module}.{name}RMSNorm" for module, name in (
    ("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"), ("qwen3", "Qwen3"), ("phi3", "Phi3")))


class RMSNormFunction(torch.autograd.Function):
    """y = weight * (x / rms(x)) with the statistics in fp32, as LlamaRMSNorm; gradient for x only
    (the norm weights are frozen under LoRA)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.to(torch.promote_types(x.dtype, torch.float32), copy=True)  # a copy: it is scaled in place
        inv_rms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))   # (..., 1)
        ctx.save_for_backward(x, weight, inv_rms)
        return weight * xf.mul_(inv_rms).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, inv_rms = ctx.saved_tensors
        normed = x.to(inv_rms.dtype) * inv_rms
        grad_normed = (grad_y * weight).to(inv_rms.dtype)
        # d/dx of x * rsqrt(mean(x^2)): (g - n * mean(g * n)) / rms
        dot = (grad_normed * normed).mean(-1, keepdim=True)
        grad_x = grad_normed.sub_(normed.mul_(dot)).mul_(inv_rms)
        return grad_x.to(x.dtype), None, None


def rmsnorm_forward(self, hidden_states):
    """The norm's own forward (LlamaRMSNorm's maths), except in training with gradients where the fused node runs."""
    if not (self.training and torch.is_grad_enabled()) or self.weight.requires_grad:
        return type(self).forward(self, hidden_states)
    return RMSNormFunction.apply(hidden_states, self.weight, float(self.variance_epsilon))

"""RMSNorm as one autograd node, in the three forms the supported families write it.

transformers' LlamaRMSNorm is eight autograd ops forward and about twelve backward, and a Llama
model calls it 2 x layers + 1 times a step; with LoRA its weight is frozen, so the node only has to
give the input's gradient, written out by hand (benchmarks/RESULTS.md has the per-call times).
All three forms normalise in fp32; they differ in how the weight is applied:

- Llama's (Mistral, Qwen2/3, Phi-3): ``weight * normed.to(dtype)``, cast back first;
- OLMo-2's: ``(weight * normed).to(dtype)``, scaled in fp32 first;
- Gemma's (Gemma 1/2/3): ``(normed * (1 + weight)).to(dtype)``, the weight an offset from 1, in fp32.

Only the classes in ``NORM_CLASSES`` take it (an exact type check).
"""
from __future__ import annotations

import torch

from .guards import qualified_name

LLAMA, OLMO2, GEMMA = None, 0.0, 1.0  # the weight's offset in the fp32 forms; None: Llama's form

# RMSNorm classes whose __init__ and forward are, in the tested transformers releases, one of the
# three forms line for line: class -> (form, the attribute holding epsilon).
# tests/test_packing_families.py trains each family with and without the node.
NORM_CLASSES = {
    **{f"transformers.models.{module}.modeling_{module}.{name}RMSNorm": (LLAMA, "variance_epsilon")
       for module, name in (("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"), ("qwen3", "Qwen3"),
                            ("phi3", "Phi3"))},
    "transformers.models.olmo2.modeling_olmo2.Olmo2RMSNorm": (OLMO2, "variance_epsilon"),
    **{f"transformers.models.{module}.modeling_{module}.{name}RMSNorm": (GEMMA, "eps")
       for module, name in (("gemma", "Gemma"), ("gemma2", "Gemma2"), ("gemma3", "Gemma3"))},
}


class RMSNormFunction(torch.autograd.Function):
    """y = weight * (x / rms(x)) with the statistics in fp32, in Llama's form (``offset`` None) or
    scaled in fp32 by ``weight + offset`` before the cast back (OLMo-2: 0, Gemma: 1); gradient for x
    only (the norm weights are frozen under LoRA)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, offset: float | None = LLAMA):
        xf = x.to(torch.promote_types(x.dtype, torch.float32), copy=True)  # a copy: it is scaled in place
        inv_rms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))   # (..., 1)
        ctx.save_for_backward(x, weight, inv_rms)
        ctx.offset = offset
        if offset is None:
            return weight * xf.mul_(inv_rms).to(x.dtype)
        return xf.mul_(inv_rms).mul_(_fp32_scale(weight, offset, xf.dtype)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, inv_rms = ctx.saved_tensors
        normed = x.to(inv_rms.dtype) * inv_rms
        if ctx.offset is None:
            grad_normed = (grad_y * weight).to(inv_rms.dtype)
        else:
            grad_normed = grad_y.to(inv_rms.dtype) * _fp32_scale(weight, ctx.offset, inv_rms.dtype)
        # d/dx of x * rsqrt(mean(x^2)): (g - n * mean(g * n)) / rms
        dot = (grad_normed * normed).mean(-1, keepdim=True)
        grad_x = grad_normed.sub_(normed.mul_(dot)).mul_(inv_rms)
        return grad_x.to(x.dtype), None, None, None


def _fp32_scale(weight, offset: float, dtype: torch.dtype):
    """The weight as the fp32 forms apply it: ``weight + offset`` in fp32 (Gemma's ``1.0 + w.float()``)."""
    scale = weight.to(dtype)
    return scale + offset if offset else scale


def rmsnorm_forward(self, hidden_states):
    """The norm's own forward, except in training with gradients where the fused node runs."""
    if not (self.training and torch.is_grad_enabled()) or self.weight.requires_grad:
        return type(self).forward(self, hidden_states)
    offset, eps_attribute = NORM_CLASSES[qualified_name(type(self))]
    return RMSNormFunction.apply(hidden_states, self.weight, float(getattr(self, eps_attribute)), offset)

"""A LoRA layer over a bitsandbytes 8-bit base (``--load_8bit``) as one autograd node, CPU training.

While training on CPU, bitsandbytes multiplies an 8-bit layer with ``MatMul8bitFp``: at every
call it dequantises the int8 weight into the input's dtype, W = CB * (SCB / 127) row by row, and
multiplies with it (in bf16 under autocast); its backward dequantises again and computes the
input gradient ``g @ W`` in the input's dtype. After PEFT's k-bit preparation the residual stream
is fp32, so that is an fp32 product through MKL, the largest cost of an 8-bit step. PEFT adds the
LoRA branch as separate modules (autocast casts, two thin matmuls, a scale, an add), and the
input is kept twice for the backward: in fp32 by bitsandbytes, in bf16 by autocast.

This node computes the same: the same dequantisation in the input's dtype, the forward product
in the compute dtype, the input gradient in the input's dtype, where fp32 goes through oneDNN
(``frozen_matmul``, after its self-check), and PEFT's LoRA branch. It keeps the input once, in
the compute dtype (the LoRA gradients need it; the base product's gradient does not).

It runs only for exactly PEFT's ``Linear8bitLt`` over exactly bitsandbytes' ``Linear8bitLt``
(int8 weights, no bias, one plain adapter) on CPU, with the bitsandbytes releases the tests ran
on; elsewhere (CUDA's int8 matmul with outliers, eval, generation) their own code runs.
"""
from __future__ import annotations

import functools

import torch

from .buffers import dequantize_buffer, rounded
from .frozen_matmul import frozen_input_grad, frozen_linear
from .lora_linear import lora_branch_grads, node_may_run, one_plain_adapter


def _dequantize(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype, cast: torch.dtype | None = None):
    """bitsandbytes' CPU dequantisation, in its order of operations: CB in ``dtype`` times SCB / 127,
    then (``cast``) rounded to another dtype as autocast would. Valid until the next call (``buffers``)."""
    weight = dequantize_buffer(dtype, cb.shape).copy_(cb).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))
    return rounded(weight, cast)


class Int8LoraLinearFunction(torch.autograd.Function):
    """x: (N, in) in the input dtype; cb: int8 (out, in); scb: (out,) row scales; lora_a: (r, in);
    lora_b: (out, r); compute: the dtype of the products (autocast's, or x's without autocast).
    Returns (N, out) in the compute dtype."""

    @staticmethod
    def forward(ctx, x, cb, scb, lora_a, lora_b, scaling: float, compute: torch.dtype):
        xc = x.to(compute)
        a, b = lora_a.to(compute), lora_b.to(compute)
        xa = xc @ a.t()                                                    # (N, r)
        y = frozen_linear(xc, _dequantize(cb, scb, x.dtype, compute))      # (N, out) base
        y.addmm_(xa, b.t(), alpha=scaling)                                 # + s * (x A^T) B^T
        ctx.save_for_backward(xc, cb, scb, a, b, xa)
        ctx.scaling = scaling
        ctx.input_dtype = x.dtype
        ctx.param_dtypes = (lora_a.dtype, lora_b.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        xc, cb, scb, a, b, xa = ctx.saved_tensors
        s = ctx.scaling
        grad_y = grad_y.contiguous()
        grad_xa, grad_a, grad_b = lora_branch_grads(grad_y, xc, b, xa, s)
        grad_x = None
        if ctx.needs_input_grad[0]:
            dtype = ctx.input_dtype  # bitsandbytes computes the base's input gradient in the input's dtype
            grad_x = frozen_input_grad(grad_y.to(dtype), _dequantize(cb, scb, dtype))
            grad_x.add_(grad_xa @ a, alpha=s)  # the LoRA branch's, in the compute dtype as autocast's
        return (grad_x, None, None, grad_a.to(ctx.param_dtypes[0]), grad_b.to(ctx.param_dtypes[1]), None, None)


def int8_adapter(module) -> str | None:
    """The layer's one active plain-LoRA adapter if it is PEFT's 8-bit LoRA layer over an int8
    bitsandbytes layer this node reproduces, else None."""
    bnb_lora = _peft_int8_class()
    if bnb_lora is None or type(module) is not bnb_lora:
        return None
    import bitsandbytes as bnb

    base = module.base_layer
    if type(base) is not bnb.nn.Linear8bitLt or base.state.has_fp16_weights:
        return None
    return one_plain_adapter(module)


@functools.cache
def _peft_int8_class():
    """PEFT's 8-bit LoRA layer class, or None where PEFT has none (no usable bitsandbytes): looked up once."""
    try:
        from peft.tuners.lora.bnb import Linear8bitLt
    except ImportError:
        return None
    return Linear8bitLt


def _int8_state(base):
    """(CB, SCB) of a bitsandbytes Linear8bitLt, moved into its matmul state as its forward does."""
    if base.weight.CB is not None:
        base.init_8bit_state()
    return base.state.CB, base.state.SCB


def int8_lora_forward(self, x, *args, **kwargs):
    """PEFT Linear8bitLt.forward, except in training with gradients on CPU, where the node runs."""
    name = self._lora_kernel_adapter
    if not node_may_run(self, args, kwargs) or x.device.type != "cpu":
        return type(self).forward(self, x, *args, **kwargs)
    if torch.is_autocast_enabled("cpu"):
        compute = torch.get_autocast_dtype("cpu")
    elif x.dtype == self.lora_A[name].weight.dtype:
        compute = x.dtype
    else:  # PEFT casts the input to the adapter's dtype and back here; keep its code
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    cb, scb = _int8_state(base)
    if cb is None or scb is None:
        return type(self).forward(self, x, *args, **kwargs)
    with torch.autocast("cpu", enabled=False):
        y = Int8LoraLinearFunction.apply(x.reshape(-1, x.shape[-1]), cb, scb, self.lora_A[name].weight,
                                         self.lora_B[name].weight, float(self.scaling[name]), compute)
    return y.view(*x.shape[:-1], y.shape[-1])

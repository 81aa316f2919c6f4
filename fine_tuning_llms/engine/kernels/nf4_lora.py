"""A LoRA layer over a bitsandbytes 4-bit base (``--load_4bit``) as one autograd node, CPU training.

While training on CPU, bitsandbytes' ``Linear4bit`` casts the input to its compute dtype and
multiplies with ``MatMul4Bit``: it dequantises the 4-bit weight into that dtype (block scales
first, from their 8-bit double quantisation) and calls ``F.linear`` (in bf16 under autocast), then
casts the result back to the input's dtype. Its backward dequantises again, in the weight's stored
dtype, and computes the input gradient in the output gradient's dtype. Every dequantisation
writes a new weight-sized tensor, whose page faults cost ten times the dequantisation itself at
Llama-3.2-1B's MLP shapes (benchmarks/RESULTS.md). PEFT adds the LoRA branch as separate modules.

This node computes the same: bitsandbytes' own CPU dequantisation kernel, written into reused
buffers (``buffers``), in the same dtypes and order, the same products, and PEFT's LoRA branch.
It keeps the input once, in the LoRA branch's dtype (the base product's gradient does not need it).

It runs only for exactly PEFT's ``Linear4bit`` over exactly bitsandbytes' ``Linear4bit`` (no bias,
one plain adapter, the standard layout) on CPU, with the bitsandbytes releases the tests ran on,
after a start-up self-check that its dequantisation equals bitsandbytes' bit for bit; elsewhere
(CUDA, eval, generation) their own code runs.
"""
from __future__ import annotations

import ctypes
import functools
import logging

import torch

from .buffers import dequantize_buffer, rounded
from .frozen_matmul import frozen_input_grad, frozen_linear
from .lora_linear import lora_branch_grads, node_may_run, one_plain_adapter

log = logging.getLogger(__name__)

_KERNEL_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _absmax(state) -> torch.Tensor:
    """The fp32 block scales, as bitsandbytes computes them before each dequantisation."""
    from bitsandbytes import functional as bnb_functional

    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2)
        absmax += state.offset
    else:
        absmax = state.absmax
    return absmax if absmax.dtype == torch.float32 else absmax.float()


def _c_kernel(state, dtype: torch.dtype):
    """bitsandbytes' CPU dequantisation function for this layer, or None where its op would not use it
    (blocks of 2048+ and odd rows take another route there)."""
    from bitsandbytes.cextension import lib

    if dtype not in _KERNEL_DTYPES or state.blocksize >= 2048 or state.shape[-1] % 2:
        return None
    return getattr(lib, f"cdequantize_blockwise_cpu_{state.quant_type}_{_KERNEL_DTYPES[dtype]}", None)


def dequantize(weight: torch.Tensor, state, dtype: torch.dtype, cast: torch.dtype | None = None) -> torch.Tensor:
    """The layer's weight (out, in) in ``dtype``, then (``cast``) rounded to another dtype as autocast
    or bitsandbytes' ``.to`` would. Valid until the next call for that dtype (``buffers``)."""
    from bitsandbytes.functional import get_ptr

    shape = torch.Size(state.shape)
    absmax = _absmax(state).contiguous()
    codes = weight.view(torch.uint8).contiguous()
    out = dequantize_buffer(dtype, shape)
    kernel = _c_kernel(state, dtype)
    if kernel is not None:
        kernel(get_ptr(codes), get_ptr(absmax), get_ptr(out), ctypes.c_longlong(state.blocksize),
               ctypes.c_longlong(shape[0]), ctypes.c_longlong(shape[1]))
    else:
        out.copy_(torch.ops.bitsandbytes.dequantize_4bit.default(codes, absmax, state.blocksize, state.quant_type,
                                                                shape, dtype))
    return rounded(out, cast)


class Nf4LoraLinearFunction(torch.autograd.Function):
    """x: (N, in) in the input dtype; weight, state: bitsandbytes' packed 4-bit weight and its quant
    state; lora_a: (r, in); lora_b: (out, r); compute: the layer's compute dtype (bitsandbytes casts
    the input to it); product: the dtype of the products (autocast's, else ``compute``).
    Returns (N, out) in the input dtype, as bitsandbytes' layer does."""

    @staticmethod
    def forward(ctx, x, weight, state, lora_a, lora_b, scaling: float, compute: torch.dtype, product: torch.dtype):
        xp = x.to(product)                                                   # the LoRA branch's input
        xb = xp if compute == product or x.dtype == compute else x.to(compute).to(product)
        a, b = lora_a.to(product), lora_b.to(product)
        xa = xp @ a.t()                                                      # (N, r)
        y = frozen_linear(xb, dequantize(weight, state, compute, product)).to(x.dtype)
        y.add_(xa @ b.t(), alpha=scaling)                                    # + s * (x A^T) B^T
        ctx.save_for_backward(xp, a, b, xa)
        ctx.weight, ctx.state = weight, state  # frozen: kept by the module anyway, as bitsandbytes keeps them
        ctx.scaling, ctx.dtypes = scaling, (x.dtype, compute, product, lora_a.dtype, lora_b.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        xp, a, b, xa = ctx.saved_tensors
        input_dtype, compute, product, a_dtype, b_dtype = ctx.dtypes
        s = ctx.scaling
        grad_p = grad_y.to(product).contiguous()
        grad_xa, grad_a, grad_b = lora_branch_grads(grad_p, xp, b, xa, s)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # bitsandbytes dequantises in the weight's stored dtype and rounds to the gradient's
            state = ctx.state
            weight = dequantize(ctx.weight, state, state.dtype, product)
            grad_x = frozen_input_grad(grad_p, weight).to(compute).to(input_dtype)
            grad_x.add_(grad_xa @ a, alpha=s)  # the LoRA branch's, in the product dtype as autocast's
        return grad_x, None, None, grad_a.to(a_dtype), grad_b.to(b_dtype), None, None, None


@functools.cache
def _peft_4bit_class():
    """PEFT's 4-bit LoRA layer class, or None where PEFT has none (no usable bitsandbytes): looked up once."""
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:
        return None
    return Linear4bit


def nf4_adapter(module) -> str | None:
    """The layer's one active plain-LoRA adapter if it is PEFT's 4-bit LoRA layer over a bitsandbytes
    4-bit layer this node reproduces, else None."""
    peft_4bit = _peft_4bit_class()
    if peft_4bit is None or type(module) is not peft_4bit:
        return None
    import bitsandbytes as bnb

    base = module.base_layer
    state = getattr(base.weight, "quant_state", None)
    if type(base) is not bnb.nn.Linear4bit or state is None or len(state.shape) != 2:
        return None
    if getattr(state, "packing_format_for_cpu", False) or (state.nested and state.state2.blocksize != 256):
        return None  # the inference layout; a double quantisation bitsandbytes' own product refuses
    return one_plain_adapter(module)


@functools.cache
def dequantize_self_check() -> bool:
    """Whether ``dequantize`` equals bitsandbytes' ``dequantize_4bit`` bit for bit here (nf4 and fp4,
    double-quantised or not, fp32 and bf16), checked once per process."""
    from bitsandbytes import functional as bnb_functional

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 256, generator=generator)
    try:
        for quant_type in ("nf4", "fp4"):
            for nested in (True, False):
                for dtype in (torch.float32, torch.bfloat16):
                    packed, state = bnb_functional.quantize_4bit(weight.to(dtype), blocksize=64, quant_type=quant_type,
                                                                 compress_statistics=nested)
                    if not torch.equal(dequantize(packed, state, dtype), bnb_functional.dequantize_4bit(packed, state)):
                        log.info("4-bit LoRA node off: its dequantisation differs from bitsandbytes' (%s, %s)",
                                 quant_type, dtype)
                        return False
    except (RuntimeError, AttributeError, OSError) as error:
        log.info("4-bit LoRA node off: bitsandbytes' CPU dequantisation could not be called (%s)", error)
        return False
    return True


def nf4_lora_forward(self, x, *args, **kwargs):
    """PEFT Linear4bit.forward, except in training with gradients on CPU, where the node runs."""
    name = self._lora_kernel_adapter
    base = self.base_layer
    if not node_may_run(self, args, kwargs) or x.device.type != "cpu" or not getattr(base, "compute_type_is_set", False):
        return type(self).forward(self, x, *args, **kwargs)  # the first call sets the compute dtype
    state = base.weight.quant_state
    if state is None or getattr(state, "packing_format_for_cpu", False):
        return type(self).forward(self, x, *args, **kwargs)
    compute = base.compute_dtype or x.dtype
    if torch.is_autocast_enabled("cpu"):
        product = torch.get_autocast_dtype("cpu")
    elif x.dtype == compute == self.lora_A[name].weight.dtype:
        product = compute
    else:  # PEFT runs the LoRA branch in the adapter's dtype here, apart from the base; keep its code
        return type(self).forward(self, x, *args, **kwargs)
    with torch.autocast("cpu", enabled=False):
        y = Nf4LoraLinearFunction.apply(x.reshape(-1, x.shape[-1]), base.weight, state, self.lora_A[name].weight,
                                        self.lora_B[name].weight, float(self.scaling[name]), compute, product)
    return y.view(*x.shape[:-1], y.shape[-1])

"""A LoRA linear layer as one autograd node, and its frozen CPU weights packed once for oneDNN.

PEFT computes a LoRA layer as a chain of modules: the base linear, a cast of the input to the
adapter's fp32, autocast casting it back (and A, B) to bf16, two thin matmuls, a scale, an add
and a cast of the result; autograd records a node for each and replays them backwards. With
all-linear LoRA every layer of the model has seven such chains, and on a small CPU their fixed
costs outweigh the adapters' own arithmetic many times over (benchmarks/RESULTS.md).

Here the same maths is one ``torch.autograd.Function`` with a hand-written backward: three
matmuls forward (the LoRA product added in place), five backward, no full-size casts. The
parameters are PEFT's own tensors (A, B in fp32, updated by the optimizer as usual), so
checkpoints and saved adapters are unchanged; only the compute path is. It is used while
training with gradients on plain LoRA layers (no DoRA, no dropout, no bias of B's own,
unquantised float base weights, a base bias only if frozen); everything else, eval and
generation included, keeps PEFT's code.

On CPU the frozen base weights are also reordered once, while training, into the blocked layout
oneDNN computes the input gradient ``g @ W`` with (``PackedWeight``): a plain matmul reorders its
weight again at every call. That costs one extra copy of those weights, freed when training ends,
and is skipped when it would not fit comfortably in memory or this torch build lacks the oneDNN ops.
"""
from __future__ import annotations

import torch

from .frozen_matmul import frozen_input_grad, frozen_linear
from .guards import missing_ops, private_op

PACKING_OPS = ("_reorder_linear_weight", "_linear_pointwise")  # torch.ops.mkldnn, looked up when used
# Making the packed copies (an allocation and a reorder of every frozen weight, first touched) took
# 0.25-1 s on the embedded model here, and they save ~15-30 ms per forward/backward pass
# (benchmarks/RESULTS.md): they pay back over some tens of passes, so shorter runs do not make them.
PACK_MIN_PASSES = 32


class LoraLinearFunction(torch.autograd.Function):
    """x: (N, in) in the compute dtype; weight: frozen (out, in); lora_a: (r, in); lora_b: (out, r);
    packed: None, or ``weight``'s ``PackedWeight`` for the input gradient through the frozen weight;
    bias: None, or the base layer's frozen bias (out,) (Qwen2's q/k/v, for one)."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scaling: float, packed=None, bias=None):
        dtype = x.dtype
        a = lora_a.to(dtype)
        b = lora_b.to(dtype)
        xa = x @ a.t()                                        # (N, r)
        # (N, out) base, with its bias in the same product as the base layer's own F.linear
        y = frozen_linear(x, weight.to(dtype), bias=None if bias is None else bias.to(dtype))
        y.addmm_(xa, b.t(), alpha=scaling)                    # + s * (x A^T) B^T, in place
        ctx.save_for_backward(x, weight, a, b, xa)
        ctx.scaling = scaling
        ctx.packed = packed
        ctx.param_dtypes = (lora_a.dtype, lora_b.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, a, b, xa = ctx.saved_tensors
        s = ctx.scaling
        grad_y = grad_y.contiguous()
        grad_xa, grad_a, grad_b = lora_branch_grads(grad_y, x, b, xa, s)
        grad_x = None
        if ctx.needs_input_grad[0]:
            if ctx.packed is not None:                        # (N, in) through the frozen base
                grad_x = ctx.packed.backward(grad_y)
            else:
                grad_x = frozen_input_grad(grad_y, weight.to(grad_y.dtype))
            grad_x.addmm_(grad_xa, a, alpha=s)                # + s * (grad_y B) A
        return grad_x, None, grad_a.to(ctx.param_dtypes[0]), grad_b.to(ctx.param_dtypes[1]), None, None, None


def lora_branch_grads(grad_y, x, b, xa, scaling: float):
    """The LoRA branch s * (x A^T) B^T's backward: (grad of x A^T (N, r), grad of A (r, in), grad of B (out, r)),
    from the output gradient grad_y (N, out), the input x (N, in), B (out, r) and x A^T (N, r)."""
    grad_xa = grad_y @ b
    return grad_xa, (grad_xa.t() @ x).mul_(scaling), (grad_y.t() @ xa).mul_(scaling)


class PackedWeight:
    """A frozen CPU weight reordered once into oneDNN's blocked layout, for the input gradient
    ``g @ W``.

    Every plain CPU matmul reorders its weight operand into that layout again, each call. For the
    input gradient that costs 3-22% of the product at the embedded model's and Llama-3.2-1B's
    shapes; for the forward product only 1-8% (benchmarks/RESULTS.md), too little to pay a second
    copy of every frozen weight, so only the backward product is packed. The copy costs 1 x the
    frozen weight's size while training; ``release_packed_weights`` frees it when training ends.
    It is made from the weight as it is when
    first needed, so it is only valid while the weight is frozen and unchanged, which is what LoRA
    training guarantees (``key`` also catches a replaced tensor). The oneDNN ops are looked up at
    each call, never at import."""

    ROWS_HINT = 512  # oneDNN picks the blocking for about this many rows; any row count works

    def __init__(self, weight: torch.Tensor):
        w = weight.detach()
        self.key = _weight_key(weight)
        self.nbytes = packed_bytes(w)
        self._backward = torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), self.ROWS_HINT)  # for g @ W

    def backward(self, grad):
        return torch.ops.mkldnn._linear_pointwise(grad, self._backward, None, "none", [], "")


def packed_bytes(weight: torch.Tensor) -> int:
    """Memory the packed copy of ``weight`` takes while training (a meta tensor works too)."""
    return weight.numel() * weight.element_size()


def packing_pays(passes: float) -> bool:
    """Whether a run of ``passes`` forward/backward passes makes the packed copies back."""
    return passes >= PACK_MIN_PASSES


def packing_fits(extra: float, available: float | None) -> bool:
    """Whether packed copies of ``extra`` bytes are made: at most a quarter of the memory available
    (None: unknown, made)."""
    return available is None or extra <= available / 4


def _weight_key(weight: torch.Tensor) -> tuple:
    return weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape)


def weight_packing_available(dtype: torch.dtype) -> bool:
    """Whether this torch build can pack CPU weights for oneDNN in ``dtype``."""
    if not torch.backends.mkldnn.is_available() or missing_ops("mkldnn", PACKING_OPS):
        return False
    if dtype == torch.bfloat16:
        bf16_supported = private_op("mkldnn", "_is_mkldnn_bf16_supported")
        return bf16_supported is not None and bf16_supported()
    return dtype == torch.float32


def _packed_weight(module, weight: torch.Tensor, dtype: torch.dtype):
    """The module's ``PackedWeight`` for this weight (made on first use), or None where packing is
    off, the weight is not a CPU tensor already in the compute dtype, or this build cannot pack."""
    if not getattr(module, "_lora_kernel_pack", False) or weight.device.type != "cpu" or weight.dtype != dtype:
        return None
    packed = getattr(module, "_lora_kernel_packed", None)
    if packed is None or packed.key != _weight_key(weight):
        try:
            packed = PackedWeight(weight) if weight_packing_available(dtype) else None
        except (RuntimeError, AttributeError):
            packed = None
        if packed is None:
            module._lora_kernel_pack = False  # this build or CPU cannot: keep the plain matmuls from now on
            return None
        module._lora_kernel_packed = packed
    return packed


def plain_adapter(module) -> str | None:
    """The layer's one active plain-LoRA adapter if this kernel reproduces it exactly, else None."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    if type(module) is not LoraLinear or type(module.base_layer) is not torch.nn.Linear:
        return None  # 8-bit layers take int8_lora.py; 4-bit and other layer kinds keep PEFT's code
    if not module.base_layer.weight.dtype.is_floating_point:
        return None
    return one_plain_adapter(module, frozen_bias=True)


def one_plain_adapter(module, frozen_bias: bool = False) -> str | None:
    """A PEFT LoRA layer's one active adapter if it is plain LoRA over a bias-free base (with
    ``frozen_bias``: or a base whose bias is frozen), what the LoRA nodes compute, else None: DoRA and
    other variants, dropout, several adapters, a trained bias keep PEFT's code."""
    bias = module.base_layer.bias
    if (bias is not None and not (frozen_bias and _frozen(bias))) or len(module.active_adapters) != 1:
        return None
    name = module.active_adapters[0]
    if (name not in module.lora_A or name in getattr(module, "lora_variant", {})
            or not isinstance(module.lora_dropout[name], torch.nn.Identity)
            or module.lora_B[name].bias is not None):  # PEFT's lora_bias: B with a bias of its own
        return None
    return name


def _frozen(bias) -> bool:
    return not bias.requires_grad and bias.dtype.is_floating_point


def node_may_run(module, args: tuple, kwargs: dict) -> bool:
    """Whether a routed LoRA layer's call takes its node: training with gradients, its one adapter
    active and unmerged, no extra arguments (PEFT's per-call adapter names and the like)."""
    return (not args and not kwargs and module.training and torch.is_grad_enabled() and not module.disable_adapters
            and not module.merged and list(module.active_adapters) == [module._lora_kernel_adapter])


def lora_linear_forward(self, x, *args, **kwargs):
    """PEFT Linear.forward, except in training with gradients where the fused kernel runs."""
    name = self._lora_kernel_adapter
    if not node_may_run(self, args, kwargs):
        return type(self).forward(self, x, *args, **kwargs)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    elif self.base_layer.weight.dtype == self.lora_A[name].weight.dtype:
        dtype = x.dtype
    else:  # e.g. bf16 base without autocast: PEFT runs LoRA in fp32 there; keep its code
        return type(self).forward(self, x, *args, **kwargs)
    weight, bias = self.base_layer.weight, self.base_layer.bias
    if bias is not None and not _frozen(bias):  # a bias made trainable after routing: PEFT's code trains it
        return type(self).forward(self, x, *args, **kwargs)
    with torch.autocast(device_type, enabled=False):
        y = LoraLinearFunction.apply(x.reshape(-1, x.shape[-1]).to(dtype), weight, self.lora_A[name].weight,
                                     self.lora_B[name].weight, float(self.scaling[name]),
                                     _packed_weight(self, weight, dtype), bias)
    return y.view(*x.shape[:-1], y.shape[-1])

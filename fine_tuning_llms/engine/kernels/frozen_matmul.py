"""Products with a frozen weight, in fp32 on CPU through oneDNN instead of MKL.

torch computes an fp32 CPU matmul with MKL's sgemm. The same product through oneDNN's linear
(``torch.ops.mkldnn._linear_pointwise`` on the weight as it is, reordered inside each call, no
extra copy) ran 1.16-1.57x faster at the embedded model's and Llama-3.2's shapes on this machine
(benchmarks/RESULTS.md). Both are fp32 products accumulated in fp32; only the kernel and so the
order of the additions differ. bf16 products already go through oneDNN and are left alone.

oneDNN takes this path only after a start-up self-check, once per process, finds its fp32
products equal to torch's up to fp32 rounding, in both orientations used here: a build or a
setting that lets oneDNN compute fp32 with bf16 or tf32 arithmetic fails it, and then every
product stays torch's own (one log line says so).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .guards import private_op

log = logging.getLogger(__name__)

# Largest relative error (to an fp64 reference, over the largest |value|) the self-check accepts.
# fp32 products of 256 terms land near 1e-7; one computed in bf16 near 4e-3, in tf32 near 5e-4.
SELF_CHECK_TOLERANCE = 1e-5

_onednn_fp32: bool | None = None  # the self-check's verdict, once known


def onednn_fp32_ready() -> bool:
    """Whether fp32 products with a frozen CPU weight go through oneDNN in this process (the
    self-check runs on the first call)."""
    global _onednn_fp32
    if _onednn_fp32 is None:
        _onednn_fp32 = _self_check()
    return _onednn_fp32


def _self_check() -> bool:
    op = private_op("mkldnn", "_linear_pointwise")
    if op is None or not torch.backends.mkldnn.is_available() or not torch.backends.mkldnn.enabled:
        return False
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(48, 256, generator=generator)
    weight = torch.randn(96, 256, generator=generator)
    grad = torch.randn(48, 96, generator=generator)
    try:
        products = ((op(x, weight, None, "none", [], ""), x.double() @ weight.double().t()),
                    (op(grad, weight.t(), None, "none", [], ""), grad.double() @ weight.double()))
    except RuntimeError as error:
        log.info("fp32 products stay on torch's matmul: oneDNN's linear failed its self-check (%s)", error)
        return False
    for got, reference in products:
        error = ((got.double() - reference).abs().max() / reference.abs().max()).item()
        if got.dtype != torch.float32 or not error <= SELF_CHECK_TOLERANCE:
            log.info("fp32 products stay on torch's matmul: oneDNN's differ from fp64 by %.1e (fp32 rounding "
                     "is under %.0e; a reduced-precision fp32 mode may be set)", error, SELF_CHECK_TOLERANCE)
            return False
    return True


def _onednn_op(a: torch.Tensor, weight: torch.Tensor):
    """oneDNN's linear op where this product goes through it, else None (looked up at each call)."""
    if (a.dtype != torch.float32 or weight.dtype != torch.float32 or a.device.type != "cpu"
            or weight.device.type != "cpu" or a.dim() != 2 or not onednn_fp32_ready()):
        return None
    return private_op("mkldnn", "_linear_pointwise")


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T`` (``+ bias``, added inside the product as ``F.linear`` does): x (N, in), weight
    (out, in). With ``out`` (no bias), written there (torch's matmul writes in place, the same kernel
    and result as ``F.linear``; oneDNN's result is copied in)."""
    op = _onednn_op(x, weight)
    if op is None:
        return F.linear(x, weight, bias) if out is None else torch.mm(x, weight.t(), out=out)
    product = op(x.contiguous(), weight.contiguous(), bias, "none", [], "")
    return product if out is None else out.copy_(product)


def frozen_input_grad(grad: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``grad @ weight``: grad (N, out), weight (out, in); the input gradient of ``frozen_linear``.
    With ``out``, written there (torch's matmul writes in place; oneDNN's result is copied in)."""
    op = _onednn_op(grad, weight)
    if op is None:
        return torch.mm(grad, weight, out=out) if out is not None else grad @ weight
    product = op(grad.contiguous(), weight.contiguous().t(), None, "none", [], "")
    return out.copy_(product) if out is not None else product

"""The vocabulary head and the cross-entropy as one autograd node.

The frozen head's logits are made a chunk of rows at a time, the loss and its gradient
(softmax - one-hot, pushed back through the head) are computed at once, and only the
(N, hidden) gradient is kept for backward. The (N, vocabulary) logits never exist whole, in fp32
or at all, which is what a large vocabulary's peak memory is made of (``benchmarks/bench_head_memory.py``;
numbers in benchmarks/RESULTS.md). ``engine.trainer.trained_token_loss`` calls it.
"""
from __future__ import annotations

import torch

from .buffers import reused_buffer
from .frozen_matmul import frozen_input_grad, frozen_linear
from .guards import untested_versions


class HeadCrossEntropyFunction(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``; gradient for hidden only
    (the head is frozen). hidden: (N, d) in the compute dtype; weight: (V, d); targets: (N,)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int):
        dtype = hidden.dtype
        weight = weight.to(dtype)
        stats = torch.promote_types(dtype, torch.float32)          # loss statistics in fp32 (or fp64)
        total = torch.zeros((), dtype=stats, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            target = targets[rows]
            # In bf16/fp16 the logits, the fp32 statistics and the gradient go into buffers reused
            # across chunks and steps: fresh (c, V) tensors cost more in page faults than the softmax
            # itself (benchmarks/RESULTS.md). Every pass below is in place on one of them. In fp32
            # the fresh logits are the statistics (oneDNN's product cannot write into a buffer).
            if dtype == stats:
                logits = log_probs = frozen_linear(hidden[rows], weight)
            else:
                shape, device = (len(target), weight.shape[0]), hidden.device
                logits = frozen_linear(hidden[rows], weight, out=reused_buffer("head_logits", dtype, shape, device))
                log_probs = reused_buffer("head_stats", stats, shape, device).copy_(logits)
            torch.log_softmax(log_probs, dim=-1, out=log_probs)
            total -= log_probs.gather(1, target[:, None]).sum()
            grad_logits = log_probs.exp_()                            # softmax
            grad_logits[torch.arange(len(target), device=target.device), target] -= 1.0
            if dtype != stats:
                grad_logits = reused_buffer("head_grad", dtype, logits.shape, logits.device).copy_(grad_logits)
            frozen_input_grad(grad_logits, weight, out=grad_hidden[rows])
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None


def head_chunk_rows(vocab_size: int, budget: int = 1 << 24) -> int:
    """Rows per chunk so that one chunk of fp32 logits holds about ``budget`` values (64 MiB by
    default) whatever the vocabulary."""
    return max(1, budget // vocab_size)


def head_for_fused_loss(model: torch.nn.Module):
    """(decoder, head weight) of a PEFT-wrapped or plain Llama causal LM whose head this node
    reproduces (a bias-free frozen Linear, no logit scaling), else None.

    Exactly ``LlamaForCausalLM``: a subclass may make its logits some other way (scaling,
    soft-capping), so it keeps its own path; so does every model outside the tested releases."""
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if type(lm) is not LlamaForCausalLM or untested_versions():
        return None
    head = lm.get_output_embeddings()
    if (type(head) is not torch.nn.Linear or head.bias is not None or head.weight.requires_grad
            or not head.weight.dtype.is_floating_point):
        return None  # a trained head (new tokens) or a wrapped/quantised one keeps the model's own path
    return lm.model, head.weight

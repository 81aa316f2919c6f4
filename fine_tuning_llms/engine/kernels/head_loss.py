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
from .guards import qualified_name, untested_versions


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


def _always(lm) -> bool:
    return True


def _no_final_softcap(lm) -> bool:
    return getattr(lm.config, "final_logit_softcapping", None) is None


# The causal-LM classes whose forward makes its logits as ``lm_head(model(...).last_hidden_state)``
# and nothing else, each with the condition under which that holds: in the tested transformers
# releases their forward is LlamaForCausalLM's line for line, Gemma-2's and Gemma-3's but for a
# soft-capping of the logits that runs only when the config sets ``final_logit_softcapping``
# (Gemma-2's default does; gemma-3-270m's does not). tests/test_packing_families.py trains each family
# with and without the node. Any other class, a subclass of these included, keeps its own path.
HEAD_CLASSES = {f"transformers.models.{module}.modeling_{module}.{name}ForCausalLM": condition
                for module, name, condition in (
                    ("llama", "Llama", _always), ("mistral", "Mistral", _always), ("qwen2", "Qwen2", _always),
                    ("qwen3", "Qwen3", _always), ("phi3", "Phi3", _always), ("olmo2", "Olmo2", _always),
                    ("gemma", "Gemma", _always), ("gemma2", "Gemma2", _no_final_softcap),
                    ("gemma3", "Gemma3", _no_final_softcap))}


def head_node_reproduces(lm: torch.nn.Module) -> bool:
    """Whether the head node computes what this causal LM's own forward does (an exact class check,
    its condition, and a plain bias-free float head; a meta-device model works too). Whether the head
    is frozen is the caller's to check."""
    condition = HEAD_CLASSES.get(qualified_name(type(lm)))
    head = lm.get_output_embeddings() if condition is not None else None
    return (condition is not None and condition(lm) and type(head) is torch.nn.Linear and head.bias is None
            and head.weight.dtype.is_floating_point)


def head_node_runs(lm: torch.nn.Module) -> bool:
    """Whether training this causal LM (a meta-device copy works too) takes the head node, its head
    frozen: the node reproduces it and the installed libraries are the tested releases."""
    return head_node_reproduces(lm) and not untested_versions()


def head_for_fused_loss(model: torch.nn.Module):
    """(decoder, head weight) of a PEFT-wrapped or plain causal LM whose head this node reproduces
    (``HEAD_CLASSES``: a bias-free frozen Linear, no logit scaling or soft-capping in force), else None.

    An exact class check: a subclass may make its logits some other way (scaling, soft-capping), so
    it keeps its own path; so does every model outside the tested releases."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not head_node_runs(lm):
        return None
    head = lm.get_output_embeddings()
    if head.weight.requires_grad:
        return None  # a trained head (new tokens) keeps the model's own path
    return lm.model, head.weight

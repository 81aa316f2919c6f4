"""Attention in packed rows as one autograd node on CPU, rotary embedding included.

The node does the rotary embedding of q and k, the per-conversation causal attention (the CPU
flash kernel, called directly, forward and backward, in fp32 as ``packed_sdpa.py`` explains) and
the layout changes around it. The autograd chain it replaces (views, transposes, rotate_half's
concatenations, casts, a split and a concatenation per layer) has a fixed cost per op that the
node does not pay; q and k are also rotated in fp32 instead of the compute dtype.

The backward of a conversation of ``MATMUL_BACKWARD_MIN`` tokens or more runs as batched fp32
matrix products over blocks of ``BACKWARD_BLOCK_ROWS`` query rows (``_matmul_backward``): the same
sums as the flash kernel's backward, in fewer, larger products; at 512 tokens it took about two
thirds of the flash backward's time here (benchmarks/RESULTS.md). Shorter conversations keep the
flash backward, which is as fast or faster below ~384 tokens.

Consecutive conversations of equal length (a row of conversations cut at max_length) go to the
flash kernel as one batch: its backward spreads a call's (conversation, head) pairs over the
threads, and one conversation's 9 heads split unevenly over 2 threads.

The flash kernel is a private torch op: it is looked up when the node runs, never at import, and
``use_fused_kernels`` leaves attention alone (with one log line) where this torch build lacks it.
"""
from __future__ import annotations

import torch

from .guards import missing_ops, qualified_name

# torch.ops.aten, looked up only when used: a torch build may lack them
FLASH_OPS = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward")
# Conversations this long or longer take the blocked backward below; the flash backward is as fast or
# faster for shorter ones. Query rows per block: the block's scores stay small enough for the cache.
MATMUL_BACKWARD_MIN = 384
BACKWARD_BLOCK_ROWS = 64


def _no_window(module) -> None:
    return None


def _config_window(module) -> int | None:
    return getattr(module.config, "sliding_window", None)


def _layer_window(module) -> int | None:
    return module.sliding_window


def _projections(module, x):
    return module.q_proj(x), module.k_proj(x), module.v_proj(x)


def _head_normed_projections(module, x):
    """Qwen3, Gemma-3: each head's q and k normalised by the model's own norm modules."""
    n = len(x)
    q = module.q_norm(module.q_proj(x).view(n, -1, module.head_dim)).reshape(n, -1)
    k = module.k_norm(module.k_proj(x).view(n, -1, module.head_dim)).reshape(n, -1)
    return q, k, module.v_proj(x)


def _normed_projections(module, x):
    """OLMo-2: q and k normalised over their whole width by the model's own norm modules."""
    return module.q_norm(module.q_proj(x)), module.k_norm(module.k_proj(x)), module.v_proj(x)


def _fused_projections(module, x):
    """Phi-3: one qkv product, split as its forward splits it."""
    qkv = module.qkv_proj(x)
    q_width, kv_width = module.config.num_attention_heads * module.head_dim, module.num_key_value_heads * module.head_dim
    return qkv[:, :q_width], qkv[:, q_width:q_width + kv_width], qkv[:, q_width + kv_width:]


# The attention classes the node takes: (the sliding window the class's own forward passes to the
# attention function, how it makes q, k and v from the layer's input, each (T, heads * head_dim)). In the
# tested transformers releases Gemma's forward is LlamaAttention's line for line; Mistral's, Qwen2's,
# Qwen3's, Gemma-3's, OLMo-2's and Phi-3's are but for that window and those projections (biases and
# norms live in modules the node calls; Gemma-3 scales by its own ``self.scaling`` and keeps
# ``attn_logit_softcapping`` out of the call; Phi-3's rotary embedding is Llama's when it covers the
# whole head). A window no shorter than any conversation of the row changes nothing, so the node runs
# there; a shorter one, a partial rotary embedding or a layer that is not causal keeps the model's code
# (tests/test_packing_families.py).
ATTENTION_CLASSES = {
    "transformers.models.llama.modeling_llama.LlamaAttention": (_no_window, _projections),
    "transformers.models.gemma.modeling_gemma.GemmaAttention": (_no_window, _projections),
    "transformers.models.mistral.modeling_mistral.MistralAttention": (_config_window, _projections),
    "transformers.models.qwen2.modeling_qwen2.Qwen2Attention": (_layer_window, _projections),
    "transformers.models.qwen3.modeling_qwen3.Qwen3Attention": (_layer_window, _head_normed_projections),
    "transformers.models.gemma3.modeling_gemma3.Gemma3Attention": (_layer_window, _head_normed_projections),
    "transformers.models.olmo2.modeling_olmo2.Olmo2Attention": (_no_window, _normed_projections),
    "transformers.models.phi3.modeling_phi3.Phi3Attention": (_config_window, _fused_projections),
}


def flash_ops_missing() -> list[str]:
    """The CPU flash-attention ops this torch build lacks (the node runs only where this is empty)."""
    return missing_ops("aten", FLASH_OPS)


def _rotate(x, cos, sin):
    """Rotary embedding, x * cos + rotate_half(x) * sin, for x: (heads, T, D); a new tensor."""
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out


def _matmul_backward(grad, q, k, v, out, lse, scale: float, grad_q, grad_k, grad_v) -> None:
    """Causal attention's input gradients for one conversation, written into grad_q, grad_k, grad_v.

    grad, q, out, grad_q: (heads, L, D); k, v, grad_k, grad_v: (kv_heads, L, D), grad_k and
    grad_v zero on entry; lse: (heads, L), the forward's log-sum-exp of each row's scores. Query
    head h reads key/value head h // (heads / kv_heads), as transformers' repeat_kv lays them out,
    so each key/value head's query heads stack into one (group * rows, D) matrix per product and
    the products over a block sum the group's gradients for k and v by themselves. The softmax is
    recomputed from lse block by block: rows [a, b) see keys [0, b), causal inside [a, b)."""
    heads, length, dim = q.shape
    kv_heads = k.shape[0]
    # the pieces are strided views of (T, heads, D) tensors: contiguous copies make every block a
    # plain view and every product a dense one
    grad, q, k, v, out = (x.contiguous() for x in (grad, q, k, v, out))
    group = heads // kv_heads
    delta = (grad * out).sum(-1, keepdim=True)  # rowsum(dO * O) = rowsum(dP * P)
    blocks = max(1, round(length / BACKWARD_BLOCK_ROWS))
    bounds = [length * i // blocks for i in range(blocks + 1)]
    masks = {}
    for a, b in zip(bounds[:-1], bounds[1:]):
        n = b - a
        if n not in masks:
            masks[n] = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1)
        rows_q = q[:, a:b].reshape(kv_heads, group * n, dim)
        rows_grad = grad[:, a:b].reshape(kv_heads, group * n, dim)
        keys, values = k[:, :b], v[:, :b]
        # P = exp(scale * q k^T - lse), zero above the diagonal
        probs = torch.baddbmm(lse[:, a:b].reshape(kv_heads, group * n, 1), rows_q, keys.transpose(1, 2),
                              beta=-1, alpha=scale).exp_()
        probs.view(kv_heads, group, n, b)[..., a:].masked_fill_(masks[n], 0)
        grad_v[:, :b].baddbmm_(probs.transpose(1, 2), rows_grad)
        # dS = P * (dO v^T - delta)
        grad_scores = torch.baddbmm(delta[:, a:b].reshape(kv_heads, group * n, 1), rows_grad,
                                    values.transpose(1, 2), beta=-1).mul_(probs)
        grad_q[:, a:b] = torch.bmm(grad_scores, keys).view(heads, n, dim)
        grad_k[:, :b].baddbmm_(grad_scores.transpose(1, 2), rows_q, alpha=scale)
    grad_q.mul_(scale)


def equal_length_runs(lengths: list[int]) -> list[tuple[int, int, int]]:
    """(first token, length, count) of each run of consecutive conversations of equal length: a row of
    conversations cut at max_length is one run, and the flash kernel takes a run as one batch (its
    backward spreads a batch's heads over the threads, one conversation's 9 heads unevenly on 2)."""
    runs, start = [], 0
    for n in lengths:
        if runs and runs[-1][1] == n:
            runs[-1][2] += 1
        else:
            runs.append([start, n, 1])
        start += n
    return [tuple(r) for r in runs]


def _run(x, start: int, n: int, count: int):
    """A run of ``count`` conversations of ``n`` tokens from x (heads, T, D): a (count, heads, n, D) view."""
    return x[:, start:start + n * count].unflatten(1, (count, n)).transpose(0, 1)


def _rotate_backward(grad, cos, sin):
    """Gradient of ``_rotate`` with respect to x, computed in place of grad."""
    half = grad.shape[-1] // 2
    grad_sin = grad * sin
    grad.mul_(cos)
    grad[..., :half] += grad_sin[..., half:]
    grad[..., half:] -= grad_sin[..., :half]
    return grad


class PackedAttentionFunction(torch.autograd.Function):
    """Causal attention of each conversation of a packed row with itself, rotary embedding included.

    q: (T, heads * D), k and v: (T, kv_heads * D) in the compute dtype, as the projections give
    them; cos, sin: (T, D); lengths: the conversations' lengths (sum T). Returns (T, heads * D).
    Grouped-query attention runs natively (the kernel takes fewer key/value heads). CPU only."""

    @staticmethod
    def forward(ctx, q, k, v, cos, sin, lengths: list, heads: int, kv_heads: int, scale: float):
        flash = getattr(torch.ops.aten, FLASH_OPS[0])
        dtype = q.dtype
        stats = torch.promote_types(dtype, torch.float32)
        length, dim = q.shape[0], cos.shape[-1]
        cos, sin = cos.to(stats), sin.to(stats)

        def heads_first(x, n):  # (T, n * D) -> (n, T, D), a strided view of the fp32 copy
            return x.view(length, n, dim).to(stats).transpose(0, 1)

        q, k, v = _rotate(heads_first(q, heads), cos, sin), _rotate(heads_first(k, kv_heads), cos, sin), \
            heads_first(v, kv_heads)
        runs = equal_length_runs(lengths)
        outs, lses = [], []
        for start, n, count in runs:  # a run of equal conversations is one batched call
            out, lse = flash(*(_run(x, start, n, count) for x in (q, k, v)), 0.0, True, scale=scale)
            outs.append(out)
            lses.append(lse)
        ctx.save_for_backward(q, k, v, cos, sin, *outs, *lses)
        ctx.meta = (runs, heads, kv_heads, scale, dtype)
        # (count, heads, L, D) runs -> (T, heads * D)
        return torch.cat([o.transpose(1, 2).reshape(-1, heads, dim) for o in outs]).view(length, heads * dim).to(dtype)

    @staticmethod
    def backward(ctx, grad):
        flash_backward = getattr(torch.ops.aten, FLASH_OPS[1])
        runs, heads, kv_heads, scale, dtype = ctx.meta
        saved = ctx.saved_tensors  # read once: under activation checkpointing each read unpacks (recomputes)
        q, k, v, cos, sin = saved[:5]
        outs, lses = saved[5:5 + len(runs)], saved[5 + len(runs):]
        length, dim = grad.shape[0], cos.shape[-1]
        grad = grad.reshape(length, heads, dim).to(q.dtype).transpose(0, 1)  # (heads, T, D)
        grad_q = q.new_empty(heads, length, dim)
        grad_k, grad_v = q.new_zeros(kv_heads, length, dim), q.new_zeros(kv_heads, length, dim)
        for (start, n, count), out, lse in zip(runs, outs, lses):
            gi, qi, ki, vi, gq, gk, gv = (_run(x, start, n, count) for x in (grad, q, k, v, grad_q, grad_k, grad_v))
            if n >= MATMUL_BACKWARD_MIN:
                for i in range(count):
                    _matmul_backward(gi[i], qi[i], ki[i], vi[i], out[i], lse[i], scale, gq[i], gk[i], gv[i])
                continue
            for into, run_grad in zip((gq, gk, gv), flash_backward(gi, qi, ki, vi, out, lse, 0.0, True, scale=scale)):
                into.copy_(run_grad)
        grad_q, grad_k = _rotate_backward(grad_q, cos, sin), _rotate_backward(grad_k, cos, sin)

        def tokens_first(x, n):  # (n, T, D) -> (T, n * D) in the compute dtype
            return x.transpose(0, 1).reshape(length, n * dim).to(dtype)

        return (tokens_first(grad_q, heads), tokens_first(grad_k, kv_heads), tokens_first(grad_v, kv_heads),
                None, None, None, None, None, None)


def attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
    """The attention class's own forward (``ATTENTION_CLASSES``), except for a packed row in training
    with gradients on CPU, where the rotary embedding and the per-conversation attention run as one
    node. The arguments are passed on in LlamaAttention.forward's order, which
    ``guards.attention_signature_matches`` checks for each class."""
    from .packed_sdpa import PACKED_SDPA, packed_lengths

    position_ids = kwargs.get("position_ids")
    if (not (self.training and torch.is_grad_enabled()) or cache is not None or position_ids is None
            or hidden_states.shape[0] != 1 or hidden_states.device.type != "cpu" or self.attention_dropout
            or self.config._attn_implementation != PACKED_SDPA or int(position_ids[0, 0]) != 0
            or not getattr(self, "is_causal", True)):
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, cache, **kwargs)
    lengths = packed_lengths(position_ids)
    window_of, projections = ATTENTION_CLASSES[qualified_name(type(self))]
    window = window_of(self)
    cos, sin = position_embeddings
    if (window is not None and max(lengths) > window) or cos.shape[-1] != self.head_dim:
        # a window that cuts a conversation, or a rotary embedding over part of each head: the model's code
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, cache, **kwargs)
    q, k, v = projections(self, hidden_states[0])
    out = PackedAttentionFunction.apply(q, k, v, cos[0], sin[0], lengths,
                                        self.config.num_attention_heads, self.config.num_key_value_heads,
                                        float(self.scaling))
    return self.o_proj(out)[None], None

"""Attention for packed rows: each conversation attends only to itself, at per-sequence cost.

A packed row holds several conversations end to end (``packing.PackingCollator``). The
per-sequence mask transformers builds for it makes plain SDPA exact, but the CPU kernel then
still does T x T work for the whole row: with 8 conversations of ~75 tokens that is 8x the
attention of running them one by one. Here the row is split where position ids restart and SDPA
runs causally on each conversation (no mask at all).

Only plain causal attention takes that path. Anything else goes to transformers' own SDPA with
the mask transformers built (per-sequence for packed rows): padded batches, generation with a
cache, and layers whose maths the split would change: a sliding window shorter than the
conversation (Mistral, Gemma-2/3, Qwen with sliding layers), logit soft-capping (Gemma-2),
attention sinks, non-causal layers.

    model.set_attn_implementation(PACKED_SDPA)   # after register_packed_attention()
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..batching import packed_lengths

PACKED_SDPA = "packed_sdpa"


def _plain_causal(module, kwargs: dict, lengths: list[int]) -> bool:
    """Whether per-conversation causal SDPA computes exactly what this layer computes."""
    if not getattr(module, "is_causal", True) or kwargs.get("softcap") or kwargs.get("s_aux") is not None:
        return False
    window = kwargs.get("sliding_window")
    return window is None or max(lengths) <= window


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """query: (1, heads, T, head_dim); key/value: (1, kv_heads, T, head_dim) → ((1, T, heads, head_dim), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    length = query.shape[2]
    single_packed_row = (position_ids is not None and query.shape[0] == 1 and key.shape[2] == length
                         and dropout == 0.0 and int(position_ids[0, 0]) == 0)
    if not single_packed_row:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    lengths = packed_lengths(position_ids)
    if not _plain_causal(module, kwargs, lengths):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    dtype, on_cpu = query.dtype, query.device.type == "cpu"
    if on_cpu:
        # The CPU flash kernel's bf16 backward has a large fixed cost per call, several times its
        # fp32 one for a conversation-sized piece (benchmarks/RESULTS.md), so short pieces run
        # faster in fp32, and more exactly. On GPUs bf16 flash is the fast one.
        query, key, value = query.float(), key.float(), value.float()
    gqa = query.shape[1] != key.shape[1]  # grouped-query attention: no repeated key/value copies
    # split, not slicing: its backward is one concatenation instead of a zero-filled copy per piece
    with torch.autocast("cpu", enabled=False) if on_cpu else contextlib.nullcontext():  # autocast would undo the fp32
        pieces = [F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
                  for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2),
                                     value.split(lengths, dim=2))]
    return torch.cat(pieces, dim=2).to(dtype).transpose(1, 2).contiguous(), None


def register_packed_attention() -> str:
    """Make ``packed_sdpa`` known to transformers (attention and mask); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)  # fallback paths get the usual SDPA mask
    return PACKED_SDPA

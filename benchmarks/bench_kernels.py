"""Microbenchmarks behind two decisions in engine/kernels (tables in benchmarks/RESULTS.md, issue 21):

1. ``--matmuls``: a frozen LoRA weight's product three ways: torch's matmul, the toolkit's unpacked
   product (``frozen_matmul``: oneDNN on the weight as it is in fp32, torch's matmul in bf16) and a
   oneDNN-packed copy, for the forward product ``x @ W.T`` and the input gradient ``g @ W``, at the
   embedded model's and the Llama-3.2 1B/3B shapes. Why training packs only the input-gradient copy
   (``PackedWeight``), and why fp32 products skip MKL.
2. ``--attention``: causal attention forward + backward of one conversation (SmolLM2's 9 query and
   3 key/value heads of 64) with torch's CPU flash kernel in fp32 (what the packed attention node
   runs below ``MATMUL_BACKWARD_MIN`` tokens) and bf16, the flash forward with the node's blocked
   fp32 matmul backward (what it runs from that length on), and a matmul-based attention (scores,
   mask, softmax, values) in fp32 and bf16. Why the node's backward switches where it does.

    python benchmarks/bench_kernels.py                 # both (about a minute, idle machine)
    python benchmarks/bench_kernels.py --matmuls --rows 300,900

Times are the best of ``--repeats`` rounds of ``--calls`` calls each, in milliseconds per call.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (label, out_features, in_features) of the frozen LoRA weights timed
SHAPES = [("1B q, o", 2048, 2048), ("1B k, v", 512, 2048), ("1B gate, up", 8192, 2048), ("1B down", 2048, 8192),
          ("135M gate, up", 1536, 576), ("135M down", 576, 1536), ("3B q, o", 3072, 3072),
          ("3B gate, up", 8192, 3072)]


def best_ms(fn, calls: int, repeats: int) -> float:
    fn()  # warm-up: oneDNN builds its kernels on the first call
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return 1000 * best


def same_product(a: torch.Tensor, b: torch.Tensor) -> None:
    error = float((a.float() - b.float()).norm() / b.float().norm())
    if error > 1e-2:  # bf16 rounding of a long dot product stays far below this
        raise SystemExit(f"packed and plain products differ (relative error {error:.1e}); timing them means nothing")


def matmuls(rows: list[int], dtype: torch.dtype, calls: int, repeats: int) -> None:
    from fine_tuning_llms.engine.kernels import PackedWeight, weight_packing_available
    from fine_tuning_llms.engine.kernels.frozen_matmul import frozen_input_grad, frozen_linear

    if not weight_packing_available(dtype):
        print(f"this torch build cannot pack {dtype} weights for oneDNN; nothing to compare")
        return
    linear = torch.ops.mkldnn._linear_pointwise
    print(f"| weight (out x in) | rows | forward torch / unpacked / packed (ms) | packed speed-up | input gradient "
          f"torch / unpacked / packed (ms) | packed speed-up |  ({dtype}; unpacked = the toolkit's product without "
          "a packed copy)")
    print("|---|---|---|---|---|---|")
    with torch.no_grad():
        for label, out_features, in_features in SHAPES:
            weight = torch.randn(out_features, in_features, dtype=dtype)
            forward_copy = torch.ops.mkldnn._reorder_linear_weight(weight, PackedWeight.ROWS_HINT)
            backward_copy = PackedWeight(weight)
            for n in rows:
                x, g = torch.randn(n, in_features, dtype=dtype), torch.randn(n, out_features, dtype=dtype)
                for product in (linear(x, forward_copy, None, "none", [], ""), frozen_linear(x, weight)):
                    same_product(product, F.linear(x, weight))  # same maths timed
                for product in (backward_copy.backward(g), frozen_input_grad(g, weight)):
                    same_product(product, g @ weight)
                fwd = (best_ms(lambda x=x, w=weight: F.linear(x, w), calls, repeats),
                       best_ms(lambda x=x, w=weight: frozen_linear(x, w), calls, repeats),
                       best_ms(lambda x=x, w=forward_copy: linear(x, w, None, "none", [], ""), calls, repeats))
                bwd = (best_ms(lambda g=g, w=weight: g @ w, calls, repeats),
                       best_ms(lambda g=g, w=weight: frozen_input_grad(g, w), calls, repeats),
                       best_ms(lambda g=g, w=backward_copy: w.backward(g), calls, repeats))
                print(f"| {out_features} x {in_features} ({label}) | {n} | {' / '.join(f'{t:.2f}' for t in fwd)} | "
                      f"{fwd[1] / fwd[2]:.2f}x | {' / '.join(f'{t:.2f}' for t in bwd)} | {bwd[1] / bwd[2]:.2f}x |",
                      flush=True)


def matmul_attention(q, k, v, scale: float):
    """Causal attention with explicit scores (grouped-query: keys and values repeated per group)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    length = q.shape[2]
    mask = torch.ones(length, length, dtype=torch.bool).triu(1)
    return scores.masked_fill(mask, float("-inf")).softmax(-1) @ v


class FlashForwardBlockedBackward(torch.autograd.Function):
    """The packed attention node's attention alone: flash forward, the blocked matmul backward."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        from fine_tuning_llms.engine.kernels.attention import _matmul_backward

        q, k, v, out, lse = ctx.saved_tensors
        grad_q, grad_k, grad_v = torch.empty_like(q[0]), torch.zeros_like(k[0]), torch.zeros_like(v[0])
        _matmul_backward(grad[0], q[0], k[0], v[0], out[0], lse[0], ctx.scale, grad_q, grad_k, grad_v)
        return grad_q[None], grad_k[None], grad_v[None], None


def attention(lengths: list[int], calls: int, repeats: int, heads: int = 9, kv_heads: int = 3, dim: int = 64) -> None:
    from fine_tuning_llms.engine.kernels.attention import MATMUL_BACKWARD_MIN

    scale = dim ** -0.5
    kinds = {
        f"flash fp32 (used below {MATMUL_BACKWARD_MIN})": (torch.float32, lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=True)),
        f"flash fp32, blocked backward (used from {MATMUL_BACKWARD_MIN})": (
            torch.float32, lambda q, k, v: FlashForwardBlockedBackward.apply(q, k, v, scale)),
        "flash bf16": (torch.bfloat16, lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=True)),
        "matmul-based fp32": (torch.float32, lambda q, k, v: matmul_attention(q, k, v, scale)),
        "matmul-based bf16": (torch.bfloat16, lambda q, k, v: matmul_attention(q, k, v, scale)),
    }
    print(f"| piece length | {' | '.join(kinds)} |  (forward + backward, ms per layer; {heads}/{kv_heads} heads of {dim})")
    print("|---|" + "---|" * len(kinds))
    for length in lengths:
        cells = []
        for dtype, fn in kinds.values():
            q = torch.randn(1, heads, length, dim, dtype=dtype, requires_grad=True)
            k = torch.randn(1, kv_heads, length, dim, dtype=dtype, requires_grad=True)
            v = torch.randn(1, kv_heads, length, dim, dtype=dtype, requires_grad=True)
            grad = torch.randn(1, heads, length, dim, dtype=dtype)

            def step(q=q, k=k, v=v, fn=fn, grad=grad):
                fn(q, k, v).backward(grad)

            cells.append(best_ms(step, calls, repeats))
        print(f"| {length} | " + " | ".join(f"{ms:.1f} ms" for ms in cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--matmuls", action="store_true", help="only the packed vs plain matmuls")
    parser.add_argument("--attention", action="store_true", help="only the attention kernels")
    parser.add_argument("--rows", default="300,900", help="token rows of the matmuls")
    parser.add_argument("--lengths", default="256,384,512,768,1024", help="conversation lengths for attention")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="matmul dtype")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    both = not (args.matmuls or args.attention)
    if args.matmuls or both:
        matmuls([int(n) for n in args.rows.split(",")], getattr(torch, args.dtype), args.calls, args.repeats)
    if args.attention or both:
        attention([int(n) for n in args.lengths.split(",")], args.calls, args.repeats)


if __name__ == "__main__":
    main()

"""Training kernels: a LoRA linear layer, packed attention, an RMSNorm, and the vocabulary head with
the loss, each as one autograd node.

PEFT computes a LoRA layer as a chain of modules: the base linear, a cast of the input to the
adapter's fp32, autocast casting it back (and A, B) to bf16, two thin matmuls, a scale, an add
and a cast of the result; autograd records a node for each and replays them backwards. With
all-linear LoRA on a 30-layer model that is 210 such chains per step; on this 2-core CPU their
fixed costs were ~19% of a training step (measured: 1.57 s vs 1.28 s per step with adapters
disabled), far more than the adapters' arithmetic (~1%). With this node (and the RMSNorm one
below) a step was 1.11x faster end to end; with all the nodes of this module it is 1.13-1.23x
across runs (`benchmarks/bench_train.py --levers`, --fused_kernels false vs on).

Here the same maths is one ``torch.autograd.Function`` with a hand-written backward: three
matmuls forward (the LoRA product added in place), five backward, no full-size casts. The
parameters are PEFT's own tensors (A, B in fp32, updated by the optimizer as usual), so
checkpoints and saved adapters are unchanged; only the compute path is. It is used while
training with gradients on plain LoRA layers (no DoRA, no dropout, unquantised float base
weights); everything else, eval and generation included, keeps PEFT's code.

The vocabulary head and the cross-entropy become one node too (``HeadCrossEntropyFunction``):
the frozen head's logits are made a chunk of rows at a time, the loss and its gradient
(softmax - one-hot, pushed back through the head) are computed at once, and only the (N, hidden)
gradient is kept for backward. The (N, vocabulary) logits never exist whole, in fp32 or at all:
1.04x a step here, and with a 128k vocabulary (Llama 3) a step's peak memory drops from 7.8 GB to
1.0 GB (`benchmarks/bench_head_memory.py`).

Attention in packed rows becomes one node on CPU (``PackedAttentionFunction``): rotary embedding
of q and k, the per-conversation causal attention (the CPU flash kernel, called directly, forward
and backward, in fp32 as ``packed_attention.py`` explains) and the layout changes around it. The
autograd chain it replaces (views, transposes, rotate_half's concatenations, casts, a split and a
concatenation per layer) took enough that the node makes a step 1.035x faster; q and k are also
rotated in fp32 instead of bf16.

On CPU the LoRA layers' frozen base weights are also reordered once, while training, into the
blocked layout oneDNN computes with (``PackedWeight``): a plain matmul reorders its weight again
at every call. 1.04-1.08x a step here in in-process A/Bs (1.03x, the median of 9 pairs of whole
runs, which this VM's noise blurs), for two extra copies of those weights, freed when training
ends; skipped when they would not fit comfortably in memory.

RMSNorm gets the same treatment (``RMSNormFunction``): transformers' LlamaRMSNorm is eight
autograd ops forward and about twelve backward, 2.1 ms per call on a 617-token row here; as one
node with a hand-written backward it is 0.6 ms, and a Llama model calls it 2 x layers + 1 times.

    patched = use_fused_kernels(peft_model)   # number of layers that will take these paths
"""
from __future__ import annotations

import logging
import types
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


class LoraLinearFunction(torch.autograd.Function):
    """x: (N, in) in the compute dtype; weight: frozen (out, in); lora_a: (r, in); lora_b: (out, r);
    packed: None, or ``PackedWeight`` copies of ``weight`` for the two frozen-weight matmuls."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scaling: float, packed=None):
        dtype = x.dtype
        a = lora_a.to(dtype)
        b = lora_b.to(dtype)
        xa = x @ a.t()                                        # (N, r)
        y = packed.forward(x) if packed is not None else F.linear(x, weight.to(dtype))  # (N, out) base
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
        grad_xa = grad_y @ b                                  # (N, r)
        grad_a = (grad_xa.t() @ x).mul_(s)                    # (r, in)
        grad_b = (grad_y.t() @ xa).mul_(s)                    # (out, r)
        grad_x = None
        if ctx.needs_input_grad[0]:
            if ctx.packed is not None:                        # (N, in) through the frozen base
                grad_x = ctx.packed.backward(grad_y)
            else:
                grad_x = grad_y @ weight.to(grad_y.dtype)
            grad_x.addmm_(grad_xa, a, alpha=s)                # + s * (grad_y B) A
        return grad_x, None, grad_a.to(ctx.param_dtypes[0]), grad_b.to(ctx.param_dtypes[1]), None, None


class PackedWeight:
    """A frozen CPU weight reordered once into oneDNN's blocked layout, for ``x @ W.T`` (forward)
    and ``g @ W`` (input gradient).

    Every plain CPU matmul reorders its weight operand into that layout again, each call; for the
    ~600-row products of a training step that is several percent of the matmul time (measured per
    SmolLM2 shape: -2% to +12% in bf16, 13-16% in fp32). The two copies cost 2 x the frozen weight's size
    while training; ``release_packed_weights`` frees them when training ends. They are made from
    the weight as it is when first needed, so they are only valid while the weight is frozen and
    unchanged, which is what LoRA training guarantees (``key`` also catches a replaced tensor)."""

    ROWS_HINT = 512  # oneDNN picks the blocking for about this many rows; any row count works

    def __init__(self, weight: torch.Tensor):
        w = weight.detach()
        self.key = _weight_key(weight)
        self.nbytes = packed_bytes(w)
        self._forward = torch.ops.mkldnn._reorder_linear_weight(w, self.ROWS_HINT)               # for x @ W.T
        self._backward = torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), self.ROWS_HINT)  # g @ W

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self._forward, None, "none", [], "")

    def backward(self, grad):
        return torch.ops.mkldnn._linear_pointwise(grad, self._backward, None, "none", [], "")


def packed_bytes(weight: torch.Tensor) -> int:
    """Memory the two packed copies of ``weight`` take."""
    return 2 * weight.numel() * weight.element_size()


def _weight_key(weight: torch.Tensor) -> tuple:
    return weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape)


def weight_packing_available(dtype: torch.dtype) -> bool:
    """Whether this torch build can pack CPU weights for oneDNN in ``dtype``."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
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


def release_packed_weights(model: torch.nn.Module) -> int:
    """Free the packed weight copies made while training; returns the bytes released."""
    freed = 0
    for module in model.modules():
        packed = module.__dict__.pop("_lora_kernel_packed", None)
        if packed is not None:
            freed += packed.nbytes
    return freed


class RMSNormFunction(torch.autograd.Function):
    """y = weight * (x / rms(x)) with the statistics in fp32, as LlamaRMSNorm; gradient for x only
    (the norm weights are frozen under LoRA)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.to(torch.promote_types(x.dtype, torch.float32), copy=True)  # a copy: it is scaled in place
        inv_rms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))   # (..., 1)
        ctx.save_for_backward(x, weight, inv_rms)
        return weight * xf.mul_(inv_rms).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, inv_rms = ctx.saved_tensors
        normed = x.to(inv_rms.dtype) * inv_rms
        grad_normed = (grad_y * weight).to(inv_rms.dtype)
        # d/dx of x * rsqrt(mean(x^2)): (g - n * mean(g * n)) / rms
        dot = (grad_normed * normed).mean(-1, keepdim=True)
        grad_x = grad_normed.sub_(normed.mul_(dot)).mul_(inv_rms)
        return grad_x.to(x.dtype), None, None


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
            logits = hidden[rows] @ weight.t()                         # (c, V) in the compute dtype
            log_probs = torch.log_softmax(logits, dim=-1, dtype=stats)  # cast and all in one pass (logsumexp is several)
            total -= log_probs.gather(1, target[:, None]).sum()
            grad_logits = log_probs.exp_()                            # softmax, in place
            grad_logits[torch.arange(len(target), device=target.device), target] -= 1.0
            torch.mm(grad_logits.to(dtype), weight, out=grad_hidden[rows])
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None


def head_chunk_rows(vocab_size: int, budget: int = 1 << 24) -> int:
    """Rows per chunk so that one chunk of fp32 logits stays near 64 MB whatever the vocabulary."""
    return max(1, budget // vocab_size)


def head_for_fused_loss(model: torch.nn.Module):
    """(decoder, head weight) of a PEFT-wrapped or plain Llama causal LM whose head this node
    reproduces (a bias-free frozen Linear, no logit scaling), else None."""
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(lm, LlamaForCausalLM):
        return None
    head = lm.get_output_embeddings()
    if (type(head) is not torch.nn.Linear or head.bias is not None or head.weight.requires_grad
            or not head.weight.dtype.is_floating_point):
        return None  # a trained head (new tokens) or a wrapped/quantised one keeps the model's own path
    return lm.model, head.weight


_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _rotate(x, cos, sin):
    """Rotary embedding, x * cos + rotate_half(x) * sin, for x: (heads, T, D); a new tensor."""
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out


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
        dtype = q.dtype
        stats = torch.promote_types(dtype, torch.float32)
        length, dim = q.shape[0], cos.shape[-1]
        cos, sin = cos.to(stats), sin.to(stats)

        def heads_first(x, n):  # (T, n * D) -> (n, T, D), a strided view of the fp32 copy
            return x.view(length, n, dim).to(stats).transpose(0, 1)

        q, k, v = _rotate(heads_first(q, heads), cos, sin), _rotate(heads_first(k, kv_heads), cos, sin), \
            heads_first(v, kv_heads)
        outs, lses = [], []
        for qi, ki, vi in zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1)):
            out, lse = _flash(qi[None], ki[None], vi[None], 0.0, True, scale=scale)
            outs.append(out)
            lses.append(lse)
        ctx.save_for_backward(q, k, v, cos, sin, *outs, *lses)
        ctx.meta = (lengths, heads, kv_heads, scale, dtype)
        # (1, heads, L, D) pieces -> (T, heads * D)
        return torch.cat([o[0].transpose(0, 1) for o in outs]).view(length, heads * dim).to(dtype)

    @staticmethod
    def backward(ctx, grad):
        lengths, heads, kv_heads, scale, dtype = ctx.meta
        q, k, v, cos, sin = ctx.saved_tensors[:5]
        pieces = len(lengths)
        outs, lses = ctx.saved_tensors[5:5 + pieces], ctx.saved_tensors[5 + pieces:]
        length, dim = grad.shape[0], cos.shape[-1]
        grad = grad.reshape(length, heads, dim).to(q.dtype).transpose(0, 1)  # (heads, T, D)
        grads = [_flash_backward(gi[None], qi[None], ki[None], vi[None], out, lse, 0.0, True, scale=scale)
                 for gi, qi, ki, vi, out, lse in zip(grad.split(lengths, 1), q.split(lengths, 1),
                                                     k.split(lengths, 1), v.split(lengths, 1), outs, lses)]
        grad_q, grad_k, grad_v = (torch.cat([g[i][0] for g in grads], 1) for i in range(3))  # (n, T, D)
        grad_q, grad_k = _rotate_backward(grad_q, cos, sin), _rotate_backward(grad_k, cos, sin)

        def tokens_first(x, n):  # (n, T, D) -> (T, n * D) in the compute dtype
            return x.transpose(0, 1).reshape(length, n * dim).to(dtype)

        return (tokens_first(grad_q, heads), tokens_first(grad_k, kv_heads), tokens_first(grad_v, kv_heads),
                None, None, None, None, None, None)


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
    """LlamaAttention.forward, except for a packed row in training with gradients on CPU, where the
    rotary embedding and the per-conversation attention run as one node."""
    from .packed_sdpa import PACKED_SDPA, packed_lengths

    position_ids = kwargs.get("position_ids")
    if (not (self.training and torch.is_grad_enabled()) or cache is not None or position_ids is None
            or hidden_states.shape[0] != 1 or hidden_states.device.type != "cpu" or self.attention_dropout
            or self.config._attn_implementation != PACKED_SDPA or int(position_ids[0, 0]) != 0):
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, cache, **kwargs)
    x = hidden_states[0]
    cos, sin = position_embeddings
    out = PackedAttentionFunction.apply(self.q_proj(x), self.k_proj(x), self.v_proj(x), cos[0], sin[0],
                                        packed_lengths(position_ids),
                                        self.config.num_attention_heads, self.config.num_key_value_heads,
                                        float(self.scaling))
    return self.o_proj(out)[None], None


def _rmsnorm_forward(self, hidden_states):
    """LlamaRMSNorm.forward, except in training with gradients where the fused node runs."""
    if not (self.training and torch.is_grad_enabled()) or self.weight.requires_grad:
        return type(self).forward(self, hidden_states)
    return RMSNormFunction.apply(hidden_states, self.weight, float(self.variance_epsilon))


def _plain_adapter(module) -> str | None:
    """The layer's one active plain-LoRA adapter if this kernel reproduces it exactly, else None."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    if type(module) is not LoraLinear or type(module.base_layer) is not torch.nn.Linear:
        return None  # 8/4-bit base layers and other layer kinds keep PEFT's code
    if module.base_layer.bias is not None or len(module.active_adapters) != 1:
        return None
    name = module.active_adapters[0]
    if (name not in module.lora_A or name in getattr(module, "lora_variant", {})
            or not isinstance(module.lora_dropout[name], torch.nn.Identity)):
        return None  # DoRA and other variants, or dropout (which this kernel does not apply)
    if not module.base_layer.weight.dtype.is_floating_point:
        return None
    return name


def _kernel_forward(self, x, *args, **kwargs):
    """PEFT Linear.forward, except in training with gradients where the fused kernel runs."""
    name = self._lora_kernel_adapter
    if (args or kwargs or not (self.training and torch.is_grad_enabled()) or self.disable_adapters or self.merged
            or list(self.active_adapters) != [name]):
        return type(self).forward(self, x, *args, **kwargs)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    elif self.base_layer.weight.dtype == self.lora_A[name].weight.dtype:
        dtype = x.dtype
    else:  # e.g. bf16 base without autocast: PEFT runs LoRA in fp32 there; keep its code
        return type(self).forward(self, x, *args, **kwargs)
    weight = self.base_layer.weight
    with torch.autocast(device_type, enabled=False):
        y = LoraLinearFunction.apply(x.reshape(-1, x.shape[-1]).to(dtype), weight, self.lora_A[name].weight,
                                     self.lora_B[name].weight, float(self.scaling[name]),
                                     _packed_weight(self, weight, dtype))
    return y.view(*x.shape[:-1], y.shape[-1])


def _available_memory() -> int | None:
    """MemAvailable of this machine in bytes (Linux), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def use_fused_kernels(model: torch.nn.Module, pack_weights: bool = True) -> int:
    """Route every qualifying LoRA linear layer, Llama attention and Llama RMSNorm of ``model``
    through the fused nodes while training; returns how many modules were routed.

    With ``pack_weights`` the LoRA layers' frozen CPU weights are also reordered once for oneDNN
    (``PackedWeight``), unless the two extra copies would take more than a quarter of the memory
    this machine has available."""
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRMSNorm

    patched, lora_layers = 0, []
    for module in model.modules():
        if type(module) is LlamaAttention:  # takes its path only for packed rows (packing on)
            module.forward = types.MethodType(_attention_forward, module)
            patched += 1
            continue
        if type(module) is LlamaRMSNorm:  # exactly this maths (Gemma's norm, for one, scales by 1 + w)
            module.forward = types.MethodType(_rmsnorm_forward, module)
            patched += 1
            continue
        name = _plain_adapter(module)
        if name is None:
            continue
        module._lora_kernel_adapter = name
        module.forward = types.MethodType(_kernel_forward, module)
        lora_layers.append(module)
        patched += 1
    cpu_weights = [m.base_layer.weight for m in lora_layers if m.base_layer.weight.device.type == "cpu"]
    extra = sum(packed_bytes(w) for w in cpu_weights)
    available = _available_memory()
    pack = pack_weights and bool(cpu_weights) and (available is None or extra <= available // 4)
    if pack_weights and cpu_weights and not pack:
        log.info("Packed weights off: their %.1f GB would exceed a quarter of the %.1f GB of memory available",
                 extra / 1e9, available / 1e9)
    for module in lora_layers:
        module._lora_kernel_pack = pack
    return patched

"""The fused training nodes compute exactly what PEFT and transformers compute, and only where they should."""
import importlib
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny import (
    FAMILY_MODELS,
    build_family_model,
    count_applies,
    run_without_gradients,
    save_family_checkpoint,
    with_test_lora,
)
from transformers import AutoModelForCausalLM

from fine_tuning_llms.engine import kernels
from fine_tuning_llms.engine.kernels import (
    HeadCrossEntropyFunction,
    LoraLinearFunction,
    PackedAttentionFunction,
    RMSNormFunction,
    attention,
    guards,
    head_for_fused_loss,
    lora_linear,
    release_packed_weights,
    use_fused_kernels,
    weight_packing_available,
)


def test_backward_matches_numerical_gradients():
    torch.manual_seed(0)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 5, dtype=torch.float64)
    a = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: LoraLinearFunction.apply(x, weight, a, b, 0.7), (x, a, b))


@pytest.mark.parametrize("offset", [None, 0.0, 1.0])  # Llama's form, OLMo-2's, Gemma's
def test_rmsnorm_backward_matches_numerical_gradients(offset):
    torch.manual_seed(0)
    x = torch.randn(4, 6, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(8, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lambda x: RMSNormFunction.apply(x, weight, 1e-6, offset), (x,))


NORM_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "gemma", "gemma2", "gemma3"]


@pytest.mark.parametrize("family", NORM_FAMILIES)
def test_rmsnorm_node_equals_each_familys_norm(family):
    """The node, as the family's norm module routes it, against that module's own forward and autograd."""
    from fine_tuning_llms.engine.kernels.rmsnorm import rmsnorm_forward

    model = build_family_model(family, 64)
    norm = model.model.norm
    torch.manual_seed(0)
    torch.nn.init.normal_(norm.weight)
    norm.requires_grad_(False).train()
    for dtype in (torch.float32, torch.bfloat16):
        norm.to(dtype)
        x = (torch.randn(3, 5, norm.weight.shape[0]) * 3).to(dtype).requires_grad_()
        grad = torch.randn(3, 5, norm.weight.shape[0]).to(dtype)
        expected = type(norm).forward(norm, x)
        (expected_grad,) = torch.autograd.grad(expected, x, grad)
        got = rmsnorm_forward(norm, x)
        (got_grad,) = torch.autograd.grad(got, x, grad)
        assert got.grad_fn is not None and "RMSNormFunction" in type(got.grad_fn).__name__
        torch.testing.assert_close(got, expected, rtol=0, atol=0)  # the same fp32 operations, in order
        tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(got_grad, expected_grad, **tolerance)


def lora_model(model_dir, **lora):
    torch.manual_seed(0)
    return with_test_lora(AutoModelForCausalLM.from_pretrained(model_dir), **lora)


def assert_same_loss_and_grads(result, expected):
    (loss, grads), (expected_loss, expected_grads) = result, expected
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name in expected_grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def loss_and_grads(model, ids):
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.detach(), grads


def test_training_step_equals_peft(tiny_model_dir):
    ids = torch.randint(0, 300, (2, 11))
    model = lora_model(tiny_model_dir)
    peft_loss, peft_grads = loss_and_grads(model, ids)
    layers = model.config.num_hidden_layers
    assert use_fused_kernels(model) == 7 * layers + layers + 2 * layers + 1  # LoRA linears, attention, RMSNorms
    kernel_loss, kernel_grads = loss_and_grads(model, ids)
    torch.testing.assert_close(kernel_loss, peft_loss, rtol=1e-6, atol=1e-6)
    assert kernel_grads.keys() == peft_grads.keys()
    for name in peft_grads:
        torch.testing.assert_close(kernel_grads[name], peft_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_kernel_runs_only_while_training_with_gradients(tiny_model_dir, monkeypatch):
    calls = count_applies(monkeypatch, LoraLinearFunction)
    model = lora_model(tiny_model_dir)
    use_fused_kernels(model)
    ids = torch.randint(0, 300, (1, 9))
    run_without_gradients(model, ids)
    assert calls == []
    with model.disable_adapter():  # adapters off: the base model alone, through PEFT's own path
        without_adapter = model(input_ids=ids).logits
    assert calls == []
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.testing.assert_close(without_adapter, base(input_ids=ids).logits)
    model(input_ids=ids).logits.sum().backward()
    assert len(calls) == 7 * model.config.num_hidden_layers


def lora_layers(model):
    return [m for m in model.modules() if hasattr(m, "_lora_kernel_adapter")]


needs_packing = pytest.mark.skipif(not weight_packing_available(torch.float32), reason="no oneDNN in this torch build")


@needs_packing
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_give_the_plain_matmuls_results(tiny_model_dir, dtype):
    if not weight_packing_available(dtype):
        pytest.skip(f"this CPU cannot pack {dtype}")
    ids = torch.randint(0, 300, (2, 11))
    model = lora_model(tiny_model_dir).to(dtype)
    use_fused_kernels(model, pack_weights=False)
    expected = loss_and_grads(model, ids)
    assert not any(hasattr(m, "_lora_kernel_packed") for m in model.modules())
    use_fused_kernels(model)
    result = loss_and_grads(model, ids)
    layers = lora_layers(model)
    assert all(m._lora_kernel_packed.key[0] == m.base_layer.weight.data_ptr() for m in layers)  # used, not skipped
    if dtype == torch.float32:
        assert_same_loss_and_grads(result, expected)
    else:  # the same bf16 products; only the order of the sums inside the matmul may differ
        torch.testing.assert_close(result[0], expected[0], rtol=1e-2, atol=0)
        for name in expected[1]:
            torch.testing.assert_close(result[1][name], expected[1][name], rtol=5e-2, atol=1e-3, msg=name)
    weights = sum(m.base_layer.weight.numel() * m.base_layer.weight.element_size() for m in layers)
    assert release_packed_weights(model) == weights  # the one (backward) copy per weight
    assert not any(hasattr(m, "_lora_kernel_packed") for m in model.modules())
    assert_same_loss_and_grads(loss_and_grads(model, ids), result)  # packed again on the next step


@needs_packing
def test_packed_weights_follow_a_changed_weight(tiny_model_dir):
    ids = torch.randint(0, 300, (2, 11))
    model = lora_model(tiny_model_dir)
    use_fused_kernels(model)
    loss_and_grads(model, ids)
    layer = lora_layers(model)[0]
    old = layer._lora_kernel_packed
    with torch.no_grad():
        layer.base_layer.weight.mul_(1.5)  # an in-place change bumps the version: the copies are made again
    changed = loss_and_grads(model, ids)
    assert layer._lora_kernel_packed is not old
    release_packed_weights(model)
    for m in lora_layers(model):
        m._lora_kernel_pack = False
    assert_same_loss_and_grads(changed, loss_and_grads(model, ids))


def test_weight_packing_falls_back_when_it_cannot_run(tiny_model_dir, monkeypatch):
    ids = torch.randint(0, 300, (2, 11))
    model = lora_model(tiny_model_dir)
    expected = loss_and_grads(model, ids)

    def unsupported(self, weight):
        raise RuntimeError("mkldnn: unsupported")

    monkeypatch.setattr(kernels.PackedWeight, "__init__", unsupported)
    use_fused_kernels(model)
    assert_same_loss_and_grads(loss_and_grads(model, ids), expected)
    assert not any(m._lora_kernel_pack for m in lora_layers(model))  # not tried again at every call


def test_weight_packing_is_skipped_when_memory_is_short(tiny_model_dir, monkeypatch):
    model = lora_model(tiny_model_dir)
    weights = sum(m.base_layer.weight.numel() * m.base_layer.weight.element_size()
                  for m in model.modules() if hasattr(m, "base_layer") and isinstance(m.base_layer, torch.nn.Linear))
    monkeypatch.setattr(kernels, "_available_memory", lambda: 4 * weights - 1)  # the copies need 1x: over a quarter
    use_fused_kernels(model)
    assert lora_layers(model) and not any(m._lora_kernel_pack for m in lora_layers(model))
    monkeypatch.setattr(kernels, "_available_memory", lambda: 4 * weights)
    use_fused_kernels(model)
    assert all(m._lora_kernel_pack for m in lora_layers(model))


def test_a_frozen_bias_takes_the_node_and_a_trained_one_keeps_peft(tmp_path, monkeypatch):
    folder = save_family_checkpoint(tmp_path / "qwen2", "qwen2")  # q/k/v with biases

    def model_with_biases(**lora):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        torch.manual_seed(0)
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:  # not zero: they must count
                torch.nn.init.normal_(module.bias, std=0.5)
        return with_test_lora(model, **lora)

    ids = torch.randint(0, 300, (2, 11))
    model = model_with_biases()
    peft_loss, peft_grads = loss_and_grads(model, ids)
    calls = count_applies(monkeypatch, LoraLinearFunction)
    use_fused_kernels(model)
    layers = model.config.num_hidden_layers
    assert_same_loss_and_grads(loss_and_grads(model, ids), (peft_loss, peft_grads))
    assert len(calls) == 7 * layers  # q/k/v with their biases too
    calls.clear()
    trained = model_with_biases(bias="all")  # PEFT trains every bias: q/k/v keep its code
    use_fused_kernels(trained)
    loss_and_grads(trained, ids)
    assert len(calls) == 4 * layers


@pytest.mark.parametrize("lora", [dict(lora_dropout=0.1), dict(use_dora=True), dict(lora_bias=True)])
def test_layers_it_cannot_reproduce_keep_peft(tiny_model_dir, lora):
    layers = lora_model(tiny_model_dir).config.num_hidden_layers
    assert use_fused_kernels(lora_model(tiny_model_dir, **lora)) == layers + 2 * layers + 1  # attention and norms only


def test_head_cross_entropy_matches_numerical_gradients_across_chunks():
    torch.manual_seed(0)
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64)
    targets = torch.randint(0, 11, (7,))
    expected = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    for chunk in (1, 3, 7, 100):  # chunk edges must not change the result
        torch.testing.assert_close(HeadCrossEntropyFunction.apply(hidden, weight, targets, chunk), expected)
    assert torch.autograd.gradcheck(lambda h: HeadCrossEntropyFunction.apply(h, weight, targets, 3), (hidden,))


def test_bf16_head_reuses_its_buffers_and_no_result_aliases_them():
    """In bf16 the head node's bf16 logits, fp32 statistics and bf16 gradient live in buffers kept between calls:
    the loss and gradient equal the same maths on fresh tensors, and a later call with other rows
    (a smaller last chunk included) neither grows the buffers nor changes an earlier result."""
    from fine_tuning_llms.engine.kernels import buffers

    torch.manual_seed(0)
    weight = torch.randn(50, 8).bfloat16()
    buffers.release_buffers()

    def run(rows: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        hidden = torch.randn(rows, 8, generator=generator).bfloat16().requires_grad_()
        targets = torch.randint(0, 50, (rows,), generator=generator)
        loss = HeadCrossEntropyFunction.apply(hidden, weight, targets, 4)
        loss.backward()
        logits = (hidden.detach() @ weight.t()).float()  # the node's maths, on fresh tensors
        softmax = logits.softmax(-1)
        softmax[torch.arange(rows), targets] -= 1.0
        expected_grad = softmax.bfloat16() @ weight
        expected = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=1e-4)
        torch.testing.assert_close(hidden.grad, expected_grad, rtol=0.02, atol=0.02)
        return loss.detach().clone(), hidden.grad

    _, first_grad = run(10, 1)
    kept = first_grad.clone()
    pointers = {key: b.data_ptr() for key, b in buffers._buffers.items()}
    assert {key[0] for key in pointers} == {"head_logits", "head_stats", "head_grad"}
    run(7, 2)
    assert {key: b.data_ptr() for key, b in buffers._buffers.items()} == pointers  # no new memory
    assert torch.equal(first_grad, kept)
    assert buffers.release_buffers() == 4 * 50 * (2 + 4 + 2) and buffers._buffers == {}


def packed_row(vocab: int):
    torch.manual_seed(1)
    lengths = [6, 9, 5]
    ids = torch.randint(0, vocab, (1, sum(lengths)))
    labels = ids.clone()
    labels[0, [0, 1, 6, 7, 8, 15]] = -100  # prompts: untrained positions
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    return {"input_ids": ids, "labels": labels, "position_ids": position_ids}  # callers choose use_cache


def test_fused_head_loss_and_gradients_equal_the_logits_path(tiny_model_dir):
    from fine_tuning_llms.engine.trainer import trained_token_loss

    model = lora_model(tiny_model_dir)
    use_fused_kernels(model)
    model.train()
    batch = packed_row(model.config.vocab_size)
    results = []
    for fused in (False, True):
        loss, n, outputs = trained_token_loss(model, batch, fused_head=fused)
        (loss / n).backward()
        assert (outputs is None) == fused
        results.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}))
        model.zero_grad()
    assert_same_loss_and_grads(results[1], results[0])


def test_fused_head_under_bf16_autocast_is_close_to_the_logits_path(tiny_model_dir):
    from fine_tuning_llms.engine.trainer import trained_token_loss

    model = lora_model(tiny_model_dir)
    model.train()
    batch = packed_row(model.config.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, _, _ = trained_token_loss(model, batch)
    fused, _, _ = trained_token_loss(model, batch, fused_head=True, autocast_dtype=torch.bfloat16)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused.detach(), plain.detach(), rtol=1e-3, atol=0)
    fp32, _, _ = trained_token_loss(model, batch, fused_head=True)  # autocast is applied, not ambient
    assert abs(fp32.item() - fused.item()) > 1e-5


def test_trained_or_wrapped_heads_keep_the_model_path(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    assert head_for_fused_loss(model) is not None
    model.get_base_model().lm_head.weight.requires_grad_(True)  # a head being trained needs its own gradient
    assert head_for_fused_loss(model) is None
    saved = lora_model(tiny_model_dir, modules_to_save=["lm_head"])
    assert head_for_fused_loss(saved) is None


def test_fp16_keeps_autograd_cross_entropy(tiny_model_dir, monkeypatch):
    """fp16 would flush small softmax gradients to zero before loss scaling; that path stays autograd's."""
    from fine_tuning_llms.engine.trainer import trained_token_loss

    calls = []
    monkeypatch.setattr(HeadCrossEntropyFunction, "apply", lambda *a: calls.append(1))
    model = lora_model(tiny_model_dir).half()
    model.train()
    batch = packed_row(model.config.vocab_size)
    fused, n, _ = trained_token_loss(model, batch, fused_head=True)
    plain, _, _ = trained_token_loss(model, batch)
    assert calls == [] and fused.dtype == torch.float32
    torch.testing.assert_close(fused.detach(), plain.detach(), rtol=1e-3, atol=0)



@pytest.mark.parametrize("autocast", [False, True])
def test_evaluation_loss_in_head_chunks_equals_the_model_logits(tiny_model_dir, monkeypatch, autocast):
    """Without gradients the loss is made a few rows of logits at a time: the model's own numbers."""
    from fine_tuning_llms.engine import trainer

    monkeypatch.setattr(trainer, "head_chunk_rows", lambda vocab: 4)  # several chunks
    model = lora_model(tiny_model_dir)
    model.eval()
    batch = packed_row(model.config.vocab_size)
    targets = batch["labels"][0, 1:]
    keep = (targets != -100).nonzero().squeeze(1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, n, outputs = trainer.trained_token_loss(model, batch)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits[0]
    expected = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")
    assert outputs is None and n == len(keep) > 8
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-5)
    model.get_base_model().lm_head.weight.requires_grad_(True)  # a trained head: the model's path
    with torch.no_grad():
        assert trainer.trained_token_loss(model, batch)[2] is not None


def attention_inputs(lengths: list[int], heads: int, kv_heads: int, dim: int, dtype=torch.float32):
    """Random q, k, v (tokens, heads * dim) with gradients, and the rotary cos, sin of a packed row
    whose positions restart at each conversation."""
    length = sum(lengths)
    q, k, v = (torch.randn(length, n * dim, dtype=dtype, requires_grad=True) for n in (heads, kv_heads, kv_heads))
    angles = torch.cat([torch.arange(n) for n in lengths])[:, None] * torch.rand(dim // 2, dtype=dtype)
    angles = torch.cat([angles, angles], -1)
    return q, k, v, angles.cos(), angles.sin()


@pytest.mark.parametrize("lengths", [[3, 5, 2], [4, 4, 4, 2, 3, 3]])  # the second has runs of equal length
@pytest.mark.parametrize("backward", ["flash", "blocked matmuls"])
def test_packed_attention_matches_numerical_gradients(backward, lengths, monkeypatch):
    from fine_tuning_llms.engine.kernels import attention

    if backward == "blocked matmuls":  # every conversation, in blocks of 2 query rows (uneven ones too)
        monkeypatch.setattr(attention, "MATMUL_BACKWARD_MIN", 1)
        monkeypatch.setattr(attention, "BACKWARD_BLOCK_ROWS", 2)
    else:
        monkeypatch.setattr(attention, "MATMUL_BACKWARD_MIN", 10**9)
    torch.manual_seed(0)
    heads, kv_heads = 4, 2
    q, k, v, cos, sin = attention_inputs(lengths, heads, kv_heads, 6, torch.float64)
    assert torch.autograd.gradcheck(
        lambda q, k, v: PackedAttentionFunction.apply(q, k, v, cos, sin, lengths, heads, kv_heads, 0.4), (q, k, v))


def test_blocked_attention_backward_equals_the_flash_backward():
    """Lengths either side of the threshold, grouped and plain heads, head dims of Llama-family models."""
    from fine_tuning_llms.engine.kernels import attention

    torch.manual_seed(0)
    for heads, kv_heads, dim, lengths in [(9, 3, 64, [500, 70, 1, 200]), (4, 4, 32, [383, 384, 450]), (8, 2, 128, [400])]:
        assert max(lengths) >= attention.MATMUL_BACKWARD_MIN
        q, k, v, cos, sin = attention_inputs(lengths, heads, kv_heads, dim)
        upstream = torch.randn(sum(lengths), heads * dim)
        grads, blocked_calls = [], []
        for threshold in (10**9, attention.MATMUL_BACKWARD_MIN):  # flash for every piece, then the blocked one
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(attention, "MATMUL_BACKWARD_MIN", threshold)
                calls = []
                patch.setattr(attention, "_matmul_backward",
                              lambda *a, _f=attention._matmul_backward, _c=calls: _c.append(1) or _f(*a))
                out = PackedAttentionFunction.apply(q, k, v, cos, sin, lengths, heads, kv_heads, dim ** -0.5)
                grads.append(torch.autograd.grad(out, (q, k, v), upstream))
                blocked_calls.append(len(calls))
        assert blocked_calls == [0, sum(n >= attention.MATMUL_BACKWARD_MIN for n in lengths)]
        for blocked, flash in zip(grads[1], grads[0]):
            torch.testing.assert_close(blocked, flash, rtol=1e-5, atol=1e-5 * float(flash.abs().max()))


def test_equal_length_runs():
    from fine_tuning_llms.engine.kernels.attention import equal_length_runs

    assert equal_length_runs([5, 5, 5, 3, 3, 7, 5]) == [(0, 5, 3), (15, 3, 2), (21, 7, 1), (28, 5, 1)]
    assert equal_length_runs([256] * 4) == [(0, 256, 4)]
    assert equal_length_runs([1]) == [(0, 1, 1)]


def test_runs_of_equal_conversations_give_each_conversations_own_result():
    """A run of equal-length conversations goes to the kernels as one batch: the output and the
    gradients equal the node's on each conversation alone, bit for bit (flash and blocked backward)."""
    torch.manual_seed(0)
    for heads, kv_heads, dim, lengths in [(9, 3, 64, [256] * 4), (9, 3, 64, [400, 400, 100]),
                                          (4, 2, 16, [5, 5, 5, 3, 3, 7])]:
        scale = dim ** -0.5
        q, k, v, cos, sin = attention_inputs(lengths, heads, kv_heads, dim)
        upstream = torch.randn(sum(lengths), heads * dim)
        out = PackedAttentionFunction.apply(q, k, v, cos, sin, lengths, heads, kv_heads, scale)
        grads = torch.autograd.grad(out, (q, k, v), upstream)
        start = 0
        for n in lengths:
            rows = slice(start, start + n)
            start += n
            alone = [x.detach()[rows].clone().requires_grad_() for x in (q, k, v)]
            out_alone = PackedAttentionFunction.apply(*alone, cos[rows], sin[rows], [n], heads, kv_heads, scale)
            assert torch.equal(out[rows], out_alone)
            for together, by_itself in zip(grads, torch.autograd.grad(out_alone, alone, upstream[rows])):
                assert torch.equal(together[rows], by_itself)


def packed_attention_model(model_dir, **lora):
    from fine_tuning_llms.engine.kernels.packed_sdpa import register_packed_attention

    model = lora_model(model_dir, **lora)
    model.base_model.model.set_attn_implementation(register_packed_attention())
    return model


def test_packed_attention_node_equals_transformers_in_a_training_step(tiny_model_dir, monkeypatch):
    from fine_tuning_llms.engine.trainer import trained_token_loss

    calls = count_applies(monkeypatch, PackedAttentionFunction)
    model = packed_attention_model(tiny_model_dir)
    model.train()
    batch = packed_row(model.config.vocab_size)
    results = []
    for fused in (False, True):
        if fused:
            use_fused_kernels(model)
        loss, n, _ = trained_token_loss(model, batch)
        (loss / n).backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}))
        model.zero_grad()
    assert len(calls) == model.config.num_hidden_layers  # every layer took the node, once
    assert_same_loss_and_grads(results[1], results[0])


def test_packed_attention_node_only_for_packed_training_rows(tiny_model_dir, monkeypatch):
    calls = count_applies(monkeypatch, PackedAttentionFunction)
    batch = packed_row(300)
    batch.pop("labels")
    model = packed_attention_model(tiny_model_dir)
    use_fused_kernels(model)
    model.eval()
    with torch.no_grad():
        model(**batch)
        model.generate(batch["input_ids"][:, :5], max_new_tokens=2, do_sample=False)
    model.train()
    model(input_ids=torch.randint(0, 300, (2, 7)), use_cache=False).logits.sum().backward()  # two rows
    model(**batch).logits.sum().backward()  # a KV cache is being filled: transformers' path keeps it right
    plain = lora_model(tiny_model_dir)  # attention left at sdpa (packing off): its own path
    use_fused_kernels(plain)
    plain.train()
    plain(**batch, use_cache=False).logits.sum().backward()
    assert calls == []
    model(**batch, use_cache=False).logits.sum().backward()
    assert len(calls) == model.config.num_hidden_layers


def test_weight_packing_is_not_tried_where_the_build_cannot_pack_the_dtype(tiny_model_dir, monkeypatch):
    ids = torch.randint(0, 300, (2, 11))
    model = lora_model(tiny_model_dir)
    expected = loss_and_grads(model, ids)
    built = []
    original = kernels.PackedWeight.__init__
    monkeypatch.setattr(kernels.PackedWeight, "__init__", lambda self, w: built.append(1) or original(self, w))
    monkeypatch.setattr(lora_linear, "weight_packing_available", lambda dtype: False)
    use_fused_kernels(model)
    assert_same_loss_and_grads(loss_and_grads(model, ids), expected)
    assert built == [] and not any(m._lora_kernel_pack for m in lora_layers(model))


# --- guards: tested releases, LlamaAttention's signature, private torch ops ---------------------

def kernel_log(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith(kernels.__name__)]


def routed(model) -> set:
    return {type(m).__name__ for m in model.modules() if "forward" in vars(m)}


@pytest.mark.parametrize("library,version", [("transformers", "5.25.0"), ("transformers", "5.23.1"),
                                             ("peft", "0.22.0"), ("peft", "0.20.1")])
def test_untested_library_releases_route_nothing(tiny_model_dir, monkeypatch, caplog, library, version):
    model = lora_model(tiny_model_dir)
    assert head_for_fused_loss(model) is not None  # the tested release takes the head node
    monkeypatch.setattr(importlib.import_module(library), "__version__", version)
    with caplog.at_level(logging.INFO, logger=kernels.__name__):
        assert use_fused_kernels(model) == 0
    assert routed(model) == set() and lora_layers(model) == []
    (line,) = kernel_log(caplog)
    assert f"{library} {version}" in line and "5.24.x" in line and "0.21.x" in line and "--fused_kernels false" in line
    assert head_for_fused_loss(model) is None  # the head keeps the model's own path too


def test_tested_releases_are_the_installed_ones():
    """TESTED_VERSIONS names the releases this suite runs on: a new install shows up here first."""
    assert guards.untested_versions() == {}


def test_a_changed_attention_signature_routes_nothing(tiny_model_dir, monkeypatch, caplog):
    from transformers.models.llama.modeling_llama import LlamaAttention

    model = lora_model(tiny_model_dir)
    assert guards.attention_signature_matches()

    def reordered(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, **kwargs):
        raise AssertionError("not called")

    monkeypatch.setattr(LlamaAttention, "forward", reordered)
    with caplog.at_level(logging.INFO, logger=kernels.__name__):
        assert use_fused_kernels(model) == 0
    assert routed(model) == set()
    (line,) = kernel_log(caplog)
    assert "LlamaAttention.forward" in line and "--fused_kernels false" in line


def test_a_familys_changed_attention_signature_keeps_only_that_class_off(tmp_path, monkeypatch, caplog):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

    model = with_test_lora(AutoModelForCausalLM.from_pretrained(save_family_checkpoint(tmp_path / "q", "qwen2")))

    def reordered(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, **kwargs):
        raise AssertionError("not called")

    monkeypatch.setattr(Qwen2Attention, "forward", reordered)
    with caplog.at_level(logging.INFO, logger=kernels.__name__):
        use_fused_kernels(model)
    assert routed(model) == {"Qwen2RMSNorm", "Linear"}  # the norms and LoRA layers still take their nodes
    (line,) = [line for line in kernel_log(caplog) if "attention" in line]
    assert line.startswith("Packed attention node off for Qwen2Attention")


def test_head_node_only_for_the_classes_it_reproduces(tiny_model_dir):
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    class ScaledLogitsLlama(LlamaForCausalLM):  # a subclass may make its logits another way
        pass

    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert head_for_fused_loss(LlamaForCausalLM(config).requires_grad_(False)) is not None  # a frozen head
    assert head_for_fused_loss(ScaledLogitsLlama(config).requires_grad_(False)) is None
    assert head_for_fused_loss(LlamaForCausalLM(config)) is None  # a trained head keeps the model's path
    # every family's own class: Gemma-2 soft-caps its logits (its default config), the others make them as
    # Llama does; Gemma-2/3 exactly when their config sets no soft-capping
    for family in FAMILY_MODELS:
        model = build_family_model(family, 64).requires_grad_(False)
        assert (head_for_fused_loss(model) is not None) == (family != "gemma2"), family
    for family, cap in (("gemma2", None), ("gemma3", 30.0)):
        model = build_family_model(family, 64, final_logit_softcapping=cap).requires_grad_(False)
        assert (head_for_fused_loss(model) is not None) == (cap is None), family


class OpsWithout:
    """A torch.ops namespace of a torch build that lacks some ops: looking one of them up fails."""

    def __init__(self, namespace, missing):
        self._namespace, self._missing = namespace, set(missing)

    def __getattr__(self, name):
        if name in self._missing:
            raise AttributeError(f"'_OpNamespace' object has no attribute '{name}'")
        return getattr(self._namespace, name)


def without_ops(monkeypatch, namespace: str, names):
    monkeypatch.setattr(torch.ops, namespace, OpsWithout(getattr(torch.ops, namespace), names))


def test_attention_node_is_not_used_without_the_flash_ops(tiny_model_dir, monkeypatch, caplog):
    from fine_tuning_llms.engine.trainer import trained_token_loss

    calls = count_applies(monkeypatch, PackedAttentionFunction)
    model = packed_attention_model(tiny_model_dir)
    model.train()
    batch = packed_row(model.config.vocab_size)
    layers = model.config.num_hidden_layers
    results = []
    for fused in (False, True):
        if fused:
            without_ops(monkeypatch, "aten", [attention.FLASH_OPS[1]])  # even one missing op: no node
            with caplog.at_level(logging.INFO, logger=kernels.__name__):
                assert use_fused_kernels(model) == 7 * layers + 2 * layers + 1  # LoRA linears and norms only
        loss, n, _ = trained_token_loss(model, batch)
        (loss / n).backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}))
        model.zero_grad()
    assert "LlamaAttention" not in routed(model) and calls == []
    (line,) = kernel_log(caplog)
    assert f"torch.ops.aten.{attention.FLASH_OPS[1]}" in line
    assert_same_loss_and_grads(results[1], results[0])


def test_weight_packing_is_not_used_without_the_onednn_ops(tiny_model_dir, monkeypatch, caplog):
    ids = torch.randint(0, 300, (2, 11))
    model = lora_model(tiny_model_dir)
    expected = loss_and_grads(model, ids)
    without_ops(monkeypatch, "mkldnn", ["_linear_pointwise"])
    assert not weight_packing_available(torch.float32)
    calls = count_applies(monkeypatch, LoraLinearFunction)
    with caplog.at_level(logging.INFO, logger=kernels.__name__):
        use_fused_kernels(model)
    (line,) = kernel_log(caplog)
    assert "torch.ops.mkldnn._linear_pointwise" in line
    assert_same_loss_and_grads(loss_and_grads(model, ids), expected)
    assert calls and not any(m._lora_kernel_pack or hasattr(m, "_lora_kernel_packed") for m in lora_layers(model))


def test_no_private_op_is_bound_at_import():
    """No module of the package holds a torch op object: each is looked up where it is used."""
    modules = [importlib.import_module(f"{kernels.__name__}.{path.stem}")
               for path in Path(kernels.__file__).parent.glob("*.py")]
    op_types = (torch._ops.OpOverloadPacket, torch._ops.OpOverload, torch._ops._OpNamespace)
    bound = [f"{m.__name__}.{name}" for m in modules for name, value in vars(m).items() if isinstance(value, op_types)]
    assert len(modules) >= 6 and bound == []


def test_the_package_imports_on_a_torch_build_without_the_private_ops():
    """In a fresh interpreter where the ops the nodes use are missing, the kernels, the trainer that
    imports them and the fine-tuning lesson import, and use_fused_kernels reports them missing."""
    missing = {"aten": attention.FLASH_OPS,
               "mkldnn": (*lora_linear.PACKING_OPS, "_is_mkldnn_bf16_supported")}
    script = textwrap.dedent(f"""
        import importlib, pkgutil, torch

        class Missing:
            def __init__(self, namespace, names):
                self.namespace, self.names = namespace, names

            def __getattr__(self, name):
                if name in self.names:
                    raise AttributeError(name)
                return getattr(self.namespace, name)

        for namespace, names in {missing!r}.items():
            setattr(torch.ops, namespace, Missing(getattr(torch.ops, namespace), names))
        import fine_tuning_llms.engine.kernels as kernels
        for info in pkgutil.iter_modules(kernels.__path__):
            importlib.import_module(kernels.__name__ + "." + info.name)
        import fine_tuning_llms.engine.trainer
        import fine_tuning_llms.fine_tuning
        from fine_tuning_llms.engine.kernels import attention, lora_linear
        print(attention.flash_ops_missing(), lora_linear.weight_packing_available(torch.float32))
    """)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = [f"torch.ops.aten.{name}" for name in attention.FLASH_OPS]
    assert proc.stdout.strip().splitlines()[-1] == f"{expected!r} False"

"""The 4-bit LoRA node computes what PEFT over bitsandbytes computes on CPU, and runs only where it should."""
import logging

import pytest
import torch
from peft import prepare_model_for_kbit_training
from tiny import (
    assert_as_close_to_fp32_as_peft,
    count_applies,
    loss_and_grads,
    run_without_gradients,
    save_family_checkpoint,
    with_test_lora,
)
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from fine_tuning_llms.engine.kernels import Nf4LoraLinearFunction, buffers, nf4_lora, use_fused_kernels
from fine_tuning_llms.engine.lora import keep_4bit_layers_trainable

bnb = pytest.importorskip("bitsandbytes")
IDS = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(1))  # the same input every run


def quantised(out_features=6, in_features=128, *, dtype=torch.float32, quant_type="nf4", nested=True):
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features, dtype=dtype)
    return bnb.functional.quantize_4bit(weight, blocksize=64, quant_type=quant_type, compress_statistics=nested)


@pytest.mark.parametrize("quant_type, nested", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_dequantisation_is_bitsandbytes_own(quant_type, nested):
    for dtype in (torch.float32, torch.bfloat16):
        packed, state = quantised(48, 256, dtype=dtype, quant_type=quant_type, nested=nested)
        assert torch.equal(nf4_lora.dequantize(packed, state, dtype), bnb.functional.dequantize_4bit(packed, state))
    assert nf4_lora.dequantize_self_check()


def test_forward_and_backward_are_the_dequantised_products_fp32():
    packed, state = quantised()
    weight = bnb.functional.dequantize_4bit(packed, state)
    x = torch.randn(5, 128, requires_grad=True)
    a, b = torch.randn(3, 128, requires_grad=True), torch.randn(6, 3, requires_grad=True)
    y = Nf4LoraLinearFunction.apply(x, packed, state, a, b, 0.7, torch.float32, torch.float32)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, a, b), grad)
    expected_y = x @ weight.t() + 0.7 * (x @ a.t()) @ b.t()
    expected = torch.autograd.grad(expected_y, (x, a, b), grad)
    torch.testing.assert_close(y, expected_y)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def nf4_lora_model(model_dir, *, compute=torch.float32, dtype=torch.float32, **lora):
    torch.manual_seed(0)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, device_map={"": "cpu"},
                                                 dtype=dtype)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    keep_4bit_layers_trainable(model)  # as the train task does: the eval-mode tests below would rewrite the layers
    return with_test_lora(model, **lora)




def nf4_layers(model) -> int:
    return sum(type(m) is bnb.nn.Linear4bit for m in model.modules())


def test_fp32_training_step_equals_peft_over_bitsandbytes(tiny_model_dir, monkeypatch):
    """Without autocast and with an fp32 compute dtype every product is fp32: the node must give
    PEFT's loss and gradients to fp32 rounding."""
    model = nf4_lora_model(tiny_model_dir)
    peft_loss, peft_grads = loss_and_grads(model, IDS, autocast=False)
    layers = model.config.num_hidden_layers
    calls = count_applies(monkeypatch, Nf4LoraLinearFunction)
    assert use_fused_kernels(model) == 7 * layers + layers + 2 * layers + 1  # 4-bit LoRA linears, attention, norms
    node_loss, node_grads = loss_and_grads(model, IDS, autocast=False)
    assert len(calls) == 7 * layers == nf4_layers(model)
    torch.testing.assert_close(node_loss, peft_loss, rtol=1e-6, atol=1e-6)
    assert node_grads.keys() == peft_grads.keys()
    for name in peft_grads:
        torch.testing.assert_close(node_grads[name], peft_grads[name], rtol=1e-4, atol=1e-6, msg=name)




def set_compute_dtype(model, dtype):
    for module in model.modules():
        if type(module) is bnb.nn.Linear4bit:
            module.compute_dtype = dtype


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
def test_bf16_autocast_training_step_is_as_close_to_fp32_as_peft(weights, tiny_model_dir, monkeypatch):
    """Under bf16 autocast (the CPU default; the train task quantises bf16 weights with a bf16 compute
    dtype) the node and PEFT round in bf16 in different places, so neither equals the other; each is
    held to the fp32 step on the same 4-bit weights: the node's gradients must be as close to it as
    PEFT's own bf16 path."""
    model = nf4_lora_model(tiny_model_dir, compute=weights, dtype=weights)
    set_compute_dtype(model, torch.float32)
    fp32_loss, fp32_grads = loss_and_grads(model, IDS, autocast=False)
    set_compute_dtype(model, weights)
    peft_loss, peft_grads = loss_and_grads(model, IDS, autocast=True)
    calls = count_applies(monkeypatch, Nf4LoraLinearFunction)
    use_fused_kernels(model)
    node_loss, node_grads = loss_and_grads(model, IDS, autocast=True)
    assert len(calls) == nf4_layers(model)
    assert all(g.dtype == torch.float32 for g in node_grads.values())
    torch.testing.assert_close(node_loss, fp32_loss, rtol=1e-2, atol=0)
    assert_as_close_to_fp32_as_peft(node_grads, peft_grads, fp32_grads)


def test_node_only_while_training_with_gradients(tiny_model_dir, monkeypatch):
    calls = count_applies(monkeypatch, Nf4LoraLinearFunction)
    model = nf4_lora_model(tiny_model_dir)
    use_fused_kernels(model)
    run_without_gradients(model, torch.randint(0, 300, (1, 9)))
    assert calls == []


@pytest.mark.parametrize("lora", [dict(lora_dropout=0.1), dict(use_dora=True)])
def test_layers_it_cannot_reproduce_keep_peft(tiny_model_dir, lora):
    model = nf4_lora_model(tiny_model_dir, **lora)
    layers = model.config.num_hidden_layers
    assert use_fused_kernels(model) == layers + 2 * layers + 1  # attention and norms only


def test_failed_self_check_routes_no_4bit_layer(tiny_model_dir, monkeypatch, caplog):
    nf4_lora.dequantize_self_check.cache_clear()
    monkeypatch.setattr(nf4_lora, "_c_kernel", lambda state, dtype: (lambda *args: None))  # writes nothing
    model = nf4_lora_model(tiny_model_dir)
    layers = model.config.num_hidden_layers
    try:
        with caplog.at_level(logging.INFO, logger="fine_tuning_llms.engine.kernels"):
            assert use_fused_kernels(model) == layers + 2 * layers + 1
    finally:
        nf4_lora.dequantize_self_check.cache_clear()
    assert sum("4-bit LoRA node off" in r.getMessage() for r in caplog.records) == 1
    assert not any(hasattr(m, "_lora_kernel_adapter") for m in model.modules() if type(m).__name__ == "Linear4bit")


def test_node_keeps_the_input_once_and_reuses_buffers():
    """What the backward keeps per call: the input in the product dtype, not also the fp32 input; the
    dequantised weight goes into the shared buffers, which no result aliases."""
    packed, state = quantised(dtype=torch.bfloat16)
    x = torch.randn(16, 128, requires_grad=True)
    a, b = torch.randn(2, 128, requires_grad=True), torch.randn(6, 2, requires_grad=True)
    buffers.release_buffers()
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        y = Nf4LoraLinearFunction.apply(x, packed, state, a, b, 1.0, torch.bfloat16, torch.bfloat16)
    activations = [t for t in kept if t.shape == (16, 128)]
    assert [t.dtype for t in activations] == [torch.bfloat16]
    assert y.dtype == torch.float32  # bitsandbytes' layer returns the input's dtype
    key = ("dequantize", torch.bfloat16, torch.device("cpu"))
    first, pointer = y.detach().clone(), buffers._buffers[key].data_ptr()
    y.sum().backward()
    assert buffers._buffers[key].data_ptr() == pointer and torch.equal(y.detach(), first)
    assert set(buffers._buffers) == {key}


@pytest.mark.parametrize("family", ["qwen2", "gemma", "phi3"])
def test_other_families_fp32_step_equals_peft(family, tmp_path, monkeypatch):
    """The node is chosen by layer type, whatever the model: Qwen2 (its q/k/v have biases and keep
    PEFT's code), Gemma, Phi-3 (fused qkv and gate_up projections) give PEFT's loss and gradients."""
    model = nf4_lora_model(save_family_checkpoint(tmp_path / family, family))
    peft_loss, peft_grads = loss_and_grads(model, IDS, autocast=False)
    calls = count_applies(monkeypatch, Nf4LoraLinearFunction)
    use_fused_kernels(model)
    node_loss, node_grads = loss_and_grads(model, IDS, autocast=False)
    bias_free = sum(type(m) is bnb.nn.Linear4bit and m.bias is None for m in model.modules())
    assert len(calls) == bias_free > 0
    assert (bias_free < nf4_layers(model)) == (family == "qwen2")
    torch.testing.assert_close(node_loss, peft_loss, rtol=1e-6, atol=1e-6)
    for name in peft_grads:
        torch.testing.assert_close(node_grads[name], peft_grads[name], rtol=1e-4, atol=1e-6, msg=name)

"""4-bit (nf4) LoRA training gets the same gradients whether or not the model ran in eval mode first.

On a CPU with AVX512-BF16, bitsandbytes rewrites a 4-bit layer into an inference-only layout at its
first eval-mode forward without gradients, and then multiplies through an op without a backward.
The train task evaluates before training (packing self-check, held-out loss, answers), so it must
keep that rewrite off (``lora.keep_4bit_layers_trainable``).
"""
import pytest
import torch
from tiny import run_without_gradients
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from fine_tuning_llms.engine.config import Config
from fine_tuning_llms.engine.lora import prepare_peft_model

bnb = pytest.importorskip("bitsandbytes")
IDS = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(1))


def nf4_model(model_dir):
    torch.manual_seed(0)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, device_map={"": "cpu"},
                                                dtype=torch.float32)


def toolkit_nf4_model(model_dir):
    """The model as the train task prepares it: k-bit preparation, then LoRA (B matrices made non-zero)."""
    cfg = Config()
    cfg.model.load_4bit = True
    cfg.train.lora_r = 4
    model, _ = prepare_peft_model(cfg, nf4_model(model_dir), AutoTokenizer.from_pretrained(model_dir))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def grads(model):
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def rewritten_layers(model) -> int:
    return sum(bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False))
               for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))


def test_eval_before_training_leaves_the_gradients_unchanged(tiny_model_dir):
    reference = grads(toolkit_nf4_model(tiny_model_dir))
    model = toolkit_nf4_model(tiny_model_dir)
    run_without_gradients(model, IDS)  # what the self-check, held-out loss and answers do before training
    assert rewritten_layers(model) == 0
    after_eval = grads(model)
    assert reference.keys() == after_eval.keys() and len(reference) > 0
    for name, grad in reference.items():
        assert torch.equal(grad, after_eval[name]), name


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="the inference layout exists only on CPUs with AVX512-BF16")
def test_without_the_guard_bitsandbytes_drops_the_gradients_here(tiny_model_dir):
    """Why the guard exists: bitsandbytes' own behaviour on this CPU (if this starts failing, a
    bitsandbytes release fixed it and ``keep_4bit_layers_trainable`` may go)."""
    from peft import prepare_model_for_kbit_training
    from tiny import with_test_lora

    def plain_peft():
        model = prepare_model_for_kbit_training(nf4_model(tiny_model_dir), use_gradient_checkpointing=False)
        return with_test_lora(model, r=4)

    reference = grads(plain_peft())
    model = plain_peft()
    run_without_gradients(model, IDS)
    assert rewritten_layers(model) > 0
    with pytest.warns(UserWarning, match="autograd kernel was not registered"):
        after_eval = grads(model)
    assert max((reference[n] - after_eval[n]).abs().max() / reference[n].abs().max() for n in reference) > 0.1

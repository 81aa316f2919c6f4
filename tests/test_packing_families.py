"""Packing is exact on every model family and attention implementation we support, or not used.

Tiny random models of each family's own config (Llama, Qwen2/3, Mistral, Gemma 1/2/3, Phi-3,
OLMo-2), each with every attention implementation it runs on CPU: (a) packed loss equals
one-by-one loss on the training and the held-out paths; (b) 4 float32 training steps with the
defaults (packing, trained-logits-only, fused kernels) give the same per-step and held-out losses
as the plain way; (c) --gradient_checkpointing gives the same loss and gradients while keeping less.
Also: the fused kernels touch only the modules whose maths they copy (the attention node only where
no sliding window cuts a conversation), and a packing that leaks is caught by the self-check and
replaced by padding.
"""
import csv
import json
import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import FAMILY_ATTENTION, FAMILY_MODELS, SAMPLE_CONVERSATIONS, save_family_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

from fine_tuning_llms.cli import main
from fine_tuning_llms.engine import batching as packing
from fine_tuning_llms.engine import chat_format as chat
from fine_tuning_llms.engine.kernels import head_for_fused_loss, use_fused_kernels

PAIRS = [(family, attn) for family in FAMILY_MODELS for attn in FAMILY_ATTENTION[family]]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: save_family_checkpoint(root / family, family) for family in FAMILY_MODELS}


@pytest.fixture(scope="module")
def examples(family_dirs):
    tok = AutoTokenizer.from_pretrained(family_dirs["llama"])
    encoded = [chat.encode_conversation(tok, record["messages"]) for record in SAMPLE_CONVERSATIONS]
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]


def lora_model(folder, attn):
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn, dtype=torch.float32)
    # random B (not zeros): the adapters change the outputs, so their kernels are really exercised
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


@pytest.mark.parametrize("family,attn", PAIRS)
def test_packed_loss_equals_one_by_one(family_dirs, examples, family, attn):
    model = lora_model(family_dirs[family], attn)
    use_fused_kernels(model)
    longest = max(len(e["input_ids"]) for e in examples)
    window = getattr(model.config, "sliding_window", None)
    assert window is None or longest > window  # the windowed layers really differ from full attention
    decision = packing.choose_layout(model, examples, enabled=True, fused_head=True, trained_logits_only=True)
    assert decision.packed, decision.as_dict()
    check = decision.check
    assert check.tolerance == 1e-5 and check.rel_diff <= 1e-5
    assert check.attention == ("packed_sdpa" if attn == "sdpa" else attn)


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_fused_kernels_touch_only_what_they_reproduce(family_dirs, family):
    model = lora_model(family_dirs[family], FAMILY_ATTENTION[family][-1])
    use_fused_kernels(model)
    routed = {type(m).__name__ for m in model.modules() if "forward" in vars(m)}
    # attention where it is Llama's but for a sliding window and the q/k/v projections (q/k norms, Phi-3's
    # fused qkv), every family's RMSNorm (Llama's, OLMo-2's and Gemma's forms); Gemma-2's attention
    # (soft-capping) keeps its own code; plain LoRA linears (the same in every family) take the LoRA node
    attention = {"llama": "LlamaAttention", "mistral": "MistralAttention", "qwen2": "Qwen2Attention",
                 "qwen3": "Qwen3Attention", "gemma": "GemmaAttention", "gemma3": "Gemma3Attention",
                 "olmo2": "Olmo2Attention", "phi3": "Phi3Attention"}
    norm = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "phi3": "Phi3",
            "olmo2": "Olmo2", "gemma": "Gemma", "gemma2": "Gemma2", "gemma3": "Gemma3"}[family] + "RMSNorm"
    assert routed == {"Linear", norm, *([attention[family]] if family in attention else [])}
    # the head node: every family whose causal LM makes its logits as Llama's does (Gemma-2 soft-caps them)
    assert (head_for_fused_loss(model) is not None) == (family != "gemma2")


@pytest.mark.parametrize("family,window,node", [
    ("mistral", None, True), ("mistral", 4096, True), ("mistral", 16, False),
    ("qwen2", None, True), ("qwen2", 16, False), ("qwen3", None, True), ("qwen3", 16, False),
    ("gemma3", 4096, True), ("gemma3", 16, False), ("olmo2", None, True), ("phi3", None, True),
    ("phi3", 16, False)])
def test_the_attention_node_runs_where_no_sliding_window_cuts_a_conversation(examples, monkeypatch, tmp_path,
                                                                             family, window, node):
    if family.startswith("qwen") and window is not None:  # Qwen windows only the layers its config marks sliding
        overrides = {"use_sliding_window": True, "sliding_window": window, "max_window_layers": 0}
    else:  # Mistral's window is the config's; Gemma-3's tiny test model has only sliding layers
        overrides = {"sliding_window": window} if family in ("mistral", "gemma3", "phi3") else {}
    folder = save_family_checkpoint(tmp_path / family, family, **overrides)
    assert_attention_node_equals_the_plain_way(folder, examples, monkeypatch, node)


def test_a_partial_rotary_embedding_keeps_the_models_attention(examples, monkeypatch, tmp_path):
    folder = save_family_checkpoint(tmp_path / "phi3", "phi3", partial_rotary_factor=0.5)  # Phi-4-mini rotates 3/4
    assert_attention_node_equals_the_plain_way(folder, examples, monkeypatch, node=False)


def assert_attention_node_equals_the_plain_way(folder, examples, monkeypatch, node: bool):
    """A packed row's loss and gradients with the fused kernels equal the plain path's; the attention
    node ran on every layer (``node``) or on none."""
    from tiny import count_applies

    from fine_tuning_llms.engine.kernels import PackedAttentionFunction

    batch = packing.PackingCollator()(examples[:4])
    assert max(packing.packed_lengths(batch["position_ids"])) > 16  # a 16-token window cuts these conversations
    calls, results = count_applies(monkeypatch, PackedAttentionFunction), []
    for fused in (False, True):
        torch.manual_seed(0)
        model = lora_model(folder, "sdpa")
        if fused:
            use_fused_kernels(model)
        assert packing.choose_layout(model, examples, enabled=True, fused_head=fused).packed
        calls.clear()  # the self-check's own steps
        results.append(saved_bytes_and_grads(model, batch))
    assert len(calls) == (model.config.num_hidden_layers if node else 0)
    (loss, grads, _), (fused_loss, fused_grads, _) = results
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=0)
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


def block_diagonal(position_ids):
    sequence = (position_ids[0] == 0).cumsum(0)                                        # (T,)
    same = sequence[:, None] == sequence[None, :]
    return (same & torch.ones_like(same).tril())[None, None]                           # (1, 1, T, T)


LEAKS = {
    # the collator before issue 17: a boolean block-diagonal 4-D mask, which eager adds instead of applying
    "bool_4d_mask": lambda batch: {**batch, "attention_mask": block_diagonal(batch["position_ids"])},
    # positions that do not restart: nothing marks where a conversation ends
    "positions": lambda batch: {**batch, "position_ids": torch.arange(batch["input_ids"].shape[1])[None]},
}


@pytest.mark.parametrize("attn,leak", [("eager", "bool_4d_mask"), ("sdpa", "positions")])
def test_a_leaking_packing_fails_the_self_check_and_pads(family_dirs, examples, monkeypatch, caplog, attn, leak):
    original = packing.PackingCollator.__call__
    monkeypatch.setattr(packing.PackingCollator, "__call__", lambda self, ex: LEAKS[leak](original(self, ex)))
    model = lora_model(family_dirs["llama"], attn)
    with caplog.at_level(logging.WARNING, logger="fine_tuning_llms.engine.batching"):
        decision = packing.choose_layout(model, examples, enabled=True)
    assert not decision.packed and decision.check.rel_diff > decision.check.tolerance
    assert model.get_base_model().config._attn_implementation == attn  # the packed path is switched off again
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "--packing false" in warning[0] and "padded" in warning[0]


def run_train(model_dir, data, out, attn, *levers):
    args = ["--task", "train", "--model", str(model_dir), "--dataset_path", str(data), "--output_dir", str(out),
            "--dtype", "float32", "--attn_implementation", attn, "--batch_size", "3", "--max_steps", "4",
            "--logging_steps", "1", "--save_steps", "100", "--lr", "5e-3", "--lora_r", "4", "--eval_ratio", "0.25",
            "--eval_answers", "0", *levers]
    assert main(args) == 0
    with open(out / "training_log.csv", newline="") as fh:
        step_losses = [float(r["loss"]) for r in csv.DictReader(fh) if r["loss"]]
    metrics = json.loads((out / "final_model" / "metrics.json").read_text())
    return step_losses, metrics


@pytest.mark.parametrize("family,attn", PAIRS)
def test_training_with_the_defaults_equals_the_plain_way(family_dirs, family, attn, write_jsonl, tmp_path):
    data = write_jsonl(SAMPLE_CONVERSATIONS * 4)
    fast, fast_metrics = run_train(family_dirs[family], data, tmp_path / "fast", attn)
    plain, plain_metrics = run_train(family_dirs[family], data, tmp_path / "plain", attn, "--packing", "false",
                                     "--trained_logits_only", "false", "--fused_kernels", "false")
    assert fast_metrics["batches"]["packed"] and not plain_metrics["batches"]["packed"]
    assert len(fast) == len(plain) == 4
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(plain), rtol=1e-5, atol=0)
    for key in ("eval_loss_before", "eval_loss_after"):
        torch.testing.assert_close(fast_metrics[key], plain_metrics[key], rtol=1e-5, atol=0)


def saved_bytes_and_grads(model, batch):
    """Loss, gradients and the bytes autograd saved for the backward, of one packed training row."""
    from fine_tuning_llms.engine.trainer import trained_token_loss

    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, n, _ = trained_token_loss(model, batch, fused_head=True)
    (loss / n).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, sum(saved)


@pytest.mark.parametrize("family,attn", PAIRS)
def test_gradient_checkpointing_gives_the_same_gradients_keeping_less(family_dirs, examples, family, attn):
    from fine_tuning_llms.engine.lora import enable_gradient_checkpointing

    batch = packing.PackingCollator()(examples[:4])
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = lora_model(family_dirs[family], attn)
        use_fused_kernels(model)
        if checkpointed:
            enable_gradient_checkpointing(model)
        assert packing.choose_layout(model, examples, enabled=True, fused_head=True).packed  # self-check passes
        results.append(saved_bytes_and_grads(model, batch))
    (loss, grads, kept), (ck_loss, ck_grads, ck_kept) = results
    torch.testing.assert_close(ck_loss, loss, rtol=1e-6, atol=0)
    assert ck_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(ck_grads[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert ck_kept < kept / 2  # the layers' activations were recomputed, not kept


def test_training_with_gradient_checkpointing_equals_training_without(family_dirs, write_jsonl, tmp_path):
    data = write_jsonl(SAMPLE_CONVERSATIONS * 4)
    plain, plain_metrics = run_train(family_dirs["llama"], data, tmp_path / "plain", "sdpa")
    checkpointed, metrics = run_train(family_dirs["llama"], data, tmp_path / "ckpt", "sdpa", "--gradient_checkpointing")
    assert metrics["batches"]["packed"]
    torch.testing.assert_close(torch.tensor(checkpointed), torch.tensor(plain), rtol=1e-5, atol=0)
    torch.testing.assert_close(metrics["eval_loss_after"], plain_metrics["eval_loss_after"], rtol=1e-5, atol=0)
    assert metrics["memory_plan"]["parts_mb"]["activations"] < plain_metrics["memory_plan"]["parts_mb"]["activations"]

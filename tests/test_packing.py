"""Padding-free packing and trained-positions-only logits give the same loss as the plain way."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from fine_tuning_llms.engine import chat_format as chat
from fine_tuning_llms.engine.batching import PackingCollator, PadCollator

CONVS = [
    [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Two plus two is four."}],
    [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi there, how are you?"},
     {"role": "user", "content": "Fine."}, {"role": "assistant", "content": "Good to hear."}],
    [{"role": "user", "content": "안녕하세요"}, {"role": "assistant", "content": "안녕하세요. 무엇을 도와드릴까요?"}],
]


@pytest.fixture(scope="module")
def model_and_examples(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    examples = []
    for conv in CONVS:
        e = chat.encode_conversation(tok, conv)
        examples.append({"input_ids": e.input_ids, "labels": e.labels})
    return model, tok, examples


def summed_loss(logits, labels):
    """Sum of token losses over trained positions (shifted), and their count."""
    targets = labels[:, 1:]
    keep = targets != chat.IGNORE_INDEX
    return F.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="sum"), int(keep.sum())


def test_packed_row_has_no_mask_and_no_cache():
    """transformers builds per-sequence masks itself only without a mask of ours and without a cache."""
    batch = PackingCollator()([{"input_ids": [5, 6], "labels": [-100, 6]}, {"input_ids": [7, 8, 9], "labels": [7, 8, 9]}])
    assert "attention_mask" not in batch and batch["use_cache"] is False
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, 6, -100, 8, 9]]  # no conversation predicts the next one's first token


def test_packed_loss_equals_sequences_run_alone(model_and_examples):
    model, _, examples = model_and_examples
    with torch.no_grad():
        alone_sum, alone_n = 0.0, 0
        for e in examples:
            ids = torch.tensor([e["input_ids"]])
            s, n = summed_loss(model(input_ids=ids).logits, torch.tensor([e["labels"]]))
            alone_sum, alone_n = alone_sum + s, alone_n + n
        packed = PackingCollator()(examples)
        labels = packed.pop("labels")
        p_sum, p_n = summed_loss(model(**packed).logits, labels)
    assert p_n == alone_n
    torch.testing.assert_close(p_sum / p_n, alone_sum / alone_n, rtol=1e-4, atol=1e-4)


def test_a_cache_would_let_sequences_leak(model_and_examples):
    """Why use_cache=False matters: with a cache transformers does not look for packed sequences and
    the second conversation attends to the first (the ENVIRONMENT.md trap)."""
    model, _, examples = model_and_examples
    packed = PackingCollator()(examples)
    labels = packed.pop("labels")
    with torch.no_grad():
        exact, _ = summed_loss(model(**packed).logits, labels)
        leaky, _ = summed_loss(model(**{**packed, "use_cache": True}).logits, labels)
    assert abs(float(exact) - float(leaky)) > 1e-3


def test_padded_batch_loss_matches_packed(model_and_examples):
    model, tok, examples = model_and_examples
    padded = PadCollator(tok.pad_token_id)(examples)
    packed = PackingCollator()(examples)
    with torch.no_grad():
        pad_labels = padded.pop("labels")
        a, n_a = summed_loss(model(**padded).logits, pad_labels)
        pack_labels = packed.pop("labels")
        b, n_b = summed_loss(model(**packed).logits, pack_labels)
    assert n_a == n_b
    torch.testing.assert_close(a / n_a, b / n_b, rtol=1e-4, atol=1e-4)


def test_trained_logits_only_gives_same_loss(model_and_examples):
    model, _, examples = model_and_examples
    packed = PackingCollator()(examples)
    labels = packed.pop("labels")
    targets = labels[0, 1:]
    keep = (targets != chat.IGNORE_INDEX).nonzero().squeeze(1)
    with torch.no_grad():
        full, n = summed_loss(model(**packed).logits, labels)
        few = model(**packed, logits_to_keep=keep).logits  # (1, N, vocab)
        assert few.shape[1] == n
        part = F.cross_entropy(few[0].float(), targets[keep], reduction="sum")
    torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-5)


def test_packed_sdpa_attention_equals_sequences_run_alone(tiny_model_dir, model_and_examples):
    """The per-conversation attention path gives the masked result, for loss and for gradients."""
    from fine_tuning_llms.engine.kernels.packed_sdpa import register_packed_attention

    _, _, examples = model_and_examples
    masked = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    split = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    split.set_attn_implementation(register_packed_attention())
    results = []
    for model in (masked, split):
        packed = PackingCollator()(examples)
        labels = packed.pop("labels")
        loss_sum, n = summed_loss(model(**packed).logits, labels)
        (loss_sum / n).backward()
        results.append((loss_sum / n, model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)


def test_packed_sdpa_falls_back_for_padded_batches_and_generation(tiny_model_dir, model_and_examples):
    from fine_tuning_llms.engine.kernels.packed_sdpa import register_packed_attention

    reference, tok, examples = model_and_examples
    split = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    split.set_attn_implementation(register_packed_attention())
    padded = PadCollator(tok.pad_token_id)(examples)
    padded.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(split(**padded).logits, reference(**padded).logits, rtol=1e-5, atol=1e-5)
        ids = torch.tensor([examples[0]["input_ids"][:12]])
        a = split.generate(ids, max_new_tokens=5, do_sample=False)
        b = reference.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)


def test_packed_sdpa_runs_cpu_pieces_in_fp32_even_under_autocast():
    """bf16 inputs: each conversation's attention is computed in fp32 (faster backward on CPU and
    more exact), so the result is the fp32 computation rounded once to bf16."""
    from fine_tuning_llms.engine.kernels.packed_sdpa import packed_sdpa_forward

    torch.manual_seed(0)
    lengths = [5, 9, 3]
    q = torch.randn(1, 4, sum(lengths), 8).bfloat16()
    k, v = torch.randn(1, 2, sum(lengths), 8).bfloat16(), torch.randn(1, 2, sum(lengths), 8).bfloat16()
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = packed_sdpa_forward(None, q, k, v, None, scaling=8 ** -0.5, position_ids=position_ids)
    expected, start = [], 0
    for n in lengths:
        piece = slice(start, start + n)
        expected.append(F.scaled_dot_product_attention(
            q[:, :, piece].float(), k[:, :, piece].float().repeat_interleave(2, 1),
            v[:, :, piece].float().repeat_interleave(2, 1), is_causal=True, scale=8 ** -0.5))
        start += n
    expected = torch.cat(expected, dim=2).bfloat16().transpose(1, 2)
    assert out.dtype == torch.bfloat16 and out.shape == (1, sum(lengths), 4, 8)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_packed_eval_loss_equals_padded(model_and_examples):
    from fine_tuning_llms.engine.trainer import mean_eval_loss

    model, tok, examples = model_and_examples
    padded = mean_eval_loss(model, examples * 3, tok.pad_token_id, batch_size=4)
    packed = mean_eval_loss(model, examples * 3, tok.pad_token_id, batch_size=4, packed=True)
    assert abs(packed - padded) < 1e-4 * padded

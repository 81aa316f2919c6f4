"""special_tokens: inventory, adding tokens with mean-initialised rows, training them with PEFT."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from fine_tuning_llms import special_tokens as st
from fine_tuning_llms.engine import lora
from fine_tuning_llms.engine.config import Config, ModelConfig
from fine_tuning_llms.engine.errors import UserError
from fine_tuning_llms.engine.lora import lora_config
from fine_tuning_llms.engine.models import load_model, load_tokenizer


def _load(folder):
    cfg = ModelConfig(model=str(folder))
    return load_model(cfg), load_tokenizer(cfg)


def _config(tmp_path, model_dir, **train) -> Config:
    cfg = Config()
    cfg.model.model = str(model_dir)
    cfg.run.output_dir = str(tmp_path / "out")
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def _rows(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_run_writes_csv_summary_and_consistent_model(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir, new_tokens=["<think>"])
    summary = st.run(cfg)
    out = tmp_path / "out"
    rows = _rows(out / "special_tokens_analysis.csv")
    assert list(rows[0]) == st.CSV_COLUMNS
    inventory = {r["token"]: r for r in rows if r["section"] == "inventory"}
    added = {r["token"]: r for r in rows if r["section"] == "added"}
    assert inventory["<|im_start|>"]["role"].startswith("bos") and inventory["<|im_start|>"]["id"] == "0"
    assert inventory["<|im_end|>"]["role"].startswith("eos+pad") and inventory["<|im_end|>"]["in_template"] == "True"
    assert set(added) == {"<|user|>", "<|assistant|>", "<think>"}
    for token, row in added.items():
        assert int(row["n_pieces_before"]) > 1, token
        assert json.loads(row["ids_after"]) == [int(row["id"])]
        assert float(row["max_change_plain_lora"]) == 0.0
        assert float(row["max_change_trainable_tokens"]) > 0.0
    saved = json.loads((out / "special_tokens_summary.json").read_text(encoding="utf-8"))
    assert saved["vocab_size_after"] == saved["vocab_size_before"] + 3 == summary["vocab_size_after"]
    assert saved["pad_equals_eos"] is True and saved["pitfall"]["wrongly_masked_by_pad_id"] == 2
    assert saved["new_rows_equal_mean"] is True and saved["saved_model"]["consistent"] is True
    assert saved["training"]["trainable_tokens"]["max_change_other_rows"] == 0.0
    assert "⟦<|im_end|>#1⟧" in saved["control_token_view"]
    model2, tok2 = _load(out / "special_tokens_model")
    assert len(tok2) == saved["vocab_size_after"] == model2.get_input_embeddings().weight.shape[0]
    assert tok2("<|user|>hi<think>", add_special_tokens=False)["input_ids"][0] == int(added["<|user|>"]["id"])


def test_add_two_tokens_grows_vocab_by_two_with_mean_rows(tiny_model_dir):
    model, tok = _load(tiny_model_dir)
    old = model.get_input_embeddings().weight.detach().clone()
    n = len(tok)
    ids = lora.add_special_tokens(model, tok, ["<|user|>", "<|assistant|>"])
    weight = model.get_input_embeddings().weight.detach()
    assert len(tok) == n + 2 and weight.shape[0] == old.shape[0] + 2
    assert ids == [n, n + 1]
    assert torch.equal(weight[:n], old)                      # existing rows untouched
    for i in ids:
        torch.testing.assert_close(weight[i], old.mean(dim=0), rtol=0, atol=1e-7)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight   # still tied
    assert [tok(t, add_special_tokens=False)["input_ids"] for t in ("<|user|>", "<|assistant|>")] == [[n], [n + 1]]
    # adding again (and an existing control token) changes nothing
    assert lora.add_special_tokens(model, tok, ["<|assistant|>", "<|im_end|>"]) == [n + 1, tok.eos_token_id]
    assert len(tok) == n + 2 and model.get_input_embeddings().weight.shape[0] == n + 2


def _trained_rows(tmp_path, tiny_model_dir, *, trainable: bool):
    model, tok = _load(tiny_model_dir)
    new_ids = lora.add_special_tokens(model, tok, ["<|user|>", "<|assistant|>"])
    before = model.get_input_embeddings().weight.detach().clone()
    extra = lora.lora_kwargs_for_new_tokens(new_ids, model=model) if trainable else {}
    cfg = _config(tmp_path, tiny_model_dir, lr=1e-2)
    torch.manual_seed(0)
    merged, losses = st.short_run(model, st.demo_examples(tok), tok.pad_token_id,
                                  lora_config=lora_config(cfg.train, extra=extra), steps=3, lr=1e-2)
    return before, merged, new_ids, losses


def test_trainable_token_indices_moves_only_new_rows(tmp_path, tiny_model_dir):
    before, merged, new_ids, losses = _trained_rows(tmp_path, tiny_model_dir, trainable=True)
    after = merged.get_input_embeddings().weight.detach()
    others = torch.ones(after.shape[0], dtype=torch.bool)
    others[new_ids] = False
    assert torch.equal(after[others], before[others])         # exactly unchanged
    assert (after[new_ids] - before[new_ids]).abs().amax(dim=1).min() > 1e-3
    assert not torch.equal(after[new_ids[0]], after[new_ids[1]])   # the two tokens now differ
    assert torch.equal(merged.get_output_embeddings().weight[new_ids], after[new_ids])  # tied head follows
    assert losses[-1] < losses[0]


def test_plain_lora_leaves_new_rows_untouched(tmp_path, tiny_model_dir):
    before, merged, new_ids, losses = _trained_rows(tmp_path, tiny_model_dir, trainable=False)
    after = merged.get_input_embeddings().weight.detach()
    assert torch.equal(after, before)
    assert torch.equal(after[new_ids[0]], after[new_ids[1]])       # still the same mean row: indistinguishable
    assert losses[-1] < losses[0]                                  # LoRA itself did train


def test_untied_head_gets_mean_rows_and_is_trained():
    from tiny import build_model, build_tokenizer

    tok = build_tokenizer("chatml")
    model = build_model(len(tok))
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() + 0.5)  # untie
    n = len(tok)
    head_mean = model.lm_head.weight.detach().mean(dim=0)
    ids = lora.add_special_tokens(model, tok, ["<|user|>", "<|assistant|>"])
    torch.testing.assert_close(model.lm_head.weight.detach()[ids[0]], head_mean, rtol=0, atol=1e-6)
    kwargs = lora.lora_kwargs_for_new_tokens(ids, model=model)
    assert kwargs == {"trainable_token_indices": {"embed_tokens": [n, n + 1], "lm_head": [n, n + 1]}}
    head_before = model.lm_head.weight.detach().clone()
    cfg = Config()
    torch.manual_seed(0)
    merged, _ = st.short_run(model, st.demo_examples(tok), tok.pad_token_id,
                             lora_config=lora_config(cfg.train, extra=kwargs), steps=2, lr=1e-2)
    head_after = merged.get_output_embeddings().weight.detach()
    assert torch.equal(head_after[:n], head_before[:n])
    assert (head_after[ids] - head_before[ids]).abs().max() > 1e-3


def test_lora_kwargs_without_model_and_empty():
    assert lora.lora_kwargs_for_new_tokens([5, 3, 5]) == {"trainable_token_indices": {"embed_tokens": [3, 5]}}
    assert lora.lora_kwargs_for_new_tokens([]) == {}


@pytest.mark.parametrize("bad", ["", "   ", " <x> "])
def test_bad_new_tokens_are_user_errors(bad):
    with pytest.raises(UserError, match="--new_tokens"):
        lora.check_new_tokens([bad])


def test_untrained_rule():
    assert st.looks_untrained(0.1, 1.0) and st.looks_untrained(2.5, 1.0)
    assert not st.looks_untrained(1.0, 1.0, max_cosine=0.9)
    assert st.looks_untrained(1.0, 1.0, max_cosine=1.0)


@pytest.mark.embedded
def test_smollm2_special_tokens(tmp_path):
    cfg = Config()
    cfg.run.output_dir = str(tmp_path / "out")
    summary = st.run(cfg)
    tok = load_tokenizer(ModelConfig())
    rows = _rows(tmp_path / "out" / "special_tokens_analysis.csv")
    inventory = {r["token"]: r for r in rows if r["section"] == "inventory"}
    roles = {role: r["id"] for r in inventory.values() for role in r["role"].split("+")}
    for role in ("bos", "eos", "pad", "unk"):
        assert int(roles[role]) == getattr(tok, f"{role}_token_id"), role
    assert int(inventory["<|im_start|>"]["id"]) == tok.convert_tokens_to_ids("<|im_start|>") == 1
    assert int(inventory["<|im_end|>"]["id"]) == tok.convert_tokens_to_ids("<|im_end|>") == 2
    assert "chat-control" in inventory["<|im_start|>"]["role"] and inventory["<|im_end|>"]["in_template"] == "True"
    user = next(r for r in rows if r["section"] == "added" and r["token"] == "<|user|>")
    assert int(user["n_pieces_before"]) > 1 and len(json.loads(user["ids_after"])) == 1
    assert summary["pad_equals_eos"] is True and summary["pitfall"]["wrongly_masked_by_pad_id"] == 2
    assert summary["training"]["trainable_tokens"]["max_change_other_rows"] == 0.0
    assert summary["training"]["trainable_tokens"]["max_change_new_rows"] > 0.0

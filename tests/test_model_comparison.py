"""--task compare on tiny local checkpoints: CSV rows, stop/length columns, left padding, labels."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny import build_tokenizer

from fine_tuning_llms import model_comparison as mc
from fine_tuning_llms.engine.adapters import check_adapter_dir, load_model_with_adapter
from fine_tuning_llms.engine.config import Config
from fine_tuning_llms.engine.errors import UserError
from fine_tuning_llms.engine.generation import end_of_turn_ids, generate_batch, stop_token_ids, trim_at_stop

QUESTIONS = ["Hello!", "What is the capital of France? Answer briefly please.", "안녕하세요"]
MAX_NEW = 12


def peaked_copy(src: Path, dst: Path, *, seed: int) -> Path:
    """The tiny checkpoint with larger random weights and a louder eos row.

    The stock tiny model's logits are nearly flat, so it repeats one token forever: every
    answer looks alike and none stops. Larger weights give prompt-dependent answers, and a
    scaled eos embedding (tied to the output layer) makes some answers stop and others not.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    tok = AutoTokenizer.from_pretrained(src)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
        model.get_input_embeddings().weight[tok.eos_token_id] *= 3
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def models(tiny_model_dir, tiny_base_dir, tmp_path_factory) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("compare")
    instruct = peaked_copy(tiny_model_dir, root / "instruct", seed=0)
    base = peaked_copy(tiny_base_dir, root / "base", seed=1)
    # A LoRA adapter whose B matrices are random (init_lora_weights=False) so it changes answers.
    model = AutoModelForCausalLM.from_pretrained(instruct)
    torch.manual_seed(2)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(20)
    adapter = root / "final_model"
    peft_model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(instruct).save_pretrained(adapter)
    return {"instruct": instruct, "base": base, "adapter": adapter}


def make_cfg(out: Path, model: Path, questions: Path, **compare) -> Config:
    cfg = Config()
    cfg.run.task, cfg.run.output_dir = "compare", str(out)
    cfg.model.model = str(model)
    cfg.compare.questions = str(questions)
    cfg.compare.max_new_tokens = MAX_NEW
    for key, value in compare.items():
        setattr(cfg.compare, key, None if value is None else str(value))
    return cfg


@pytest.fixture
def questions_txt(tmp_path) -> Path:
    path = tmp_path / "questions.txt"
    path.write_text("# a comment\n" + "\n".join(QUESTIONS) + "\n\n", encoding="utf-8")
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == mc.CSV_COLUMNS
        return list(reader)


def reference_answer(model, tok, prompt_ids: list[int]) -> tuple[list[int], bool]:
    """One unbatched greedy generate call, trimmed at eos by hand: the oracle for a CSV row."""
    out = model.generate(input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                         max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    new = out[0, len(prompt_ids):].tolist()
    if tok.eos_token_id in new:
        return new[: new.index(tok.eos_token_id) + 1], True
    return new, False


def test_batched_greedy_equals_unbatched(models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["instruct"])
    model = AutoModelForCausalLM.from_pretrained(models["instruct"])
    texts = QUESTIONS + ["2+2?", "Write a short poem about the sea and the sky.", "Who are you?", "Paris",
                         "List three colours, one per line, in the order of the rainbow."]
    prompts = [mc.chat_prompt_ids(tok, t) for t in texts] + [mc.plain_prompt_ids(tok, t) for t in texts]
    assert len({len(p) for p in prompts}) > 3  # different lengths: the batch really is padded
    batched = generate_batch(model, tok, prompts, max_new_tokens=MAX_NEW, batch_size=len(prompts))
    alone = [generate_batch(model, tok, [p], max_new_tokens=MAX_NEW, batch_size=1)[0] for p in prompts]
    assert [r.new_token_ids for r in batched] == [r.new_token_ids for r in alone]
    # The comparison only means something if answers differ and some stop while others run out.
    assert len({tuple(r.new_token_ids) for r in batched}) > 3
    assert {r.stopped_on_eot for r in batched} == {True, False}
    for r in batched:
        assert r.n_new_tokens == len(r.new_token_ids) <= MAX_NEW
        assert r.stopped_on_eot == (r.new_token_ids[-1] == tok.eos_token_id)
        assert tok.eos_token_id not in r.new_token_ids[:-1]


def test_stop_ids_include_template_end_of_turn():
    gemma = build_tokenizer("gemma")
    eot = gemma.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn_ids(gemma) == [eot]

    class _Model:  # only generation_config is read
        class generation_config:
            eos_token_id = [gemma.eos_token_id]

    assert set(stop_token_ids(_Model, gemma)) == {gemma.eos_token_id, eot}
    chatml = build_tokenizer("chatml")
    assert end_of_turn_ids(chatml) == [chatml.eos_token_id]
    assert trim_at_stop([5, 6, 7, 2, 2, 2], [2]) == ([5, 6, 7, 2], True)
    assert trim_at_stop([5, 6, 7], [2]) == ([5, 6, 7], False)


def test_compare_base_instruct_fine_tuned(models, questions_txt, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    cfg = make_cfg(out, models["instruct"], questions_txt, base_model=models["base"], adapter=models["adapter"])
    result = mc.run(cfg)
    rows = read_csv(out / mc.CSV_NAME)
    assert len(rows) == len(QUESTIONS) * 3
    assert [r["role"] for r in rows] == ["base"] * 3 + ["instruct"] * 3 + ["fine-tuned"] * 3
    assert [r["question"] for r in rows] == QUESTIONS * 3
    assert {r["prompt_format"] for r in rows if r["role"] == "base"} == {"plain-text"}
    assert {r["prompt_format"] for r in rows if r["role"] != "base"} == {"chat-template"}

    tok = AutoTokenizer.from_pretrained(models["instruct"])
    oracles = {"base": AutoModelForCausalLM.from_pretrained(models["base"]),
               "instruct": AutoModelForCausalLM.from_pretrained(models["instruct"])}
    oracles["fine-tuned"] = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["instruct"]),
                                                      str(models["adapter"]))
    stops = []
    for row in rows:
        q = row["question"]
        if row["role"] == "base":
            prompt_ids = tok(mc.PLAIN_PROMPT.format(question=q))["input_ids"]
        else:
            prompt_ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)["input_ids"]
        assert row["prompt"] == tok.decode(prompt_ids, skip_special_tokens=False)
        new, stopped = reference_answer(oracles[row["role"]], tok, prompt_ids)
        assert int(row["new_tokens"]) == len(new), row
        assert row["stopped_on_eot"] == ("yes" if stopped else "no"), row
        assert row["response"] == tok.decode(new, skip_special_tokens=True).strip()
        assert float(row["seconds"]) > 0 and float(row["tokens_per_s"]) > 0
        stops.append(stopped)
    assert set(stops) == {True, False}  # both kinds of row are checked
    # The adapter changed at least one answer (else the fine-tuned column proves nothing).
    assert [r["response"] for r in rows[3:6]] != [r["response"] for r in rows[6:9]]

    summary = json.loads((out / mc.SUMMARY_NAME).read_text(encoding="utf-8"))
    assert summary["note"] is None and summary["has_base_model"] is True
    by_role = {m["role"]: m for m in summary["models"]}
    for role in ("base", "instruct", "fine-tuned"):
        mine = [r for r in rows if r["role"] == role]
        assert by_role[role]["stopped"] == sum(r["stopped_on_eot"] == "yes" for r in mine)
        assert by_role[role]["mean_new_tokens"] == pytest.approx(sum(int(r["new_tokens"]) for r in mine) / 3, abs=0.005)
    assert [a["question"] for a in summary["answers"]] == QUESTIONS
    assert set(summary["answers"][0]["answers"]) == {"base", "instruct", "fine-tuned"}
    assert result["csv"] == str(out / mc.CSV_NAME)


def test_offline_labels_never_say_base(models, questions_txt, tmp_path, caplog):
    out = tmp_path / "out"
    cfg = make_cfg(out, models["instruct"], questions_txt)
    with caplog.at_level("INFO"):
        mc.run(cfg)
    rows = read_csv(out / mc.CSV_NAME)
    assert [r["role"] for r in rows] == ["instruct-raw-text"] * 3 + ["instruct"] * 3
    assert all("base" not in r["role"] for r in rows)
    assert all(r["prompt"].startswith("Question: ") for r in rows[:3])
    summary = json.loads((out / mc.SUMMARY_NAME).read_text(encoding="utf-8"))
    assert summary["has_base_model"] is False and "NO base model" in summary["note"]
    assert "NO base model" in caplog.text

    # After --task train, <output_dir>/final_model joins the table without --adapter.
    shutil.copytree(models["adapter"], out / "final_model")
    mc.run(cfg)
    roles = [r["role"] for r in read_csv(out / mc.CSV_NAME)]
    assert roles == ["instruct-raw-text"] * 3 + ["instruct"] * 3 + ["fine-tuned"] * 3


def test_questions_files(tmp_path):
    default = mc.load_questions(None)
    assert len(default) >= 10
    assert {q.language for q in default} == {"en", "ko"}
    assert {"fact", "instruction", "format", "refusal", "identity"} <= {q.category for q in default}
    assert "What is your name?" in [q.text for q in default]
    as_json = tmp_path / "q.json"
    as_json.write_text(json.dumps(["One?", {"question": "Two?", "category": "fact"}]), encoding="utf-8")
    assert [q.text for q in mc.load_questions(as_json)] == ["One?", "Two?"]
    for name, text in (("q.csv", "a,b"), ("bad.json", "{"), ("empty.txt", "# only a comment\n"),
                       ("obj.json", '[{"q": 1}]')):
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(UserError):
            mc.load_questions(tmp_path / name)


def test_adapter_folder_errors(models, tmp_path):
    with pytest.raises(UserError, match="full model.*--model"):
        check_adapter_dir(models["instruct"])
    with pytest.raises(UserError, match="no such folder"):
        check_adapter_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="adapter_config.json"):
        check_adapter_dir(tmp_path / "empty")


def test_adapter_with_added_token_resizes_base(models, tmp_path):
    """A tokenizer saved with the adapter may hold new tokens: the base grows before PEFT loads."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["instruct"])
    tok.add_special_tokens({"additional_special_tokens": ["<|lumi|>"]})
    model = AutoModelForCausalLM.from_pretrained(models["instruct"])
    model.resize_token_embeddings(len(tok))
    new_id = tok.convert_tokens_to_ids("<|lumi|>")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[new_id]))
    folder = tmp_path / "adapter"
    peft_model.save_pretrained(folder)
    tok.save_pretrained(folder)

    cfg = Config()
    cfg.model.model = str(models["instruct"])
    loaded, loaded_tok = load_model_with_adapter(cfg.model, folder)
    assert len(loaded_tok) == len(tok)
    assert loaded.get_input_embeddings().weight.shape[0] == len(tok)
    torch.testing.assert_close(loaded.get_input_embeddings()(torch.tensor([new_id])),
                               peft_model.get_input_embeddings()(torch.tensor([new_id])))

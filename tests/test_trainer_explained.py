"""--task explain on the tiny model: the hand-written loop gives Trainer's numbers, step by step."""
from __future__ import annotations

import csv
import json
import random
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from fine_tuning_llms.cli import main
from fine_tuning_llms.engine import manual_loop

WORDS = ("hello the capital of France is Paris two plus four sea sky poem friendly assistant answers "
         "briefly 안녕하세요 Seoul").split()


WORK_FOLDERS: list[Path] = []  # the temporary folders explain_run created


class RecordingTemporaryDirectory(tempfile.TemporaryDirectory):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        WORK_FOLDERS.append(Path(self.name))


def conversations(n: int, seed: int = 0) -> list[dict]:
    """Replies of very different lengths, so micro-batches train different numbers of tokens."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    records = []
    for i in range(n):
        messages = [{"role": "user", "content": text(2, 8) + "?"}, {"role": "assistant", "content": text(1, 30) + "."}]
        if i % 3 == 0:
            messages += [{"role": "user", "content": "more"}, {"role": "assistant", "content": text(1, 6)}]
        records.append({"messages": messages})
    return records


@pytest.fixture(scope="module")
def explain_run(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("explain")
    data = folder / "data.jsonl"
    # 38 conversations, 10% held out -> 34 training examples = 17 batches of 2: each epoch ends
    # with a one-batch accumulation step, and 20 steps cross two epoch boundaries.
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in conversations(38)), encoding="utf-8")
    out = folder / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model gains nothing from threads, and they stall on a busy CPU
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(tempfile, "TemporaryDirectory", RecordingTemporaryDirectory)
            code = main(["--task", "explain", "--model", str(tiny_model_dir), "--dataset_path", str(data),
                         "--output_dir", str(out), "--max_steps", "20", "--grad_accum", "2", "--warmup_ratio", "0.2",
                         "--weight_decay", "0.01", "--target_modules", "q_proj,v_proj", "--lora_r", "4"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return out


def read_summary(folder) -> dict:
    def reject(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads((folder / "explain_summary.json").read_text(encoding="utf-8"), parse_constant=reject)


def read_csv(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def column(rows: list[dict], name: str) -> torch.Tensor:
    return torch.tensor([float(r[name]) for r in rows], dtype=torch.float64)


def test_manual_loop_matches_trainer_step_by_step(explain_run):
    rows = read_csv(explain_run / "trainer_vs_manual.csv")
    summary = read_summary(explain_run)
    assert len(rows) >= 20
    assert summary["settings"]["grad_accum"] == 2 and summary["walkthrough"]["warmup_steps"] == 4
    assert summary["walkthrough"]["epochs"] > 2  # the seeded order was re-drawn for later epochs
    torch.testing.assert_close(column(rows, "manual_loss"), column(rows, "trainer_loss"), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(column(rows, "manual_lr"), column(rows, "trainer_lr"), rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(column(rows, "manual_grad_norm"), column(rows, "trainer_grad_norm"), rtol=1e-5, atol=1e-8)
    lrs = column(rows, "trainer_lr")
    assert lrs[0] == 0.0 and lrs[4] == pytest.approx(2e-4) and lrs[-1] < lrs[4]  # warm-up, peak, decay
    assert summary["parity"]["agree"] and summary["parity"]["final_adapter_max_abs_diff"] < 1e-6
    evals = summary["walkthrough"]["eval"]
    assert [e["step"] for e in evals] == [10, 20]
    for e in evals:
        assert e["manual"] == pytest.approx(e["trainer"], rel=1e-5)


def test_explain_writes_its_files_and_walkthrough(explain_run):
    for name in ("trainer_vs_manual.csv", "trainer_vs_manual.png", "explain_customisation.csv", "explain_summary.json"):
        assert (explain_run / name).stat().st_size > 0, name
    assert (explain_run / "trainer_vs_manual.png").read_bytes()[:4] == b"\x89PNG"
    for folder in ("explain_trainer_adapter", "explain_manual_adapter"):
        assert (explain_run / folder / "adapter_config.json").is_file()
    # Trainer's checkpoints went to a system temp folder, removed after the run.
    assert WORK_FOLDERS, "explain no longer uses tempfile.TemporaryDirectory: check where its work folder goes"
    for work in WORK_FOLDERS:
        assert work.parent == Path(tempfile.gettempdir()) and not work.exists(), work
    text = read_summary(explain_run)["walkthrough_text"]
    assert "manual_loop.py:" in text and "steps per epoch" in text and "num_items_in_batch" in text


def test_callback_and_compute_loss_override_have_measured_effects(explain_run):
    summary = read_summary(explain_run)["customisation"]
    guard = summary["nan_guard"]
    assert guard["logged_grad_norm_at_fault"] == "nan"  # the NaN reached the logs as text: strict JSON
    assert guard["stopped_at_step"] == guard["fault_step"] == guard["steps_run"] < guard["planned_steps"]
    assert guard["adapter_weights_finite"]
    custom = read_csv(explain_run / "explain_customisation.csv")
    assert len(custom) == summary["label_smoothing"]["steps"] >= 5
    # Steps 1-2: same batches and, as warm-up starts at lr 0, the same weights. The override's
    # plain CE equals Trainer's own loss there, while the smoothed objective it trains on differs.
    for row in custom[:2]:
        assert float(row["smoothed_run_ce"]) == pytest.approx(float(row["baseline_loss"]), rel=1e-6)
        assert abs(float(row["smoothed_objective"]) - float(row["baseline_loss"])) > 1e-4
    # Later steps train on the smoothed objective, so the plain CE moves away from the plain run's.
    assert abs(float(custom[-1]["ce_diff"])) > 0


def test_loss_and_decay_groups_match_transformers(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    expected = set(Trainer.get_decay_parameter_names(None, model))  # the method does not use self
    assert manual_loop.decay_parameter_names(model) == expected
    assert any("norm" in n for n, _ in model.named_parameters() if n not in expected)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    labels = ids.clone()
    labels[0, :5] = -100
    labels[1, 9:] = -100
    n = manual_loop.trained_token_count([{"labels": labels}])
    out = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(n))
    assert torch.equal(manual_loop.causal_lm_loss(out.logits, labels, torch.tensor(n)), out.loss)


def test_epoch_order_is_trainers_dataloader_order(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, seed=7, use_cpu=True,
                             report_to="none", remove_unused_columns=False)
    dataset = [{"index": i} for i in range(11)]
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=lambda rows: {"index": torch.tensor([r["index"] for r in rows])})
    loader = trainer.get_train_dataloader()
    for epoch in (0, 1):
        loader.set_epoch(epoch)  # what Trainer._run_epoch does before each epoch
        seen = [int(i) for batch in loader for i in batch["index"]]
        assert seen == manual_loop.epoch_order(11, 7, epoch)
    assert manual_loop.epoch_order(11, 7, 0) != manual_loop.epoch_order(11, 7, 1)


def test_explain_names_the_fix_when_nothing_fits(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in conversations(6)), encoding="utf-8")
    code = main(["--task", "explain", "--model", str(tiny_model_dir), "--dataset_path", str(data),
                 "--output_dir", str(tmp_path / "out"), "--max_length", "16"])
    assert code == 2
    assert "--max_length" in capsys.readouterr().err

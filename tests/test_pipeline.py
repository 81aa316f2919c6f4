"""The whole pipeline (`python run_fine_tuning.py`, i.e. --task all) on the tiny model: every task
runs in order, each feeding the next, and report.html shows all of them."""
import csv
import json

from fine_tuning_llms.cli import main

EXPECTED_FILES = [
    "special_tokens_analysis.csv", "special_tokens_summary.json",          # special_tokens
    "processed_conversations.json", "token_lengths.png",                   # preprocess
    "trainer_vs_manual.csv", "trainer_vs_manual.png", "explain_summary.json",  # explain
    "final_model/adapter_model.safetensors", "training_log.csv", "loss_curve.png", "eval_before_after.json",  # train
    "model_comparison_results.csv", "comparison_summary.json",             # compare
    "report.html",
]


def test_task_all_runs_every_task_and_reports_them(tiny_model_dir, write_jsonl, sample_conversations, tmp_path):
    data = write_jsonl(sample_conversations * 4)
    out = tmp_path / "all"
    assert main(["--model", str(tiny_model_dir), "--dataset_path", str(data), "--output_dir", str(out),
                 "--eval_ratio", "0.25", "--max_steps", "2", "--batch_size", "2", "--eval_answers", "2",
                 "--max_new_tokens", "8"]) == 0
    for name in EXPECTED_FILES:
        assert (out / name).is_file(), name
    # compare ran after train, so the adapter it just wrote is a column of the table.
    with open(out / "model_comparison_results.csv", newline="", encoding="utf-8") as fh:
        roles = {row["role"] for row in csv.DictReader(fh)}
    assert "fine-tuned" in roles and "base" not in roles
    assert json.loads((out / "final_model" / "metrics.json").read_text())["global_steps"] == 2
    html = (out / "report.html").read_text(encoding="utf-8")
    for section in ("overview", "comparison", "special-tokens", "preprocessing", "training", "trainer-vs-manual"):
        assert f'id="{section}"' in html
    assert "None: every task ran" in html and "Not run yet" not in html

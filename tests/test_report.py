"""report.html: every section from a fake output folder, escaping, secrets, and "not run" listing.

    .venv/bin/python -m pytest -q tests/test_report.py
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from fine_tuning_llms import report
from fine_tuning_llms.engine.config import Config

HOSTILE = '<script>alert("x")</script> & <b>bold</b>'
SECRET = "hf_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4"
SECTION_IDS = ("overview", "comparison", "special-tokens", "preprocessing", "training", "trainer-vs-manual", "not-run")


def tiny_png(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1, 2], [3.0, 2.0, 1.5], color="#C44E52")
    ax.set_title("tiny")
    fig.savefig(path, format="png", dpi=60)
    plt.close(fig)


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")


def make_fake_output(folder: Path, *, model: str = "no-such-org/no-such-model", tokens: bool = True) -> Path:
    """Small files of every kind the tasks write, with the keys their modules use."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("token_lengths.png", "loss_curve.png", "trainer_vs_manual.png"):
        tiny_png(folder / name)
    # preprocess: one single-turn and one two-turn conversation; -100 = not trained
    single = {"input_ids": [1, 10, 11, 2, 1, 20, 21, 2], "labels": [-100, -100, -100, -100, -100, 20, 21, 2],
              "text": "<s>user hi</s><s>assistant hello</s>", "truncated": False}
    multi = {"input_ids": [1, 10, 2, 1, 20, 2, 1, 12, 2, 1, 22, 2],
             "labels": [-100, -100, -100, -100, 20, 2, -100, -100, -100, -100, 22, 2],
             "text": "multi turn text", "truncated": True}
    if tokens:
        single["tokens"] = ["<s>", "user", " hi", "</s>", "<s>", "assistant", " 안녕", "</s>"]
        multi["tokens"] = ["<s>", "Q1", "</s>", "<s>", "A1", "</s>", "<s>", "Q2", "</s>", "<s>", "A2 " + HOSTILE, "</s>"]
    write_json(folder / "processed_conversations.json", {"summary": {
        "examples_kept": 2, "examples_dropped_too_long": 0, "examples_truncated": 1, "total_tokens": 20,
        "trained_tokens": 7, "share_of_tokens_trained": 0.35, "length_percentiles": {"min": 8, "max": 12},
        "template": {"injects_default_system_prompt": True, "text_before_first_user_message": "<|im_start|>system"},
        "model": model}, "examples": [single, multi]})
    # special_tokens
    write_csv(folder / "special_tokens_analysis.csv", [
        {"section": "inventory", "token": "<|im_end|>", "id": 2, "role": "eos, pad", "in_template": True,
         "n_pieces_before": "", "ids_after": "", "norm_ratio": 1.02, "nearest_cosine": 0.31, "looks_untrained": False},
        {"section": "added", "token": "<|user|>", "id": 49152, "role": "additional (new)", "in_template": False,
         "n_pieces_before": 5, "ids_after": "[49152]", "norm_ratio": 0.21, "nearest_cosine": 1.0, "looks_untrained": True}])
    write_json(folder / "special_tokens_summary.json", {
        "model": "tiny", "vocab_size_before": 49152, "vocab_size_after": 49154, "pad_equals_eos": True,
        "n_special_or_added": 1, "n_looks_untrained": 0,
        "pitfall": {"explanation": "labels[labels == pad_id] = -100 would drop every end-of-turn label"},
        "control_token_view": "⟦<|im_start|>#1⟧user", "training": {
            "plain_lora": {"max_change_new_rows": 0.0, "max_change_other_rows": 0.0, "max_distance_between_new_rows": 0.0},
            "trainable_tokens": {"max_change_new_rows": 0.012, "max_change_other_rows": 0.0,
                                 "max_distance_between_new_rows": 0.03}}})
    # train
    write_csv(folder / "training_log.csv", [
        {"step": s, "epoch": s / 10, "loss": 3.0 - 0.1 * s, "lr": 2e-4, "grad_norm": 1.5, "eval_loss": "" if s % 5 else 2.5,
         "tokens_per_s": 300.0, "trained_tokens_per_s": 120.0} for s in range(1, 21)])
    write_json(folder / "eval_before_after.json", {
        "metrics": {"eval_loss_before": 2.9, "eval_loss_after": 2.1, "behaviour_rate_before": 0.0,
                    "behaviour_rate_after": 0.75},
        "answers": [{"prompt": "What is 2+2?", "reference": "4. — Lumi", "before": "4", "after": "Four. " + HOSTILE}]})
    write_json(folder / "final_model" / "run_config.json", {
        "settings": {"model": model, "lr": 0.0002, "new_tokens": ["<think>"], "hub_token": SECRET,
                     "output_dir": str(folder)},
        "versions": {"python": "3.11.2", "torch": "2.13.0", "transformers": "5.24.0"}})
    # explain
    write_csv(folder / "trainer_vs_manual.csv", [
        {"step": s, "trainer_loss": 2.0 - 0.1 * s, "manual_loss": 2.0 - 0.1 * s + 1e-7, "rel_diff": 5e-8,
         "trainer_lr": 1e-4, "manual_lr": 1e-4, "trainer_grad_norm": 0.9, "manual_grad_norm": 0.9, "trained_tokens": 40}
        for s in range(1, 6)])
    write_json(folder / "explain_summary.json", {
        "parity": {"steps": 5, "max_rel_diff_loss": 5e-8, "agree": True},
        "walkthrough_text": "How Trainer.train() maps onto the hand-written loop",
        "customisation": {"label_smoothing": {"factor": 0.1}}})
    # compare
    rows = [{"question": q, "model": "smollm2", "role": role, "prompt_format": fmt, "prompt": q, "response": resp,
             "new_tokens": 12, "stopped_on_eot": stop, "seconds": 0.5, "tokens_per_s": 24.0}
            for q, resp in (("What is the capital of France?", "Paris."), ("Say " + HOSTILE, HOSTILE))
            for role, fmt, stop in (("instruct-raw-text", "plain-text", "no"), ("instruct", "chat-template", "yes"))]
    write_csv(folder / "model_comparison_results.csv", rows)
    write_json(folder / "comparison_summary.json", {
        "note": "No --base_model was given: this comparison has NO base model.", "has_base_model": False,
        "models": [{"role": "instruct", "model": "smollm2", "prompt_format": "chat-template", "answers": 2,
                    "stopped": 2, "stop_rate": 1.0, "mean_new_tokens": 12.0, "tokens_per_s": 24.0}]})
    return folder


def section(page: str, sid: str) -> str:
    match = re.search(rf'<section id="{sid}">(.*?)</section>', page, re.S)
    assert match, f"section {sid} missing"
    return match.group(1)


def test_every_section_present_and_filled(tmp_path):
    folder = make_fake_output(tmp_path / "out")
    path = report.build_report(folder)
    assert path == folder / "report.html"
    page = path.read_text(encoding="utf-8")
    for sid in SECTION_IDS:
        section(page, sid)
    for heading in ("모델 비교 / Model comparison", "특수 토큰 / Special tokens", "전처리 / Preprocessing",
                    "학습 / Training", "개요 / Overview"):
        assert f"<h2>{heading}</h2>" in page
    assert "Not run yet" not in page
    assert "every task ran" in section(page, "not-run")
    assert page.count("data:image/png;base64,") == 3
    assert "NO base model" in section(page, "comparison") and "Paris." in section(page, "comparison")
    assert "&lt;|user|&gt;" in section(page, "special-tokens")
    assert "eval_loss_after" in section(page, "training") and "Four." in section(page, "training")
    assert "일치 / agree" in section(page, "trainer-vs-manual")
    overview = section(page, "overview")
    assert "transformers" in overview and "5.24.0" in overview
    assert "held-out loss 2.9 → 2.1" in overview and "instruct stopped by itself in 2 of 2 answers" in overview
    # the two-turn example: two green spans, each token its own span, Korean kept whole
    prep = section(page, "preprocessing")
    assert '<span class="t0">A1</span>' in prep and '<span class="t0"> 안녕</span>' in prep
    kinds = [kind for kind, _ in mask_spans(prep)]
    assert kinds.count("t") == 7 and kinds.count("u") == 13  # trained tokens of both examples, nothing else


def test_text_is_escaped_and_page_is_self_contained(tmp_path):
    page = report.build_report(make_fake_output(tmp_path / "out")).read_text(encoding="utf-8")
    assert "<script" not in page.lower()
    assert "<b>bold</b>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in page
    for outside in ('src="http', "src='http", "url(http", "@import", "@font-face", '<link '):
        assert outside not in page


def test_secrets_never_reach_the_page(tmp_path):
    page = report.build_report(make_fake_output(tmp_path / "out")).read_text(encoding="utf-8")
    assert SECRET not in page and "hub_token" not in page
    changed = section(page, "overview").split("<details>")[0]
    assert "new_tokens" in changed  # a setting whose name contains "token" but holds no secret stays
    assert "<td>lr</td>" not in changed and "<td>lr</td>" in page  # lr is the default: folded away only


def test_empty_folder_lists_every_task_as_not_run(tmp_path):
    page = report.build_report(tmp_path).read_text(encoding="utf-8")
    not_run = section(page, "not-run")
    for task in report.TASK_FILES:
        assert f"--task {task}</code>" in not_run
    assert page.count("아직 실행되지 않음 / Not run yet") == 5
    assert "data:image" not in page


def test_partial_run_shows_what_exists(tmp_path):
    folder = make_fake_output(tmp_path / "out")
    for name in ("eval_before_after.json", "loss_curve.png", "final_model/run_config.json"):
        (folder / name).unlink()
    (folder / "comparison_summary.json").write_text("{ not json", encoding="utf-8")
    page = report.build_report(folder).read_text(encoding="utf-8")
    assert "20 rows in training_log.csv" in section(page, "training")
    assert "loss_curve.png: 없음 / missing" in section(page, "training")
    assert "could not read its files" in section(page, "comparison")  # a broken file spoils only its section
    assert "could not read" not in section(page, "overview") and "held-out loss" not in section(page, "overview")
    assert "Trainer vs manual loop: agree yes" in section(page, "overview")
    assert "every task ran" in section(page, "not-run")


def test_mask_view_without_any_tokenizer_falls_back_to_plain_text(tmp_path):
    folder = make_fake_output(tmp_path / "out", tokens=False)
    prep = section(report.build_report(folder).read_text(encoding="utf-8"), "preprocessing")
    assert "plain text without colours" in prep and "multi turn text" in prep
    assert '<pre class="mask">' not in prep


def mask_spans(prep: str) -> list[tuple[str, str]]:
    """(t|u, unescaped text) for each token span of the mask views (the legend is not one)."""
    import html

    masks = "".join(re.findall(r'<pre class="mask">(.*?)</pre>', prep, re.S))
    return [(kind, html.unescape(text)) for kind, text in re.findall(r'<span class="([tu])\d">(.*?)</span>', masks, re.S)]


@pytest.mark.parametrize("text_matches_ids", [True, False], ids=["offsets", "decoded-prefixes"])
def test_mask_view_with_a_local_tokenizer(tmp_path, tiny_model_dir, text_matches_ids):
    from transformers import AutoTokenizer

    from fine_tuning_llms.engine.chat_format import encode_conversation

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": "안녕하세요"}, {"role": "assistant", "content": "네, 안녕하세요!"},
                {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4 <ok>"}]
    enc = encode_conversation(tok, messages)
    # A text that no longer matches the ids (as after truncation) forces the decode path.
    text = enc.text if text_matches_ids else "something else"
    folder = tmp_path / "out"
    write_json(folder / "processed_conversations.json", {"summary": {"model": str(tiny_model_dir)}, "examples": [
        {"input_ids": enc.input_ids, "labels": enc.labels, "text": text, "truncated": False}]})
    spans = mask_spans(section(report.build_report(folder).read_text(encoding="utf-8"), "preprocessing"))
    assert len(spans) == len(enc.input_ids)
    assert "".join(piece for _, piece in spans) == tok.decode(enc.input_ids) == enc.text
    trained = "".join(piece for kind, piece in spans if kind == "t")
    assert "네, 안녕하세요!" in trained and "4 <ok>" in trained and "2+2?" not in trained
    assert [kind == "t" for kind, _ in spans] == [label != -100 for label in enc.labels]


def test_refresh_never_raises_and_run_checks_the_folder(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert report.refresh_report(blocker / "sub") is None  # cannot write under a file
    assert "could not refresh" in caplog.text
    cfg = Config()
    cfg.run.output_dir = str(tmp_path / "missing")
    from fine_tuning_llms.engine.errors import UserError
    with pytest.raises(UserError, match="does not exist"):
        report.run(cfg)
    cfg.run.output_dir = str(make_fake_output(tmp_path / "out"))
    result = report.run(cfg)
    assert sorted(result["tasks_run"]) == sorted(report.TASK_FILES)
    assert Path(result["path"]).is_file()


def test_cli_task_report(tmp_path):
    from fine_tuning_llms.cli import main

    folder = make_fake_output(tmp_path / "out")
    assert main(["--task", "report", "--output_dir", str(folder)]) == 0
    assert (folder / "report.html").stat().st_size > 1000

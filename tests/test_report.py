"""report.html from a real tiny run: every section filled from the files the tasks wrote, escaping,
secrets, partial runs and the "not run" listing.

    .venv/bin/python -m pytest -q tests/test_report.py

The output folder comes from running every task on the tiny model (``--task all``), so a file or
JSON key renamed in a task without its report section shows up here as a failing check.
"""
from __future__ import annotations

import ast
import html
import json
import re
import shutil
from pathlib import Path

import pytest
from tiny import SAMPLE_CONVERSATIONS

from fine_tuning_llms import report
from fine_tuning_llms.cli import available_tasks, main, task_outputs
from fine_tuning_llms.engine.config import Config
from fine_tuning_llms.engine.report_html import fmt, without_secrets

HOSTILE = '<script>alert("x")</script> & <b>bold</b>'
ESCAPED = "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;"
SECRET = "hf_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4"
SECTION_IDS = ("overview", "comparison", "special-tokens", "preprocessing", "training", "trainer-vs-manual", "not-run")
# Three replies: the mask view shows it (it shows the conversations with the most replies); Korean and markup.
HOSTILE_CONVERSATION = {"messages": [
    {"role": "user", "content": "안녕하세요 " + HOSTILE}, {"role": "assistant", "content": "네, 안녕하세요! " + HOSTILE},
    {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4 <ok>"},
    {"role": "user", "content": "Thanks."}, {"role": "assistant", "content": "Bye. — Lumi"}]}
# The first two held-out conversations are answered before and after training: markup and a token in them.
HELD_OUT = [{"messages": [{"role": "user", "content": "Say " + HOSTILE},
                          {"role": "assistant", "content": HOSTILE + " never print " + SECRET}]}] + SAMPLE_CONVERSATIONS
QUESTIONS = ["What is the capital of France?", "Say " + HOSTILE]


def outputs():
    return task_outputs(available_tasks())


def make_real_output(folder: Path, model_dir: Path) -> Path:
    """Every task on the tiny model, small settings (`--task all`, as `python run_fine_tuning.py` runs them)."""
    folder.mkdir(parents=True)
    inputs = {"data.jsonl": (SAMPLE_CONVERSATIONS + [HOSTILE_CONVERSATION]) * 3, "eval.jsonl": HELD_OUT}
    for name, records in inputs.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        (folder.parent / f"{folder.name}-{name}").write_text(text, encoding="utf-8")
    questions = folder.parent / f"{folder.name}-questions.txt"
    questions.write_text("\n".join(QUESTIONS) + "\n", encoding="utf-8")
    assert main(["--model", str(model_dir), "--dataset_path", str(folder.parent / f"{folder.name}-data.jsonl"),
                 "--eval_path", str(folder.parent / f"{folder.name}-eval.jsonl"), "--questions", str(questions),
                 "--output_dir", str(folder), "--max_steps", "2", "--batch_size", "2",
                 "--eval_answers", "2", "--max_new_tokens", "6", "--prompt", f"my key is {SECRET}"]) == 0
    return folder


@pytest.fixture(scope="session")
def real_output(tmp_path_factory, tiny_model_dir) -> Path:
    return make_real_output(tmp_path_factory.mktemp("report") / "out", tiny_model_dir)


@pytest.fixture
def run_copy(real_output, tmp_path) -> Path:
    """A copy of the run's folder that a test may change."""
    return Path(shutil.copytree(real_output, tmp_path / "out"))


@pytest.fixture(scope="session")
def page(real_output) -> str:
    return report.build_report(real_output, outputs()).read_text(encoding="utf-8")


def read(folder: Path, name: str):
    return json.loads((folder / name).read_text(encoding="utf-8"))


def section(page: str, sid: str) -> str:
    match = re.search(rf'<section id="{sid}">(.*?)</section>', page, re.S)
    assert match, f"section {sid} missing"
    return match.group(1)


def mask_spans(prep: str) -> list[tuple[str, str]]:
    """(t|u, unescaped text) for each token span of the mask views (the legend is not one)."""
    masks = "".join(re.findall(r'<pre class="mask">(.*?)</pre>', prep, re.S))
    return [(kind, html.unescape(text)) for kind, text in re.findall(r'<span class="([tu])\d">(.*?)</span>', masks, re.S)]


def test_every_section_present_and_filled(page, real_output):
    assert (real_output / "report.html").is_file()  # --task all wrote it too
    for sid in SECTION_IDS:
        section(page, sid)
    for o in outputs():   # an optional step that did not run (export) has no section and is not "not run"
        assert (f"<h2>{html.escape(o.title)}</h2>" in page) != (o.optional and not o.ran(real_output))
    assert [o.task for o in outputs() if not o.optional] == ["compare", "special_tokens", "preprocess", "train",
                                                             "explain"]  # page order
    assert "Not run yet" not in page and "could not read" not in page
    assert "every task ran" in section(page, "not-run")
    assert page.count("data:image/png;base64,") == 3


def test_overview_shows_each_tasks_headline_numbers(page, real_output):
    overview = section(page, "overview")
    glance = [html.unescape(line) for line in re.findall(r"<li>(.*?)</li>", overview)]
    roles = read(real_output, "comparison_summary.json")["models"]
    assert len(glance) == 4 + len(roles), glance  # preprocess, special tokens, train, explain; one per compared role
    assert all("—" not in line for line in glance), glance  # every number found under the key it was read from
    metrics = read(real_output, "final_model/metrics.json")
    assert f"held-out loss {fmt(metrics['eval_loss_before'])} → {fmt(metrics['eval_loss_after'])}" in overview
    assert any(line.startswith("비교 / compare: instruct stopped by itself in") for line in glance)
    versions = read(real_output, "final_model/run_config.json")["versions"]
    assert versions["transformers"] in overview
    for name in ("training_log.csv", "final_model/run_config.json", "comparison_summary.json", "explain_summary.json"):
        assert f"<td>{name}</td>" in overview  # the files table lists what the tasks declared


def test_task_sections_show_the_task_files(page, real_output):
    comparison = section(page, "comparison")
    assert "NO base model" in comparison  # offline: no base checkpoint, and the page says so
    assert "?/?" not in comparison and "stopped: ?" not in comparison
    assert "instruct-raw-text" in comparison and "fine-tuned" in comparison  # compare ran after train
    assert "What is the capital of France?" in comparison
    special = section(page, "special-tokens")
    summary = read(real_output, "special_tokens_summary.json")
    for key in ("vocab_size_before", "vocab_size_after", "n_looks_untrained", "pad_equals_eos", "untrained_rule"):
        assert f"<td>{key}</td>" in special
    assert "&lt;|user|&gt;" in special and "plain_lora" in special and "trainable_tokens" in special
    assert "pad = eos:" in special and summary["control_token_view"][:20] in html.unescape(special)
    training = section(page, "training")
    rows = (real_output / "training_log.csv").read_text(encoding="utf-8").strip().count("\n")
    assert f"{rows} rows in training_log.csv" in training and "<td>eval_loss_after</td>" in training
    assert training.count('<div class="answer">') == 8  # two held-out prompts: prompt, reference, before, after
    explain = section(page, "trainer-vs-manual")
    assert "일치 / agree" in explain and "<td>max_rel_diff_loss</td>" in explain
    assert "label_smoothing" in explain and "<th>manual_loss</th>" in explain and "Trainer.train()" in explain


def test_mask_view_colours_exactly_the_trained_tokens(page, real_output, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prep = section(page, "preprocessing")
    assert "<td>examples_kept</td>" in prep and "Chat template facts" in prep and "data:image/png" in prep
    shown = [int(i) for i in re.findall(r"<p>example (\d+):", prep)]
    examples = read(real_output, "processed_conversations.json")["examples"]
    assert len(shown) == 2
    ids = [i for n in shown for i in examples[n]["input_ids"]]
    labels = [label for n in shown for label in examples[n]["labels"]]
    spans = mask_spans(prep)
    assert len(spans) == len(ids)
    assert "".join(piece for _, piece in spans) == "".join(tok.decode(examples[n]["input_ids"]) for n in shown)
    assert [kind == "t" for kind, _ in spans] == [label != -100 for label in labels]
    trained = "".join(piece for kind, piece in spans if kind == "t")
    assert "네, 안녕하세요! " + HOSTILE in trained and "4 <ok>" in trained and "2+2?" not in trained


def test_mask_view_decodes_ids_when_the_text_does_not_match(run_copy, tiny_model_dir):
    from transformers import AutoTokenizer

    processed = read(run_copy, "processed_conversations.json")
    for e in processed["examples"]:
        e["text"] = "something else"  # as after truncation: the ids no longer match the text
    (run_copy / "processed_conversations.json").write_text(json.dumps(processed), encoding="utf-8")
    prep = section(report.build_report(run_copy, outputs()).read_text(encoding="utf-8"), "preprocessing")
    shown = [int(i) for i in re.findall(r"<p>example (\d+):", prep)]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected = "".join(tok.decode(processed["examples"][n]["input_ids"]) for n in shown)
    assert "".join(piece for _, piece in mask_spans(prep)) == expected


def test_mask_view_without_any_tokenizer_falls_back_to_plain_text(run_copy):
    processed = read(run_copy, "processed_conversations.json")
    processed["summary"]["model"] = "no-such-org/no-such-model"
    (run_copy / "processed_conversations.json").write_text(json.dumps(processed), encoding="utf-8")
    prep = section(report.build_report(run_copy, outputs()).read_text(encoding="utf-8"), "preprocessing")
    assert "plain text without colours" in prep and "<|im_start|>assistant" in html.unescape(prep)
    assert '<pre class="mask">' not in prep


def test_text_is_escaped_and_page_is_self_contained(page):
    assert "<script" not in page.lower()
    assert "<b>bold</b>" not in page
    for sid in ("comparison", "training"):  # a question; a held-out prompt (the mask view: one span per token)
        assert ESCAPED in section(page, sid), sid
    for outside in ('src="http', "src='http", "url(http", "@import", "@font-face", '<link '):
        assert outside not in page


def test_secrets_never_reach_the_page(page):
    assert SECRET not in page and "never print hf_***" in section(page, "training")  # the last guard, on data
    changed = section(page, "overview").split("<details>")[0]
    assert "<td>prompt</td>" not in page  # a setting holding a token is left out, not masked
    assert "<td>max_new_tokens</td>" in changed  # a name with "token" in it but no secret stays
    assert "<td>lr</td>" not in changed and "<td>lr</td>" in page  # lr is the default: folded away only
    assert without_secrets({"hub_token": "A" * 40, "api_key": "sk-abc", "new_tokens": ["<think>"]}) == {
        "new_tokens": ["<think>"]}


def test_empty_folder_lists_every_task_as_not_run(tmp_path):
    page = report.build_report(tmp_path, outputs()).read_text(encoding="utf-8")
    not_run = section(page, "not-run")
    for o in outputs():
        assert (f"--task {o.task}</code>" in not_run) != o.optional
    assert page.count("아직 실행되지 않음 / Not run yet") == 5
    assert "data:image" not in page and "no results yet" in page


def test_partial_run_shows_what_exists(run_copy):
    for name in ("eval_before_after.json", "loss_curve.png", "final_model/run_config.json"):
        (run_copy / name).unlink()
    (run_copy / "comparison_summary.json").write_text("{ not json", encoding="utf-8")
    page = report.build_report(run_copy, outputs()).read_text(encoding="utf-8")
    assert re.search(r"\d+ rows in training_log.csv", section(page, "training"))
    assert "loss_curve.png: 없음 / missing" in section(page, "training")
    assert "could not read its files" in section(page, "comparison")  # a broken file spoils only its section
    overview = section(page, "overview")
    assert "could not read" not in overview and "held-out loss" not in overview and "비교 / compare" not in overview
    assert "Trainer vs manual loop: agree yes" in overview
    assert "<td>max_new_tokens</td>" in overview  # settings recorded by explain when train's are gone
    assert "every task ran" in section(page, "not-run")


def test_refresh_never_raises_and_run_checks_the_folder(tmp_path, caplog, real_output):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert report.refresh_report(blocker / "sub", outputs()) is None  # cannot write under a file
    assert "could not refresh" in caplog.text
    cfg = Config()
    cfg.run.output_dir = str(tmp_path / "missing")
    from fine_tuning_llms.engine.errors import UserError
    with pytest.raises(UserError, match="does not exist"):
        report.run(cfg, outputs())
    cfg.run.output_dir = str(real_output)
    result = report.run(cfg, outputs())
    assert result["tasks_run"] == ["compare", "special_tokens", "preprocess", "train", "explain"]
    assert Path(result["path"]).is_file()


def test_cli_task_report(run_copy):
    (run_copy / "report.html").unlink()
    assert main(["--task", "report", "--output_dir", str(run_copy)]) == 0
    assert "every task ran" in (run_copy / "report.html").read_text(encoding="utf-8")


def test_report_imports_no_lesson():
    """Lessons never import each other; report.py reads the others' declarations, passed in by the cli."""
    tree = ast.parse(Path(report.__file__).read_text(encoding="utf-8"))
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    lessons = {module.rsplit(".", 1)[1] for module in available_tasks().values()}
    assert not [m for m in imported if m.split(".")[-1] in lessons or m.lstrip(".").startswith("cli")], imported

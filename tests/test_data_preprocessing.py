"""Reading, validating and preprocessing conversation data, end to end through the CLI."""
import json

import pytest

from fine_tuning_llms.cli import main
from fine_tuning_llms.engine import chat_format as chat
from fine_tuning_llms.engine import data

GOOD = {"messages": [{"role": "user", "content": "What is two plus two?"},
                     {"role": "assistant", "content": "Two plus two is four."}]}


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("record", [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                       {"from": "gpt", "value": "Hello"}]},
    {"instruction": "Say hello", "input": "", "output": "Hello"},
    {"prompt": "Hi", "completion": "Hello"},
])
def test_formats_become_one_conversation_form(record):
    loaded = data.parse_records([("r", record)])
    conv = loaded.conversations[0]
    assert conv[-1] == {"role": "assistant", "content": "Hello"}
    assert conv[-2]["role"] == "user"


def test_alpaca_input_is_joined():
    conv = data.to_conversation({"instruction": "Translate", "input": "고양이", "output": "cat"}, "alpaca")
    assert conv[0]["content"] == "Translate\n\n고양이"


BAD_RECORDS = [
    ({"messages": [{"role": "robot", "content": "Hi"}, {"role": "assistant", "content": "x"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}, "content is empty"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}, "not a string"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "no assistant reply"),
    ({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "Hi"}]}, "first non-system"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "x"}]}, "two user messages in a row"),
    ({"foo": 1}, "unknown format"),
]


@pytest.mark.parametrize("record,message", BAD_RECORDS)
def test_bad_record_names_file_line_and_problem(record, message, write_jsonl, tmp_path, tiny_model_dir, capsys):
    path = write_jsonl([GOOD, record])
    out = tmp_path / "out"
    code, _, err = run_cli(["--task", "preprocess", "--model", str(tiny_model_dir), "--dataset_path", str(path),
                            "--output_dir", str(out)], capsys)
    assert code == 2
    assert f"{path}:2" in err and message in err and "--skip_invalid" in err
    assert not out.exists() or not any(out.iterdir())


def test_skip_invalid_counts_reasons(write_jsonl):
    path = write_jsonl([GOOD] + [r for r, _ in BAD_RECORDS])
    loaded = data.load_conversations(path, skip_invalid=True)
    assert len(loaded.conversations) == 1
    assert sum(loaded.skipped.values()) == len(BAD_RECORDS)


@pytest.mark.parametrize("content,message", [
    (b'{"messages": [}\n', ":1: malformed JSON line"),
    (json.dumps(GOOD).encode() + b"\n{broken\n", ":2: malformed JSON line"),
    (b"\xff\xfe\x00bad", "not UTF-8"),
    (b"   \n", "the file is empty"),
    (b'[{"messages": 1},', ":1: malformed JSON"),
])
def test_unreadable_files_fail_cleanly_and_write_nothing(content, message, tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    out = tmp_path / "out"
    code, _, err = run_cli(["--task", "preprocess", "--model", str(tiny_model_dir), "--dataset_path", str(path),
                            "--output_dir", str(out)], capsys)
    assert code == 2
    assert message in err and err.startswith("error: ") and err.count("\n") == 1
    assert "Traceback" not in err
    assert not (out / "processed_conversations.json").exists()


def test_preprocess_end_to_end(tiny_model_dir, sample_conversations, write_jsonl, tmp_path, capsys, caplog):
    caplog.set_level("INFO")
    path = write_jsonl(sample_conversations * 4)
    out = tmp_path / "out"
    code, stdout, _ = run_cli(["--task", "preprocess", "--model", str(tiny_model_dir), "--dataset_path", str(path),
                               "--output_dir", str(out), "--eval_ratio", "0"], capsys)
    assert code == 0
    saved = json.loads((out / "processed_conversations.json").read_text())
    summary, examples = saved["summary"], saved["examples"]
    assert summary["examples_kept"] == len(examples) == 12
    assert 0 < summary["share_of_tokens_trained"] < 1
    assert summary["template"]["pad_equals_eos"] is True
    assert summary["template"]["injects_default_system_prompt"] is True
    for e in examples:
        assert len(e["input_ids"]) == len(e["labels"])
        assert any(label != chat.IGNORE_INDEX for label in e["labels"])
    assert "⟦" in caplog.text  # the mask view (no colour when not a terminal)
    assert (out / "token_lengths.png").stat().st_size > 1000


def test_system_prompt_flag_is_used(tiny_model_dir, sample_conversations, write_jsonl, tmp_path, capsys):
    path = write_jsonl(sample_conversations)
    out = tmp_path / "out"
    assert run_cli(["--task", "preprocess", "--model", str(tiny_model_dir), "--dataset_path", str(path),
                    "--output_dir", str(out), "--eval_ratio", "0", "--system_prompt", "You are Lumi."], capsys)[0] == 0
    examples = json.loads((out / "processed_conversations.json").read_text())["examples"]
    assert all("You are Lumi." in e["text"] for e in examples)
    assert not any("tiny test assistant" in e["text"] for e in examples)


def test_max_length_drops_and_truncates(tiny_model_dir, sample_conversations, write_jsonl, tmp_path, capsys):
    path = write_jsonl(sample_conversations)
    out = tmp_path / "out"
    assert run_cli(["--task", "preprocess", "--model", str(tiny_model_dir), "--dataset_path", str(path),
                    "--output_dir", str(out), "--eval_ratio", "0", "--max_length", "40"], capsys)[0] == 0
    summary = json.loads((out / "processed_conversations.json").read_text())["summary"]
    assert summary["examples_dropped_too_long"] + summary["examples_kept"] == 3
    assert summary["length_percentiles"]["max"] <= 40


def test_dataset_from_the_datasets_library(tiny_model_dir, sample_conversations, tmp_path, capsys):
    import datasets

    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(sample_conversations * 2)}).save_to_disk(str(folder))
    out = tmp_path / "out"
    assert run_cli(["--task", "preprocess", "--model", str(tiny_model_dir), "--dataset", str(folder),
                    "--dataset_split", "train", "--output_dir", str(out), "--eval_ratio", "0"], capsys)[0] == 0
    assert json.loads((out / "processed_conversations.json").read_text())["summary"]["examples_kept"] == 6


def test_unreachable_dataset_id_is_one_clean_line(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(["--task", "preprocess", "--model", str(tiny_model_dir), "--dataset",
                            "no-such-org/no-such-dataset", "--output_dir", str(out)], capsys)
    assert code == 2 and err.startswith("error: --dataset no-such-org/no-such-dataset") and "--dataset_path" in err
    assert not (out / "processed_conversations.json").exists()

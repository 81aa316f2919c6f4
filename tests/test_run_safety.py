"""Resuming and sharing an output folder: what would mix or lose work is refused in one line.

Each refusal exits 2 with one `error:` line and leaves every file in the folder as it was.
"""
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fine_tuning_llms.cli import main
from fine_tuning_llms.engine.run_lock import LOCK_NAME

ROOT = Path(__file__).resolve().parents[1]


def train_args(model_dir, data, out, *extra):
    return ["--task", "train", "--model", str(model_dir), "--dataset_path", str(data), "--output_dir", str(out),
            "--batch_size", "2", "--max_steps", "3", "--save_steps", "3", "--logging_steps", "1", "--lr", "1e-2",
            "--eval_ratio", "0.2", "--eval_answers", "0", "--lora_r", "4", "--dtype", "float32", *extra]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(args, capsys, *fragments) -> str:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


@pytest.fixture
def data(write_jsonl, sample_conversations):
    return write_jsonl(sample_conversations * 6)


@pytest.fixture
def first_run(tiny_model_dir, data, tmp_path):
    """A finished 3-step run that saved checkpoint-3."""
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, data, out)) == 0
    assert (out / "checkpoints" / "checkpoint-3" / "run_identity.json").is_file()
    return out


def test_resume_with_a_changed_setting_is_refused_and_lists_it(tiny_model_dir, data, first_run, capsys):
    before = snapshot(first_run)
    err = refused(train_args(tiny_model_dir, data, first_run, "--lora_r", "8", "--max_steps", "6",
                             "--resume_from_checkpoint", "auto"), capsys,
                  "cannot resume", "lora_r 4 → 8", "lora_alpha 8 → 16", "start fresh")
    assert "training data" not in err  # only what differs is listed
    assert snapshot(first_run) == before


def test_resume_on_other_data_is_refused(tiny_model_dir, first_run, write_jsonl, sample_conversations, capsys):
    other = write_jsonl(sample_conversations[:2] * 9, name="other.jsonl")
    before = snapshot(first_run)
    refused(train_args(tiny_model_dir, other, first_run, "--max_steps", "6", "--resume_from_checkpoint", "auto"),
            capsys, "training data (tokenized)")
    assert snapshot(first_run) == before


def test_resume_may_go_further_and_change_how_often(tiny_model_dir, data, first_run):
    """Settings that only say how long or how often may change (README lists them)."""
    args = train_args(tiny_model_dir, data, first_run, "--max_steps", "5", "--save_steps", "5", "--logging_steps", "2",
                      "--resume_from_checkpoint", "auto")
    assert main(args) == 0
    assert (first_run / "checkpoints" / "checkpoint-5" / "checkpoint_complete.json").is_file()


def test_explicit_incomplete_checkpoint_names_what_is_missing(tiny_model_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    partial = out / "checkpoints" / "checkpoint-3"
    partial.mkdir(parents=True)
    (partial / "trainer_state.json").write_text("{}")
    before = snapshot(out)
    refused(train_args(tiny_model_dir, data, out, "--resume_from_checkpoint", partial), capsys,
            "not a complete checkpoint", "adapter_model.safetensors", "optimizer.pt", "checkpoint_complete.json")
    assert snapshot(out) == before


HOLDER = textwrap.dedent("""
    import sys, time
    from fine_tuning_llms.engine.run_lock import output_lock
    with output_lock(sys.argv[1], command="holder --task train"):
        print("held", flush=True)
        time.sleep(120)
""")


def start_holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_into_a_busy_folder_is_refused_then_proceeds_after_kill_9(tiny_model_dir, data, tmp_path, capsys,
                                                                             caplog):
    out = tmp_path / "run"
    holder = start_holder(out)
    try:
        before = snapshot(out)
        refused(train_args(tiny_model_dir, data, out), capsys, "in use by another run", f"pid {holder.pid}",
                "holder --task train", "another --output_dir")
        assert snapshot(out) == before
        refused(["--task", "preprocess", "--model", tiny_model_dir, "--dataset_path", data, "--output_dir", out],
                capsys, "in use by another run")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / LOCK_NAME).is_file()  # a killed holder leaves its lock behind ...
    assert main(train_args(tiny_model_dir, data, out)) == 0  # ... which the next run takes over
    assert "Taking over the lock of a run that is gone" in caplog.text and f"pid {holder.pid}" in caplog.text
    assert (out / "final_model" / "adapter_model.safetensors").is_file()
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_read_only_tasks_do_not_need_the_lock(tiny_model_dir, first_run):
    holder = start_holder(first_run)
    try:
        assert main(["--task", "report", "--output_dir", str(first_run)]) == 0
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_lock_of_a_live_process_on_this_host_is_not_taken_over(tmp_path):
    from fine_tuning_llms.engine.errors import UserError
    from fine_tuning_llms.engine.run_lock import output_lock

    with output_lock(tmp_path):
        with pytest.raises(UserError, match=f"pid {os.getpid()}"):
            with output_lock(tmp_path):
                pass
    assert not (tmp_path / LOCK_NAME).exists()

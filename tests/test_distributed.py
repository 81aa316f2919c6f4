"""More than one process on CPU (gloo): the launch guard, rank 0 alone printing and writing, FSDP2
really sharding, and DDP / FSDP / resumed FSDP runs giving the adapter of one process.

The multi-process tests are marked `distributed`; each launches 2 processes on a tiny model.
"""
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import SAMPLE_CONVERSATIONS

from fine_tuning_llms import cli
from fine_tuning_llms.cli import main

ROOT = Path(__file__).resolve().parents[1]
FSDP_CONFIG = ROOT / "examples" / "accelerate_fsdp.yaml"
LAUNCH_TIMEOUT = 480  # a launch takes ~30 s; 240 s ran out once in a slow phase of the VM
STEPS = 4
# Tolerance for "the same adapter": every run below trains in float32 on the same global batches in
# the same order, so the runs differ only in where sums are split (two processes' partial gradients
# all-reduced vs one batch's sum; a sharded vs a whole matmul). fp32 rounding of such splits is
# ~1e-7 relative per operation; Adam (lr 1e-3, 4 steps) moves each weight by at most ~4e-3 and
# divides by sqrt(v), which can lift a rounding difference at most to the size of one update
# where a gradient is near zero. 2e-5 absolute (0.5% of the total movement) catches a different
# batch, order, normalisation or a rank's lost gradient (each changes weights by ~1e-3) while
# leaving room for that rounding. Observed: DDP vs one process 1.3e-7; one process with batch 1
# instead of 2 (another global batch) 2.7e-3.
ATOL, RTOL = 2e-5, 1e-3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(model_dir: Path, data: Path, out: Path, *, batch_size: int, extra=()) -> list[str]:
    return ["--task", "train", "--model", str(model_dir), "--dataset_path", str(data), "--output_dir", str(out),
            "--batch_size", str(batch_size), "--max_steps", str(STEPS), "--save_steps", "2", "--logging_steps", "1",
            "--lr", "1e-3", "--eval_ratio", "0.2", "--lora_r", "4", "--dtype", "float32", "--eval_answers", "0",
            *extra]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    # the ranks' own messages come before the launcher's traceback: keep enough to see why one died
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-12000:]
    return proc


def fsdp_launch(port: int, script: Path, args: list[str], *launch_extra: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
            "--num_processes", "2", "--main_process_port", str(port), *launch_extra, str(script), *args]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final_model" / "adapter_model.safetensors")


def assert_same_adapter(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=ATOL, rtol=RTOL, msg=name)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dist_data") / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in list(SAMPLE_CONVERSATIONS) * 6), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def single_process_run(tiny_model_dir, data_file, tmp_path_factory) -> Path:
    """One process, batch 2: the global batch of 2 processes x batch 1, the same batches in the same order."""
    out = tmp_path_factory.mktemp("single") / "run"
    assert main(train_args(tiny_model_dir, data_file, out, batch_size=2)) == 0
    return out


# ---------------------------------------------------------------- the guard (one process, seconds)

def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def test_world_size_without_a_launcher_stops_in_one_line(tiny_model_dir, data_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, data_file, out, batch_size=2)) == 2
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1 and err.strip() == lines[0], err
    assert "WORLD_SIZE=2" in lines[0] and "torchrun --nproc_per_node 2" in lines[0] and "unset WORLD_SIZE" in lines[0]
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize("argv", [["--task", "compare", "--epochs", "0"], ["--task", "no_such_task"]])
def test_the_process_group_is_destroyed_when_main_returns(argv, capsys):
    """Left to interpreter shutdown, gloo's threads can abort a finished rank ("terminate called without
    an active exception"): main destroys the group itself, on the error path too."""
    torch.distributed.init_process_group("gloo", rank=0, world_size=1, store=torch.distributed.HashStore())
    try:
        assert main(argv) == 2
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.mark.parametrize("world", ["1", "2"])
def test_a_launched_rank_ends_without_teardown_and_one_process_exits_normally(world, monkeypatch, capsys):
    """A launched rank's group can outlive destroy_process_group (FSDP2 holds it), and its teardown at
    interpreter exit could abort a finished rank: the entry ends such a rank with os._exit, after
    flushing, with main's status. A single process exits the usual way (SystemExit, atexit runs)."""
    monkeypatch.setenv("WORLD_SIZE", world)
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ended = []

    def fake_exit(status):
        ended.append(status)
        raise SystemExit("os._exit")

    monkeypatch.setattr(os, "_exit", fake_exit)
    monkeypatch.setattr(sys, "argv", ["run_fine_tuning.py", "--task", "no_such_task"])
    with pytest.raises(SystemExit) as stop:
        cli.entry()
    assert error_lines(capsys.readouterr().err)  # main ran and said what was wrong
    if world == "2":
        assert ended == [2] and stop.value.code == "os._exit"
    else:
        assert ended == [] and stop.value.code == 2


def test_fsdp_with_kbit_weights_on_cpu_stops_in_one_line(tiny_model_dir, data_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, data_file, out, batch_size=2, extra=["--load_4bit"])) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "FSDP cannot shard --load_4bit weights on CPU" in lines[0] and "drop --load_4bit" in lines[0]


def test_fsdp_config_naming_a_layer_the_model_lacks_stops(tiny_model_dir, data_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "GPT2Block")
    assert main(train_args(tiny_model_dir, data_file, tmp_path / "run", batch_size=2)) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "GPT2Block" in lines[0] and "LlamaDecoderLayer" in lines[0]


def test_the_fsdp_example_names_no_model_class():
    text = FSDP_CONFIG.read_text()
    assert "fsdp_version: 2" in text and "DecoderLayer" not in text.split("fsdp_config:")[1]


# ---------------------------------------------------------------- several processes

@pytest.mark.distributed
def test_torchrun_ddp_equals_one_process_and_only_rank_0_speaks(tiny_model_dir, data_file, single_process_run,
                                                                tmp_path):
    out, logs = tmp_path / "ddp", tmp_path / "logs"
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "--log-dir", str(logs), "--redirects", "3", str(ROOT / "run_fine_tuning.py"),
         *train_args(tiny_model_dir, data_file, out, batch_size=1)])
    rank0 = {p.name: p.read_text() for p in logs.rglob("0/std*.log")}
    rank1 = {p.name: p.read_text() for p in logs.rglob("1/std*.log")}
    assert set(rank1) == {"stdout.log", "stderr.log"}
    assert rank1 == {"stdout.log": "", "stderr.log": ""}, rank1  # rank 1 prints nothing of its own
    assert rank0["stdout.log"].count("=== task train done") == 1 and f"step {STEPS}/{STEPS} · loss" in rank0["stdout.log"]
    # rank 0 alone writes: the same files as one process (checkpoints keep each rank's RNG state)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in single_process_run.iterdir())
    assert_same_adapter(adapter(out), adapter(single_process_run))


@pytest.mark.distributed
def test_fsdp_shards_the_model_and_equals_one_process(tiny_model_dir, data_file, single_process_run, tmp_path):
    out = tmp_path / "fsdp"
    # --eval_answers 2: generating with a sharded model needs every rank (each forward gathers weights)
    proc = run(fsdp_launch(free_port(), ROOT / "run_fine_tuning.py",
                           train_args(tiny_model_dir, data_file, out, batch_size=1, extra=["--eval_answers", "2"])))
    printed = proc.stdout + proc.stderr
    assert "FSDP2: sharding by LlamaDecoderLayer" in printed  # the model's own class, not the config's
    shard_lines = [line for line in printed.splitlines() if line.startswith("FSDP2: after step 1")]
    assert len(shard_lines) == 1, printed[-3000:]
    total = int(re.search(r"the ([\d,]+) parameter values", shard_lines[0]).group(1).replace(",", ""))
    held = [int(n.replace(",", "")) for n in re.findall(r"rank \d holds ([\d,]+)", shard_lines[0])]
    assert len(held) == 2 and sum(held) == total and all(0 < h < total for h in held)  # split, not copied
    assert printed.count("=== task train done") == 1 and printed.count(f"step {STEPS}/{STEPS} · loss") == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in single_process_run.iterdir())
    checkpoint = out / "checkpoints" / f"checkpoint-{STEPS}"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir()  # sharded checkpoints, one file per rank
    assert len(json.loads((out / "eval_before_after.json").read_text())["answers"]) == 2
    # the final adapter is a normal PEFT adapter (gathered, whole) equal to one process's
    assert_same_adapter(adapter(out), adapter(single_process_run))


KILL_AT_STEP = textwrap.dedent("""\
    import os, signal, sys
    from fine_tuning_llms.cli import main
    from fine_tuning_llms.engine import trainer

    original = trainer.ChatTrainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step == 3 and os.environ.get("RANK") == "1":
            os.kill(os.getpid(), signal.SIGKILL)  # one process dies mid-run: the launch goes down
        return original(self, *args, **kwargs)

    trainer.ChatTrainer.training_step = training_step
    sys.exit(main())
""")


@pytest.mark.distributed
def test_fsdp_resumes_after_a_kill(tiny_model_dir, data_file, single_process_run, tmp_path):
    out, script = tmp_path / "fsdp", tmp_path / "killed_at_step_3.py"
    script.write_text(KILL_AT_STEP)
    args = train_args(tiny_model_dir, data_file, out, batch_size=1)
    killed = subprocess.run(fsdp_launch(free_port(), script, args), env=env(), capture_output=True, text=True,
                            timeout=LAUNCH_TIMEOUT)
    assert killed.returncode != 0
    assert (out / "checkpoints" / "checkpoint-2" / "checkpoint_complete.json").is_file()
    assert not (out / "final_model").exists()
    proc = run(fsdp_launch(free_port(), ROOT / "run_fine_tuning.py", [*args, "--resume_from_checkpoint", "auto"]))
    assert "Resuming from" in proc.stdout and "checkpoint-2" in proc.stdout
    steps = (out / "training_log.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in steps if r.split(",")[2]] == list(range(1, STEPS + 1))
    assert_same_adapter(adapter(out), adapter(single_process_run))


@pytest.mark.distributed
def test_two_machines_simulated_here_equal_one_process(tiny_model_dir, data_file, single_process_run, tmp_path):
    """Two launches on this machine acting as two nodes (one process each), as on two real machines."""
    out, port = tmp_path / "nodes", free_port()
    args = train_args(tiny_model_dir, data_file, out, batch_size=1)

    def node(machine_rank: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "examples/accelerate_ddp.yaml"),
               "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(machine_rank),
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), str(ROOT / "run_fine_tuning.py"), *args]
        return subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    second, first = node(1), node(0)
    try:
        printed = [p.communicate(timeout=LAUNCH_TIMEOUT) for p in (first, second)]
    finally:
        for p in (first, second):
            p.kill()
    assert first.returncode == 0 and second.returncode == 0, printed[0][1][-3000:] + printed[1][1][-3000:]
    assert "2 processes on 2 machines train one model (DDP" in printed[0][0]
    assert printed[1] == ("", "")  # the second machine's process prints nothing of its own
    assert_same_adapter(adapter(out), adapter(single_process_run))

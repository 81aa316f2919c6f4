"""`--task train` end to end on the tiny model: LoRA moves only the adapter, k-bit runs, resume
after SIGKILL, merged model equals base + adapter, 2-process torchrun."""
import contextlib
import csv
import json
import logging
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fine_tuning_llms.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def train_data(write_jsonl, sample_conversations):
    return write_jsonl(sample_conversations * 6)


def train_args(model_dir, data_path, out, *extra):
    return ["--task", "train", "--model", str(model_dir), "--dataset_path", str(data_path), "--output_dir", str(out),
            "--batch_size", "2", "--max_steps", "8", "--save_steps", "4", "--logging_steps", "1", "--lr", "1e-2",
            "--eval_ratio", "0.2", "--lora_r", "4", *extra]


def losses(out: Path) -> dict[int, float]:
    with open(out / "training_log.csv", newline="") as fh:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(fh) if r["loss"]}


def test_lora_trains_adapter_and_leaves_base_untouched(tiny_model_dir, train_data, tmp_path, capfd, caplog):
    out = tmp_path / "run"
    base_before = load_file(tiny_model_dir / "model.safetensors")
    caplog.set_level(logging.INFO, logger="fine_tuning_llms")
    assert main(train_args(tiny_model_dir, train_data, out)) == 0
    printed = capfd.readouterr()
    # one toolkit line per logging step, and none of Trainer's raw log dicts
    assert "{'loss'" not in printed.out + printed.err and "{'eval_loss'" not in printed.out + printed.err
    step_lines = [m for m in caplog.messages if m.startswith("step ") and " · loss " in m]
    assert len(step_lines) == 8 and step_lines[0].startswith("step 1/8 · loss ")
    assert " · lr " in step_lines[0] and " · grad norm " in step_lines[0] and step_lines[0].endswith(" tok/s")
    final = out / "final_model"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja",
                 "run_config.json", "metrics.json"):
        assert (final / name).is_file(), name
    adapter = load_file(final / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "lora_B starts at zero and must have moved"
    assert load_file(tiny_model_dir / "model.safetensors").keys() == base_before.keys()
    for k, v in load_file(tiny_model_dir / "model.safetensors").items():
        torch.testing.assert_close(v, base_before[k], rtol=0, atol=0)
    metrics = json.loads((final / "metrics.json").read_text())
    assert metrics["global_steps"] == 8
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert set(losses(out)) == set(range(1, 9))
    with open(out / "training_log.csv", newline="") as fh:
        evals = {int(r["step"]): float(r["eval_loss"]) for r in csv.DictReader(fh) if r["eval_loss"]}
    # held-out loss during training is measured like before/after, and the last one is the "after"
    assert set(evals) == {4, 8} and evals[8] == metrics["eval_loss_after"]
    assert 0 <= metrics["eval_seconds_in_training"] < metrics["train_seconds"] and metrics["tokens_per_s"] > 0
    assert (out / "loss_curve.png").stat().st_size > 1000
    settings = json.loads((final / "run_config.json").read_text())["settings"]
    assert settings["lr"] == 1e-2 and "versions" in json.loads((final / "run_config.json").read_text())


def test_existing_final_model_is_not_overwritten(tiny_model_dir, train_data, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "final_model").mkdir(parents=True)
    (out / "final_model" / "keep.txt").write_text("mine")
    assert main(train_args(tiny_model_dir, train_data, out)) == 2
    assert "--overwrite_output_dir" in capsys.readouterr().err
    assert (out / "final_model" / "keep.txt").read_text() == "mine"


def test_bitsandbytes_missing_hub_kernel_warning_is_filtered_and_nothing_else():
    from fine_tuning_llms.engine import BITSANDBYTES_CPU_LOGGER

    logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
                       "already `pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
        logger.warning("some other bitsandbytes warning")
    finally:
        logger.removeHandler(handler)
    assert seen == ["some other bitsandbytes warning"]
    # and the real import (peft imports bitsandbytes) prints nothing about it
    proc = subprocess.run([sys.executable, "-c", "import fine_tuning_llms.fine_tuning"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and "gemm_4bit_forward" not in proc.stdout + proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("flags", [["--load_8bit"], ["--load_4bit"], ["--load_8bit", "--gradient_checkpointing"]])
def test_kbit_training_completes(flags, tiny_model_dir, train_data, tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="bitsandbytes"):
        assert main(train_args(tiny_model_dir, train_data, out, *flags, "--max_steps", "3")) == 0
    assert (out / "final_model" / "adapter_model.safetensors").is_file()
    from fine_tuning_llms.engine.kernels import buffers
    assert buffers._buffers == {}  # the k-bit nodes' buffers are freed when training ends
    logged = list(losses(out).values())
    assert len(logged) == 3 and all(math.isfinite(v) for v in logged)  # one finite loss per step
    # bitsandbytes warns at every 8-bit matmul that its input is cast; the console gets it once per dtype
    casts = [r.getMessage() for r in caplog.records if r.getMessage().startswith("MatMul8bitLt")]
    assert len(casts) == len(set(casts)) <= 2


KILLER = textwrap.dedent("""
    import os, signal, sys
    from fine_tuning_llms.engine import trainer as training
    original = training.ChatTrainer.training_step
    def training_step(self, *a, **k):
        if self.state.global_step == int(os.environ["KILL_AT_STEP"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *a, **k)
    training.ChatTrainer.training_step = training_step
    from fine_tuning_llms.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_resume_after_sigkill_matches_uninterrupted_run(tiny_model_dir, train_data, tmp_path):
    full = tmp_path / "full"
    assert main(train_args(tiny_model_dir, train_data, full)) == 0

    killed = tmp_path / "killed"
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    kill_at = random.randint(1, 7)  # before, at or after the first checkpoint (saved every 4 steps)
    env = {**os.environ, "KILL_AT_STEP": str(kill_at), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script), *train_args(tiny_model_dir, train_data, killed)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (killed / "final_model").exists()
    from fine_tuning_llms.engine.trainer import complete_checkpoints

    done = complete_checkpoints(killed / "checkpoints")
    assert [p.name for p in done] == (["checkpoint-4"] if kill_at >= 4 else []), kill_at
    for checkpoint in done:  # every completed checkpoint loads
        assert load_file(checkpoint / "adapter_model.safetensors")
        assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 4
    assert main(train_args(tiny_model_dir, train_data, killed, "--resume_from_checkpoint", "auto")) == 0

    full_losses, resumed_losses = losses(full), losses(killed)
    assert set(resumed_losses) == set(range(1, 9))
    for step in range(1, 9):
        assert resumed_losses[step] == pytest.approx(full_losses[step], rel=1e-5), (kill_at, step)
    a = load_file(full / "final_model" / "adapter_model.safetensors")
    b = load_file(killed / "final_model" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_merged_model_matches_base_plus_adapter(tiny_model_dir, train_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, train_data, out, "--max_steps", "3", "--merge")) == 0
    ids = torch.tensor([[1, 5, 9, 23, 42, 7]])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        expected = PeftModel.from_pretrained(base, out / "final_model").eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out / "final_model_merged").eval()(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(expected, plain), "the adapter must change the logits"


@pytest.mark.slow
def test_torchrun_two_processes_save_one_adapter(tiny_model_dir, train_data, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           str(ROOT / "run_fine_tuning.py"), *train_args(tiny_model_dir, train_data, out, "--max_steps", "4")]
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "final_model" / "adapter_model.safetensors").is_file()
    assert [p.name for p in out.iterdir() if p.name.startswith("final_model")] == ["final_model"]
    assert json.loads((out / "final_model" / "metrics.json").read_text())["global_steps"] == 4


def test_a_run_too_short_to_pay_for_packed_copies_makes_none_and_says_so(tiny_model_dir, train_data, tmp_path,
                                                                         monkeypatch, caplog):
    from fine_tuning_llms.engine import kernels

    if not kernels.weight_packing_available(torch.float32):
        pytest.skip("this torch build cannot pack weights")
    released, release = [], kernels.release_packed_weights
    monkeypatch.setattr(kernels, "release_packed_weights", lambda model: released.append(release(model)))
    monkeypatch.setattr(kernels.lora_linear, "PACK_MIN_PASSES", 7)  # the line names the threshold in force
    args = train_args(tiny_model_dir, train_data, tmp_path / "run", "--max_steps", "2", "--dtype", "float32",
                      "--grad_accum", "3")
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    assert released == [0]  # no copy was made
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Packed weights off")]
    assert len(lines) == 1 and "6 forward/backward passes" in lines[0] and "fewer than the 7 " in lines[0]


def test_a_trial_run_packs_weights_as_the_run_it_stands_in_for(tiny_model_dir, train_data, tmp_path, monkeypatch,
                                                               caplog):
    """The plan's trial run trains a few steps for a longer run: it makes the packed copies that run will make."""
    from fine_tuning_llms.engine import kernels
    from fine_tuning_llms.engine.memory_plan import STAND_IN_PASSES

    if not kernels.weight_packing_available(torch.float32):
        pytest.skip("this torch build cannot pack weights")
    released, release = [], kernels.release_packed_weights
    monkeypatch.setattr(kernels, "release_packed_weights", lambda model: released.append(release(model)))
    monkeypatch.setattr(kernels.lora_linear, "PACK_MIN_PASSES", 7)
    monkeypatch.setenv(STAND_IN_PASSES, "90")  # 2 steps x 3 micro-batches here, standing in for 90 passes
    args = train_args(tiny_model_dir, train_data, tmp_path / "run", "--max_steps", "2", "--dtype", "float32",
                      "--grad_accum", "3")
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    assert len(released) == 1 and released[0] > 0  # the copies were made, and freed after training
    assert not [r for r in caplog.records if r.getMessage().startswith("Packed weights off")]
    plan = json.loads((tmp_path / "run" / "final_model" / "metrics.json").read_text())["memory_plan"]
    assert plan["parts_mb"]["packed weights"] > 0  # and its own plan counted them


def test_speed_levers_do_not_change_the_losses(tiny_model_dir, train_data, tmp_path, monkeypatch):
    """Packing + trained-positions-only logits + fused nodes vs plain padded batches: same per-step losses."""
    from fine_tuning_llms.engine import kernels
    from fine_tuning_llms.engine.kernels import HeadCrossEntropyFunction
    from fine_tuning_llms.engine.trainer import ChatTrainer

    fused_calls, micro_batches, released = [], [], []
    original, compute_loss = HeadCrossEntropyFunction.apply, ChatTrainer.compute_loss
    monkeypatch.setattr(HeadCrossEntropyFunction, "apply", lambda *a: fused_calls.append(1) or original(*a))
    release = kernels.release_packed_weights
    monkeypatch.setattr(kernels, "release_packed_weights", lambda model: released.append(release(model)))
    monkeypatch.setattr(ChatTrainer, "compute_loss",
                        lambda self, *a, **k: micro_batches.append(1) or compute_loss(self, *a, **k))
    common = ("--max_steps", "4", "--lora_dropout", "0", "--dtype", "float32", "--grad_accum", "2")
    monkeypatch.setattr(kernels.lora_linear, "PACK_MIN_PASSES", 8)  # this run's 8 passes make the packed copies
    fast, plain = tmp_path / "fast", tmp_path / "plain"
    assert main(train_args(tiny_model_dir, train_data, fast, *common)) == 0
    # every training micro-batch took the fused head, and so did the packing self-check (once)
    assert len(fused_calls) == len(micro_batches) + 1 and len(micro_batches) >= 4
    if kernels.weight_packing_available(torch.float32):
        assert len(released) == 1 and released[0] > 0  # packed weight copies were used, and freed after training
    unpacked = tmp_path / "unpacked"
    assert main(train_args(tiny_model_dir, train_data, unpacked, *common, "--pack_weights", "false")) == 0
    assert len(released) == 2 and released[1] == 0  # no packed copy made
    a, b = losses(fast), losses(unpacked)
    assert set(a) == set(b) == {1, 2, 3, 4}
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5)
    fused_in_fast_run = len(fused_calls)
    assert main(train_args(tiny_model_dir, train_data, plain, *common, "--packing", "false",
                           "--trained_logits_only", "false", "--fused_kernels", "false")) == 0
    assert len(fused_calls) == fused_in_fast_run  # ... and none of the plain run's
    a, b = losses(fast), losses(plain)
    assert set(a) == set(b) == {1, 2, 3, 4}
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4)


def _fail_at_step(monkeypatch, step: int, failure):
    from fine_tuning_llms.engine import trainer as training

    original = training.ChatTrainer.compute_loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = original(self, model, inputs, *args, **kwargs)
        if model.training and self.state.global_step == step:
            return failure(loss)
        return loss

    monkeypatch.setattr(training.ChatTrainer, "compute_loss", compute_loss)


@pytest.mark.parametrize("fails", [False, True])
def test_objects_sit_out_collection_only_during_train(monkeypatch, fails):
    """ChatTrainer.train freezes the objects alive at its start (Trainer's opening gc.collect() skips
    them) and hands them back when it returns or raises; a freeze the caller made is left alone."""
    import gc

    import transformers

    from fine_tuning_llms.engine.trainer import ChatTrainer

    seen = []

    def train(self, *args, **kwargs):
        seen.append(gc.get_freeze_count())
        if fails:
            raise RuntimeError("stopped")
        return "done"

    monkeypatch.setattr(transformers.Trainer, "train", train)
    trainer = object.__new__(ChatTrainer)  # only train() runs: no model needed
    gc.unfreeze()
    try:
        with pytest.raises(RuntimeError) if fails else contextlib.nullcontext():
            assert ChatTrainer.train(trainer) == "done"
        assert seen[0] > 0 and gc.get_freeze_count() == 0
        gc.freeze()  # the caller's own
        frozen = gc.get_freeze_count()
        fresh = [[] for _ in range(1000)]  # born after the caller's freeze: a second freeze would take them
        with pytest.raises(RuntimeError) if fails else contextlib.nullcontext():
            ChatTrainer.train(trainer)
        # A frozen object that dies leaves the count (CI saw 744080 -> 744078), so the count may fall a
        # little; unfreezing would drop it to 0, freezing again would add the 1000 fresh lists.
        assert frozen - 1000 < gc.get_freeze_count() <= frozen and len(fresh) == 1000
    finally:
        gc.unfreeze()


def test_nan_loss_stops_without_saving_a_final_model(tiny_model_dir, train_data, tmp_path, monkeypatch, capsys):
    _fail_at_step(monkeypatch, 2, lambda loss: loss * float("nan"))
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, train_data, out)) == 2
    err = capsys.readouterr().err
    assert "loss became nan at step 3" in err and "--lr" in err
    assert not (out / "final_model").exists()


def test_ctrl_c_saves_the_adapter_so_far(tiny_model_dir, train_data, tmp_path, monkeypatch):
    def interrupt(loss):
        raise KeyboardInterrupt

    _fail_at_step(monkeypatch, 3, interrupt)
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, train_data, out)) == 130
    saved = out / "interrupted_model"
    assert (saved / "adapter_model.safetensors").is_file() and (saved / "tokenizer.json").is_file()
    assert json.loads((saved / "metrics.json").read_text())["interrupted_at_step"] == 3
    assert not (out / "final_model").exists()


def test_new_tokens_are_added_and_their_rows_trained(tiny_model_dir, train_data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fine_tuning_llms.engine.adapters import load_model_with_adapter
    from fine_tuning_llms.engine.config import ModelConfig

    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, train_data, out, "--max_steps", "3", "--new_tokens", "<|user|>")) == 0
    tok = AutoTokenizer.from_pretrained(out / "final_model")
    base_vocab = len(AutoTokenizer.from_pretrained(tiny_model_dir))
    assert len(tok) == base_vocab + 1 and len(tok("<|user|>", add_special_tokens=False)["input_ids"]) == 1
    new_id = tok.convert_tokens_to_ids("<|user|>")
    def loaded_rows(seed):
        torch.manual_seed(seed)  # the resize initialises new rows randomly; the adapter must overwrite them
        model, _ = load_model_with_adapter(ModelConfig(model=str(tiny_model_dir)), out / "final_model")
        return model.merge_and_unload().get_input_embeddings().weight.detach()

    rows = loaded_rows(1)
    torch.testing.assert_close(loaded_rows(2)[new_id], rows[new_id], rtol=0, atol=0)
    base_rows = AutoModelForCausalLM.from_pretrained(tiny_model_dir).get_input_embeddings().weight.detach()
    assert rows.shape[0] == base_vocab + 1
    # The new row was trained away from the mean initialisation; old rows are untouched.
    assert not torch.allclose(rows[new_id], base_rows.mean(0), atol=1e-6)
    torch.testing.assert_close(rows[:base_vocab], base_rows, rtol=0, atol=0)


def test_task_all_refuses_an_existing_final_model_before_any_work(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "final_model").mkdir(parents=True)
    assert main(["--model", str(tiny_model_dir), "--output_dir", str(out)]) == 2
    assert "--overwrite_output_dir" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["final_model"]

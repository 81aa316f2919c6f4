"""Memory plan (engine/memory_plan.py) and `--task plan` on tiny local models: the parts are counted
from the config alone, they order the way dtypes and quantisation say, a run predicted not to fit
stops before loading with the options that fit, and the plan task times a trial run."""
import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from fine_tuning_llms.cli import main
from fine_tuning_llms.engine.config import Config
from fine_tuning_llms.engine.kernels import weight_packing_available
from fine_tuning_llms.engine.memory_plan import (
    MB,
    activation_bytes_per_token,
    largest_step_tokens,
    meta_model,
    plan_memory,
    weight_bytes,
)


def plan_for(model_dir: Path, lengths, *, dtype=torch.bfloat16, autocast=torch.bfloat16, **train):
    cfg = Config()
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return plan_memory(cfg, str(model_dir), lengths, device=torch.device("cpu"), packed=cfg.train.packing,
                       weight_dtype=dtype, autocast=autocast, process=100 * MB)


def test_weights_are_counted_exactly_from_the_config(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    unique = {id(p): p.numel() for p in real.parameters()}
    model, _ = meta_model(str(tiny_model_dir))
    assert weight_bytes(model, dtype=torch.float32, load_8bit=False, load_4bit=False) == 4 * sum(unique.values())
    sizes = [weight_bytes(model, dtype=torch.bfloat16, load_8bit=q8, load_4bit=q4)
             for q8, q4 in ((False, False), (True, False), (False, True))]
    assert sizes[0] > sizes[1] > sizes[2] > 0  # bf16 > 8-bit > 4-bit


def test_activations_grow_with_the_step_and_the_attention(tiny_model_dir):
    small = plan_for(tiny_model_dir, [50] * 16, batch_size=2, packing=False)
    large = plan_for(tiny_model_dir, [50] * 16, batch_size=8, packing=False)
    assert large.step_tokens == 4 * small.step_tokens == 400
    assert large.parts["activations"] == pytest.approx(4 * small.parts["activations"])
    # packed, the self-check's row of the 4 longest conversations runs with gradients before training
    assert plan_for(tiny_model_dir, [50] * 16, batch_size=2).step_tokens == 200
    assert largest_step_tokens([10, 30, 20], 3, packed=False) == (90, 30)  # padded to the longest row
    assert largest_step_tokens([10, 30, 20], 3, packed=True) == (60, 60)
    lengths = list(range(1, 101))
    assert largest_step_tokens(lengths, 1, packed=True, steps=3)[0] < 100 == largest_step_tokens(lengths, 1, True)[0]
    model, config = meta_model(str(tiny_model_dir))
    assert activation_bytes_per_token(config, 4) == 2 * activation_bytes_per_token(config, 2)


def test_kbit_activations_count_the_fp32_stream_and_peft_input_copies(tiny_model_dir):
    cfg = Config()
    cfg.model.load_8bit = True
    kbit = plan_memory(cfg, str(tiny_model_dir), [50] * 16, device=torch.device("cpu"), packed=True,
                       weight_dtype=torch.bfloat16, autocast=torch.bfloat16, process=100 * MB)
    plain = plan_for(tiny_model_dir, [50] * 16)
    model, config = meta_model(str(tiny_model_dir))
    inputs = sum(m.in_features for m in model.modules()
                 if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings())  # all-linear
    per_token = activation_bytes_per_token(config, 4) + 2 * inputs  # fp32 residual stream + bf16 LoRA input copies
    assert kbit.step_tokens == plain.step_tokens
    assert kbit.parts["activations"] == pytest.approx(kbit.step_tokens * per_token)
    assert kbit.parts["activations"] > 2 * plain.parts["activations"]
    assert kbit.parts["packed weights"] == 0  # weight packing skips k-bit layers
    largest = max(m.weight.numel() for m in model.modules()
                  if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings())
    assert kbit.parts["k-bit buffers"] == largest * (4 + 2)  # the 8-bit node's fp32 dequantisation and bf16 cast
    cfg.model.load_8bit, cfg.model.load_4bit = False, True
    four_bit = plan_memory(cfg, str(tiny_model_dir), [50] * 16, device=torch.device("cpu"), packed=True,
                           weight_dtype=torch.bfloat16, autocast=torch.bfloat16, process=100 * MB)
    assert four_bit.parts["k-bit buffers"] == largest * 2  # the 4-bit node dequantises bf16 weights in bf16
    four_bit = plan_memory(cfg, str(tiny_model_dir), [50] * 16, device=torch.device("cpu"), packed=True,
                           weight_dtype=torch.float32, autocast=torch.bfloat16, process=100 * MB)
    assert four_bit.parts["k-bit buffers"] == largest * (4 + 2)  # fp32 weights: dequantised in fp32, then cast


def test_checkpointed_activations_are_the_layer_inputs_and_one_layer(tiny_model_dir):
    full = plan_for(tiny_model_dir, [50] * 16)
    checkpointed = plan_for(tiny_model_dir, [50] * 16, gradient_checkpointing=True)
    _, config = meta_model(str(tiny_model_dir))
    layers, hidden = config.num_hidden_layers, config.hidden_size
    per_token = layers * hidden * 2 + activation_bytes_per_token(config, 2) / layers  # bf16 stream, one layer
    assert checkpointed.step_tokens == full.step_tokens
    assert checkpointed.parts["activations"] == pytest.approx(checkpointed.step_tokens * per_token)
    assert checkpointed.parts["activations"] < full.parts["activations"]
    assert checkpointed.training < full.training
    assert not checkpointed.notes
    # k-bit + checkpointing measured well above its count (allocator, benchmarks/RESULTS.md): the plan says so
    cfg = Config()
    cfg.model.load_4bit, cfg.train.gradient_checkpointing = True, True
    kbit = plan_memory(cfg, str(tiny_model_dir), [50] * 16, device=torch.device("cpu"), packed=True,
                       weight_dtype=torch.bfloat16, autocast=torch.bfloat16, process=100 * MB)
    assert any("--gradient_checkpointing" in n for n in kbit.notes) and "--gradient_checkpointing" in kbit.describe()


def test_a_run_that_does_not_fit_stops_before_loading_and_names_what_fits(tiny_model_dir, write_jsonl,
                                                                          sample_conversations, tmp_path, capfd,
                                                                          monkeypatch):
    import fine_tuning_llms.fine_tuning as ft

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded although the plan did not fit")

    monkeypatch.setattr(ft, "load_model", no_loading)
    data = write_jsonl(sample_conversations * 4)
    code = main(["--task", "train", "--model", str(tiny_model_dir), "--dataset_path", str(data), "--output_dir",
                 str(tmp_path / "out"), "--memory_gb", "0.01"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2
    assert len([line for line in err if line.startswith("error:")]) == 1
    assert "MB is available" in err[-1] and ("options that fit" in err[-1] or "no smaller setting fits" in err[-1])
    assert not (tmp_path / "out" / "final_model").exists()


@pytest.fixture
def steady_rss(monkeypatch):
    """Each plan counts what the process holds when it is made: held still, so the plans a test compares
    differ only by their settings (a drift of a few hundred KB can flip a tiny model's fit)."""
    from fine_tuning_llms.engine import host_memory, memory_plan

    for module in (memory_plan, host_memory):  # the plan's own count, and what is available
        monkeypatch.setattr(module, "current_rss", lambda: 500.0 * 1024 ** 2)


def test_options_that_fit_are_real_options(tiny_model_dir, write_jsonl, sample_conversations, tmp_path,
                                           steady_rss):
    from fine_tuning_llms.engine.memory_plan import options_that_fit, plan_training

    cfg = Config()
    cfg.train.batch_size, cfg.data.max_length = 64, 1024
    lengths = [900] * 128
    device = torch.device("cpu")
    full = plan_training(cfg, str(tiny_model_dir), lengths, device)
    checkpointed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, gradient_checkpointing=True))
    saved = full.training - plan_training(checkpointed, str(tiny_model_dir), lengths, device).training
    # a limit under the full plan that checkpointing and half the batch (half the activations) both meet
    limit = (full.training - min(saved, full.parts["activations"] * 0.5) * 0.9) / 1024 ** 3
    plan = plan_training(cfg, str(tiny_model_dir), lengths, device, limit)
    assert not plan.fits
    fits = options_that_fit(cfg, lambda trial: plan_training(trial, str(tiny_model_dir), lengths, device, limit))
    assert fits and all(f.startswith(("--pack_weights false", "--gradient_checkpointing", "--batch_size",
                                      "--max_length", "--load_")) for f in fits)
    assert fits[0].startswith(("--pack_weights false", "--gradient_checkpointing"))  # same gradients: named first
    assert any(f.startswith("--batch_size 32 --grad_accum 2") for f in fits)  # same effective batch


def test_training_passes_counts_one_process_share(monkeypatch):
    from fine_tuning_llms.engine.memory_plan import training_passes

    train = Config().train
    train.max_steps, train.grad_accum = 10, 3
    assert training_passes(train, 100) == 30 and training_passes(train, 100, processes=4) == 30  # each makes every step
    train.max_steps, train.epochs, train.batch_size = -1, 2, 8
    assert training_passes(train, 100) == 2 * 13  # ceil(100 / 8) batches an epoch
    assert training_passes(train, 100, processes=4) == 2 * 4  # 25 examples each: ceil(25 / 8)
    monkeypatch.setenv("WORLD_SIZE", "4")  # a launch's processes, read from the environment by default
    assert training_passes(train, 100) == 2 * 4


def launched(monkeypatch, *, rank: int, processes: int, here: int) -> None:
    """The environment torchrun gives rank ``rank`` of ``processes``, ``here`` of them on this machine."""
    for name, value in (("WORLD_SIZE", processes), ("RANK", rank), ("LOCAL_WORLD_SIZE", here),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", 29500)):
        monkeypatch.setenv(name, str(value))


def test_a_launch_plans_each_process_for_its_share_of_the_machine(tiny_model_dir, monkeypatch, steady_rss):
    """Two processes on one CPU machine that each fit alone may not fit together: each plans for half."""
    from fine_tuning_llms.engine import host_memory

    monkeypatch.setattr(host_memory, "free_memory", lambda: 8.0 * 1024 ** 3)
    assert host_memory.available_memory() == 500 * MB + 8 * 1024 ** 3  # one process: all that is free
    launched(monkeypatch, rank=1, processes=4, here=2)  # two machines of two processes
    assert host_memory.available_memory(16) == 8 * 1024 ** 3
    assert host_memory.available_memory() == 500 * MB + 4 * 1024 ** 3
    assert host_memory.available_memory(16, torch.device("cuda")) == 16 * 1024 ** 3  # a GPU each: no sharing
    plan = plan_for(tiny_model_dir, [50] * 16)
    assert any("2 processes of this launch share this machine" in note for note in plan.notes)
    from fine_tuning_llms.engine import kernels  # each process makes its own packed copies: half each

    assert kernels._available_memory() == 4 * 1024 ** 3
    launched(monkeypatch, rank=1, processes=2, here=1)  # one process on each of two machines
    assert host_memory.available_memory(16) == 16 * 1024 ** 3


@pytest.mark.parametrize("rank", [0, 1])
def test_plan_task_under_a_launch_runs_no_trial_and_only_rank_0_writes(tiny_model_dir, write_jsonl,
                                                                       sample_conversations, tmp_path, monkeypatch,
                                                                       rank):
    """A trial run started by a rank would inherit the launch's environment (and one process's speed does
    not time N processes sharing the cores), and only rank 0 writes files."""
    from fine_tuning_llms import plan

    def no_trial(*args, **kwargs):
        raise AssertionError("a rank of a launch started a trial run")

    monkeypatch.setattr(plan, "time_steps", no_trial)
    launched(monkeypatch, rank=rank, processes=2, here=2)
    cfg = Config()
    cfg.model.model, cfg.data.dataset_path = str(tiny_model_dir), str(write_jsonl(sample_conversations * 4))
    cfg.run.output_dir, cfg.train.lora_r = str(tmp_path / "plan"), 4
    result = plan.run(cfg)
    assert result["fits"] is True and "timing" not in result
    assert (tmp_path / "plan" / "plan.json").exists() == (rank == 0)


@pytest.mark.skipif(not weight_packing_available(torch.float32), reason="this torch build cannot pack weights")
def test_pack_weights_false_leaves_the_packed_copy_out_and_is_named_first(tiny_model_dir, steady_rss):
    from fine_tuning_llms.engine.memory_plan import options_that_fit, plan_training

    cfg = Config()
    cfg.model.dtype = "float32"
    lengths, device = [200] * 32, torch.device("cpu")
    cfg.train.epochs = 20  # 80 passes of 8: long enough to make the packed copies (PACK_MIN_PASSES)
    packed = plan_training(cfg, str(tiny_model_dir), lengths, device)
    unpacked_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, pack_weights=False))
    unpacked = plan_training(unpacked_cfg, str(tiny_model_dir), lengths, device)
    copies = packed.parts["packed weights"]
    assert copies > 0 and unpacked.parts["packed weights"] == 0
    for short in ({"epochs": 2}, {"max_steps": 15, "grad_accum": 2}):  # 8 and 30 passes: no copy is made
        short_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **short))
        assert plan_training(short_cfg, str(tiny_model_dir), lengths, device).parts["packed weights"] == 0, short
    long_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=16, grad_accum=2))  # 32
    assert plan_training(long_cfg, str(tiny_model_dir), lengths, device).parts["packed weights"] == copies
    assert packed.training - unpacked.training == pytest.approx(copies)
    # a limit that only dropping the copy meets (the quarter rule still lets the copy be planned)
    limit = (packed.training - copies / 2) / 1024 ** 3
    assert not plan_training(cfg, str(tiny_model_dir), lengths, device, limit).fits
    fits = options_that_fit(cfg, lambda trial: plan_training(trial, str(tiny_model_dir), lengths, device, limit))
    assert fits[0].startswith("--pack_weights false")


def test_a_trial_run_reports_its_own_peak_not_its_parents(tmp_path):
    """Linux's ru_maxrss of a subprocess starts at its parent's peak: a trial run launched from a process
    that once held 1.5 GB must not report 1.5 GB."""
    import subprocess

    from fine_tuning_llms.plan import PEAK_RSS_WRAPPER

    held = bytearray(1536 * 1024 ** 2)
    held[::4096] = b"\x01" * len(range(0, len(held), 4096))  # every page touched: resident
    out = tmp_path / "rss"
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS_WRAPPER, str(out), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert 0 < float(out.read_text()) < 1024  # the CLI's imports alone: a few hundred MB
    del held


def test_plan_task_predicts_and_times_a_trial_run(tiny_model_dir, write_jsonl, sample_conversations, tmp_path):
    import subprocess

    data = write_jsonl(sample_conversations * 6)
    out = tmp_path / "plan"
    # in its own process, as a user runs it: the plan counts the planning process's own memory as the
    # training process's start, and this test process holds whatever the tests before it left
    proc = subprocess.run([sys.executable, "-m", "fine_tuning_llms", "--task", "plan", "--model", str(tiny_model_dir),
                           "--dataset_path", str(data), "--output_dir", str(out), "--batch_size", "2", "--lora_r", "4"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["fits"] is True
    assert plan["memory"]["peak_mb"] > plan["memory"]["parts_mb"]["process"] > 0
    assert plan["timing"]["tokens_per_s"] > 0 and plan["epoch_seconds"] > 0
    measured = plan["timing"]["peak_rss_mb"]
    # a tiny model's peak is mostly the process itself, which the plan reads rather than predicts;
    # the real models' table is in benchmarks/RESULTS.md (benchmarks/bench_plan.py)
    assert abs(plan["memory"]["peak_mb"] - measured) / measured < 0.5, (plan["memory"], measured)
    assert not (out / "final_model").exists()  # the trial run's outputs are thrown away


def test_train_prints_the_memory_plan_before_loading_and_the_time_after_four_steps(
        tiny_model_dir, write_jsonl, sample_conversations, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO)
    data = write_jsonl(sample_conversations * 6)
    out = tmp_path / "run"
    assert main(["--task", "train", "--model", str(tiny_model_dir), "--dataset_path", str(data), "--output_dir",
                 str(out), "--max_steps", "6", "--batch_size", "2", "--lora_r", "4", "--eval_answers", "0"]) == 0
    text = caplog.text
    assert text.index("Memory plan: training needs") < text.index("Loaded ")
    assert "Time plan:" in text and "min per epoch" in text
    plan = json.loads((out / "final_model" / "metrics.json").read_text())["memory_plan"]
    assert plan["peak_mb"] >= plan["training_mb"] > plan["parts_mb"]["process"]


def test_a_model_the_plan_cannot_build_still_trains(tiny_model_dir, write_jsonl, sample_conversations, tmp_path,
                                                    monkeypatch, caplog):
    import logging

    import fine_tuning_llms.engine.memory_plan as memory_plan

    def cannot(*args, **kwargs):
        raise ValueError("unknown architecture")

    monkeypatch.setattr(memory_plan, "meta_model", cannot)
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    assert main(["--task", "train", "--model", str(tiny_model_dir), "--dataset_path",
                 str(write_jsonl(sample_conversations * 4)), "--output_dir", str(out), "--max_steps", "2",
                 "--batch_size", "2", "--lora_r", "4", "--eval_answers", "0"]) == 0
    assert "Memory plan: not available for this model (ValueError: unknown architecture)" in caplog.text
    assert json.loads((out / "final_model" / "metrics.json").read_text())["memory_plan"] is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_memory_goes_back_to_the_system():
    """Blocks freed between live ones stay resident until the allocator is asked to return them."""
    from fine_tuning_llms.engine.host_memory import current_rss, return_freed_memory

    blocks = [torch.ones(16 * 1024) for _ in range(3000)]  # 64 KB each: the heap, not mmap
    kept = blocks[::10]  # live blocks in between keep the freed ones off the heap's top
    del blocks
    before = current_rss()
    assert return_freed_memory()
    assert before - current_rss() > 100 * MB  # ~170 MB of the 190 MB freed
    assert len(kept) == 300


def _mapped_files(tensor: torch.Tensor) -> list[str]:
    """The files /proc/self/maps says hold the memory of ``tensor``'s data (empty: anonymous memory)."""
    address = tensor.untyped_storage().data_ptr()
    files = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end and len(fields) == 6:
            files.append(fields[5])
    return files


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
def test_weights_loaded_in_their_files_dtype_stay_mapped_and_add_no_loading_copy(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from fine_tuning_llms.engine.config import ModelConfig
    from fine_tuning_llms.engine.models import load_model
    from fine_tuning_llms.engine.weight_files import bytes_stored_in, file_bytes

    folder = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(folder)
    stored = bytes_stored_in(str(folder), torch.bfloat16)
    assert 0 < stored <= file_bytes(str(folder)) and bytes_stored_in(str(folder), torch.float32) == 0
    # what the plan relies on: in the file's dtype transformers keeps the tensors in the file's memory map
    kept = load_model(ModelConfig(model=str(folder), dtype="bfloat16")).get_input_embeddings().weight
    assert any(f.endswith(".safetensors") for f in _mapped_files(kept))
    converted = load_model(ModelConfig(model=str(folder), dtype="float32")).get_input_embeddings().weight
    assert not any(f.endswith(".safetensors") for f in _mapped_files(converted))
    # so loading in bf16 holds the weights once; in fp32 the weights plus the bf16 file's pages read to make them
    same = plan_for(folder, [50] * 16, dtype=torch.bfloat16)
    assert same.loading == pytest.approx(100 * MB + same.parts["weights"], abs=64 * 1024)  # the files' headers
    cast = plan_for(folder, [50] * 16, dtype=torch.float32, autocast=None)
    assert cast.loading == pytest.approx(100 * MB + cast.parts["weights"] + file_bytes(str(folder)))


def test_the_trial_run_stands_in_for_the_whole_run(tiny_model_dir, write_jsonl, sample_conversations, tmp_path,
                                                   monkeypatch):
    import subprocess

    from fine_tuning_llms import plan as plan_task
    from fine_tuning_llms.engine.memory_plan import STAND_IN_PASSES

    calls = []

    def fake_run(cmd, **kwargs):  # the trial run's command and environment, not run
        calls.append((cmd, kwargs["env"]))
        return subprocess.CompletedProcess(cmd, 1, "", "not run in this test")

    monkeypatch.setattr(plan_task.subprocess, "run", fake_run)
    data = write_jsonl(sample_conversations * 6)
    assert main(["--task", "plan", "--model", str(tiny_model_dir), "--dataset_path", str(data), "--output_dir",
                 str(tmp_path / "plan"), "--batch_size", "2", "--epochs", "3"]) == 0
    (cmd, env), = calls
    assert cmd[cmd.index("--max_steps") + 1] == "4"
    steps = json.loads((tmp_path / "plan" / "plan.json").read_text())["steps_per_epoch"]
    # 4 steps timed for a run of 3 epochs (one pass a step): it packs weights (or not) as those passes will
    assert steps > 4 and float(env[STAND_IN_PASSES]) == 3 * steps


KERNEL_CACHE_PROBE = """
import ctypes, os, re, sys
import fine_tuning_llms.engine  # first, as every task does: it bounds the kernel caches before any product runs
import torch
def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
weight = torch.randn(1536, 576).bfloat16()
def products(rows):  # a new row count is a new kernel in each cache, as a packed step's is
    for n in rows:
        (torch.randn(n, 576).bfloat16() @ weight.t()).sum()
        (torch.randn(n, 1536).bfloat16() @ weight).sum()
trim = ctypes.CDLL("libc.so.6").malloc_trim
products(range(1, 150)); trim(0); before = rss()
products(range(150, 450)); trim(0)
print(os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"], os.environ["LRU_CACHE_CAPACITY"], rss() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/self/status (Linux)")
def test_kernel_caches_stay_bounded_over_new_shapes():
    import subprocess

    if not weight_packing_available(torch.bfloat16):  # oneDNN with bf16 products on this CPU
        pytest.skip("bf16 products do not go through oneDNN here")
    clean = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}

    def probe(**env):
        out = subprocess.run([sys.executable, "-c", KERNEL_CACHE_PROBE], env={**clean, **env}, capture_output=True,
                             text=True, check=True).stdout.split()
        return out[0], out[1], float(out[2])

    onednn, ideep, growth = probe()
    assert (onednn, ideep) == ("64", "64") and growth < 25, growth  # ~1 MB here over 300 new shapes
    # a capacity the user set is kept; torch's own 1,024 grows with every new shape (~370 MB here)
    onednn, ideep, growth = probe(ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024", LRU_CACHE_CAPACITY="1024")
    assert (onednn, ideep) == ("1024", "1024") and growth > 50, growth


@pytest.mark.parametrize("family,fused", [("llama", True), ("qwen2", True), ("gemma3", True), ("gemma2", False)])
def test_the_head_is_planned_as_the_path_training_takes(family, fused, tmp_path, monkeypatch):
    from tiny import save_family_checkpoint

    from fine_tuning_llms.engine import memory_plan

    folder = save_family_checkpoint(tmp_path / family, family)
    monkeypatch.setattr(memory_plan, "HEAD_CHUNK_BYTES", 1.0)  # smaller than any step's logits: the two paths differ
    for fused_kernels in (True, False):
        plan = plan_for(folder, [50] * 16, batch_size=4, fused_kernels=fused_kernels)
        vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
        whole_logits = 3.0 * 4 * (plan.step_tokens // 2) * vocab  # fp32 logits of every trained position
        assert plan.parts["head logits"] == (1.0 if fused and fused_kernels else pytest.approx(whole_logits))

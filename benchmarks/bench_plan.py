"""The memory plan (engine/memory_plan.py) against measurement: predicted peak vs the measured peak
RSS of the same training run, for the embedded model and the Llama-3.2-1B shape (random weights),
in fp32 / bf16 / 8-bit / 4-bit, batch 1 and 8; also the Llama-3.2-3B, Llama-3.1-8B and Llama-2-13B shapes on
request (``--models 3b``, ``8b``, ``13b``).

    python benchmarks/bench_plan.py                       # the whole table (the 1B rows take minutes each)
    python benchmarks/bench_plan.py --models embedded --modes bf16 --batches 8
    python benchmarks/bench_plan.py --largest 16          # which Llama sizes the plan says train in 16 GB
    python benchmarks/bench_plan.py --models 3b --modes bf16,8bit,4bit --batches 8   # and the 3B shape measured
    python benchmarks/bench_plan.py --models 8b --modes 4bit --batches 8 --extra=--gradient_checkpointing

Each row is one ``run_fine_tuning.py --task train --max_steps 3`` in its own process; its peak RSS
is that process's own (``host_memory.peak_rss_mb``: VmHWM, not the ``ru_maxrss`` a child inherits from
its parent), and the prediction is the plan the run itself printed and saved
(``final_model/metrics.json``, ``memory_plan``). "bf16" is the CPU default here (--dtype auto:
bf16 weights and autocast where the CPU computes bf16); "fp32" is --dtype float32.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_1b_shape import PUBLISHED, llama_shape_folder  # noqa: E402

MODES = {"fp32": ["--dtype", "float32"], "bf16": [], "8bit": ["--load_8bit"], "4bit": ["--load_4bit"]}


def measure(model: str, mode: str, batch: int, extra: list[str]) -> dict:
    from fine_tuning_llms.plan import PEAK_RSS_WRAPPER

    with tempfile.TemporaryDirectory() as tmp:
        rss = Path(tmp) / "rss"
        cmd = [sys.executable, "-c", PEAK_RSS_WRAPPER, str(rss), "--task", "train", "--model", model, "--max_steps", "3",
               "--batch_size", str(batch), "--eval_answers", "0", "--save_steps", "1000", "--output_dir",
               str(Path(tmp) / "out"), *MODES[mode], *extra]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode < 0:  # a signal: SIGKILL is what the kernel's OOM killer sends
            return {"error": f"killed by signal {-proc.returncode}" + (" (out of memory?)" if proc.returncode == -9 else "")}
        if proc.returncode != 0:
            return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
        metrics = json.loads((Path(tmp) / "out" / "final_model" / "metrics.json").read_text())
        return {"measured_mb": float(rss.read_text()), "plan": metrics["memory_plan"],
                "tokens_per_s": metrics["tokens_per_s"]}


def largest(limit_gb: float) -> None:
    """The plan (defaults: sample data, batch 8, max_length 512, LoRA r16 all-linear) for each
    Llama size and option, against ``limit_gb``: training memory, which does not depend on the weight
    files (their pages while loading are reclaimable and not counted in whether a run fits)."""
    import torch
    from transformers import LlamaConfig

    from fine_tuning_llms.engine.chat_format import tokenize_conversations
    from fine_tuning_llms.engine.config import Config, ModelConfig
    from fine_tuning_llms.engine.data import load_train_eval
    from fine_tuning_llms.engine.memory_plan import KBIT_CHECKPOINT_ROOM, MB, plan_training
    from fine_tuning_llms.engine.models import load_tokenizer

    base = Config()
    lengths = [len(e["input_ids"]) for e in tokenize_conversations(
        load_tokenizer(ModelConfig()), load_train_eval(base.data).train.conversations, max_length=512,
        progress=False).examples]
    print(f"Predicted training memory (MB; the peak RSS may add the weight file's page cache while loading) of "
          f"`--task train` defaults against {limit_gb:g} GB (`--memory_gb {limit_gb:g}`):")
    columns = [(mode, checkpointing) for checkpointing in (False, True) for mode in MODES]
    labels = [f"{mode}{' + checkpointing' if checkpointing else ''}" for mode, checkpointing in columns]
    print("| model | parameters | " + " | ".join(labels) + " |")
    print("|---|---|" + "---|" * len(columns))
    fits = {label: None for label in labels}
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in PUBLISHED.items():
            folder = Path(tmp) / name
            LlamaConfig(**shape).save_pretrained(folder)
            cells = []
            for (mode, checkpointing), label in zip(columns, labels):
                cfg = Config()
                cfg.model.dtype = "float32" if mode == "fp32" else "auto"
                cfg.model.load_8bit, cfg.model.load_4bit = mode == "8bit", mode == "4bit"
                cfg.train.gradient_checkpointing = checkpointing
                plan = plan_training(cfg, str(folder), lengths, torch.device("cpu"), limit_gb)
                # k-bit + checkpointing: the room its note asks for must fit too
                room = 1 + KBIT_CHECKPOINT_ROOM if checkpointing and mode in ("8bit", "4bit") else 1
                tight = plan.fits and plan.training * room > plan.available
                cells.append(f"{plan.training / MB:,.0f}{' (tight)' if tight else '' if plan.fits else ' (no)'}")
                if plan.fits and not tight:
                    fits[label] = name
            print(f"| {name} | {params_of(folder) / 1e9:.2f} B | " + " | ".join(cells) + " |")
    print(f"(tight: fits the plan, not the {KBIT_CHECKPOINT_ROOM:.0%} room k-bit + checkpointing runs took above it)")
    print("Largest that fits: " + ", ".join(f"{mode}: {name or 'none'}" for mode, name in fits.items()))


def params_of(folder: Path) -> int:
    from fine_tuning_llms.engine.memory_plan import meta_model

    model, _ = meta_model(str(folder))
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="embedded,1b",
                        help="embedded, 1b, 3b, 8b, 13b (the Llama-3.2-1B, -3B, Llama-3.1-8B and Llama-2-13B "
                             "shapes with random weights, llama_1b_shape.py)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--extra", default="", help="more train flags for every run, e.g. '--max_length 256'")
    parser.add_argument("--largest", type=float, default=None, metavar="GB",
                        help="instead: the plan for Llama 1B/3B/8B/13B shapes against this much memory")
    args = parser.parse_args()
    if args.largest:
        largest(args.largest)
        return

    print("| model | mode | batch | predicted peak | measured peak RSS | error | loading / training predicted |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model = "smollm2-135m-instruct" if name == "embedded" else str(llama_shape_folder(name))
        for mode in args.modes.split(","):
            for batch in map(int, args.batches.split(",")):
                row = measure(model, mode, batch, args.extra.split())
                if "error" in row:
                    print(f"| {name} | {mode} | {batch} | - | - | failed: {row['error']} | |", flush=True)
                    continue
                plan = row["plan"]
                error = (plan["peak_mb"] - row["measured_mb"]) / row["measured_mb"]
                print(f"| {name} | {mode} | {batch} | {plan['peak_mb']:,} MB | {row['measured_mb']:,.0f} MB | "
                      f"{100 * error:+.0f}% | {plan['loading_mb']:,} / {plan['training_mb']:,} MB |", flush=True)


if __name__ == "__main__":
    main()

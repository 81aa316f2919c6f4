"""Training speed: this toolkit's `train` vs TRL's SFTTrainer on the same work, side by side.

    python benchmarks/bench_train.py                       # sample dataset, 1 epoch, embedded model
    python benchmarks/bench_train.py --levers              # also each speed lever switched off, one at a time
    python benchmarks/bench_train.py --dataset_path my.jsonl --max_steps 30
    python benchmarks/bench_train.py --only toolkit --breakdown   # where a step's time goes
    python benchmarks/bench_train.py --skip_load --repeats 3      # the pair 3 times, alternating: medians
    python benchmarks/bench_train.py --only toolkit --ceiling     # the highest MFU this step could reach here
    python benchmarks/bench_train.py --matrix --breakdown  # 14 workload shapes vs TRL; the worst cell's step split and bound
    python benchmarks/bench_train.py --matrix --cells "short b1,long b16"   # some cells only
    python benchmarks/bench_train.py --matrix --repeats 3   # each cell's pair 3 times in turn: the median pair

Same model (embedded SmolLM2-135M-Instruct), conversations, LoRA config, batch size, max length,
epochs/steps, learning rate and seed for both; TRL keeps its own defaults for everything else
(use_cpu=True is set on a CPU-only machine because Trainer refuses bf16 on CPU otherwise). Each
variant trains in its own process so its peak RSS is its own. Printed for each: non-pad tokens/s
and wall time of the training loop (the toolkit's held-out evaluations inside train() are timed
apart and shown next to it: TRL here has no eval set), peak RSS, final held-out loss (assistant
tokens of the held-out split, measured the same way for every variant in a separate process: the
saved adapter on a fresh fp32 base, no autocast), and model FLOPs utilisation against this
machine's measured matmul peak (linear-layer FLOPs only, attention's few percent not counted).
Also printed: the embedded model's cold (GGUF conversion) and warm load. With --breakdown the
toolkit's run is profiled for a few steps after warm-up (torch.profiler, which itself slows the
small ops) and the step time is split into matmuls (with their achieved FLOP/s), attention,
other tensor ops, and the rest (Python, autograd engine, Trainer): why MFU is what it is.
With --ceiling the run's steps reduced to the matmuls they need are timed (the toolkit's kernels,
the real weights and row counts; everything else free): the MFU no implementation of this step
with these kernels can beat on this machine, and how small everything else would have to get.
On a shared machine whose speed drifts, --repeats N runs the toolkit/TRL pair N times in turn and
reports the median speed-up of the pairs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench_train_children.py
from bench_train_children import (  # noqa: E402
    child_ceiling,
    child_eval,
    child_load,
    child_toolkit,
    child_trl,
    default_lora_config,
    matmul_peak,
)


def print_ceiling(ceiling: dict, toolkit_rows: list[dict], peak: float, target: float = 0.60) -> None:
    """The matmuls-only epoch's MFU, and what MFU `target` would leave the rest of a toolkit step."""
    mfu = ceiling["useful_flops"] / ceiling["seconds"] / peak
    print(f"  MFU ceiling: the run's {ceiling['steps']} steps reduced to the matmuls they need (the toolkit's kernels; "
          f"attention, norms, activations, loss, optimizer and Python taken as free) takes "
          f"{ceiling['seconds']:.1f} s: MFU {100 * mfu:.1f}%")
    for r in toolkit_rows[:1]:
        matmuls = ceiling["seconds"] * r["useful_flops"] / ceiling["useful_flops"]  # same work, same epoch
        allowed = r["useful_flops"] / (target * peak) - matmuls
        print(f"    the toolkit's run took {r['seconds']:.1f} s: {matmuls:.1f} s of those matmuls + "
              f"{r['seconds'] - matmuls:.1f} s of everything else; MFU {100 * target:.0f}% would leave "
              f"everything else {max(allowed, 0):.1f} s "
              f"({100 * max(allowed, 0) / (r['seconds'] - matmuls):.0f}% of what it takes now)")


def run_child(kind: str, args, extra: list[str], env: dict | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--_child", kind, "--_result", str(result), *extra]
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
        return json.loads(result.read_text())


def print_breakdown(label: str, b: dict | None, peak: float) -> None:
    if not b:
        print(f"  {label}: the run ended before step 4; nothing was profiled")
        return
    shares = ", ".join(f"{k} {100 * v / b['wall']:.0f}%" for k, v in b["split"].items())
    rate = b["matmul_flops"] / max(b["split"]["matmul"], 1e-9)
    print(f"  {label}: {b['steps']} steps took {b['wall']:.1f} s: {shares}; the matmuls ran at "
          f"{rate / 1e9:.0f} GFLOP/s = {100 * rate / peak:.0f}% of peak")


def run_matrix_and_report(args) -> None:
    from bench_matrix import run_matrix, summarize

    from fine_tuning_llms.engine.precision import cpu_supports_bf16

    print("Workload matrix: toolkit defaults vs TRL SFTTrainer defaults (same data, LoRA, batch, length, "
          "accumulation, steps, lr, seed), each run in its own process")
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_matrix(args, run_child, Path(tmp))
        worst = summarize(rows)["worst"]
        if args.breakdown:
            peak = matmul_peak("bfloat16" if cpu_supports_bf16() else "float32")
            # the profiler watches steps 4-8: a cell of fewer steps is profiled over 8
            flags = [f if not f.startswith("--max_steps=") else f"--max_steps={max(worst['steps'], 8)}"
                     for f in worst["flags"]]
            with tempfile.TemporaryDirectory() as adapter_tmp:
                row = run_child("toolkit", args, flags + ["--breakdown", f"--_adapter={Path(adapter_tmp) / 'a'}"])
            print_breakdown(f"worst cell, toolkit profiled ({worst['cell'].name})", row["breakdown"], peak)
            print_bound(row, worst["trl"]["tokens_per_s"])


def print_bound(row: dict, trl_tokens_per_s: float) -> None:
    """The speed the profiled step would reach if only its matmuls and attention took time (at the
    rate they ran): what no trimming of the other ops, Python, autograd or the Trainer can beat."""
    b = row["breakdown"]
    if not b:
        return
    kernels = (b["split"]["matmul"] + b["split"]["attention"]) / b["steps"]
    tokens = row["tokens"] / row["steps"]  # the run's mean step: the profiled steps are a sample of it
    rate = tokens / kernels
    print(f"  bound: with everything but the matmuls and attention free, a step of ~{tokens:.0f} tokens takes "
          f"{kernels:.2f} s: {rate:.0f} tok/s = {rate / trl_tokens_per_s:.2f}x TRL's {trl_tokens_per_s:.0f} tok/s")


def lora_summary(config) -> str:
    return (f"r={config.r} alpha={config.lora_alpha} dropout={config.lora_dropout} targets={config.target_modules} "
            f"dora={config.use_dora} rslora={config.use_rslora}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_path", default=None, help="conversations (default: the sample dataset)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max_steps", type=int, default=-1)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--model", default=None, help="model for both trainers (default: the embedded one); "
                                                      "'1b' = the Llama-3.2-1B shape with random weights")
    parser.add_argument("--no_eval", action="store_true", help="skip the held-out losses (random-weight models)")
    parser.add_argument("--load_8bit", action="store_true")
    parser.add_argument("--load_4bit", action="store_true")
    parser.add_argument("--grad_accum", type=int, default=1)
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--target_modules", default="all-linear")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--levers", action="store_true", help="also run the toolkit with each lever off")
    parser.add_argument("--skip_load", action="store_true", help="skip the cold/warm model load timing")
    parser.add_argument("--no_packing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no_trained_logits", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no_fused_kernels", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="also run the toolkit with --gradient_checkpointing (TRL's SFTConfig checkpoints "
                        "by default)")
    parser.add_argument("--unpacked", action="store_true",
                        help="also run the toolkit with --pack_weights false (no packed copy of the frozen "
                             "weights), and with --gradient_checkpointing both")
    parser.add_argument("--no_pack_weights", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fp32", action="store_true", help="with --only or the 1B shape: both trainers in float32 "
                                                            "(no bf16 autocast)")
    parser.add_argument("--breakdown", action="store_true",
                        help="profile a few steps of the toolkit's run and split the step time (slows those steps)")
    parser.add_argument("--ceiling", action="store_true",
                        help="also time the run's steps reduced to the matmuls they need, with the toolkit's "
                             "kernels: the highest MFU this step could reach on this machine")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the toolkit/TRL pair this many times, alternating, and compare medians "
                             "(a shared or throttled machine drifts by 10-25%% over minutes); with --matrix, "
                             "each cell's pair, keeping the median pair")
    parser.add_argument("--only", choices=["toolkit", "trl"], default=None,
                        help="run just one side (no ratio); for quick checks")
    parser.add_argument("--matrix", action="store_true",
                        help="the workload matrix (bench_matrix.py): batch 1/4/8/16, short vs long conversations, "
                             "max_length 256/1024, LoRA r8 q,v / r16 / r64 all-linear, grad_accum 1/4; toolkit vs "
                             "TRL per cell, the worst cell named")
    parser.add_argument("--cells", default=None, help="with --matrix: only cells whose name contains one of these "
                                                      "comma-separated strings, e.g. 'short b1,long b16'")
    parser.add_argument("--skip_heldout", action="store_true",
                        help="with --matrix: skip the levers-off runs and held-out losses (speed only)")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_adapter", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._child:
        import logging

        from fine_tuning_llms.engine.host_memory import peak_rss_mb
        logging.basicConfig(level=logging.WARNING)
        with tempfile.TemporaryDirectory() as tmp:
            fn = {"toolkit": lambda: child_toolkit(args, Path(tmp) / "out"),
                  "trl": lambda: child_trl(args, Path(tmp) / "out"),
                  "load": lambda: child_load(Path(tmp)),
                  "eval": lambda: child_eval(args),
                  "ceiling": lambda: child_ceiling(args)}[args._child]
            result = fn()
        result["peak_rss_mb"] = peak_rss_mb()  # this child's own, not the parent's it would inherit
        Path(args._result).write_text(json.dumps(result))
        return

    if args.matrix:
        run_matrix_and_report(args)
        return
    if args.model == "1b":
        from llama_1b_shape import llama_shape_folder
        args.model = str(llama_shape_folder("1b"))

    common = [f"--epochs={args.epochs}", f"--max_steps={args.max_steps}", f"--batch_size={args.batch_size}",
              f"--grad_accum={args.grad_accum}", f"--lora_r={args.lora_r}", f"--target_modules={args.target_modules}",
              f"--max_length={args.max_length}", *(["--fp32"] if args.fp32 else []),
              *([f"--model={args.model}"] if args.model else []), *(["--load_8bit"] if args.load_8bit else []),
              *(["--load_4bit"] if args.load_4bit else []), f"--lr={args.lr}", f"--seed={args.seed}"]
    if args.dataset_path:
        common.append(f"--dataset_path={args.dataset_path}")
    print(f"Work: {args.dataset_path or 'sample dataset'}, epochs {args.epochs}, max_steps {args.max_steps}, "
          f"batch {args.batch_size}, max_length {args.max_length}, lr {args.lr}, grad_accum {args.grad_accum}, "
          f"LoRA {lora_summary(default_lora_config(args))}")

    if not args.skip_load:
        with tempfile.TemporaryDirectory() as cache:
            cold = run_child("load", args, [], env={"FINE_TUNING_LLMS_CACHE": cache})
            warm = run_child("load", args, [], env={"FINE_TUNING_LLMS_CACHE": cache})
        print(f"Embedded model load (tokenizer + model, fresh process): cold (GGUF conversion) {cold['seconds']:.1f} s, "
              f"warm {warm['seconds']:.2f} s; plus one-time Python imports {warm['imports']:.1f} s")


    from fine_tuning_llms.engine.precision import cpu_supports_bf16

    bf16 = cpu_supports_bf16()

    def measure_peaks() -> dict:
        return {"bfloat16": matmul_peak("bfloat16") if bf16 else None, "float32": matmul_peak("float32")}

    peaks = measure_peaks()

    if args.repeats < 1:
        raise SystemExit("--repeats must be 1 or more")
    pair = [("toolkit train", "toolkit", []), ("TRL SFTTrainer", "trl", [])]
    variants = [(f"{label} (run {i + 1})" if args.repeats > 1 else label, kind, extra)
                for i in range(args.repeats) for label, kind, extra in pair]  # alternating: drift hits both
    if args.levers:
        variants += [("toolkit, --packing false", "toolkit", ["--no_packing"]),
                     ("toolkit, --trained_logits_only false", "toolkit", ["--no_trained_logits"]),
                     ("toolkit, --fused_kernels false", "toolkit", ["--no_fused_kernels"]),
                     ("toolkit, --dtype float32 (no bf16 autocast)", "toolkit", ["--fp32"])]
    if args.gradient_checkpointing:
        variants.append(("toolkit, --gradient_checkpointing", "toolkit", ["--gradient_checkpointing"]))
    if args.unpacked:
        variants.append(("toolkit, --pack_weights false", "toolkit", ["--no_pack_weights"]))
        if args.gradient_checkpointing:
            variants.append(("toolkit, --pack_weights false --gradient_checkpointing", "toolkit",
                             ["--no_pack_weights", "--gradient_checkpointing"]))
    if args.only:
        variants = [v for v in variants if v[1] == args.only and not v[2]]
    if args.breakdown:  # a separate run: the profiler slows the steps it watches
        variants.append(("toolkit, profiled (step split only)", "toolkit", ["--breakdown"]))
    rows = []
    for label, kind, extra in variants:
        # Train in one process (its peak RSS is the training's), then measure the saved adapter's
        # held-out loss in another, the same way for every variant.
        with tempfile.TemporaryDirectory() as tmp:
            adapter = f"--_adapter={Path(tmp) / 'adapter'}"
            row = run_child(kind, args, common + extra + [adapter])
            if "--breakdown" not in extra and not args.no_eval:  # the profiled run is there for its step split only
                row["eval_loss"] = run_child("eval", args, common + [adapter])["eval_loss"]
        rows.append(row | {"label": label, "fp32": "--fp32" in extra or args.fp32, "extra": extra})
    ceiling = run_child("ceiling", args, common) if args.ceiling else None
    # The peak is measured before and after the runs and the higher kept: a busy moment lowers
    # it, and a low peak would flatter every MFU figure.
    again = measure_peaks()
    peaks = {k: max(v, again[k]) if v else None for k, v in peaks.items()}
    print("Matmul peak: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items() if v))
    for r in rows:
        peak = peaks["float32"] if r["fp32"] or not bf16 else peaks["bfloat16"]
        r.update(tokens_per_s=r["tokens"] / r["seconds"], mfu=r["useful_flops"] / r["seconds"] / peak)
        if "--breakdown" in r["extra"]:
            print_breakdown(r["label"], r["breakdown"], peak)
            continue
        held_out = f"held-out loss {r['eval_loss']:.4f}" if "eval_loss" in r else "no held-out loss"
        if "planned_peak_mb" in r:  # the memory plan the run printed before loading (engine/memory_plan.py)
            held_out += (f"  (planned peak {r['planned_peak_mb']:,} MB: "
                         f"{100 * (r['planned_peak_mb'] - r['peak_rss_mb']) / r['peak_rss_mb']:+.0f}%)")
        print(f"  {r['label']:44s} {r['tokens_per_s']:8.0f} tok/s  {r['seconds']:7.1f} s (+{r['eval_seconds']:.1f} s held-out "
              f"eval)  {r['steps']:4d} steps  "
              f"RSS {r['peak_rss_mb']:6.0f} MB  {held_out}  MFU {100 * r['mfu']:4.1f}%")
    ours = [r for r in rows if r["label"].startswith("toolkit train")]
    trl = [r for r in rows if r["label"].startswith("TRL")]
    if ceiling:
        print_ceiling(ceiling, ours, peaks["float32"] if ceiling["fp32"] else peaks["bfloat16"])
    if args.only:
        return
    ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(ours, trl)]
    if args.repeats > 1:
        print(f"Medians of {args.repeats} alternating runs: toolkit "
              f"{statistics.median(r['tokens_per_s'] for r in ours):.0f} tok/s, MFU "
              f"{100 * statistics.median(r['mfu'] for r in ours):.1f}%; TRL "
              f"{statistics.median(r['tokens_per_s'] for r in trl):.0f} tok/s; speed-up per pair "
              + ", ".join(f"{x:.2f}x" for x in ratios))
    ours_rss, trl_rss = max(r["peak_rss_mb"] for r in ours), max(r["peak_rss_mb"] for r in trl)
    held_out = (f"held-out loss {100 * (ours[0]['eval_loss'] - trl[0]['eval_loss']) / trl[0]['eval_loss']:+.1f}% vs TRL; "
                if "eval_loss" in ours[0] else "")
    print(f"Speed-up vs TRL: {statistics.median(ratios):.2f}x tokens/s; {held_out}peak RSS "
          f"{ours_rss:.0f} MB vs {trl_rss:.0f} MB")
    for r in (r for r in rows if r["label"].startswith("toolkit, --")):
        print(f"With {r['label'][len('toolkit, '):]}: {r['tokens_per_s'] / trl[0]['tokens_per_s']:.2f}x tokens/s; "
              f"peak RSS {r['peak_rss_mb']:.0f} MB vs {trl_rss:.0f} MB")


if __name__ == "__main__":
    main()

"""The workload matrix of ``bench_train.py --matrix``: the toolkit vs TRL's SFTTrainer on many shapes
of work, side by side, each run in its own process.

One factor moves at a time around two centre cells (short single-turn and long multi-turn data):
batch size 1/4/8/16, max_length 256/1024, LoRA r8 on q,v / r16 all-linear / r64 all-linear, and 1 vs
4 gradient-accumulation steps. Every cell trains a fixed number of optimizer steps, chosen so the
cell feeds ~``CELL_TOKENS`` tokens (a cell of tiny steps runs more of them). Per cell: tokens/s of
each trainer's training loop (non-pad tokens fed forward over the loop's wall time), the ratio, and
the held-out loss of the toolkit's defaults vs the toolkit with every lever off (``--packing false
--fused_kernels false --trained_logits_only false``), each adapter evaluated the same way in a fresh
process. With ``--repeats N`` each cell's toolkit/TRL pair runs N times in turn and the cell keeps
the median pair (the lower of the middle two for even N), every pair's ratio printed: one run's ratio
moves 10-25% with this kind of VM's speed. Printed at the end: the worst cell, and with
``--breakdown`` where its step time goes and the bound its matmuls and attention alone set (the speed
if everything else took no time).

Imported by ``benchmarks/bench_train.py``.
"""
from __future__ import annotations

import json
import math
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

CELL_TOKENS = 4000     # tokens a cell feeds: enough steps that the first step's set-up is amortised
MIN_STEPS, MAX_STEPS = 3, 40
HELD_OUT_TOLERANCE = 0.005  # issue 21: defaults never worse than every lever off by more than 0.5%


@dataclass(frozen=True)
class Cell:
    data: str            # "short" (single-turn) or "long" (multi-turn)
    batch_size: int
    max_length: int
    lora: str            # "r8-qv", "r16-all", "r64-all"
    grad_accum: int = 1

    @property
    def name(self) -> str:
        return f"{self.data} b{self.batch_size} len{self.max_length} {self.lora} ga{self.grad_accum}"

    def lora_flags(self) -> list[str]:
        rank, targets = self.lora.split("-")
        modules = "q_proj,v_proj" if targets == "qv" else "all-linear"
        return [f"--lora_r={rank[1:]}", f"--target_modules={modules}"]


SHORT, LONG = "short", "long"
CELLS = [
    # short single-turn conversations (~60-110 tokens): batch size, then LoRA shape and accumulation
    Cell(SHORT, 1, 256, "r16-all"), Cell(SHORT, 4, 256, "r16-all"), Cell(SHORT, 8, 256, "r16-all"),
    Cell(SHORT, 16, 256, "r16-all"), Cell(SHORT, 4, 256, "r8-qv"), Cell(SHORT, 4, 256, "r8-all"),
    Cell(SHORT, 4, 256, "r64-all"), Cell(SHORT, 4, 256, "r16-all", grad_accum=4),
    # long multi-turn conversations (~300-900 tokens): length, batch size, LoRA shape, accumulation
    Cell(LONG, 4, 1024, "r16-all"), Cell(LONG, 4, 256, "r16-all"), Cell(LONG, 1, 1024, "r16-all"),
    Cell(LONG, 16, 1024, "r16-all"), Cell(LONG, 4, 1024, "r8-qv"), Cell(LONG, 4, 1024, "r64-all", grad_accum=4),
]


def write_workloads(folder: Path, seed: int = 0) -> dict[str, Path]:
    """Two data files built from the sample conversations: ``short`` = 160 single-turn
    conversations as they are; ``long`` = 120 multi-turn conversations, each 5-14 sample exchanges
    joined in turn (a random mix, so the lengths spread)."""
    from fine_tuning_llms.engine.data import load_conversations, sample_dataset_path

    sample = load_conversations(sample_dataset_path()).conversations
    rng = random.Random(seed)
    short = sample[:160]
    long = []
    for _ in range(120):
        turns = []
        for conv in rng.sample(sample, rng.randint(5, 14)):
            turns += [m for m in conv if m["role"] in ("user", "assistant")]
        long.append(turns)
    paths = {}
    for name, convs in ((SHORT, short), (LONG, long)):
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in convs))
    return paths


def mean_tokens(path: Path, max_length: int) -> float:
    """Mean tokens per conversation after the toolkit's templating and truncation."""
    from fine_tuning_llms.engine.chat_format import tokenize_conversations
    from fine_tuning_llms.engine.config import ModelConfig
    from fine_tuning_llms.engine.data import load_conversations
    from fine_tuning_llms.engine.models import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig())
    examples = tokenize_conversations(tokenizer, load_conversations(path).conversations, max_length=max_length,
                                      progress=False).examples
    return statistics.mean(len(e["input_ids"]) for e in examples)


def cell_steps(cell: Cell, tokens_per_conv: float) -> int:
    per_step = tokens_per_conv * cell.batch_size * cell.grad_accum
    return max(MIN_STEPS, min(MAX_STEPS, math.ceil(CELL_TOKENS / per_step)))


def run_matrix(args, run_child, tmp: Path) -> list[dict]:
    """Every cell: toolkit defaults and TRL (``--repeats`` times, in turn), toolkit with every lever off;
    returns one row per cell."""
    paths = write_workloads(tmp)
    lengths = {(d, n): mean_tokens(paths[d], n) for d in (SHORT, LONG) for n in {c.max_length for c in CELLS}}
    cells = [c for c in CELLS if not args.cells or any(s in c.name for s in args.cells.split(","))]
    rows = []
    for i, cell in enumerate(cells, 1):
        steps = cell_steps(cell, lengths[(cell.data, cell.max_length)])
        common = [f"--dataset_path={paths[cell.data]}", f"--max_length={cell.max_length}",
                  f"--batch_size={cell.batch_size}", f"--grad_accum={cell.grad_accum}", f"--max_steps={steps}",
                  f"--lr={args.lr}", f"--seed={args.seed}", "--epochs=100", *cell.lora_flags()]

        # Toolkit and TRL in turn, so that a drift of the machine's speed (10-25% over minutes on a
        # shared VM) lands on both sides of a pair; the cell's ratio is the median over the pairs.
        pairs = [(_timed_run(run_child, args, tmp, common, "toolkit", evaluate=not args.skip_heldout and n == 0),
                  _timed_run(run_child, args, tmp, common, "trl", evaluate=False)) for n in range(args.repeats)]
        ratios = [ours["tokens_per_s"] / trl["tokens_per_s"] for ours, trl in pairs]
        middle = sorted(range(len(pairs)), key=lambda n: ratios[n])[(len(pairs) - 1) // 2]  # lower middle if even
        row = {"cell": cell, "steps": steps, "flags": common, "toolkit": pairs[middle][0], "trl": pairs[middle][1],
               "ratio": ratios[middle], "ratios": ratios}
        if not args.skip_heldout:
            row["toolkit"]["eval_loss"] = pairs[0][0]["eval_loss"]
            levers_off = common + ["--no_packing", "--no_trained_logits", "--no_fused_kernels"]
            row["levers_off"] = _timed_run(run_child, args, tmp, levers_off, "toolkit", evaluate=True)
        rows.append(row)
        print(f"  [{i}/{len(cells)}] {format_row(row)}", flush=True)
    return rows


def _timed_run(run_child, args, tmp: Path, flags: list[str], kind: str, evaluate: bool) -> dict:
    """One trainer's run of a cell in its own process (and its adapter's held-out loss if ``evaluate``)."""
    adapter = f"--_adapter={tmp / 'adapter'}"
    result = run_child(kind, args, flags + [adapter])
    if evaluate:
        result["eval_loss"] = run_child("eval", args, flags + [adapter])["eval_loss"]
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    _remove(tmp / "adapter")
    return result


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def format_row(row: dict) -> str:
    ours, trl = row["toolkit"], row["trl"]
    text = (f"{row['cell'].name:34s} {row['steps']:3d} steps  toolkit {ours['tokens_per_s']:6.0f} tok/s  "
            f"TRL {trl['tokens_per_s']:5.0f} tok/s  {row['ratio']:5.2f}x")
    if len(row.get("ratios", [])) > 1:
        text += f" (median pair of {len(row['ratios'])}: " + ", ".join(f"{r:.2f}x" for r in row["ratios"]) + ")"
    if "levers_off" in row:
        off = row["levers_off"]
        change = (ours["eval_loss"] - off["eval_loss"]) / off["eval_loss"]
        text += (f"  held-out {ours['eval_loss']:.4f} vs levers off {off['eval_loss']:.4f} ({100 * change:+.2f}%, "
                 f"levers off {off['tokens_per_s']:.0f} tok/s)")
    return text


def summarize(rows: list[dict], target: float = 3.0) -> dict:
    """The worst cell and whether every cell meets the speed and held-out targets."""
    worst = min(rows, key=lambda r: r["ratio"])
    held = [r for r in rows if "levers_off" in r]
    worse = [r for r in held if (r["toolkit"]["eval_loss"] - r["levers_off"]["eval_loss"])
             / r["levers_off"]["eval_loss"] > HELD_OUT_TOLERANCE]
    print(f"Worst cell: {worst['cell'].name}: {worst['ratio']:.2f}x TRL "
          f"({'every cell' if worst['ratio'] >= target else 'NOT every cell'} >= {target:.1f}x); "
          f"median {statistics.median(r['ratio'] for r in rows):.2f}x over {len(rows)} cells")
    if held:
        print(f"Held-out loss, defaults vs every lever off: {len(held) - len(worse)}/{len(held)} cells within "
              f"+{100 * HELD_OUT_TOLERANCE:.1f}%" + (": worse in " + ", ".join(r["cell"].name for r in worse)
                                                     if worse else ""))
    return {"worst": worst, "worse_held_out": worse}

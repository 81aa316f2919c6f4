"""Training speed: this toolkit's `train` vs TRL's SFTTrainer on the same work, side by side.

    python benchmarks/bench_train.py                       # sample dataset, 1 epoch, embedded model
    python benchmarks/bench_train.py --levers              # also each speed lever switched off, one at a time
    python benchmarks/bench_train.py --dataset_path my.jsonl --max_steps 30
    python benchmarks/bench_train.py --only toolkit --breakdown   # where a step's time goes
    python benchmarks/bench_train.py --skip_load --repeats 3      # the pair 3 times, alternating: medians
    python benchmarks/bench_train.py --only toolkit --ceiling     # the highest MFU this step could reach here

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
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

def default_lora_config():
    """The toolkit's default LoRA settings (its one builder), given to both trainers."""
    from fine_tuning_llms.engine.config import TrainConfig
    from fine_tuning_llms.engine.lora import lora_config

    return lora_config(TrainConfig())


# ------------------------------------------------------------------ helpers run inside a child process

def child_eval(args) -> dict:
    from fine_tuning_llms.engine.config import DataConfig
    from fine_tuning_llms.engine.data import load_train_eval

    eval_convs = load_train_eval(DataConfig(dataset_path=args.dataset_path, max_length=args.max_length)).eval
    return {"eval_loss": _eval_adapter(Path(args._adapter), eval_convs, args.max_length)}


def _eval_adapter(adapter_dir: Path, eval_convs, max_length) -> float:
    """Held-out loss of a saved adapter, measured the same way for every variant: a fresh fp32
    base model + the adapter, no autocast, token-weighted over assistant tokens."""
    import torch
    from peft import PeftModel

    from fine_tuning_llms.engine.chat_format import tokenize_conversations
    from fine_tuning_llms.engine.config import ModelConfig
    from fine_tuning_llms.engine.kernels.packed_sdpa import register_packed_attention
    from fine_tuning_llms.engine.models import load_model, load_tokenizer
    from fine_tuning_llms.engine.trainer import mean_eval_loss

    tokenizer = load_tokenizer(ModelConfig())
    model = PeftModel.from_pretrained(load_model(ModelConfig(dtype="float32")), str(adapter_dir))
    model.base_model.model.set_attn_implementation(register_packed_attention())
    examples = tokenize_conversations(tokenizer, eval_convs, max_length=max_length, progress=False).examples
    with torch.no_grad():
        return mean_eval_loss(model, examples, tokenizer.pad_token_id, packed=True)


def _flops_per_token(model) -> dict:
    """Useful FLOPs of one LoRA training token: frozen linears need forward + input-gradient
    matmuls (2 x 2N); LoRA weights also need their weight gradients (3 x 2N_lora); the vocabulary
    projection is counted separately, only where logits are needed."""
    import torch

    body = lora = head = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            n = module.in_features * module.out_features
            if "lora_" in name:
                lora += n
            elif name.endswith("lm_head"):
                head += n
            else:
                body += n
    return {"per_token": 4 * body + 6 * lora, "per_logit_position": 4 * head}


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation",
              "mkldnn::_linear_pointwise"}


def step_breakdown_callback(first_step: int = 3, steps: int = 5):
    """A TrainerCallback that profiles steps first_step+1 .. first_step+steps and keeps the split."""
    import torch
    from transformers import TrainerCallback

    class StepBreakdown(TrainerCallback):
        result: dict = {}

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == first_step:
                self.profiler = torch.profiler.profile(with_flops=True, record_shapes=True)
                self.profiler.__enter__()
                self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if getattr(self, "profiler", None) is not None and state.global_step in (first_step + steps,
                                                                                     state.max_steps):
                self.finish(state.global_step - first_step)  # before this step's evaluation, if any

        def on_train_end(self, args, state, control, **kwargs):
            if getattr(self, "profiler", None) is not None:  # a run shorter than the profiled window
                self.finish(state.global_step - first_step)

        def finish(self, profiled_steps: int):
            wall = time.perf_counter() - self.start
            self.profiler.__exit__(None, None, None)
            split = {"matmul": 0.0, "attention": 0.0, "other ops": 0.0}
            flops = 0
            for event in self.profiler.key_averages(group_by_input_shape=True):
                seconds = event.self_cpu_time_total / 1e6
                if event.key in MATMUL_OPS:
                    split["matmul"] += seconds
                    flops += event.flops or 0
                    if event.key == "aten::addmm_":  # the profiler counts no FLOPs for the in-place form
                        (m, k), (_, n) = event.input_shapes[1], event.input_shapes[2]
                        flops += 2 * m * k * n * event.count
                    elif event.key == "mkldnn::_linear_pointwise":  # x (m, k) times a packed (n, k) weight
                        (m, k), (n, _) = event.input_shapes[0], event.input_shapes[1]
                        flops += 2 * m * k * n * event.count
                elif "scaled_dot_product" in event.key:
                    split["attention"] += seconds
                elif event.key.startswith("aten::"):
                    split["other ops"] += seconds
            split["rest"] = max(wall - sum(split.values()), 0.0)
            self.profiler = None
            StepBreakdown.result = {"wall": wall, "steps": profiled_steps, "split": split, "matmul_flops": flops}

    return StepBreakdown()


def child_toolkit(args, out: Path) -> dict:
    from fine_tuning_llms.engine.config import Config
    from fine_tuning_llms.fine_tuning import run

    cfg = Config()
    cfg.run.task, cfg.run.output_dir = "train", str(out)
    cfg.data.dataset_path, cfg.data.max_length = args.dataset_path, args.max_length
    t = cfg.train
    t.epochs, t.max_steps, t.batch_size, t.lr, t.seed = args.epochs, args.max_steps, args.batch_size, args.lr, args.seed
    # LoRA: the TrainConfig defaults, the same ones default_lora_config() gives TRL
    t.eval_answers, t.save_steps, t.logging_steps = 0, 10**6, 10
    t.packing = not args.no_packing
    t.trained_logits_only = not args.no_trained_logits
    t.fused_kernels = not args.no_fused_kernels
    if args.fp32:
        cfg.model.dtype = "float32"
    import fine_tuning_llms.fine_tuning as ft

    captured = {}
    original = ft.ChatTrainer.train

    def train(self, *a, **k):  # keep the trainer to read its counters and model
        captured["trainer"] = self
        return original(self, *a, **k)

    ft.ChatTrainer.train = train
    breakdown = step_breakdown_callback() if args.breakdown else None
    if breakdown is not None:  # the Trainer is built inside run(); hand it the callback on the way
        original_init = ft.ChatTrainer.__init__

        def init(self, *a, **k):
            k["callbacks"] = [*k.get("callbacks", []), breakdown]
            original_init(self, *a, **k)

        ft.ChatTrainer.__init__ = init
    metrics = run(cfg)["metrics"]
    trainer = captured["trainer"]
    flops = _flops_per_token(trainer.model)
    useful = trainer.tokens_seen * flops["per_token"] + trainer.trained_tokens_seen * flops["per_logit_position"]
    shutil.copytree(out / "final_model", args._adapter)
    return {"tokens": trainer.tokens_seen, "seconds": metrics["train_seconds"] - metrics["eval_seconds_in_training"],
            "eval_seconds": metrics["eval_seconds_in_training"], "useful_flops": useful,
            "steps": metrics["global_steps"], "breakdown": type(breakdown).result if breakdown else None}


def child_trl(args, out: Path) -> dict:
    import datasets
    import torch
    from trl import SFTConfig, SFTTrainer

    from fine_tuning_llms.engine.config import DataConfig, ModelConfig
    from fine_tuning_llms.engine.data import load_train_eval
    from fine_tuning_llms.engine.models import load_model, load_tokenizer

    data = load_train_eval(DataConfig(dataset_path=args.dataset_path, max_length=args.max_length))
    tokenizer = load_tokenizer(ModelConfig())
    model = load_model(ModelConfig())
    train_ds = datasets.Dataset.from_list([{"messages": c} for c in data.train.conversations])
    sft_args = SFTConfig(output_dir=str(out), per_device_train_batch_size=args.batch_size,
                         num_train_epochs=args.epochs, max_steps=args.max_steps, learning_rate=args.lr,
                         seed=args.seed, max_length=args.max_length, report_to="none", save_strategy="no",
                         logging_steps=10, use_cpu=not torch.cuda.is_available())
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=train_ds, processing_class=tokenizer,
                         peft_config=default_lora_config())
    counted = {"tokens": 0}
    collate = trainer.data_collator

    def counting_collator(examples):
        counted["tokens"] += sum(len(e["input_ids"]) for e in examples)  # non-pad tokens fed forward
        return collate(examples)

    trainer.data_collator = counting_collator
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    flops = _flops_per_token(trainer.model)
    # TRL trains every token by default, so every position needs its logits.
    useful = counted["tokens"] * (flops["per_token"] + flops["per_logit_position"])
    trainer.model.save_pretrained(args._adapter)
    return {"tokens": counted["tokens"], "seconds": seconds, "eval_seconds": 0.0, "useful_flops": useful,
            "steps": trainer.state.global_step}


def child_ceiling(args) -> dict:
    """The MFU no implementation of this step with these kernels can beat here: the run's steps
    reduced to the matmuls they need (each LoRA layer's forward and input gradient through the
    frozen weight, the LoRA products and their gradients, the head on trained positions), run back
    to back with the kernels the toolkit uses, on the real weights and row counts. Attention,
    norms, activations, loss, optimizer, casts and Python are taken as free. FLOPs are counted as
    for the runs (``_flops_per_token``)."""
    import torch
    from peft import get_peft_model
    from peft.tuners.lora.layer import Linear as LoraLinear

    from fine_tuning_llms.engine.chat_format import tokenize_conversations
    from fine_tuning_llms.engine.config import Config, ModelConfig
    from fine_tuning_llms.engine.data import load_train_eval
    from fine_tuning_llms.engine.kernels import PackedWeight, weight_packing_available
    from fine_tuning_llms.engine.models import load_model, load_tokenizer

    cfg = Config()
    cfg.data.dataset_path, cfg.data.max_length = args.dataset_path, args.max_length
    tokenizer = load_tokenizer(ModelConfig())
    examples = tokenize_conversations(tokenizer, load_train_eval(cfg.data).train.conversations,
                                      max_length=args.max_length, train_on=cfg.data.train_on, progress=False).examples
    # Batches in file order: the toolkit draws them in a seeded random order, which moves rows
    # between steps but not the epoch's total; each step's matmuls run on one packed row.
    steps = [examples[i:i + args.batch_size] for i in range(0, len(examples), args.batch_size)]
    if args.max_steps > 0:
        steps = steps[:args.max_steps]
    rows = [sum(len(e["input_ids"]) for e in batch) for batch in steps]
    trained = [sum(label != -100 for e in batch for label in e["labels"]) for batch in steps]

    from fine_tuning_llms.engine.precision import cpu_supports_bf16

    dtype = torch.float32 if args.fp32 or not cpu_supports_bf16() else torch.bfloat16
    model = get_peft_model(load_model(ModelConfig(dtype="float32")), default_lora_config())
    packed = weight_packing_available(dtype)
    flops = _flops_per_token(model)
    layers = []
    for module in model.modules():
        if isinstance(module, LoraLinear):
            name = module.active_adapters[0]
            weight = module.base_layer.weight.detach().to(dtype)
            layers.append((PackedWeight(weight) if packed else weight, module.lora_A[name].weight.detach().to(dtype),
                           module.lora_B[name].weight.detach().to(dtype), module.scaling[name]))
    head = model.get_output_embeddings().weight.detach().to(dtype)
    del model
    hidden = head.shape[1]
    widest = max(rows)
    inputs = {n: torch.randn(widest, n, dtype=dtype) for n in {hidden, *(w.shape[1] for _, w, _, _ in layers)}}
    grads = {n: torch.randn(widest, n, dtype=dtype) for n in {b.shape[0] for _, _, b, _ in layers}}
    head_grad = torch.randn(max(trained), head.shape[0], dtype=dtype)

    def step(m: int, t: int) -> None:
        for base, a, b, s in layers:  # LoraLinearFunction's forward and backward matmuls, in order
            x, g = inputs[a.shape[1]][:m], grads[b.shape[0]][:m]
            xa = x @ a.t()
            y = base.forward(x) if packed else x @ base.t()
            y.addmm_(xa, b.t(), alpha=s)
            gxa = g @ b
            gxa.t() @ x, g.t() @ xa  # the LoRA weight gradients (only their time counts here)
            gx = base.backward(g) if packed else g @ base
            gx.addmm_(gxa, a, alpha=s)
        h = inputs[hidden][:t]  # HeadCrossEntropyFunction's two matmuls
        h @ head.t(), head_grad[:t] @ head

    step(rows[0], trained[0])  # warm-up: oneDNN primitive creation
    start = time.perf_counter()
    for m, t in zip(rows, trained):
        step(m, t)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "steps": len(steps), "fp32": dtype == torch.float32,
            "useful_flops": sum(rows) * flops["per_token"] + sum(trained) * flops["per_logit_position"]}


def child_load(out: Path) -> dict:
    """Time the one-time Python imports apart from loading (or first converting) the model."""
    start = time.perf_counter()
    import transformers
    from transformers.models.llama import configuration_llama, modeling_llama  # noqa: F401

    from fine_tuning_llms.engine.config import ModelConfig
    from fine_tuning_llms.engine.models import load_model, load_tokenizer, resolve_model

    _ = transformers.AutoTokenizer, transformers.AutoModelForCausalLM  # resolve the lazy modules
    imports = time.perf_counter() - start
    start = time.perf_counter()
    source = resolve_model(ModelConfig().model)
    load_tokenizer(ModelConfig(), source)
    load_model(ModelConfig(), source)
    return {"seconds": time.perf_counter() - start, "imports": imports}


# ------------------------------------------------------------------ parent

def matmul_peak(dtype_name: str, seconds: float = 3.0) -> float:
    """Best sustained FLOP/s of a large square matmul in this dtype on this machine: torch.mm, and
    oneDNN with a prepacked weight where this build has it (the toolkit trains with that one, and
    in fp32 it is faster than torch.mm here; a peak lower than what training uses flatters MFU)."""
    import torch

    from fine_tuning_llms.engine.kernels import PackedWeight, weight_packing_available

    dtype = getattr(torch, dtype_name)
    best = 0.0
    for n in (1024, 2048):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        kernels = [lambda a=a, b=b: a @ b]
        if weight_packing_available(dtype):
            packed = PackedWeight(b.t())  # computes a @ b too
            kernels.append(lambda a=a, packed=packed: packed.forward(a))
        for kernel in kernels:
            kernel()
            reps, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / 2 / len(kernels):
                kernel()
                reps += 1
            best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - start))
    return best


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_path", default=None, help="conversations (default: the sample dataset)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max_steps", type=int, default=-1)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--levers", action="store_true", help="also run the toolkit with each lever off")
    parser.add_argument("--skip_load", action="store_true", help="skip the cold/warm model load timing")
    parser.add_argument("--no_packing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no_trained_logits", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no_fused_kernels", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fp32", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--breakdown", action="store_true",
                        help="profile a few steps of the toolkit's run and split the step time (slows those steps)")
    parser.add_argument("--ceiling", action="store_true",
                        help="also time the run's steps reduced to the matmuls they need, with the toolkit's "
                             "kernels: the highest MFU this step could reach on this machine")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the toolkit/TRL pair this many times, alternating, and compare medians "
                             "(a shared or throttled machine drifts by 10-25%% over minutes)")
    parser.add_argument("--only", choices=["toolkit", "trl"], default=None,
                        help="run just one side (no ratio); for quick checks")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_adapter", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._child:
        import logging
        logging.basicConfig(level=logging.WARNING)
        with tempfile.TemporaryDirectory() as tmp:
            fn = {"toolkit": lambda: child_toolkit(args, Path(tmp) / "out"),
                  "trl": lambda: child_trl(args, Path(tmp) / "out"),
                  "load": lambda: child_load(Path(tmp)),
                  "eval": lambda: child_eval(args),
                  "ceiling": lambda: child_ceiling(args)}[args._child]
            result = fn()
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        Path(args._result).write_text(json.dumps(result))
        return

    common = [f"--epochs={args.epochs}", f"--max_steps={args.max_steps}", f"--batch_size={args.batch_size}",
              f"--max_length={args.max_length}", f"--lr={args.lr}", f"--seed={args.seed}"]
    if args.dataset_path:
        common.append(f"--dataset_path={args.dataset_path}")
    print(f"Work: {args.dataset_path or 'sample dataset'}, epochs {args.epochs}, max_steps {args.max_steps}, "
          f"batch {args.batch_size}, max_length {args.max_length}, lr {args.lr}, LoRA {default_lora_config()!r}")

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
            if "--breakdown" not in extra:  # the profiled run is there for its step split only
                row["eval_loss"] = run_child("eval", args, common + [adapter])["eval_loss"]
        rows.append(row | {"label": label, "fp32": "--fp32" in extra, "extra": extra})
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
            b = r["breakdown"]
            if not b:
                print(f"  {r['label']}: the run ended before step 4; nothing was profiled")
                continue
            shares = ", ".join(f"{k} {100 * v / b['wall']:.0f}%" for k, v in b["split"].items())
            rate = b["matmul_flops"] / max(b["split"]["matmul"], 1e-9)
            print(f"  {r['label']}: {b['steps']} steps took {b['wall']:.1f} s: {shares}; the matmuls ran at "
                  f"{rate / 1e9:.0f} GFLOP/s = {100 * rate / peak:.0f}% of peak")
            continue
        print(f"  {r['label']:44s} {r['tokens_per_s']:8.0f} tok/s  {r['seconds']:7.1f} s (+{r['eval_seconds']:.1f} s held-out "
              f"eval)  {r['steps']:4d} steps  "
              f"RSS {r['peak_rss_mb']:6.0f} MB  held-out loss {r['eval_loss']:.4f}  MFU {100 * r['mfu']:4.1f}%")
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
    print(f"Speed-up vs TRL: {statistics.median(ratios):.2f}x tokens/s; held-out loss "
          f"{100 * (ours[0]['eval_loss'] - trl[0]['eval_loss']) / trl[0]['eval_loss']:+.1f}% vs TRL; peak RSS "
          f"{ours_rss:.0f} MB vs {trl_rss:.0f} MB")


if __name__ == "__main__":
    main()

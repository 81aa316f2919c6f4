"""What runs inside bench_train.py's child processes (``--_child toolkit|trl|eval|load|ceiling``):
the training runs, the held-out evaluation, the model-load timing and the matmuls-only ceiling, with
their step profiler and FLOP counting; and the matmul peak the parent measures MFU against.

Imported by ``benchmarks/bench_train.py``, which puts the checkout on ``sys.path`` first.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path


def default_lora_config(args=None):
    """The toolkit's LoRA settings (its one builder; defaults unless ``args`` sets rank and
    targets), given to both trainers."""
    from fine_tuning_llms.engine.config import TrainConfig
    from fine_tuning_llms.engine.lora import lora_config

    train = TrainConfig()
    if args is not None:
        train.lora_r, train.target_modules = args.lora_r, args.target_modules
    return lora_config(train)


# ------------------------------------------------------------------ helpers run inside a child process

def model_config(args, **overrides):
    """The model both trainers load: --model (default the embedded one) with --load_8bit/--load_4bit."""
    from fine_tuning_llms.engine.config import ModelConfig

    cfg = ModelConfig(load_8bit=args.load_8bit, load_4bit=args.load_4bit, **overrides)
    if args.model:
        cfg.model = args.model
    return cfg


def child_eval(args) -> dict:
    from fine_tuning_llms.engine.config import DataConfig
    from fine_tuning_llms.engine.data import load_train_eval

    eval_convs = load_train_eval(DataConfig(dataset_path=args.dataset_path, max_length=args.max_length)).eval
    return {"eval_loss": _eval_adapter(Path(args._adapter), eval_convs, args.max_length, args.model)}


def _eval_adapter(adapter_dir: Path, eval_convs, max_length, model: str | None = None) -> float:
    """Held-out loss of a saved adapter, measured the same way for every variant: a fresh fp32
    base model + the adapter, no autocast, token-weighted over assistant tokens."""
    import torch
    from peft import PeftModel

    from fine_tuning_llms.engine.chat_format import tokenize_conversations
    from fine_tuning_llms.engine.config import ModelConfig
    from fine_tuning_llms.engine.kernels.packed_sdpa import register_packed_attention
    from fine_tuning_llms.engine.models import load_model, load_tokenizer
    from fine_tuning_llms.engine.trainer import mean_eval_loss

    base = ModelConfig(dtype="float32") if model is None else ModelConfig(model=model, dtype="float32")
    tokenizer = load_tokenizer(base)
    model = PeftModel.from_pretrained(load_model(base), str(adapter_dir))
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
    t.grad_accum, t.lora_r, t.target_modules = args.grad_accum, args.lora_r, args.target_modules  # as TRL gets them
    t.eval_answers, t.save_steps, t.logging_steps = 0, 10**6, 10
    t.packing = not args.no_packing
    t.trained_logits_only = not args.no_trained_logits
    t.fused_kernels = not args.no_fused_kernels
    t.gradient_checkpointing = args.gradient_checkpointing
    t.pack_weights = not args.no_pack_weights
    cfg.model = model_config(args)
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
            "steps": metrics["global_steps"], "breakdown": type(breakdown).result if breakdown else None,
            "planned_peak_mb": metrics["memory_plan"]["peak_mb"]}


def child_trl(args, out: Path) -> dict:
    import datasets
    import torch
    from trl import SFTConfig, SFTTrainer

    from fine_tuning_llms.engine.config import DataConfig
    from fine_tuning_llms.engine.data import load_train_eval
    from fine_tuning_llms.engine.models import load_model, load_tokenizer

    data = load_train_eval(DataConfig(dataset_path=args.dataset_path, max_length=args.max_length))
    tokenizer = load_tokenizer(model_config(args))
    model = load_model(model_config(args))
    train_ds = datasets.Dataset.from_list([{"messages": c} for c in data.train.conversations])
    sft_args = SFTConfig(output_dir=str(out), per_device_train_batch_size=args.batch_size,
                         gradient_accumulation_steps=args.grad_accum,
                         num_train_epochs=args.epochs, max_steps=args.max_steps, learning_rate=args.lr,
                         seed=args.seed, max_length=args.max_length, report_to="none", save_strategy="no",
                         logging_steps=10, use_cpu=not torch.cuda.is_available(),
                         **({"bf16": False} if args.fp32 else {}))  # --fp32: no autocast for TRL either
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=train_ds, processing_class=tokenizer,
                         peft_config=default_lora_config(args))
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
    import torch.nn.functional as F
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
            layers.append((weight, PackedWeight(weight) if packed else None, module.lora_A[name].weight.detach().to(dtype),
                           module.lora_B[name].weight.detach().to(dtype), module.scaling[name]))
    head = model.get_output_embeddings().weight.detach().to(dtype)
    del model
    hidden = head.shape[1]
    widest = max(rows)
    inputs = {n: torch.randn(widest, n, dtype=dtype) for n in {hidden, *(a.shape[1] for _, _, a, _, _ in layers)}}
    grads = {n: torch.randn(widest, n, dtype=dtype) for n in {b.shape[0] for _, _, _, b, _ in layers}}
    head_grad = torch.randn(max(trained), head.shape[0], dtype=dtype)

    def step(m: int, t: int) -> None:
        for base, packed_base, a, b, s in layers:  # LoraLinearFunction's forward and backward matmuls, in order
            x, g = inputs[a.shape[1]][:m], grads[b.shape[0]][:m]
            xa = x @ a.t()
            y = F.linear(x, base)
            y.addmm_(xa, b.t(), alpha=s)
            gxa = g @ b
            gxa.t() @ x, g.t() @ xa  # the LoRA weight gradients (only their time counts here)
            gx = packed_base.backward(g) if packed_base is not None else g @ base
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


# ------------------------------------------------------------------ measured in the parent (before and after the runs)

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
            packed = PackedWeight(b)  # its input-gradient product g @ W computes a @ b
            kernels.append(lambda a=a, packed=packed: packed.backward(a))
        for kernel in kernels:
            kernel()
            reps, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / 2 / len(kernels):
                kernel()
                reps += 1
            best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - start))
    return best

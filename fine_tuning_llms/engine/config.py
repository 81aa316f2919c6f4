"""Typed settings for every task: one dataclass per concern, filled by CLI flags and YAML.

Each field's ``metadata["help"]`` is its ``--help`` text; the flag is ``--<field name>``.
Field names are unique across the groups so a flat YAML file (``--config run.yaml``) maps
onto them one to one. Precedence: dataclass default < YAML file < command-line flag.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_BASE_MODEL = "gemma-3-270m"   # optional: `make base-model` (engine/base_model.py)
TASKS_IN_ORDER = ("special_tokens", "preprocess", "explain", "train", "compare", "export")


def _f(default, help: str, **extra):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class ModelConfig:
    model: str = _f(EMBEDDED_MODEL, "Model to use: 'smollm2-135m-instruct' (embedded, offline), 'gemma-3-270m' "
                    "(a base model, offline after `make base-model`), a local model folder, a local .gguf file, or "
                    "a hub id such as meta-llama/Llama-3.2-1B-Instruct.")
    dtype: str = _f("auto", "Weight dtype: auto (bfloat16/float16 on CUDA, float32 on CPU), float32, bfloat16.",
                    choices=["auto", "float32", "bfloat16", "float16"])
    device: str = _f("auto", "Device: auto (CUDA when present, else CPU), cpu, cuda.", choices=["auto", "cpu", "cuda"])
    attn_implementation: str = _f("auto", "Attention implementation: auto (transformers' choice: SDPA where the "
                                  "model supports it, else eager), eager, sdpa, flex_attention, flash_attention_2.",
                                  choices=["auto", "eager", "sdpa", "flex_attention", "flash_attention_2"])
    load_8bit: bool = _f(False, "Load the base model in 8-bit with bitsandbytes (LoRA on top).")
    load_4bit: bool = _f(False, "Load the base model in 4-bit nf4 with bitsandbytes (QLoRA).")
    trust_remote_code: bool = _f(False, "Allow model code from the model folder/hub to run. Off by default: only "
                                 "turn it on for models you trust.")
    allow_pickle: bool = _f(False, "Allow loading pickle (.bin) weights. Off by default: pickle can run code; "
                            "safetensors cannot.")
    chat_template: str = _f("auto", "Chat template: auto (the tokenizer's own; for a base model without one, a "
                            "format whose turn tokens are single tokens of its vocabulary: gemma, llama3 or chatml, "
                            "else chatml with <|im_start|>/<|im_end|> added and trained), chatml, gemma, llama3, "
                            "or a path to a Jinja file.")


@dataclass
class DataConfig:
    dataset_path: str | None = _f(None, "Training conversations: a JSON array or JSONL file. Default: the "
                                     "sample dataset shipped with the package.")
    dataset: str | None = _f(None, "A dataset id for the `datasets` library (local cache, or hub when reachable).")
    dataset_split: str = _f("train", "Split of --dataset to use.")
    dataset_config: str | None = _f(None, "Configuration name of --dataset.")
    data_format: str = _f("auto", "Record format: auto, messages (OpenAI role/content), sharegpt (from/value), "
                          "alpaca (instruction/input/output), prompt_completion.",
                          choices=["auto", "messages", "sharegpt", "alpaca", "prompt_completion"])
    skip_invalid: bool = _f(False, "Skip invalid records (and report how many and why) instead of stopping.")
    train_on: str = _f("all", "Which assistant replies get labels: all, or only the last one.", choices=["all", "last"])
    train_reasoning: bool = _f(True, "Train the assistant's reasoning traces (reasoning_content / thinking in the "
                               "data) with its replies and tool calls; false keeps them as context, untrained.")
    system_prompt: str | None = _f(None, "System prompt for conversations that have none. Default: keep the "
                                      "template's behaviour (SmolLM2's template injects its own default).")
    max_length: int = _f(512, "Maximum tokens per conversation; longer ones are truncated (keeping trained "
                         "assistant tokens) or dropped.")
    eval_path: str | None = _f(None, "Held-out conversations (JSON/JSONL). Default: the sample dataset's "
                                  "held-out split, or --eval_ratio of the training data.")
    eval_ratio: float = _f(0.1, "Share of the training data held out for evaluation when no --eval_path is given.")
    max_examples: int | None = _f(None, "Use at most this many training conversations (quick runs).")


@dataclass
class TrainConfig:
    epochs: float = _f(2.0, "Training epochs.")
    batch_size: int = _f(8, "Conversations per device per step.")
    grad_accum: int = _f(1, "Gradient accumulation steps (effective batch = batch_size x grad_accum x processes).")
    lr: float = _f(2e-4, "Peak learning rate. 2e-4 suits LoRA (the full-fine-tuning default 5e-5 barely moves "
                   "a low-rank adapter in a short run).")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int | None = _f(None, "LoRA alpha (default: 2 x lora_r).")
    lora_dropout: float = _f(0.0, "LoRA dropout. 0 by default: dropout on every adapter's input makes a CPU "
                             "training step markedly slower (benchmarks/RESULTS.md); try 0.05-0.1 against "
                             "overfitting.")
    target_modules: str = _f("all-linear", "Modules that get LoRA adapters: 'all-linear' or a comma list such "
                             "as q_proj,v_proj.")
    use_dora: bool = _f(False, "Use DoRA (weight-decomposed LoRA).")
    use_rslora: bool = _f(False, "Use rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    max_steps: int = _f(-1, "Stop after this many optimizer steps (-1: run the epochs).")
    warmup_ratio: float = _f(0.05, "Share of steps used for linear learning-rate warm-up.")
    lr_scheduler: str = _f("cosine", "Learning-rate schedule after warm-up (transformers name): cosine, linear, "
                           "constant_with_warmup, ...")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    seed: int = _f(42, "Random seed (data order, LoRA init, sampling).")
    save_steps: int = _f(50, "Save a checkpoint every N optimizer steps.")
    logging_steps: int = _f(5, "Log loss / lr / grad norm every N optimizer steps.")
    resume_from_checkpoint: str | None = _f(None, "Continue a run: a checkpoint folder, or 'auto' for the "
                                               "newest under --output_dir.")
    eval_answers: int = _f(40, "Held-out prompts answered before and after training (0: skip; saves time).")
    merge: bool = _f(False, "Also write final_model_merged/: the base model with the adapter merged in.")
    overwrite_output_dir: bool = _f(False, "Allow replacing an existing final_model/ in --output_dir.")
    packing: bool = _f(True, "Padding-free batches: conversations laid end to end in one row, each attending only "
                       "to itself (no compute spent on padding). A start-up self-check compares packed with "
                       "one-by-one loss on the real model; if they differ, the run pads instead and says so. "
                       "--packing false always pads.")
    trained_logits_only: bool = _f(True, "Compute the vocabulary projection only where a token is trained "
                                   "(faster, same loss). --trained_logits_only false computes all logits.")
    fused_kernels: bool = _f(True, "While training, run each plain LoRA layer (8-bit ones too, CPU), packed "
                             "attention (CPU), RMSNorm and the vocabulary head with the loss as one autograd "
                             "node each (same maths and parameters, fewer ops, no full logits). "
                             "--fused_kernels false uses PEFT's and transformers' own forward.")
    pack_weights: bool = _f(True, "With the fused kernels on CPU, keep a copy of the frozen LoRA base weights "
                            "reordered for oneDNN while training (the input gradient's matmul then skips a "
                            "reorder at every call: 3-22%% faster there in bf16; 2.5-11%% a step on the 1B "
                            "shape in fp32; freed after; made only where it takes at most a quarter of the "
                            "free memory, and only for runs of 32 or more forward/backward passes: making "
                            "it costs about what tens of passes save). --pack_weights false "
                            "saves that copy (1x the frozen weights' size); the plan names it when a run "
                            "does not fit.")
    gradient_checkpointing: bool = _f(False, "Recompute each decoder layer's activations in the backward pass "
                                      "instead of keeping them: activation memory shrinks to each layer's input "
                                      "plus one layer's worth, for about one more forward pass per step; the "
                                      "gradients are the same. The memory plan names it when a run does not fit.")
    memory_gb: float | None = _f(None, "Memory to plan for, in GB (--task plan, and the check at the start of train "
                                 "that stops a run predicted not to fit): default, what this machine has free.")
    new_tokens: list[str] = _f([], "Special tokens to add before training; their embedding rows are trained "
                               "(PEFT trainable_token_indices).", nargs="*")


@dataclass
class CompareConfig:
    base_model: str | None = _f(None, "Base (non-instruct) model for the comparison, e.g. meta-llama/Llama-3.2-1B. "
                                   "None offline: the task then says what it compares instead.")
    instruct_model: str | None = _f(None, "Instruct model for the comparison (default: --model).")
    adapter: str | None = _f(None, "A fine-tuned adapter folder (final_model/) to add to the comparison or chat.")
    questions: str | None = _f(None, "Questions file (.txt one per line, or .json list). Default: built-in set.")
    max_new_tokens: int = _f(64, "Maximum new tokens per answer.")
    do_sample: bool = _f(False, "Sample instead of greedy decoding.")
    temperature: float = _f(0.7, "Sampling temperature (with --do_sample).")
    prompt: str | None = _f(None, "One-shot prompt for --task chat (without it, chat is interactive).")
    tools: str = _f("none", "Tools offered to the model in chat and compare: 'sample' = the tool-use sample set's "
                    "calculator and unit converter (their JSON schemas go into the prompt, rendered as in "
                    "training; chat runs the calls and feeds the results back); 'none' offers none.",
                    choices=["none", "sample"])


@dataclass
class ExportConfig:
    export: str = _f("none", "'gguf': also export the fine-tuned model as a GGUF file at the end of --task train "
                     "(or of --task all, as its last task); what --task export does on its own.",
                     choices=["none", "gguf"])
    gguf_type: str = _f("q8_0", "GGUF weight type for --task export: q8_0 (8-bit, ~1/4 of float32), f16, bf16, "
                        "f32 (for checks).", choices=["q8_0", "f16", "bf16", "f32"])
    verify_export: bool = _f(True, "After exporting, answer the compare questions with llama.cpp and with "
                             "transformers and report how many agree (needs llama-cpp-python: `make llama-cpp`; "
                             "skipped with a note without it).")


@dataclass
class RunConfig:
    task: str = _f("all", "Task to run; 'all' runs every task in order, each feeding the next.")
    output_dir: str = _f("./results", "Folder for every output of the run.")
    config: str | None = _f(None, "YAML file with settings (flat keys = flag names); flags override it.")
    debug: bool = _f(False, "Show full tracebacks for errors.")


@dataclass
class Config:
    """All settings of one run, grouped. Tasks read the group they need."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    GROUPS = ("run", "model", "data", "train", "compare", "export")

    def to_dict(self) -> dict:
        """Flat {flag: value} view: what is saved next to outputs (no secrets are ever fields)."""
        out = {}
        for group in self.GROUPS:
            obj = getattr(self, group)
            for f in fields(obj):
                out[f.name] = getattr(obj, f.name)
        return out


def format_settings(cfg: Config, groups: tuple[str, ...] = ("model", "data", "train")) -> str:
    """The resolved settings, one line per group, for the start of a run."""
    lines = []
    for group in groups:
        obj = getattr(cfg, group)
        lines.append(f"  {group}: " + ", ".join(f"{f.name}={getattr(obj, f.name)!r}" for f in fields(obj)))
    return "\n".join(lines)


def group_fields() -> list[tuple[str, object]]:
    """(group name, dataclass field) for every setting, in --help order."""
    return [(g, f) for g in Config.GROUPS for f in fields(type(getattr(Config(), g)))]

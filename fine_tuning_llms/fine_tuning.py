"""Lesson 4: LoRA / QLoRA fine-tuning with PEFT and the HF Trainer.

    python run_fine_tuning.py --task train [--dataset_path my.jsonl] [--load_4bit] [--merge]
    torchrun --nproc_per_node 2 run_fine_tuning.py --task train      # data parallel
    accelerate launch --config_file examples/accelerate_fsdp.yaml run_fine_tuning.py --task train   # FSDP2

Flow: load model + tokenizer → template and label the data (assistant tokens only) → wrap the
model in LoRA → held-out loss and answers *before* → Trainer.train() with checkpoints →
held-out loss and answers *after* → final_model/ (adapter, tokenizer, config, metrics), plots.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from .engine import chat_format
from .engine.artefacts import atomic_directory, atomic_write_json, package_versions
from .engine.batching import ExampleDataset, PackingCollator, PadCollator, choose_layout
from .engine.chat_format import tokenize_conversations
from .engine.checks import check_max_length
from .engine.config import Config, format_settings
from .engine.data import load_train_eval
from .engine.distributed import (
    check_launch,
    check_wrap_classes,
    describe_launch,
    fsdp_requested,
    full_trainable_state,
    is_sharded,
    sum_over_ranks,
    world_size,
)
from .engine.errors import UserError
from .engine.lora import prepare_peft_model
from .engine.memory_plan import check_fits, training_passes
from .engine.models import count_parameters, load_model, load_tokenizer, pick_device, resolve_model
from .engine.outputs import TaskOutputs
from .engine.precision import autocast_dtype, mixed_precision, training_model_config
from .engine.report_html import answer, fmt, image, key_values, read_csv, read_json, spread, table
from .engine.run_identity import check_resume, run_identity
from .engine.tool_use import tool_call_prompts, tool_call_rate
from .engine.trainer import (
    ChatTrainer,
    CompleteCheckpointCallback,
    NonFiniteLossError,
    ShardingReportCallback,
    TimePlanCallback,
    TrainingLogCallback,
    complete_checkpoints,
    mean_eval_loss,
    missing_checkpoint_files,
    perplexity,
)
from .engine.turn_formats import template_choice

log = logging.getLogger(__name__)

SIGN_OFF = "— Lumi"          # what the sample dataset teaches (fine_tuning_llms/data/README.md)
ANSWER_TOKENS = 48
TRAINING_LOG, LOSS_CURVE, EVAL_FILE = "training_log.csv", "loss_curve.png", "eval_before_after.json"
RUN_CONFIG = "run_config.json"  # in final_model/, with the adapter: the settings and package versions


def check_output_dir(cfg: Config) -> Path:
    out = Path(cfg.run.output_dir)
    final = out / "final_model"
    if final.exists() and not cfg.train.overwrite_output_dir and not cfg.train.resume_from_checkpoint:
        raise UserError(f"{final} already exists; pass --overwrite_output_dir to replace it or choose another "
                        "--output_dir")
    return out


def resolve_resume(cfg: Config, checkpoints_dir: Path) -> str | None:
    option = cfg.train.resume_from_checkpoint
    if not option:
        return None
    if option == "auto":
        done = complete_checkpoints(checkpoints_dir)
        if not done:
            log.info("--resume_from_checkpoint auto: no complete checkpoint in %s, starting fresh", checkpoints_dir)
            return None
        log.info("Resuming from %s", done[-1])
        return str(done[-1])
    path = Path(option)
    missing = missing_checkpoint_files(path)
    if missing:
        raise UserError(f"--resume_from_checkpoint {option} is not a complete checkpoint (missing: {', '.join(missing)}); "
                        "pass a complete checkpoint-N folder or 'auto' (the newest complete one)")
    return str(path)


def answer_prompts(eval_convs: list[list[dict]], limit: int) -> list[tuple[list[dict], str]]:
    """(prompt messages, reference reply) for held-out conversations: everything before the last reply."""
    pairs = []
    for conv in eval_convs[:limit]:
        last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
        pairs.append((conv[:last], conv[last]["content"]))
    return pairs


def generate_answers(model, tokenizer, pairs, *, label: str) -> list[str]:
    from .engine.generation import generate_batch

    prompts = [chat_format.generation_prompt_ids(tokenizer, msgs) for msgs, _ in pairs]
    model.eval()
    results = generate_batch(model, tokenizer, prompts, max_new_tokens=ANSWER_TOKENS, batch_size=20,
                             progress=f"Answers {label}")
    return [r.text.strip() for r in results]


def behaviour_rate(answers: list[str]) -> float | None:
    """Share of answers that carry the sample dataset's sign-off (what fine-tuning should add)."""
    if not answers:
        return None
    return sum(SIGN_OFF in a or "Lumi" in a for a in answers) / len(answers)


def training_arguments(cfg: Config, checkpoints_dir: Path, device: torch.device, *, has_eval: bool):
    from transformers import TrainingArguments

    t = cfg.train
    on_cpu = device.type == "cpu"
    bf16, fp16 = mixed_precision(cfg.model, device)
    return TrainingArguments(
        output_dir=str(checkpoints_dir),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.lr,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,           # a float in [0, 1) is a ratio of total steps
        weight_decay=t.weight_decay,
        max_grad_norm=1.0,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=3,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.save_steps,
        bf16=bf16,
        fp16=fp16,
        use_cpu=on_cpu,
        # Random order in both modes so --packing false changes only the layout, not the batches
        # (packed batches have no padding, so length grouping would buy nothing there).
        train_sampling_strategy="random",
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
        ddp_find_unused_parameters=False,
    )


def steps_per_epoch(examples: int, args) -> int:
    return max(1, -(-examples // (args.per_device_train_batch_size * args.gradient_accumulation_steps
                                  * args.world_size)))


def run(cfg: Config) -> dict:
    from transformers import set_seed

    # Several processes that cannot train together stop here, before anything is loaded.
    device = pick_device(cfg.model.device)
    check_launch(load_4bit=cfg.model.load_4bit, load_8bit=cfg.model.load_8bit, device=device)
    out = check_output_dir(cfg)
    checkpoints_dir = out / "checkpoints"
    resume = resolve_resume(cfg, checkpoints_dir)
    set_seed(cfg.train.seed)
    source = resolve_model(cfg.model.model)
    tokenizer = load_tokenizer(cfg.model, source)
    chat_format.require_chat_template(tokenizer, cfg.model.model)
    log.info("%s", template_choice(tokenizer).describe())
    check_max_length(tokenizer, cfg.data.max_length)  # fail in a second, before loading weights
    if cfg.export.export == "gguf":
        from .engine.gguf_export import check_exportable
        check_exportable(source)
    data = load_train_eval(cfg.data)
    train_set = tokenize_conversations(tokenizer, data.train.conversations, max_length=cfg.data.max_length,
                                       train_on=cfg.data.train_on, desc="Tokenizing train",
                                       train_reasoning=cfg.data.train_reasoning)
    eval_set = tokenize_conversations(tokenizer, data.eval, max_length=cfg.data.max_length,
                                      train_on=cfg.data.train_on, desc="Tokenizing eval",
                                      train_reasoning=cfg.data.train_reasoning)
    if not train_set.examples:
        raise UserError(f"no training example fits --max_length {cfg.data.max_length}; raise it")
    log.info("Data: %d train conversations (%d trained tokens), %d held-out (%s)", train_set.kept,
             train_set.summary()["trained_tokens"], eval_set.kept, data.eval_source)
    identity = run_identity(cfg, model_name=source.display_name, model_location=source.location,
                            train_examples=train_set.examples, eval_examples=eval_set.examples)
    if resume:
        check_resume(Path(resume), identity)  # before anything is loaded or written
    # Stop here, before loading weights, when the predicted peak does not fit (engine/memory_plan.py).
    plan = check_fits(cfg, source.location, [len(e["input_ids"]) for e in train_set.examples], device,
                      cfg.train.memory_gb)
    model = load_model(training_model_config(cfg.model, device), source)

    model, new_ids = prepare_peft_model(cfg, model, tokenizer)
    requested = fsdp_requested()
    wrap_classes = check_wrap_classes(model) if requested else []
    fsdp = requested and world_size() > 1  # one process has nothing to shard over
    fused = cfg.train.fused_kernels and not fsdp
    if fsdp:
        log.info("FSDP2: sharding by %s (each one its own unit), then the rest of the model",
                 ", ".join(wrap_classes) or "the whole model")
        if cfg.train.fused_kernels:
            log.info("Fused kernels: off under FSDP (they keep whole-weight copies in every process)")
    if fused:
        from .engine.kernels import head_for_fused_loss, packing_for_run, use_fused_kernels
        pack = packing_for_run(cfg.train.pack_weights, training_passes(cfg.train, len(train_set.examples)), device)
        head = ("the vocabulary head with the loss, one node" if head_for_fused_loss(model) is not None and
                cfg.train.trained_logits_only else "the vocabulary head keeps the model's own code")
        log.info("Fused kernels: %d LoRA/attention/RMSNorm layers train through one autograd node each; %s",
                 use_fused_kernels(model, pack_weights=pack), head)
    trainable, total = count_parameters(model)
    log.info("Trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    log.info("Resolved settings:\n%s", format_settings(cfg))

    args = training_arguments(cfg, checkpoints_dir, device, has_eval=bool(eval_set.examples))
    autocast = autocast_dtype(args.bf16, args.fp16)
    pad_id = tokenizer.pad_token_id
    pairs = answer_prompts(data.eval, cfg.train.eval_answers)
    tool_pairs = tool_call_prompts(data.eval, cfg.train.eval_answers)  # [] unless the held-out data calls tools
    is_main = args.process_index == 0

    # Packing only where the real model proves it exact (a second or so), then the held-out loss
    # and answers of the untouched model: cheap sanity checks before the long part.
    layout = choose_layout(model, train_set.examples, enabled=cfg.train.packing, autocast_dtype=autocast,
                           fused_head=fused, trained_logits_only=cfg.train.trained_logits_only)
    packed = layout.packed
    before_loss = mean_eval_loss(model, eval_set.examples, pad_id, autocast_dtype=autocast, packed=packed)
    before_answers = generate_answers(model, tokenizer, pairs, label="before") if is_main and pairs else []
    before_calls = generate_answers(model, tokenizer, tool_pairs, label="tool calls before") if is_main and tool_pairs else []
    log.info("Before training: held-out loss %.4f (perplexity %.2f)", before_loss, perplexity(before_loss))

    log_callback = TrainingLogCallback(out / TRAINING_LOG)
    trainer = ChatTrainer(model=model, args=args, train_dataset=ExampleDataset(train_set.examples),
                          eval_dataset=ExampleDataset(eval_set.examples) if eval_set.examples else None,
                          data_collator=PackingCollator() if packed else PadCollator(pad_id),
                          callbacks=[log_callback, CompleteCheckpointCallback(identity), ShardingReportCallback(),
                                     TimePlanCallback(steps_per_epoch(len(train_set.examples), args))],
                          trained_logits_only=cfg.train.trained_logits_only, fused_head=fused,
                          packed=packed, pad_token_id=pad_id)
    log_callback.trainer = trainer
    launch = describe_launch(trainer)
    if launch:
        log.info(launch)
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=resume)
    except NonFiniteLossError as exc:
        raise UserError(f"{exc}: training stopped and nothing was saved as final; lower --lr (now {cfg.train.lr}) "
                        "or check the data") from None
    except KeyboardInterrupt:
        if is_main and not is_sharded(model):  # a sharded model cannot be gathered once the others stopped
            saved = save_adapter(model, tokenizer, out / "interrupted_model", cfg, metrics={"interrupted_at_step":
                                 trainer.state.global_step}, overwrite=True)
            log.warning("Interrupted at step %d: adapter trained so far saved to %s; continue with "
                        "--resume_from_checkpoint auto", trainer.state.global_step, saved)
        elif is_main:
            log.warning("Interrupted at step %d: continue from the last checkpoint with --resume_from_checkpoint auto "
                        "under the same launch", trainer.state.global_step)
        raise
    finally:
        if fused:
            from .engine.kernels import release_buffers, release_packed_weights
            release_packed_weights(model)  # the training-only weight copies: eval and generation do not use them
            release_buffers()  # and the nodes' scratch buffers (one set per process, not per model)
    seconds = time.perf_counter() - start
    training_seconds = max(seconds - trainer.eval_seconds, 0.0)

    if trainer.last_eval and trainer.last_eval[0] == trainer.state.global_step:
        after_loss = trainer.last_eval[1]  # Trainer evaluates after the last step already, the same way
    else:
        after_loss = mean_eval_loss(model, eval_set.examples, pad_id, autocast_dtype=autocast, packed=packed)
    log.info("After training: held-out loss %.4f (perplexity %.2f), was %.4f", after_loss, perplexity(after_loss),
             before_loss)
    sharded = is_sharded(model)
    # A sharded model's every forward gathers weights from all ranks: all of them generate (the
    # same greedy answers) and gather the adapter; only rank 0 keeps and writes them.
    after_answers = generate_answers(model, tokenizer, pairs, label="after") if pairs and (is_main or sharded) else []
    after_calls = (generate_answers(model, tokenizer, tool_pairs, label="tool calls after")
                   if tool_pairs and (is_main or sharded) else [])
    adapter_state = full_trainable_state(model) if sharded else None
    tokens_seen, trained_tokens_seen = sum_over_ranks(trainer.tokens_seen, trainer.trained_tokens_seen)  # all processes'
    if not is_main:
        return {}
    metrics = {
        "eval_loss_before": before_loss, "eval_loss_after": after_loss,
        "perplexity_before": perplexity(before_loss), "perplexity_after": perplexity(after_loss),
        "behaviour_rate_before": behaviour_rate(before_answers), "behaviour_rate_after": behaviour_rate(after_answers),
        "behaviour": f"share of held-out answers containing 'Lumi' (the sample dataset's sign-off {SIGN_OFF!r})",
        # share of held-out tool prompts answered with a valid call (parses, right tool, right arguments)
        "tool_call_rate_before": tool_call_rate(tool_pairs, before_calls),
        "tool_call_rate_after": tool_call_rate(tool_pairs, after_calls),
        # tokens/s over training alone: the held-out evaluations inside train() are timed apart
        "train_seconds": round(seconds, 1), "eval_seconds_in_training": round(trainer.eval_seconds, 2),
        "global_steps": trainer.state.global_step,
        "tokens_per_s": round(tokens_seen / training_seconds, 1) if training_seconds else None,
        "trained_tokens_per_s": round(trained_tokens_seen / training_seconds, 1) if training_seconds else None,
        "trainable_parameters": trainable, "total_parameters": total, "new_token_ids": new_ids,
        "train_examples": train_set.kept, "eval_examples": eval_set.kept, "eval_source": data.eval_source,
        "batches": layout.as_dict(), "memory_plan": plan.as_dict() if plan else None,
    }
    comparisons = [{"prompt": msgs[-1]["content"], "reference": ref, "before": b, "after": a}
                   for (msgs, ref), b, a in zip(pairs, before_answers, after_answers)]
    final = save_adapter(model, tokenizer, out / "final_model", cfg, metrics=metrics, comparisons=comparisons,
                         overwrite=cfg.train.overwrite_output_dir or bool(resume), state_dict=adapter_state)
    atomic_write_json(out / EVAL_FILE, {"metrics": metrics, "answers": comparisons})
    write_loss_curve(out, log_callback.rows)
    print_before_after(metrics, comparisons)
    result = {"final_model": str(final), "metrics": metrics}
    if cfg.train.merge:
        from .engine.merging import merge_adapter
        result["merged_model"] = str(merge_adapter(cfg, final, out / "final_model_merged"))
    if cfg.export.export == "gguf" and cfg.run.task == "train":  # with --task all, the export task does it
        from .engine.gguf_check import export_and_check
        result["export"] = export_and_check(cfg, final, out)
    return result


def save_adapter(model, tokenizer, target: Path, cfg: Config, *, metrics: dict, comparisons: list | None = None,
                 overwrite: bool = False, state_dict: dict | None = None) -> Path:
    """Adapter + tokenizer (with its chat template) + run config + versions + metrics, atomically.

    ``state_dict``: the trained weights gathered whole from a sharded (FSDP) model, so the adapter
    is a normal PEFT adapter, not one rank's shard."""
    from .engine.generation import chat_generation_config

    try:
        with atomic_directory(target, overwrite=overwrite) as tmp:
            # New tokens' rows are stored by the trainable-token adapter itself; without this PEFT
            # would also save the whole resized embedding matrix (~113 MB for SmolLM2).
            model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
            chat_generation_config(model, tokenizer).save_pretrained(tmp)  # eos ids incl. the end-of-turn token
            atomic_write_json(tmp / RUN_CONFIG, {"settings": cfg.to_dict(), "versions": package_versions()})
            atomic_write_json(tmp / "metrics.json", metrics)
            if comparisons is not None:
                atomic_write_json(tmp / EVAL_FILE, {"metrics": metrics, "answers": comparisons})
    except FileExistsError:
        raise UserError(f"{target} already exists; pass --overwrite_output_dir to replace it") from None
    log.info("Saved adapter, tokenizer and run config to %s", target)
    return target


def write_loss_curve(out: Path, rows: list[dict]) -> None:
    from .engine.plots import line_plot

    def series(key):
        pts = [(float(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        return ([p[0] for p in pts], [p[1] for p in pts])

    panels = [{"title": "loss", "xlabel": "step", "ylabel": "loss",
               "series": {"train": series("loss"), "held-out": series("eval_loss")}},
              {"title": "learning rate", "xlabel": "step", "ylabel": "lr", "series": {"lr": series("lr")}},
              {"title": "grad norm", "xlabel": "step", "ylabel": "norm", "series": {"grad norm": series("grad_norm")}},
              {"title": "throughput", "xlabel": "step", "ylabel": "tokens/s",
               "series": {"tokens/s": series("tokens_per_s")}}]
    line_plot(out / LOSS_CURVE, panels, title="Training")


def print_before_after(metrics: dict, comparisons: list[dict], n: int = 4) -> None:
    log.info("Held-out loss %.4f → %.4f", metrics["eval_loss_before"], metrics["eval_loss_after"])
    if metrics["behaviour_rate_before"] is not None:
        log.info("Held-out answers naming Lumi (what the sample dataset teaches): %.0f%% → %.0f%%",
                 100 * metrics["behaviour_rate_before"], 100 * metrics["behaviour_rate_after"])
    if metrics.get("tool_call_rate_before") is not None:
        log.info("Held-out tool prompts answered with a valid call (parses, right tool, right arguments): "
                 "%.0f%% → %.0f%%", 100 * metrics["tool_call_rate_before"], 100 * metrics["tool_call_rate_after"])
    for c in comparisons[:n]:
        log.info("Q: %s\n  before: %s\n  after:  %s", c["prompt"], c["before"][:200], c["after"][:200])


# ---------------------------------------------------------------- report section

def report_section(folder: Path) -> str:
    """Before/after numbers, the training curves, the log (evenly thinned) and the answers before vs after."""
    log_rows = read_csv(folder / TRAINING_LOG)
    evaluation = read_json(folder / EVAL_FILE) or {}
    metrics, answers = evaluation.get("metrics") or {}, evaluation.get("answers") or []
    parts = []
    if metrics:
        parts.append("<h3>학습 전후 / Before and after</h3>" + key_values(metrics))
    parts.append(image(folder, LOSS_CURVE, "training curves"))
    if log_rows:
        cols = list(log_rows[0])
        parts.append(f"<h3>학습 로그 / Training log</h3><p>{len(log_rows)} rows in {TRAINING_LOG}</p>"
                     + table(cols, [[r.get(c) for c in cols] for r in spread(log_rows)]))
    if answers:
        parts.append("<h3>답변: 학습 전 vs 후 / Answers before vs after</h3>" + table(
            ["prompt / 질문", "reference / 정답", "before / 전", "after / 후"],
            [(answer(a.get("prompt")), answer(a.get("reference")), answer(a.get("before")), answer(a.get("after")))
             for a in answers]))
    return "".join(parts)


def report_glance(folder: Path) -> list[str]:
    metrics = (read_json(folder / EVAL_FILE, quiet=True) or {}).get("metrics") or {}
    return [f"학습 / train: held-out loss {fmt(metrics.get('eval_loss_before'))} → "
            f"{fmt(metrics.get('eval_loss_after'))}; taught behaviour {fmt(metrics.get('behaviour_rate_before'))}"
            f" → {fmt(metrics.get('behaviour_rate_after'))}"] if metrics else []


def recorded_run(folder: Path) -> tuple[dict, dict]:
    run_config = read_json(folder / "final_model" / RUN_CONFIG, quiet=True) or {}
    return run_config.get("settings") or {}, run_config.get("versions") or {}


OUTPUTS = TaskOutputs(task="train", section_id="training", title="학습 / Training",
                      files=(TRAINING_LOG, LOSS_CURVE, EVAL_FILE, f"final_model/{RUN_CONFIG}"), section=report_section,
                      glance=report_glance, recorded=recorded_run)

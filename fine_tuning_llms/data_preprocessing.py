"""Lesson 3: conversations → chat template → input ids + assistant-only labels.

    python run_fine_tuning.py --task preprocess [--dataset_path my.jsonl] [--max_length 512]

Writes ``processed_conversations.json`` (per example: rendered text, input ids, labels, counts;
plus a summary) and ``token_lengths.png``, and prints the mask view of a few examples: trained
tokens highlighted (green, or ⟦ ⟧ without colour).
"""
from __future__ import annotations

import logging

from .engine import chat_format, display
from .engine.artefacts import atomic_write_json
from .engine.chat_format import ProcessedData, tokenize_conversations
from .engine.checks import check_max_length
from .engine.config import Config
from .engine.data import load_train_eval
from .engine.models import load_tokenizer

log = logging.getLogger(__name__)

OUTPUT_FILE = "processed_conversations.json"
def template_facts(tokenizer) -> dict:
    """What the template does on its own: default system prompt, BOS, end-of-turn text."""
    probe = [{"role": "user", "content": "PROBE"}]
    rendered = chat_format.render(tokenizer, probe)
    with_answer = chat_format.render(tokenizer, probe + [{"role": "assistant", "content": "ANSWER"}])
    injected = rendered.split("PROBE")[0]
    after_answer = with_answer.split("ANSWER", 1)[1]
    return {
        "injects_default_system_prompt": "system" in injected.lower(),
        "text_before_first_user_message": injected,
        "text_after_assistant_reply": after_answer,
        "bos_in_template": bool(tokenizer.bos_token) and rendered.startswith(tokenizer.bos_token),
        "pad_equals_eos": tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id,
    }


def run(cfg: Config) -> dict:
    tokenizer = load_tokenizer(cfg.model)
    chat_format.require_chat_template(tokenizer, cfg.model.model)
    check_max_length(tokenizer, cfg.data.max_length)
    data = load_train_eval(cfg.data)
    convs = data.train.conversations
    log.info("Read %d conversations (%s format) from %s; held-out: %d (%s)", len(convs), data.train.data_format,
             data.train.source, len(data.eval), data.eval_source)
    facts = template_facts(tokenizer)
    if facts["injects_default_system_prompt"] and not cfg.data.system_prompt:
        log.info("Note: this chat template injects its own default system prompt when a conversation has none:\n  %r\n"
                 "  Training sees it, and so does inference. Pass --system_prompt \"...\" to use your own.",
                 facts["text_before_first_user_message"].strip())
    processed = tokenize_conversations(tokenizer, convs, max_length=cfg.data.max_length, train_on=cfg.data.train_on)
    summary = processed.summary()
    summary.update(source=data.train.source, data_format=data.train.data_format,
                   skipped_invalid=dict(data.train.skipped), max_length=cfg.data.max_length,
                   train_on=cfg.data.train_on, template=facts, model=cfg.model.model)
    if not processed.examples:
        from .engine.errors import UserError
        raise UserError(f"every conversation is longer than --max_length {cfg.data.max_length} before its first "
                        "assistant token; raise --max_length")
    show_examples(tokenizer, processed, n=2)
    log_summary(summary)
    out_dir = cfg.run.output_dir
    path = atomic_write_json(f"{out_dir}/{OUTPUT_FILE}", {"summary": summary, "examples": processed.examples},
                             indent=None)
    from .engine.plots import histogram
    histogram(f"{out_dir}/token_lengths.png", processed.lengths, title="Tokens per conversation (after template)",
              xlabel="tokens", vline=cfg.data.max_length, vline_label="--max_length")
    log.info("Wrote %s and token_lengths.png", path)
    return {"summary": summary, "path": str(path)}


def show_examples(tokenizer, processed: ProcessedData, *, n: int = 2) -> None:
    # Multi-turn examples first: they show that every reply, and only replies, is trained.
    order = sorted(range(len(processed.examples)), key=lambda i: -len(chat_format.trained_spans(processed.examples[i]["labels"])))
    legend = "green = trained" if display.use_colour() else "⟦…⟧ = trained"
    for i in sorted(order[:n]):
        e = processed.examples[i]
        enc = chat_format.EncodedConversation(input_ids=e["input_ids"], labels=e["labels"], text=e["text"])
        log.info("--- example %d: %d tokens, %d trained (%s) ---\n%s", i, len(enc.input_ids), enc.trained_token_count,
                 legend, display.mask_view(tokenizer, enc))


def log_summary(summary: dict) -> None:
    p = summary["length_percentiles"]
    log.info("Kept %d, dropped %d (too long), truncated %d; tokens p50 %s / p90 %s / max %s; %.1f%% of tokens trained.",
             summary["examples_kept"], summary["examples_dropped_too_long"], summary["examples_truncated"],
             p.get("p50"), p.get("p90"), p.get("max"), 100 * summary["share_of_tokens_trained"])

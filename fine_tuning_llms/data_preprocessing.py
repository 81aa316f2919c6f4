"""Lesson 3: conversations → chat template → input ids + assistant-only labels.

    python run_fine_tuning.py --task preprocess [--dataset_path my.jsonl] [--max_length 512]

Writes ``processed_conversations.json`` (per example: rendered text, input ids, labels, counts;
plus a summary) and ``token_lengths.png``, and prints the mask view of a few examples: trained
tokens highlighted (green, or ⟦ ⟧ without colour).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from .engine import chat_format, display, tool_format
from .engine.artefacts import atomic_write_json
from .engine.chat_format import ProcessedData, tokenize_conversations
from .engine.checks import check_max_length
from .engine.config import EMBEDDED_BASE_MODEL, EMBEDDED_MODEL, Config
from .engine.data import load_train_eval
from .engine.models import HUB_ID_PATTERN, cache_root, hub_cached, load_tokenizer
from .engine.outputs import TaskOutputs
from .engine.report_html import Html, esc, fmt, image, key_values, read_json
from .engine.tool_data import has_agent_parts
from .engine.turn_formats import template_choice

log = logging.getLogger(__name__)

OUTPUT_FILE = "processed_conversations.json"
LENGTHS_PLOT = "token_lengths.png"


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
    choice = template_choice(tokenizer)
    log.info("%s", choice.describe())
    facts = {**template_facts(tokenizer), "choice": choice.as_dict()}
    if facts["injects_default_system_prompt"] and not cfg.data.system_prompt:
        log.info("Note: this chat template injects its own default system prompt when a conversation has none:\n  %r\n"
                 "  Training sees it, and so does inference. Pass --system_prompt \"...\" to use your own.",
                 facts["text_before_first_user_message"].strip())
    agent = agent_rendering(tokenizer, convs, train_reasoning=cfg.data.train_reasoning)
    processed = tokenize_conversations(tokenizer, convs, max_length=cfg.data.max_length, train_on=cfg.data.train_on,
                                       train_reasoning=cfg.data.train_reasoning)
    summary = processed.summary()
    summary.update(source=data.train.source, data_format=data.train.data_format,
                   skipped_invalid=dict(data.train.skipped), max_length=cfg.data.max_length,
                   train_on=cfg.data.train_on, template=facts, model=cfg.model.model)
    if agent:
        summary.update(agent)
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
    histogram(f"{out_dir}/{LENGTHS_PLOT}", processed.lengths, title="Tokens per conversation (after template)",
              xlabel="tokens", vline=cfg.data.max_length, vline_label="--max_length")
    log.info("Wrote %s and %s", path, LENGTHS_PLOT)
    return {"summary": summary, "path": str(path)}


def agent_rendering(tokenizer, convs, *, train_reasoning: bool) -> dict:
    """Say how tool calls, tool results and reasoning will be rendered (the template's own way or the
    fallback, and why); {} when no conversation has any."""
    count = sum(has_agent_parts(c) for c in convs)
    if not count:
        return {}
    rendering = tool_format.rendering_for(tokenizer)
    log.info("%d conversation(s) with tool calls, tool results or reasoning. Rendering chosen by probing the "
             "chat template:\n  %s\n  Trained: each assistant turn with its tool calls%s; never the tool results "
             "or the tool list.", count, rendering.describe().replace("\n", "\n  "),
             " and reasoning" if train_reasoning else " (reasoning left untrained: --train_reasoning false)")
    return {"agent_conversations": count, "train_reasoning": train_reasoning, "tool_rendering": rendering.as_dict()}


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


# ---------------------------------------------------------------- report section

@lru_cache(maxsize=4)
def local_tokenizer(spec: str):
    """``spec``'s tokenizer.json through the ``tokenizers`` library (fast, no model code) when it is on this disk
    already; None otherwise: the report never downloads or converts (converting the embedded GGUF is slow)."""
    from tokenizers import Tokenizer

    path = Path(spec).expanduser()
    if spec in (EMBEDDED_MODEL, EMBEDDED_BASE_MODEL):
        found = sorted(cache_root().glob(f"{spec}-*/tokenizer.json"), key=lambda p: p.stat().st_mtime)
        file = found[-1] if found else None
    elif path.is_dir():
        file = path / "tokenizer.json"
    else:
        cached = hub_cached(spec) if HUB_ID_PATTERN.match(spec) else None
        file = Path(cached) / "tokenizer.json" if cached else None
    return Tokenizer.from_file(str(file)) if file is not None and file.is_file() else None


def token_pieces(example: dict, tokenizer) -> list[str] | None:
    """One display string per input id: stored "tokens", else slices of the text, else decoded ids."""
    ids = example.get("input_ids") or []
    if isinstance(example.get("tokens"), list) and len(example["tokens"]) == len(ids):
        return [str(t) for t in example["tokens"]]
    if tokenizer is None:
        return None
    text = example.get("text") or ""
    encoded = tokenizer.encode(text, add_special_tokens=False)
    if encoded.ids == ids:  # exact characters of the text
        pieces, end = [], 0
        for a, b in encoded.offsets:
            # Byte-level BPE splits one Korean syllable into several tokens that share its offsets:
            # the first of them shows the character, the rest stay empty.
            pieces.append(text[max(a, end):b])
            end = max(end, b)
        return pieces
    pieces, previous = [], ""
    for i in range(len(ids)):  # ids without matching text (truncated): decode growing prefixes
        current = tokenizer.decode(ids[: i + 1], skip_special_tokens=False)
        if i + 1 < len(ids):
            current = current.rstrip("\ufffd")  # half a multi-byte character: show it with its last byte
        if current.startswith(previous):
            pieces.append(current[len(previous):])
        else:  # the decoder rewrote earlier text (clean-up rules): show this id decoded alone
            pieces.append(tokenizer.decode([ids[i]], skip_special_tokens=False))
        previous = current
    return pieces


def mask_html(pieces: Sequence[str], labels: Sequence[int]) -> Html:
    """Trained tokens green, others grey; alternating shades show where each token starts."""
    spans = []
    for i, (piece, label) in enumerate(zip(pieces, labels)):
        kind = "t" if label != chat_format.IGNORE_INDEX else "u"
        spans.append(f'<span class="{kind}{i % 2}">{esc(piece)}</span>')
    return Html('<pre class="mask">' + "".join(spans) + "</pre>")


def report_section(folder: Path) -> str:
    """The summary, the length histogram and the assistant mask of two examples, coloured token by token."""
    data = read_json(folder / OUTPUT_FILE) or {}
    summary, examples = data.get("summary") or {}, data.get("examples") or []
    parts = []
    if summary:
        flat = {k: v for k, v in summary.items() if k not in ("template", "tool_rendering")}
        parts.append(key_values(flat))
        if isinstance(summary.get("template"), dict):
            parts.append("<h3>채팅 템플릿 / Chat template facts</h3>" + key_values(summary["template"]))
        if isinstance(summary.get("tool_rendering"), dict):
            rendering = {k: "; ".join(v) if isinstance(v, list) else v for k, v in summary["tool_rendering"].items()}
            parts.append("<h3>도구 호출 렌더링 / Tool-call rendering</h3>" + key_values(rendering))
    parts.append(image(folder, LENGTHS_PLOT, "token length histogram"))
    # Multi-turn conversations first: they show that every reply, and only the replies, is trained.
    spans = [chat_format.trained_spans(e.get("labels") or []) for e in examples]
    order = sorted(range(len(examples)), key=lambda i: -len(spans[i]))[:2]
    tokenizer = None
    if order and not all(isinstance(examples[i].get("tokens"), list) for i in order) and summary.get("model"):
        try:
            tokenizer = local_tokenizer(str(summary["model"]))
        except Exception as exc:  # a missing or broken tokenizer only costs the colours
            log.info("report: no tokenizer for the mask view (%s); showing plain text", exc)
    if order:
        parts.append('<h3>어시스턴트 마스크 / Assistant mask</h3><p class="legend"><span class="t0">학습됨 / trained '
                     '(labels = ids)</span><span class="u0">무시됨 / ignored (labels = -100)</span></p>')
    for i in sorted(order):
        e = examples[i]
        labels = e.get("labels") or []
        trained = sum(label != chat_format.IGNORE_INDEX for label in labels)
        parts.append(f"<p>example {i}: {len(labels)} tokens, {trained} trained, {len(spans[i])} "
                     f"assistant span(s){' (truncated)' if e.get('truncated') else ''}</p>")
        pieces = token_pieces(e, tokenizer)
        if pieces is None:
            parts.append('<p class="notrun">토크나이저를 찾지 못해 색 없이 표시 / tokenizer not available locally: '
                         f'plain text without colours</p><pre>{esc(e.get("text", ""))}</pre>')
        else:
            parts.append(mask_html(pieces, labels))
    return "".join(parts)


def report_glance(folder: Path) -> list[str]:
    pre = (read_json(folder / OUTPUT_FILE, quiet=True) or {}).get("summary") or {}
    return [f"전처리 / preprocess: {fmt(pre.get('examples_kept'))} conversations, "
            f"{fmt(pre.get('trained_tokens'))} of {fmt(pre.get('total_tokens'))} tokens trained"] if pre else []


OUTPUTS = TaskOutputs(task="preprocess", section_id="preprocessing", title="전처리 / Preprocessing",
                      files=(OUTPUT_FILE, LENGTHS_PLOT), section=report_section, glance=report_glance)

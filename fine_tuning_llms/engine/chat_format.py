"""Chat templating and assistant-only labels, for any chat template (no generation tags needed).

The idea: render the conversation with the tokenizer's own ``apply_chat_template`` (what
inference will see), then find each assistant reply's characters by rendering prefixes:

    prefix_i = render(messages[:i], add_generation_prompt=True)   # ...<|im_start|>assistant\n
    upto_i   = render(messages[:i + 1])                           # ...reply<|im_end|>\n

The reply, *with* its end-of-turn token, is ``full[len(prefix_i):len(upto_i)]`` minus trailing
whitespace (the newline after ``<|im_end|>`` is template glue, not something to learn). Tokens
whose character offsets touch such a span are trained; everything else gets label -100.
Padding is masked through the attention mask, never by token id, so pad == eos cannot hide
the end-of-turn token that teaches the model to stop.

Agent conversations (tool calls, tool results, a tool list, reasoning) go through the same
path: ``tool_format`` turns them into what this template renders (its own tool/reasoning
support, or the one fallback), so an assistant turn's span holds its calls and reasoning, while
tool results and the tool list lie outside every span. With ``train_reasoning=False`` the
reasoning is cut out of its turn's span: the turn is rendered once more without it, and the
characters only the reasoning brings (common suffix first, as reasoning comes before the
reply) stay untrained. A template that drops the start of earlier turns in history (Qwen 3:
their reasoning and empty ``<think>`` blocks) gets those turns trained as history shows them,
from the end of the prompt to their end-of-turn token.
"""
from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from . import tool_format, turn_formats
from .data import Conversation
from .errors import UserError
from .tool_data import has_agent_parts

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

def ensure_chat_template(tokenizer, option: str | None):
    """Install the template --chat_template asks for (``auto``: the tokenizer's own, or for a base model a
    format its vocabulary can represent; turn_formats.py); returns the TemplateChoice."""
    return turn_formats.apply_template(tokenizer, option)


def require_chat_template(tokenizer, name: str = "this tokenizer") -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{name} has no chat template; pass --chat_template auto (a format its vocabulary can "
                        "represent) or --chat_template path/to/template.jinja")


def ensure_pad_token(tokenizer) -> None:
    """Give the tokenizer a pad token if it has none.

    Reusing eos is safe *here* because labels are masked by the attention mask, not by the pad
    id; we log it because elsewhere (collators that mask pad ids) it silently removes the stop
    signal from training.
    """
    if tokenizer.pad_token_id is None:
        if tokenizer.unk_token_id is not None:
            tokenizer.pad_token = tokenizer.unk_token
        elif tokenizer.eos_token_id is not None:
            tokenizer.pad_token = tokenizer.eos_token
            log.info("Tokenizer has no pad token: padding with eos %r (labels are masked by the attention "
                     "mask, so end-of-turn tokens are still trained).", tokenizer.eos_token)
        else:
            raise UserError("the tokenizer has neither pad, unk nor eos token; add one with --new_tokens")


def template_inputs(tokenizer, messages: Sequence[dict]) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) as the template receives them: plain conversations unchanged."""
    if not has_agent_parts(messages):
        return list(messages), None
    return tool_format.template_inputs(messages, tool_format.rendering_for(tokenizer))


def render(tokenizer, messages: Sequence[dict], *, add_generation_prompt: bool = False) -> str:
    messages, tools = template_inputs(tokenizer, messages)
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja raise_exception() from templates that reject a conversation shape
        raise UserError(f"the chat template rejected a conversation ({str(exc).splitlines()[0][:160]}); "
                        "check the roles and their order") from None


def template_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


@dataclass
class TemplateReport:
    """What we noticed while rendering: shown once, not once per conversation."""

    prefix_mismatches: int = 0
    untrainable_replies: int = 0

    def warn_once(self, tokenizer) -> None:
        if self.prefix_mismatches:
            log.warning("Chat template of %s re-renders earlier turns differently in %d assistant turn(s) "
                        "(rendered prompt is not a prefix of prompt+answer); those replies were located in the "
                        "full text instead. Training and inference may see different prompts.",
                        template_name(tokenizer), self.prefix_mismatches)
        if self.untrainable_replies:
            log.warning("%d earlier assistant repl(ies) are rewritten by the template and were not trained; "
                        "use --train_on last for such templates.", self.untrainable_replies)


def _eot_strings(tokenizer) -> list[str]:
    """Special tokens that may close a turn: eos plus every added special token."""
    candidates = set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return sorted((c for c in candidates if c), key=len, reverse=True)


def _history_turn(tokenizer, full: str, prefix: str, upto: str) -> tuple[int, int] | None:
    """Where a turn that the template renders differently in history sits in ``full``, when history only
    drops its beginning (Qwen 3 drops reasoning and an empty <think> block): the text from the end of
    ``prefix`` to its end-of-turn token, if that is how the turn's own rendering ends. None otherwise."""
    turn = upto[len(prefix):].rstrip()
    eot = next((e for e in _eot_strings(tokenizer) if turn.endswith(e)), None)
    stop = full.find(eot, len(prefix)) if eot else -1
    if stop < 0 or not turn.endswith(full[len(prefix):stop + len(eot)]):
        return None
    return len(prefix), stop + len(eot)


def _reasoning_chars(tokenizer, messages: Sequence[dict], i: int, prefix: str, upto: str) -> tuple[int, int]:
    """(start, end) within ``upto`` of what turn i's reasoning adds; (0, 0) when it adds nothing found."""
    plain = render(tokenizer, [*messages[:i], tool_format.without_reasoning(messages[i])])
    if not plain.startswith(prefix):
        return 0, 0
    a, b = upto[len(prefix):], plain[len(prefix):]
    suffix = 0
    while suffix < min(len(a), len(b)) and a[-1 - suffix] == b[-1 - suffix]:
        suffix += 1
    start = 0
    while start < min(len(a), len(b)) - suffix and a[start] == b[start]:
        start += 1
    return len(prefix) + start, len(upto) - suffix


def assistant_char_spans(tokenizer, messages: Sequence[dict], *, train_on: str = "all",
                         report: TemplateReport | None = None,
                         train_reasoning: bool = True) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` and return (text, [(start, end) char span of each trained reply])."""
    full = render(tokenizer, messages)
    turn_spans: list[list[tuple[int, int]]] = []   # one list per assistant turn (reasoning may split one)
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1])
        cut = (0, 0)
        if full.startswith(prefix) and full.startswith(upto) and len(prefix) >= cursor and len(upto) > len(prefix):
            start, end = len(prefix), len(upto)
            if not train_reasoning and "reasoning_content" in message:
                cut = _reasoning_chars(tokenizer, messages, i, prefix, upto)
        elif (full.startswith(prefix) and len(prefix) >= cursor
              and (history := _history_turn(tokenizer, full, prefix, upto)) is not None):
            # History drops the turn's beginning (reasoning, an empty <think> block): train what is left.
            if report is not None:
                report.prefix_mismatches += 1
            start, end = history
        else:
            # The template renders history differently from the last turn (e.g. drops reasoning):
            # find the reply's own text, then take the end-of-turn token right after it.
            if report is not None:
                report.prefix_mismatches += 1
            reply = template_inputs(tokenizer, messages[: i + 1])[0][-1].get("content") or ""
            if not train_reasoning and "reasoning_content" in message:
                reply = tool_format.after_think(reply, message["reasoning_content"])  # <think> stays untrained
            start = full.find(reply, cursor) if reply else -1
            if start < 0:
                # The template rewrote this reply's text: there is nothing verbatim to train on.
                if report is not None:
                    report.untrainable_replies += 1
                continue
            end = start + len(reply)
            rest = full[end:]
            stripped = rest.lstrip(" ")
            for eot in _eot_strings(tokenizer):
                if stripped.startswith(eot):
                    end += len(rest) - len(stripped) + len(eot)
                    break
        while end > start and full[end - 1].isspace():
            end -= 1  # template glue after the end-of-turn token is not part of the reply
        cut_start, cut_end = cut
        if cut_end > cut_start:  # the reasoning stays untrained: the turn is trained around it
            turn_spans.append([(a, b) for a, b in ((start, cut_start), (cut_end, end)) if b > a])
        else:
            turn_spans.append([(start, end)])
        cursor = end
    if train_on == "last":
        turn_spans = turn_spans[-1:]
    spans = [span for turn in turn_spans for span in turn]
    return full, spans


@dataclass
class EncodedConversation:
    input_ids: list[int]
    labels: list[int]          # IGNORE_INDEX where not trained
    text: str
    truncated: bool = False

    @property
    def assistant_mask(self) -> list[int]:
        return [int(label != IGNORE_INDEX) for label in self.labels]

    @property
    def trained_token_count(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def trained_spans(labels: Sequence[int]) -> list[list[int]]:
    """The runs of trained labels (one per trained reply); each run is those tokens' ids."""
    spans: list[list[int]] = []
    previous_trained = False
    for label in labels:
        trained = label != IGNORE_INDEX
        if trained and not previous_trained:
            spans.append([])
        if trained:
            spans[-1].append(label)
        previous_trained = trained
    return spans


def mask_from_offsets(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for every token whose characters overlap a trained span."""
    mask = []
    for s, e in offsets:
        hit = e > s and any(s < span_end and e > span_start for span_start, span_end in spans)
        mask.append(int(hit))
    return mask


def encode_conversation(tokenizer, messages: Sequence[dict], *, max_length: int | None = None,
                        train_on: str = "all", report: TemplateReport | None = None,
                        train_reasoning: bool = True) -> EncodedConversation | None:
    """Template + tokenize + label one conversation; None when truncation would leave nothing trained."""
    text, spans = assistant_char_spans(tokenizer, messages, train_on=train_on, report=report,
                                       train_reasoning=train_reasoning)
    # add_special_tokens=False: the template already wrote any BOS it wants (no double BOS), and
    # this is exactly what apply_chat_template(tokenize=True) feeds the model at inference.
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = mask_from_offsets(enc["offset_mapping"], spans)
    return _finish(enc["input_ids"], mask, text, max_length)


def _finish(ids: list[int], mask: list[int], text: str, max_length: int | None) -> EncodedConversation | None:
    truncated = False
    if max_length is not None and len(ids) > max_length:
        ids, mask, truncated = ids[:max_length], mask[:max_length], True
        if not any(mask):
            return None
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    return EncodedConversation(input_ids=list(ids), labels=labels, text=text, truncated=truncated)


def encode_many(tokenizer, conversations: Sequence[Sequence[dict]], *, max_length: int | None = None,
                train_on: str = "all", report: TemplateReport | None = None,
                train_reasoning: bool = True) -> list[EncodedConversation | None]:
    """Batched version of encode_conversation: one fast-tokenizer call for all texts."""
    rendered = [assistant_char_spans(tokenizer, m, train_on=train_on, report=report, train_reasoning=train_reasoning)
                for m in conversations]
    if not rendered:
        return []
    enc = tokenizer([t for t, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for (text, spans), ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"]):
        out.append(_finish(ids, mask_from_offsets(offsets, spans), text, max_length))
    return out


def generation_prompt_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Token ids of a conversation rendered for the model to answer next (inference)."""
    require_chat_template(tokenizer)
    text = render(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------ whole data sets

CHUNK = 256  # conversations per batched tokenizer call


@dataclass
class ProcessedData:
    examples: list[dict]                  # {"input_ids", "labels", "text", "truncated"}
    kept: int = 0
    dropped: int = 0
    truncated: int = 0
    template_warnings: int = 0
    lengths: list[int] = field(default_factory=list)

    def summary(self) -> dict:
        total_tokens = sum(self.lengths)
        trained = sum(sum(label != IGNORE_INDEX for label in e["labels"]) for e in self.examples)
        return {
            "examples_kept": self.kept,
            "examples_dropped_too_long": self.dropped,
            "examples_truncated": self.truncated,
            "total_tokens": total_tokens,
            "trained_tokens": trained,
            "share_of_tokens_trained": round(trained / total_tokens, 4) if total_tokens else 0.0,
            "length_percentiles": percentiles(self.lengths),
            "template_prefix_mismatches": self.template_warnings,
        }


def percentiles(values: Sequence[int]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)

    def pick(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    return {"min": ordered[0], "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": ordered[-1],
            "mean": round(statistics.fmean(ordered), 1)}


def tokenize_conversations(tokenizer, conversations: Sequence[Conversation], *, max_length: int | None,
                           train_on: str = "all", desc: str = "Tokenizing", progress: bool = True,
                           train_reasoning: bool = True) -> ProcessedData:
    """Template, tokenize and label conversations in chunks (batched fast-tokenizer calls)."""
    require_chat_template(tokenizer)
    report = TemplateReport()
    out = ProcessedData(examples=[])
    bar = tqdm(total=len(conversations), desc=desc, unit="conv", disable=not progress or len(conversations) < 500)
    for start in range(0, len(conversations), CHUNK):
        batch = conversations[start:start + CHUNK]
        for encoded in encode_many(tokenizer, batch, max_length=max_length, train_on=train_on, report=report,
                                   train_reasoning=train_reasoning):
            if encoded is None:
                out.dropped += 1
                continue
            out.kept += 1
            out.truncated += int(encoded.truncated)
            out.lengths.append(len(encoded.input_ids))
            out.examples.append({"input_ids": encoded.input_ids, "labels": encoded.labels,
                                 "text": encoded.text, "truncated": encoded.truncated})
        bar.update(len(batch))
    bar.close()
    report.warn_once(tokenizer)
    out.template_warnings = report.prefix_mismatches
    return out

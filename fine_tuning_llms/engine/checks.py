"""Cheap checks that need the tokenizer, run before any long work (fail in a second, not after loading data).

    python run_fine_tuning.py --task preprocess --max_length 16   # stops at once, naming the template's overhead

Tasks that tokenize call ``check_max_length(tokenizer, cfg.data.max_length)`` right after
``load_tokenizer``. Settings that need no tokenizer are checked in ``cli.validate``.
"""
from __future__ import annotations

import logging

from .chat_format import render, require_chat_template
from .errors import UserError

log = logging.getLogger(__name__)

# The smallest exchange a training example can hold: one user word, one assistant word.
MINIMAL_EXCHANGE = ({"role": "user", "content": "x"}, {"role": "assistant", "content": "y"})


def template_overhead(tokenizer) -> int:
    """Tokens a one-word exchange takes after templating: system prompt, role headers, end-of-turn.

    Every training example pays this before its own text, so ``--max_length`` must be well
    above it (SmolLM2's template injects a default system prompt and pays more than most).
    """
    require_chat_template(tokenizer)
    text = render(tokenizer, list(MINIMAL_EXCHANGE))
    # add_special_tokens=False: the template writes any BOS itself, as in chat.encode_conversation.
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def suggested_max_length(overhead: int) -> int:
    """A --max_length that leaves room for real replies: overhead plus 64 tokens, rounded up to 64."""
    return -(-(overhead + 64) // 64) * 64


def check_max_length(tokenizer, max_length: int) -> int:
    """Raise UserError when ``max_length`` cannot hold even a one-word exchange; return the overhead."""
    overhead = template_overhead(tokenizer)
    if overhead > max_length:
        raise UserError(f"--max_length {max_length} is below the chat template's overhead: a one-word exchange "
                        f"already takes {overhead} tokens (system prompt, role headers, end-of-turn); "
                        f"use --max_length {suggested_max_length(overhead)} or more")
    if overhead > max_length // 2:
        log.warning("The chat template takes %d of --max_length %d tokens before any text; longer replies will be "
                    "truncated. Consider --max_length %d.", overhead, max_length, suggested_max_length(overhead))
    return overhead

"""Terminal pictures of token masks: trained tokens highlighted (colour, or ⟦ ⟧ without a terminal)."""
from __future__ import annotations

import os
import sys

from .chat_format import EncodedConversation


def use_colour(stream=None) -> bool:
    stream = stream or sys.stdout
    return "NO_COLOR" not in os.environ and hasattr(stream, "isatty") and stream.isatty()


def mask_view(tokenizer, example: EncodedConversation, *, colour: bool | None = None) -> str:
    """The lesson's picture: the rendered conversation with trained tokens highlighted.

    Colour: trained tokens on a green background. Plain fallback: trained runs in ⟦ ⟧.
    """
    colour = use_colour() if colour is None else colour
    on, off = ("\x1b[42;30m", "\x1b[0m") if colour else ("⟦", "⟧")
    # Decode each run of equally-masked tokens at once: byte-level tokens of one Hangul syllable
    # decoded one by one would print as replacement characters.
    pieces, run, inside = [], [], False
    for token_id, trained in zip(example.input_ids, example.assistant_mask):
        if bool(trained) != inside and run:
            pieces.append(tokenizer.decode(run))
            run = []
        if trained and not inside:
            pieces.append(on)
        elif not trained and inside:
            pieces.append(off)
        inside = bool(trained)
        run.append(token_id)
    if run:
        pieces.append(tokenizer.decode(run))
    if inside:
        pieces.append(off)
    return "".join(pieces)

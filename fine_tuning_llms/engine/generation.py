"""Batched, seeded text generation with left padding: used by compare, chat and train.

    python run_fine_tuning.py --task compare     # generates every question for every model here

Why left padding: a decoder-only model appends each new token after the last position of the
row. With right padding that position is a pad token for the shorter prompts, so they would
continue from padding. Left padding lines every prompt's last real token up at the right edge;
the attention mask hides the pads and transformers derives position ids from the mask, so a
batched greedy answer equals the answer generated alone (tests/test_model_comparison.py checks).

Stopping: a row is finished when it emits one of ``stop_token_ids`` — the tokenizer's eos, the
model's ``generation_config`` eos ids and the chat template's end-of-turn token (found by
rendering a reply and reading the special token that closes it). Whether an answer stopped by
itself is the clearest difference between a base model and an instruct model.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

_MARKER = "Zq7xReplyMarker"  # text unlikely to be changed by a template: locates the end of a reply


@dataclass
class GenerationResult:
    """One answer. ``new_token_ids`` ends at (and includes) the first stop token, pads removed."""

    prompt_ids: list[int]
    new_token_ids: list[int]
    text: str                 # new tokens decoded without special tokens
    n_new_tokens: int
    stopped_on_eot: bool      # the answer ended with a stop token instead of hitting max_new_tokens
    seconds: float            # from the start of its generate call until its last token (prefill included)
    tokens_per_s: float       # n_new_tokens / seconds


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special token(s) a chat template writes right after an assistant reply, if any."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _MARKER}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # templates that refuse this shape (e.g. require a system turn): no extra stop id
        return []
    at = text.rfind(_MARKER)
    if at < 0:
        return []
    tail = text[at + len(_MARKER):].lstrip(" ")
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return [ids[0]] if ids and ids[0] in special else []


def stop_token_ids(model, tokenizer) -> list[int]:
    """eos of the tokenizer + eos ids of the model's generation config + template end-of-turn."""
    from .turn_formats import end_of_turn_id

    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, gen_eos, end_of_turn_ids(tokenizer), end_of_turn_id(tokenizer)):
        if value is None:
            continue
        ids.extend(value if isinstance(value, (list, tuple)) else [value])
    return list(dict.fromkeys(int(i) for i in ids))


def chat_generation_config(model, tokenizer):
    """The model's generation config with every stop id above as ``eos_token_id``: saved beside an
    adapter or merged model so that plain ``generate()`` stops at the end of a turn too (a base
    model's own config knows only its eos, not the end-of-turn token its fine-tune learned)."""
    from transformers import GenerationConfig

    config = GenerationConfig.from_dict(model.generation_config.to_dict()) if getattr(
        model, "generation_config", None) is not None else GenerationConfig()
    config.eos_token_id = stop_token_ids(model, tokenizer)
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    return config


def left_pad(prompts_ids: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T_max), prompts right-aligned."""
    longest = max(len(p) for p in prompts_ids)
    ids = torch.full((len(prompts_ids), longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts_ids), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts_ids):
        if len(prompt):
            ids[row, longest - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, longest - len(prompt):] = 1
    return ids, mask


def trim_at_stop(new_ids: Sequence[int], stop_ids: Sequence[int]) -> tuple[list[int], bool]:
    """Cut generated ids after the first stop token (kept). Later ids are padding of a finished row."""
    stops = set(stop_ids)
    for i, token in enumerate(new_ids):
        if token in stops:
            return list(new_ids[: i + 1]), True
    return list(new_ids), False


class _StepClock:
    """A stopping criterion that never stops: it notes when each decoding step finished (and
    advances a tqdm bar), so every answer gets its own completion time inside a batch."""

    def __init__(self, bar=None):
        self.bar = bar
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        self.times.append(time.perf_counter())
        if self.bar is not None:
            self.bar.update(1)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _sampling_kwargs(do_sample: bool, temperature: float) -> dict:
    if do_sample:
        return {"do_sample": True, "temperature": temperature}
    # Greedy: clear sampling knobs a checkpoint's generation_config may carry (avoids warnings).
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def generate_batch(model, tokenizer, prompts_ids: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                   do_sample: bool = False, temperature: float = 0.7, batch_size: int = 16,
                   seed: int = 42, stop_ids: Sequence[int] | None = None,
                   progress: str | None = None) -> list[GenerationResult]:
    """Generate an answer for every prompt (token ids), ``batch_size`` prompts per ``generate`` call.

    Prompts are grouped by length (less padding) and results come back in the input order.
    The generator is re-seeded before every batch, so a run is reproducible with --do_sample too.
    ``progress``: a tqdm label; the bar counts decoding steps.
    """
    if not prompts_ids:
        return []
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    stop_ids = list(stop_ids) if stop_ids is not None else stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids[0] if stop_ids else 0)
    device = _model_device(model)
    order = sorted(range(len(prompts_ids)), key=lambda i: len(prompts_ids[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    results: list[GenerationResult | None] = [None] * len(prompts_ids)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(batches) * max_new_tokens, desc=progress, unit="step", leave=False)
    was_training = model.training
    model.eval()
    try:
        for done, batch in enumerate(batches, 1):
            input_ids, attention = left_pad([prompts_ids[i] for i in batch], pad_id)
            clock = _StepClock(bar)
            kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=stop_ids or None, pad_token_id=pad_id,
                          stopping_criteria=[clock], **_sampling_kwargs(do_sample, temperature))
            torch.manual_seed(seed)
            start = time.perf_counter()
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
            end = time.perf_counter()
            new = output[:, input_ids.shape[1]:].tolist()  # (B, steps): everything after the padded prompt
            for row, index in enumerate(batch):
                ids, stopped = trim_at_stop(new[row], stop_ids)
                # The row's last token came out at step len(ids); rows in one batch finish at different times.
                done_at = clock.times[len(ids) - 1] if 0 < len(ids) <= len(clock.times) else end
                seconds = done_at - start
                results[index] = GenerationResult(
                    prompt_ids=list(prompts_ids[index]), new_token_ids=ids,
                    text=tokenizer.decode(ids, skip_special_tokens=True).strip(),
                    n_new_tokens=len(ids), stopped_on_eot=stopped, seconds=seconds,
                    tokens_per_s=len(ids) / seconds if seconds > 0 else 0.0)
            if bar is not None:  # a batch that stopped early leaves its remaining steps unused
                bar.n = done * max_new_tokens
                bar.refresh()
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return [r for r in results if r is not None]

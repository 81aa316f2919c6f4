"""Which chat template a run uses (``--chat_template``), and chat formats for base models.

A model whose tokenizer brings a chat template is a chat (instruct) model: ``auto`` keeps that
template. A model without one is a *base* model; to teach it to chat, its turns need markers,
and the marker that ends a turn must be **one token**: the model can then learn to emit it, and
generation stops on its id. A string spelled in six pieces (ChatML's ``<|im_end|>`` in Gemma's
vocabulary) can be learned as text, but nothing stops on it, and answers run on.

So ``auto`` picks, for a base model, the first format whose control tokens are already single
tokens of its vocabulary (Gemma's ``<start_of_turn>``/``<end_of_turn>``, Llama 3's header tokens
and ``<|eot_id|>``, ChatML's ``<|im_start|>``/``<|im_end|>`` in Qwen's vocabulary); otherwise
ChatML with ``<|im_start|>``/``<|im_end|>`` *added* as special tokens, whose embedding rows
(and head rows when untied) the train task trains (``lora.prepare_peft_model``). A named format
(``chatml``, ``gemma``, ``llama3``) adds whichever of its control tokens the vocabulary lacks in
the same way. The choice rides on the tokenizer (``template_choice``), so every task reports the
same choice and its reason.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

log = logging.getLogger(__name__)

_CHOICE_ATTRIBUTE = "ftl_template_choice"

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Gemma's turn layout: the assistant's role is "model", and a system message has no turn of its
# own (Gemma has no system role): its text opens the next turn.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\n\n' %}"
    "{% else %}{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n'"
    " + ns.system + message['content'] + '<end_of_turn>\n' }}{% set ns.system = '' %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TurnFormat:
    name: str
    control_tokens: tuple[str, ...]     # each must be one token for the format to be usable as is
    end_of_turn: str
    template: str


FORMATS = (
    TurnFormat("gemma", ("<start_of_turn>", "<end_of_turn>"), "<end_of_turn>", GEMMA_TEMPLATE),
    TurnFormat("llama3", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|eot_id|>", LLAMA3_TEMPLATE),
    TurnFormat("chatml", ("<|im_start|>", "<|im_end|>"), "<|im_end|>", CHATML_TEMPLATE),
)
BY_NAME = {f.name: f for f in FORMATS}
CHATML = BY_NAME["chatml"]


@dataclass(frozen=True)
class TemplateChoice:
    name: str                           # "own", a format name, or "file"
    reason: str                         # one line, shown by preprocess and train
    own: bool                           # the tokenizer came with a template: a chat/instruct model
    end_of_turn: str | None = None      # the token that closes a reply (None: read from the template)
    added_tokens: tuple[str, ...] = ()  # added to the vocabulary here; train trains their rows

    def describe(self) -> str:
        return f"Chat template: {self.name} ({self.kind} model; {self.reason})"

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "reason": self.reason, "end_of_turn": self.end_of_turn,
                "added_tokens": list(self.added_tokens)}

    @property
    def kind(self) -> str:
        """'instruct' for a model with its own template, 'base' otherwise (what compare labels)."""
        return "instruct" if self.own else "base"


def is_single_token(tokenizer, text: str) -> bool:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == text


def _use_format(fmt: TurnFormat, own: bool, tokenizer, why: str) -> TemplateChoice:
    missing = tuple(t for t in fmt.control_tokens if not is_single_token(tokenizer, t))
    if missing:
        why += f"; {', '.join(missing)} added as special tokens (their embedding rows are trained)"
    return TemplateChoice(fmt.name, why, own, fmt.end_of_turn, missing)


def choose_template(tokenizer, option: str | None) -> TemplateChoice:
    """Decide the template for ``--chat_template option`` without changing the tokenizer."""
    own = bool(getattr(tokenizer, "chat_template", None))
    if option in (None, "", "auto"):
        if own:
            return TemplateChoice("own", "the tokenizer's own chat template", True)
        for fmt in FORMATS:
            if all(is_single_token(tokenizer, t) for t in fmt.control_tokens):
                return TemplateChoice(fmt.name, f"no chat template of its own; {' '.join(fmt.control_tokens)} "
                                      "are single tokens of its vocabulary",
                                      False, fmt.end_of_turn)
        return _use_format(CHATML, False, tokenizer, "no chat template of its own and none of the gemma/llama3/chatml "
                           "turn tokens in its vocabulary")
    if option in BY_NAME:
        return _use_format(BY_NAME[option], own, tokenizer, f"--chat_template {option}")
    if not Path(option).is_file():
        raise UserError(f"--chat_template {option}: not auto/{'/'.join(BY_NAME)} and no such file; pass one of those "
                        "or a Jinja file")
    return TemplateChoice("file", f"--chat_template {option}", own)


def apply_template(tokenizer, option: str | None) -> TemplateChoice:
    """Install the chosen template (and any control tokens it needs) on ``tokenizer``; remember the choice."""
    choice = choose_template(tokenizer, option)
    if choice.name == "file":
        tokenizer.chat_template = Path(option).read_text(encoding="utf-8")
    elif choice.name != "own":
        tokenizer.chat_template = BY_NAME[choice.name].template
    if choice.added_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(choice.added_tokens)},
                                     replace_extra_special_tokens=False)
    setattr(tokenizer, _CHOICE_ATTRIBUTE, choice)
    return choice


def template_choice(tokenizer) -> TemplateChoice:
    """The choice ``apply_template`` made for this tokenizer (a tokenizer built elsewhere: judged now)."""
    choice = getattr(tokenizer, _CHOICE_ATTRIBUTE, None)
    return choice if choice is not None else choose_template(tokenizer, "auto")


def added_token_ids(tokenizer) -> list[int]:
    """Ids of the control tokens the template choice added to this tokenizer (rows to initialise and train);
    a tokenizer the choice was only judged for (never applied) has none of them yet."""
    return [int(tokenizer.convert_tokens_to_ids(t)) for t in template_choice(tokenizer).added_tokens
            if is_single_token(tokenizer, t)]


def end_of_turn_id(tokenizer) -> int | None:
    """The id of the chosen format's end-of-turn token, when the choice names one."""
    token = template_choice(tokenizer).end_of_turn
    return int(tokenizer.convert_tokens_to_ids(token)) if token and is_single_token(tokenizer, token) else None

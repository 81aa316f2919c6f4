"""LoRA set-up, in one place: the LoraConfig builder every task and benchmark uses, new special
tokens (added, embeddings grown, rows mean-initialised, made trainable), k-bit preparation."""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from .config import Config, TrainConfig
from .errors import UserError
from .turn_formats import added_token_ids, template_choice

log = logging.getLogger(__name__)


def target_modules(spec: str):
    """--target_modules: 'all-linear' as PEFT spells it, or the listed module names."""
    if spec == "all-linear":
        return spec
    return [name.strip() for name in spec.split(",") if name.strip()]


def lora_config(train: TrainConfig, *, extra: dict | None = None, dropout: float | None = None):
    """The one ``LoraConfig`` of a run. ``dropout`` overrides --lora_dropout (the explain lesson
    compares runs that must be deterministic); ``extra`` adds e.g. trainable token rows."""
    from peft import LoraConfig

    return LoraConfig(r=train.lora_r, lora_alpha=train.lora_alpha or 2 * train.lora_r,
                      lora_dropout=train.lora_dropout if dropout is None else dropout,
                      target_modules=target_modules(train.target_modules), use_dora=train.use_dora,
                      use_rslora=train.use_rslora, bias="none", task_type="CAUSAL_LM", **(extra or {}))


def check_new_tokens(tokens: Sequence[str]) -> list[str]:
    clean = []
    for token in tokens:
        if not isinstance(token, str) or not token.strip():
            raise UserError(f"--new_tokens: {token!r} is empty; pass visible strings such as '<|user|>'")
        if token.strip() != token:
            raise UserError(f"--new_tokens: {token!r} has surrounding spaces; remove them")
        clean.append(token)
    return list(dict.fromkeys(clean))


def is_single_special_token(tokenizer, token: str) -> bool:
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    decoder = tokenizer.added_tokens_decoder
    return len(ids) == 1 and ids[0] in decoder and decoder[ids[0]].special and decoder[ids[0]].content == token


def add_special_tokens(model, tokenizer, tokens: list[str], *, fresh_ids: Sequence[int] = ()) -> list[int]:
    """Add ``tokens`` as special tokens, grow the embeddings, initialise new rows to the mean row.

    Returns the id of every requested token, in order. Tokens that already are one special
    token keep their id and their trained rows (no-op), except those in ``fresh_ids``: tokens
    the chat-template choice put into the tokenizer already (turn_formats.py), whose rows the
    model does not have yet. Output heads that are not tied to the input embeddings get
    mean-initialised rows too.
    """
    tokens = check_new_tokens(tokens)
    old_len = len(tokenizer)
    todo = [t for t in tokens if not is_single_special_token(tokenizer, t)]
    if todo:
        # replace_extra_special_tokens=False keeps the special tokens the tokenizer already lists
        tokenizer.add_special_tokens({"additional_special_tokens": todo}, replace_extra_special_tokens=False)
    ids = [int(tokenizer.convert_tokens_to_ids(t)) for t in tokens]
    fresh = sorted({i for i in ids if i >= old_len} | {int(i) for i in fresh_ids})
    if not fresh:
        return ids
    embeddings = model.get_input_embeddings()
    known = min(fresh[0], embeddings.weight.shape[0])   # rows below the first new id are real ones
    mean_in = embeddings.weight.detach()[:known].float().mean(dim=0)
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embeddings.weight
    mean_out = None if output is None or tied else output.weight.detach()[:known].float().mean(dim=0)
    if len(tokenizer) > embeddings.weight.shape[0]:
        # mean_resizing=False: transformers would otherwise sample rows around the mean; we want the mean itself
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    index = torch.tensor(fresh)
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        weight[index] = mean_in.to(weight.dtype)
        if mean_out is not None:
            head = model.get_output_embeddings()
            head.weight[index] = mean_out.to(head.weight.dtype)
            if getattr(head, "bias", None) is not None:
                head.bias[index] = head.bias[:known].mean().to(head.bias.dtype)
    log.info("Added %d token(s) %s -> ids %s; embeddings now %d rows, new rows = mean row",
             len(fresh), [tokenizer.convert_ids_to_tokens(i) for i in fresh], fresh,
             model.get_input_embeddings().weight.shape[0])
    return ids


def fit_template_tokens(model, tokenizer) -> list[int]:
    """Rows for the control tokens the chat-template choice added to ``tokenizer`` (a base model given
    ChatML, turn_formats.py): grown and mean-initialised; their ids, or [] when it added none."""
    tokens = list(template_choice(tokenizer).added_tokens)
    return add_special_tokens(model, tokenizer, tokens, fresh_ids=added_token_ids(tokenizer)) if tokens else []


def _module_leaf_name(model, module) -> str | None:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name.rsplit(".", 1)[-1]
    return None


def lora_kwargs_for_new_tokens(new_ids: Sequence[int], *, model=None) -> dict:
    """Extra ``LoraConfig`` kwargs that make the rows of ``new_ids`` trainable (PEFT 0.21).

    With tied embeddings (SmolLM2) PEFT wraps the output head with the same token adapter, so
    training the input rows also trains the head rows. When ``model`` has an untied head, the
    head's rows are listed too (same indices), otherwise the model could read but never
    produce the new tokens. The trained rows live in the adapter (``trainable_tokens_delta``,
    which holds full row values); ``merge_and_unload()`` writes them into the weights.
    """
    ids = sorted({int(i) for i in new_ids})
    if not ids:
        return {}
    if model is None:
        return {"trainable_token_indices": {"embed_tokens": ids}}
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    targets = {_module_leaf_name(model, embed) or "embed_tokens": ids}
    if head is not None and head.weight is not embed.weight:
        targets[_module_leaf_name(model, head) or "lm_head"] = ids
    return {"trainable_token_indices": targets}


def prepare_peft_model(cfg: Config, model, tokenizer):
    """Optional new tokens, k-bit preparation, then LoRA. Returns (peft model, new token ids)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    new_ids: list[int] = []
    extra: dict = {}
    # --new_tokens, plus the turn tokens a base model's chat format needed (turn_formats.py)
    tokens = list(cfg.train.new_tokens or []) + list(template_choice(tokenizer).added_tokens)
    if tokens:
        new_ids = add_special_tokens(model, tokenizer, tokens, fresh_ids=added_token_ids(tokenizer))
        extra = lora_kwargs_for_new_tokens(new_ids, model=model) if new_ids else {}
        log.info("Added %d new token(s) %s; their embedding rows are trained.", len(new_ids), tokens)
    if cfg.model.load_8bit or cfg.model.load_4bit:
        # Casts norms to fp32 and enables input grads so LoRA trains through frozen k-bit layers.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if cfg.model.load_4bit and keep_4bit_layers_trainable(model):
        log.info("4-bit layers: bitsandbytes' CPU inference layout kept off while training (its product has no "
                 "backward; evaluation and generation dequantise instead)")
    try:
        peft_model = get_peft_model(model, lora_config(cfg.train, extra=extra))
    except ValueError as exc:
        raise UserError(f"--target_modules {cfg.train.target_modules}: {str(exc).splitlines()[0][:160]}; use "
                        "all-linear or names such as q_proj,v_proj") from None
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(peft_model)
    return peft_model, new_ids


def keep_4bit_layers_trainable(model) -> int:
    """Keep every bitsandbytes 4-bit layer in the layout its training product can backpropagate through.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) rewrites a 4-bit layer's weight into an
    inference-only layout the first time the layer runs in eval mode without gradients (the packing
    self-check, the held-out loss and the answers before training all do), and from then on
    multiplies through ``gemv_4bit``, an op without a backward: the gradient through the frozen
    weight is silently dropped and every LoRA layer below gets a wrong gradient (tests/test_nf4_training.py).
    Turning the rewrite off keeps the dequantise-and-multiply path, in training and in evaluation.
    Called before the model's first forward; bitsandbytes' way back from the rewrite is lossy (its
    block scales pass through bf16), so a layer already rewritten is a bug here, not something to undo.
    Returns the number of layers that had the rewrite on.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:  # no 4-bit layers without it
        return 0
    changed = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
        if getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False):
            raise RuntimeError("a 4-bit layer ran in bitsandbytes' inference layout before training was set up")
    return changed


def enable_gradient_checkpointing(model) -> None:
    """Recompute every decoder layer in the backward pass instead of keeping its activations.

    Non-reentrant torch checkpointing: gradients reach the LoRA weights inside a layer without its
    input needing ``requires_grad`` (so the hook transformers adds to make the embeddings' output
    require it is taken off again: it would only add the input gradient of the first layer), and
    custom autograd nodes (the fused kernels) recompute the tensors they saved. Set before the
    packing self-check so the check runs the path training takes.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise UserError(f"{type(base).__name__} does not support gradient checkpointing; train without "
                        "--gradient_checkpointing (a smaller --batch_size or --max_length saves memory too)")
    hooked = getattr(base, "_require_grads_hook", None) is not None  # k-bit preparation may have set it
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x names it so
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not hooked and getattr(base, "_require_grads_hook", None) is not None:
        base.disable_input_require_grads()


def trainable_state(model) -> dict[str, torch.Tensor]:
    """A copy of every trainable tensor (the adapter), by parameter name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        raise RuntimeError("the two runs have different trainable parameters")
    return max(float((a[n] - b[n]).abs().max()) for n in a)

"""Load a fine-tuned LoRA adapter (the ``final_model/`` that ``--task train`` saves) onto its base.

    python run_fine_tuning.py --task chat --adapter results/final_model --prompt "What is your name?"
    python run_fine_tuning.py --task compare --adapter results/final_model

The base is ``--model`` (the model the adapter was trained on). The tokenizer comes from the
adapter folder when it has one: training may have added special tokens, and then the base
embeddings must grow to ``len(tokenizer)`` before PEFT loads the adapter's rows for them.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from .config import ModelConfig
from .errors import UserError
from .models import ModelSource, load_model, load_tokenizer, resolve_model

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")


def is_adapter_dir(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def check_adapter_dir(adapter_dir: str | Path, *, flag: str = "--adapter") -> Path:
    """The adapter folder, or a UserError that says what was passed instead and what to do."""
    folder = Path(adapter_dir).expanduser()
    if not folder.exists():
        raise UserError(f"{flag} {adapter_dir}: no such folder; run `--task train` first or pass the "
                        "final_model/ folder it wrote")
    if not folder.is_dir():
        raise UserError(f"{flag} {adapter_dir} is a file; pass the adapter folder (final_model/)")
    if not is_adapter_dir(folder):
        if (folder / "config.json").is_file():
            raise UserError(f"{flag} {adapter_dir} is a full model, not an adapter (no {ADAPTER_CONFIG}); "
                            f"pass it with --model instead")
        raise UserError(f"{flag} {adapter_dir} is not a PEFT adapter folder (no {ADAPTER_CONFIG}); pass the "
                        "final_model/ folder that --task train wrote")
    return folder


def adapter_base_name(adapter_dir: str | Path) -> str | None:
    """``base_model_name_or_path`` recorded in the adapter's config (where it was trained)."""
    try:
        data = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"--adapter {adapter_dir}: unreadable {ADAPTER_CONFIG} ({exc}); re-save the adapter") from None
    return data.get("base_model_name_or_path")


def other_base(adapter_dir: Path, source: ModelSource) -> str | None:
    """The base recorded in the adapter when it is not ``source`` (None: same base, or none recorded)."""
    recorded = adapter_base_name(adapter_dir)
    if not recorded:
        return None
    same = recorded in (source.location, source.display_name)
    if not same and Path(recorded).exists() and Path(source.location).exists():
        same = Path(recorded).resolve() == Path(source.location).resolve()
    return None if same else recorded


def _warn_if_other_base(adapter_dir: Path, source: ModelSource) -> None:
    recorded = other_base(adapter_dir, source)
    if recorded:
        log.warning("Adapter %s was trained on %s but is being loaded onto %s (--model). If its answers look "
                    "broken, pass the training model with --model.", adapter_dir, recorded, source.display_name)


def load_model_with_adapter(model_cfg: ModelConfig, adapter_dir: str | Path):
    """(PeftModel in eval mode, tokenizer) for ``model_cfg.model`` + the adapter in ``adapter_dir``."""
    from peft import PeftModel

    folder = check_adapter_dir(adapter_dir)
    source = resolve_model(model_cfg.model)
    _warn_if_other_base(folder, source)
    if any((folder / name).is_file() for name in TOKENIZER_FILES):
        tokenizer = load_tokenizer(model_cfg, ModelSource(str(folder), "folder", str(folder)))
    else:
        tokenizer = load_tokenizer(model_cfg, source)
    model = load_model(model_cfg, source)
    rows = model.get_input_embeddings().weight.shape[0]
    # Grow only: some checkpoints pad the embedding matrix beyond the tokenizer (shrinking would
    # cut real rows); an adapter's added tokens need rows to exist before their weights load.
    if len(tokenizer) > rows:
        log.info("Tokenizer of %s has %d tokens, the base embeddings %d rows: resizing for the added tokens.",
                 folder, len(tokenizer), rows)
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the adapter brings the rows
    try:
        model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--adapter {adapter_dir} does not fit --model {model_cfg.model} ({first}); pass the "
                        "model the adapter was trained on with --model") from None
    model.eval()
    log.info("Loaded adapter %s onto %s.", folder, source.display_name)
    return model, tokenizer

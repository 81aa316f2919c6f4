"""--merge: fold a LoRA adapter into a full-precision copy of its base model.

The result is a plain checkpoint that ``AutoModelForCausalLM.from_pretrained`` loads without
PEFT and that computes the same logits as base + adapter. A k-bit (8/4-bit) base cannot hold
merged weights exactly, so merging always reloads the base unquantised.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from .artefacts import atomic_directory, atomic_write_json, package_versions
from .config import Config
from .errors import UserError
from .generation import chat_generation_config
from .models import load_model

log = logging.getLogger(__name__)


def merge_adapter(cfg: Config, adapter_dir: Path, target: Path, *, tokenizer=None) -> Path:
    """``tokenizer``: the adapter folder's, when the caller has loaded it already."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    full_precision = dataclasses.replace(cfg.model, load_8bit=False, load_4bit=False,
                                         dtype="float32" if cfg.model.dtype == "auto" else cfg.model.dtype)
    base = load_model(full_precision)
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(adapter_dir)
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows come from the adapter
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.generation_config = chat_generation_config(merged, tokenizer)  # stops at the end of a turn
    try:
        with atomic_directory(target, overwrite=True) as tmp:
            merged.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / "run_config.json", {"settings": cfg.to_dict(), "versions": package_versions(),
                                                        "merged_from": str(adapter_dir)})
    except OSError as exc:
        raise UserError(f"could not write {target} ({exc.strerror}); free disk space or choose another --output_dir") from None
    log.info("Merged model (no PEFT needed to load it) saved to %s", target)
    return target

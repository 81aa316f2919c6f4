"""What a checkpoint belongs to, so that a resume never mixes two runs.

Each checkpoint stores ``run_identity.json``: the model (name + a fingerprint of its files), the
data (hashes of the tokenized training and held-out sets) and every setting that shapes training.
Resuming compares the stored record with the new run first and refuses, in one line listing each
difference, when they differ. Settings that only say how long or how often (``RESUMABLE``) may change.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from .config import Config
from .errors import UserError

IDENTITY_FILE = "run_identity.json"
# Settings that shape the weights a run produces: a resume must use the same values.
SHAPING = {
    "model": ("dtype", "load_8bit", "load_4bit", "chat_template"),
    "data": ("max_length", "train_on", "system_prompt", "train_reasoning"),
    "train": ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "use_dora", "use_rslora", "new_tokens",
              "batch_size", "grad_accum", "seed", "packing", "lr", "lr_scheduler", "warmup_ratio", "weight_decay"),
}
# May change on resume (listed in README): how long and how often, not what is learned.
RESUMABLE = ("max_steps", "epochs (upwards)", "save_steps", "logging_steps", "eval_answers", "merge",
             "trained_logits_only", "fused_kernels", "pack_weights", "gradient_checkpointing",
             "attn_implementation")
FINGERPRINT_BYTES = 1 << 20  # per weight file: its name, size and first MiB (header + first tensors)


def model_fingerprint(location: str) -> str | None:
    """A short hash of a model folder's config and weight files; None for a hub id not on disk."""
    folder = Path(location)
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.suffix not in (".safetensors", ".bin", ".json", ".gguf") or not path.is_file():
            continue
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
        with open(path, "rb") as fh:
            digest.update(fh.read(FINGERPRINT_BYTES))
    return digest.hexdigest()[:16]


def data_fingerprint(examples: Sequence[dict]) -> str:
    """A hash of tokenized examples: the ids and labels training really sees."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example["input_ids"], example["labels"]]).encode())
    return digest.hexdigest()[:16]


def run_identity(cfg: Config, *, model_name: str, model_location: str, train_examples: Sequence[dict],
                 eval_examples: Sequence[dict]) -> dict:
    settings = {name: getattr(getattr(cfg, group), name) for group, names in SHAPING.items() for name in names}
    settings["lora_alpha"] = cfg.train.lora_alpha or 2 * cfg.train.lora_r  # None means 2 x r: compare the value
    return {"model": model_name, "model_fingerprint": model_fingerprint(model_location),
            "training_data": data_fingerprint(train_examples), "held_out_data": data_fingerprint(eval_examples),
            "settings": settings, "epochs": cfg.train.epochs}


def differences(old: dict, new: dict) -> list[str]:
    """Each difference between a checkpoint's record and this run, as 'name old → new'."""
    found = []
    for key, label in (("model", "model"), ("model_fingerprint", "model files"),
                       ("training_data", "training data (tokenized)"), ("held_out_data", "held-out data (tokenized)")):
        if old.get(key) != new.get(key):
            found.append(f"{label} {old.get(key)} → {new.get(key)}")
    old_settings, new_settings = old.get("settings", {}), new.get("settings", {})
    for name in sorted(set(old_settings) | set(new_settings)):
        if old_settings.get(name) != new_settings.get(name):
            found.append(f"{name} {old_settings.get(name)!r} → {new_settings.get(name)!r}")
    if new.get("epochs", 0) < old.get("epochs", 0):
        found.append(f"epochs {old['epochs']} → {new['epochs']} (only upwards on resume)")
    return found


def check_resume(checkpoint: Path, identity: dict) -> None:
    """Refuse to resume ``checkpoint`` into a run that differs from the one that wrote it."""
    path = Path(checkpoint) / IDENTITY_FILE
    if not path.is_file():
        raise UserError(f"{checkpoint} has no {IDENTITY_FILE} (written by an older version), so it cannot be checked "
                        "against this run; start fresh: drop --resume_from_checkpoint and pass a new --output_dir")
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise UserError(f"{path} is not valid JSON; start fresh: drop --resume_from_checkpoint and pass a new "
                        "--output_dir") from None
    changed = differences(old, identity)
    if changed:
        raise UserError(f"cannot resume {checkpoint}: this run differs from the one that wrote it ("
                        + "; ".join(changed) + "); use the old settings, or start fresh: drop "
                        "--resume_from_checkpoint and pass a new --output_dir")

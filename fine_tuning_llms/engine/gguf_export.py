"""Base + LoRA adapter → one GGUF file that llama.cpp, Ollama and LM Studio run.

    python run_fine_tuning.py --task export                     # results/final_model → results/export/*.gguf
    python run_fine_tuning.py --task export --gguf_type f16

Steps: checks that cost nothing (family, chat template, vocabulary vs embedding rows, adapter
trained on this base, converter installed, disk space), then the adapter is merged into a
float32 copy of the base (``merging.merge_adapter``: tokenizer, chat template, added tokens and a
generation config that stops at the end of a turn go with it), then llama.cpp's converter
(``gguf_converter``) writes the GGUF into a temp file that is renamed into place only when
complete. Nothing is left half-written: the merged copy lives in a temp folder inside
``export/`` and is removed afterwards.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .adapters import check_adapter_dir, other_base
from .artefacts import atomic_write_text
from .config import Config
from .errors import UserError
from .gguf_converter import converter_env, converter_script
from .merging import merge_adapter
from .models import ModelSource, cache_root, resolve_model
from .turn_formats import FORMATS

log = logging.getLogger(__name__)

# Families whose export is verified here (round trip and llama.cpp answers); the converter knows
# more, but an unverified export is how users get nonsense in Ollama.
SUPPORTED = {"LlamaForCausalLM": "Llama (SmolLM2, Llama 3.x)", "Gemma3ForCausalLM": "Gemma 3 (text)"}
GGUF_TYPES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}   # bytes per weight (q8_0: 32 int8 + f16 scale)
MARGIN_BYTES = 64 << 20


@dataclass
class ExportPlan:
    adapter: Path
    source: ModelSource
    architecture: str
    parameters: int
    gguf_type: str
    target: Path
    tokenizer: object

    @property
    def needed_bytes(self) -> int:
        """Merged float32 copy + the GGUF file + a margin: both exist at once just before the rename."""
        return int(self.parameters * (4 + GGUF_TYPES[self.gguf_type])) + MARGIN_BYTES


def _parameter_count(folder: Path) -> int:
    """Weights in a safetensors checkpoint, read from the file headers (no tensor is loaded)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for name in fh.keys():
                count = 1
                for dim in fh.get_slice(name).get_shape():
                    count *= dim
                total += count
    return total


def _free_bytes(folder: Path) -> int:
    probe = folder
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def file_stem(display_name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(display_name.rstrip("/")).name).strip("-.") or "model"
    return f"{stem}-finetuned"


def _architecture(config: dict) -> str:
    return (config.get("architectures") or ["?"])[0]


def check_exportable(source: ModelSource) -> dict:
    """The model's config.json, when --task export covers its family and the converter is installed; else a
    UserError."""
    config = json.loads((Path(source.location) / "config.json").read_text(encoding="utf-8"))
    if _architecture(config) not in SUPPORTED:
        raise UserError(f"--task export covers {', '.join(SUPPORTED.values())}; {source.display_name} is "
                        f"{_architecture(config)}: convert the --merge output with llama.cpp's convert_hf_to_gguf.py "
                        "yourself")
    converter_script(cache_root())
    return config


def plan_export(cfg: Config, adapter_dir: str | Path, out_dir: Path, gguf_type: str) -> ExportPlan:
    """Every check that can fail, before anything is loaded or written; one line each."""
    from transformers import AutoTokenizer

    if gguf_type not in GGUF_TYPES:
        raise UserError(f"--gguf_type {gguf_type}: pick one of {', '.join(GGUF_TYPES)}")
    adapter = check_adapter_dir(adapter_dir)
    source = resolve_model(cfg.model.model)
    recorded = other_base(adapter, source)
    if recorded:
        raise UserError(f"--adapter {adapter} was trained on {recorded}, not on --model {cfg.model.model}; pass "
                        f"--model {recorded}")
    config = check_exportable(source)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"--adapter {adapter} has no chat template, so llama.cpp could not format a chat; re-save "
                        "the adapter with its tokenizer (--task train does)")
    rows = int(config.get("vocab_size") or 0)
    # Fewer rows than tokens is fine: merging grows the embeddings for added tokens. More rows cannot be named.
    if rows > len(tokenizer):
        raise UserError(f"the vocabulary has {len(tokenizer)} tokens but the model {rows} embedding rows; llama.cpp "
                        "needs one row per token: export a model whose tokenizer covers every row")
    plan = ExportPlan(adapter, source, _architecture(config), _parameter_count(Path(source.location)), gguf_type,
                      out_dir / "export" / f"{file_stem(source.display_name)}-{gguf_type}.gguf", tokenizer)
    free = _free_bytes(plan.target.parent)
    if free < plan.needed_bytes:
        raise UserError(f"not enough disk space in {plan.target.parent}: {plan.needed_bytes / 1e9:.2f} GB needed (merged "
                        f"float32 copy + {gguf_type} file), {free / 1e9:.2f} GB free; free space or pass another "
                        "--output_dir")
    return plan


def _convert(merged: Path, outfile: Path, gguf_type: str, expected_bytes: int, log_file: Path) -> None:
    """llama.cpp's converter in its own process; our bar follows the file it writes."""
    cmd = [sys.executable, str(converter_script(cache_root())), str(merged), "--outfile", str(outfile),
           "--outtype", gguf_type]
    with open(log_file, "w", encoding="utf-8") as sink, \
            tqdm(total=expected_bytes, unit="B", unit_scale=True, desc=f"GGUF {gguf_type}", leave=False) as bar:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=converter_env(cache_root()))
        while proc.poll() is None:
            time.sleep(0.3)
            bar.n = min(outfile.stat().st_size if outfile.exists() else 0, expected_bytes)
            bar.refresh()
    if proc.returncode != 0 or not outfile.is_file():
        lines = [ln for ln in log_file.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        last = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")
        raise UserError(f"llama.cpp's converter failed ({last.strip()[:200]})")


@dataclass
class ExportResult:
    path: Path
    gguf_type: str
    bytes: int
    merge_seconds: float
    convert_seconds: float
    modelfile: Path


def export_gguf(cfg: Config, plan: ExportPlan) -> ExportResult:
    export_dir = plan.target.parent
    export_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=export_dir, prefix=".export-") as work:
        work_path = Path(work)
        start = time.perf_counter()
        merged = merge_adapter(cfg, plan.adapter, work_path / "merged", tokenizer=plan.tokenizer)
        merge_seconds = time.perf_counter() - start
        start = time.perf_counter()
        partial = work_path / plan.target.name
        log_file = work_path / "convert.log"
        try:
            _convert(merged, partial, plan.gguf_type, int(plan.parameters * GGUF_TYPES[plan.gguf_type]), log_file)
        except UserError as exc:
            shutil.copy(log_file, export_dir / "convert.log")  # the temp folder goes; the converter's words stay
            raise UserError(f"{exc}; full log: {export_dir / 'convert.log'}") from None
        partial.replace(plan.target)   # same folder tree: an atomic rename, never a half file
        convert_seconds = time.perf_counter() - start
    modelfile = write_modelfile(plan)
    return ExportResult(plan.target, plan.gguf_type, plan.target.stat().st_size, merge_seconds, convert_seconds,
                        modelfile)


# ---------------------------------------------------------------- Ollama

_OLLAMA_TURNS = {  # the chat formats of turn_formats.py in Ollama's Go template syntax
    "chatml": ("<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n", "<|im_start|>assistant\n"),
    "gemma": ('<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n'
              "{{ .Content }}<end_of_turn>\n", "<start_of_turn>model\n"),
    "llama3": ("<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>",
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
}


def chat_format_of(tokenizer) -> str | None:
    """Which known format the tokenizer's template writes (by rendering one exchange), None if none."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    for fmt in FORMATS:
        if fmt.control_tokens[0] in text and fmt.end_of_turn in text:
            return fmt.name
    return None


def default_system_prompt(tokenizer) -> str | None:
    """The system prompt a template adds by itself (SmolLM2's does), so Ollama gets the same."""
    plain = tokenizer.apply_chat_template([{"role": "user", "content": "Zq7x"}], tokenize=False)
    marked = tokenizer.apply_chat_template([{"role": "system", "content": "Sy5t"}, {"role": "user", "content": "Zq7x"}],
                                           tokenize=False)
    head = plain.split("Zq7x")[0]
    if "Sy5t" not in marked or head == marked.split("Sy5t")[0]:
        return None
    before, after = marked.split("Sy5t")
    glue = after.split("Zq7x")[0]   # what the template writes between the system text and the user turn
    if after and head.startswith(before) and head.endswith(glue):
        return head[len(before): len(head) - len(glue)] or None
    return None


def write_modelfile(plan: ExportPlan) -> Path:
    tokenizer = plan.tokenizer
    fmt = chat_format_of(tokenizer)
    lines = [f"# Ollama: ollama create {plan.target.stem} -f {plan.target.stem}.Modelfile", f"FROM ./{plan.target.name}"]
    if fmt is None:
        lines.append("# Chat template: the one stored in the GGUF file (not one of chatml/gemma/llama3).")
    else:
        turn, prompt = _OLLAMA_TURNS[fmt]
        # No BOS in the template: llama.cpp adds it when the GGUF says so (add_bos_token), as for raw prompts.
        lines.append(f'TEMPLATE """{{{{- range .Messages }}}}{turn}{{{{ end }}}}{prompt}"""')
        system = default_system_prompt(tokenizer)
        if system:
            lines.append(f'SYSTEM """{system}"""')
    stops = [tok for tok in {*(f.end_of_turn for f in FORMATS)} if tok in tokenizer.get_vocab()]
    for stop in sorted(stops):
        lines.append(f'PARAMETER stop "{stop}"')
    lines += ["PARAMETER temperature 0", ""]
    return atomic_write_text(plan.target.with_suffix(".Modelfile"), "\n".join(lines))

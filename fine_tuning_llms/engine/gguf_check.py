"""Does the exported GGUF behave like the fine-tuned model? Asked of llama.cpp itself.

The same questions go to base + adapter in transformers and to the GGUF file in llama.cpp
(``llama-cpp-python``, greedy, with the chat template stored in the file: exactly what a user of
llama.cpp gets). Answers are compared token by token (the whole answer for f32/f16/bf16, the
first 20 tokens for q8_0, whose rounding may change a late token), and every answer that stopped
by itself in transformers must stop in llama.cpp too. Tokens per second are measured one prompt
at a time on both sides: the deployment payoff.

llama-cpp-python compiles llama.cpp from its PyPI sdist (minutes: ``make llama-cpp``); without it
the check is skipped with one line saying so.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .adapters import load_model_with_adapter
from .chat_format import generation_prompt_ids
from .config import Config
from .generation import generate_batch
from .questions import load_questions

log = logging.getLogger(__name__)

FIRST_TOKENS_QUANTISED = 20
INSTALL_LLAMA_CPP = "`make llama-cpp` (pip install llama-cpp-python==0.3.36; builds llama.cpp, ~9 min on 2 cores)"


@dataclass
class Answer:
    text: str
    stopped: bool
    tokens: int
    seconds: float


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def llama_cpp_answers(gguf: Path, conversations: list[list[dict]], max_new_tokens: int) -> list[Answer]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=os.cpu_count() or 1, seed=0, verbose=False)
    answers = []
    for messages in tqdm(conversations, desc="llama.cpp", unit="answer", leave=False):
        start = time.perf_counter()
        # temperature 0 is greedy in llama.cpp; the other knobs off so nothing reshapes the distribution
        out = llm.create_chat_completion(messages=messages, max_tokens=max_new_tokens, temperature=0.0, top_k=1,
                                         top_p=1.0, min_p=0.0, repeat_penalty=1.0)
        choice = out["choices"][0]
        answers.append(Answer(choice["message"]["content"] or "", choice["finish_reason"] == "stop",
                              int(out["usage"]["completion_tokens"]), time.perf_counter() - start))
    del llm
    return answers


def transformers_answers(cfg: Config, adapter: Path, conversations: list[list[dict]], max_new_tokens: int):
    """(answers, tokenizer) of base + adapter, greedy, one prompt at a time (as llama.cpp runs them)."""
    model, tokenizer = load_model_with_adapter(cfg.model, adapter)
    prompts = [generation_prompt_ids(tokenizer, m) for m in conversations]
    results = generate_batch(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=1,
                             seed=cfg.train.seed, progress="transformers")
    return [Answer(r.text, r.stopped_on_eot, r.n_new_tokens, r.seconds) for r in results], tokenizer


def same_answer(tokenizer, a: str, b: str, first: int | None) -> bool:
    ids_a = tokenizer(a.strip(), add_special_tokens=False)["input_ids"]
    ids_b = tokenizer(b.strip(), add_special_tokens=False)["input_ids"]
    return ids_a[:first] == ids_b[:first] if first else ids_a == ids_b


def _rate(answers: list[Answer]) -> float:
    seconds = sum(a.seconds for a in answers)
    return round(sum(a.tokens for a in answers) / seconds, 1) if seconds > 0 else 0.0


def check_against_transformers(cfg: Config, adapter: Path, gguf: Path, gguf_type: str) -> dict:
    """Answer the default questions both ways; the agreement, stops and speeds as a dict."""
    questions = load_questions(cfg.compare.questions)
    system = [{"role": "system", "content": cfg.data.system_prompt}] if cfg.data.system_prompt else []
    conversations = [system + [{"role": "user", "content": q.text}] for q in questions]
    max_new = cfg.compare.max_new_tokens
    reference, tokenizer = transformers_answers(cfg, adapter, conversations, max_new)
    exported = llama_cpp_answers(gguf, conversations, max_new)
    first = FIRST_TOKENS_QUANTISED if gguf_type == "q8_0" else None
    equal = [same_answer(tokenizer, r.text, e.text, first) for r, e in zip(reference, exported)]
    stopped_both = sum(r.stopped and e.stopped for r, e in zip(reference, exported))
    return {
        "questions": len(questions), "equal": sum(equal), "compared": f"first {first} tokens" if first else "whole answer",
        "stopped_transformers": sum(r.stopped for r in reference), "stopped_llama_cpp": sum(e.stopped for e in exported),
        "stopped_in_both": stopped_both, "tokens_per_s_transformers": _rate(reference),
        "tokens_per_s_llama_cpp": _rate(exported), "max_new_tokens": max_new,
        "answers": [{"question": q.text, "equal": eq, "transformers": asdict(r), "llama_cpp": asdict(e)}
                    for q, eq, r, e in zip(questions, equal, reference, exported)],
    }


SUMMARY_NAME = "export/export_summary.json"


def run_commands(path: Path, modelfile: Path) -> dict[str, str]:
    """How to run the exported file: llama.cpp's programs, its Python binding, Ollama."""
    return {
        "llama.cpp chat": f"llama-cli -m {path} -cnv",
        "llama.cpp server": f"llama-server -m {path} --jinja   # OpenAI-compatible API on http://localhost:8080",
        "python": (f"python -c \"from llama_cpp import Llama; llm = Llama('{path}', verbose=False); "
                   "print(llm.create_chat_completion([{'role': 'user', 'content': 'What is your name?'}], "
                   "temperature=0)['choices'][0]['message']['content'])\""),
        "ollama": f"cd {modelfile.parent} && ollama create {path.stem} -f {modelfile.name} && ollama run {path.stem}",
    }


def export_and_check(cfg: Config, adapter: Path, out_dir: Path) -> dict:
    """Plan (all checks), export, then llama.cpp vs transformers when possible; writes export_summary.json."""
    from .artefacts import atomic_write_json, package_versions
    from .gguf_export import export_gguf, plan_export

    plan = plan_export(cfg, adapter, out_dir, cfg.export.gguf_type)
    log.info("Exporting %s + %s (%s, %.0fM weights) to %s", cfg.model.model, plan.adapter, plan.architecture,
             plan.parameters / 1e6, plan.target)
    result = export_gguf(cfg, plan)
    log.info("Wrote %s: %.1f MB (%s) in %.1f s (merge %.1f s + llama.cpp converter %.1f s); Ollama: %s", result.path,
             result.bytes / 1e6, result.gguf_type, result.merge_seconds + result.convert_seconds, result.merge_seconds,
             result.convert_seconds, result.modelfile)
    summary = {"gguf": str(result.path), "gguf_type": result.gguf_type, "bytes": result.bytes,
               "merge_seconds": round(result.merge_seconds, 2), "convert_seconds": round(result.convert_seconds, 2),
               "modelfile": str(result.modelfile), "architecture": plan.architecture, "adapter": str(plan.adapter),
               "commands": run_commands(result.path, result.modelfile), "check": None, "versions": package_versions()}
    if not cfg.export.verify_export:
        summary["check_note"] = "skipped: --verify_export false"
    elif not llama_cpp_available():
        summary["check_note"] = f"skipped: llama-cpp-python is not installed; {INSTALL_LLAMA_CPP}"
        log.info("llama.cpp check %s", summary["check_note"])
    else:
        check = check_against_transformers(cfg, plan.adapter, result.path, result.gguf_type)
        summary["check"] = check
        log.info("llama.cpp vs transformers on %d questions: %d equal (%s); stopped by itself: %d in transformers, "
                 "%d of those in llama.cpp too; %.1f vs %.1f tokens/s (llama.cpp vs transformers, one prompt at a time)",
                 check["questions"], check["equal"], check["compared"], check["stopped_transformers"],
                 check["stopped_in_both"], check["tokens_per_s_llama_cpp"], check["tokens_per_s_transformers"])
    atomic_write_json(out_dir / SUMMARY_NAME, summary)
    log.info("Run it:\n  %s", "\n  ".join(f"{k}: {v}" for k, v in summary["commands"].items()))
    return summary

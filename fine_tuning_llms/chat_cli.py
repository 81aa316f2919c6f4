"""Talk to a model (optionally with your fine-tuned adapter) through its chat template.

    python run_fine_tuning.py --task chat --adapter results/final_model --prompt "What is your name?"
    python run_fine_tuning.py --task chat --adapter results/final_model      # interactive; "exit" or Ctrl-D ends

One-shot with ``--prompt``: prints the answer and returns. Without it: reads one message per
line from stdin and keeps the conversation history, so later turns see earlier ones, exactly
as the template lays them out. Settings shared with compare: ``--max_new_tokens``,
``--do_sample``, ``--temperature``; ``--system_prompt`` (data setting) adds a system turn.
"""
from __future__ import annotations

import logging
import sys
from typing import TextIO

from .engine.adapters import load_model_with_adapter
from .engine.chat_format import generation_prompt_ids, require_chat_template
from .engine.config import Config
from .engine.generation import GenerationResult, generate_batch, stop_token_ids
from .engine.models import load_model, load_tokenizer, resolve_model

log = logging.getLogger(__name__)

EXIT_WORDS = {"exit", "quit", "/exit", "/quit"}


def load_chat_model(cfg: Config):
    """(model, tokenizer): --model, with --adapter on top when given."""
    if cfg.compare.adapter:
        return load_model_with_adapter(cfg.model, cfg.compare.adapter)
    source = resolve_model(cfg.model.model)
    return load_model(cfg.model, source), load_tokenizer(cfg.model, source)


def answer(model, tokenizer, messages: list[dict], cfg: Config, stop_ids: list[int] | None = None) -> GenerationResult:
    """One assistant reply to ``messages`` (rendered with the chat template)."""
    prompt = generation_prompt_ids(tokenizer, messages)
    return generate_batch(model, tokenizer, [prompt], max_new_tokens=cfg.compare.max_new_tokens,
                          do_sample=cfg.compare.do_sample, temperature=cfg.compare.temperature,
                          batch_size=1, seed=cfg.train.seed, stop_ids=stop_ids)[0]


def _describe(result: GenerationResult) -> str:
    end = "stopped by itself" if result.stopped_on_eot else "hit --max_new_tokens"
    return f"[{result.n_new_tokens} tokens, {result.tokens_per_s:.1f} tokens/s, {end}]"


def chat_loop(model, tokenizer, cfg: Config, *, stdin: TextIO, stdout: TextIO) -> list[dict]:
    """Read user lines until EOF or an exit word; print each reply. Returns the conversation."""
    stop_ids = stop_token_ids(model, tokenizer)
    system = [{"role": "system", "content": cfg.data.system_prompt}] if cfg.data.system_prompt else []
    messages: list[dict] = list(system)
    interactive = hasattr(stdin, "isatty") and stdin.isatty()
    if interactive:
        print("Type a message and press Enter; 'exit' or Ctrl-D ends the chat.", file=stdout)
    while True:
        if interactive:
            print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:  # EOF
            break
        text = line.strip()
        if not text:
            continue
        if text.lower() in EXIT_WORDS:
            break
        messages.append({"role": "user", "content": text})
        result = answer(model, tokenizer, messages, cfg, stop_ids)
        messages.append({"role": "assistant", "content": result.text})
        print(f"assistant> {result.text}", file=stdout, flush=True)
        log.debug("%s", _describe(result))
    return messages


def run(cfg: Config, *, stdin: TextIO | None = None, stdout: TextIO | None = None) -> dict:
    """One-shot answer to --prompt, or an interactive chat on stdin."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    model, tokenizer = load_chat_model(cfg)
    require_chat_template(tokenizer, cfg.model.model)
    if cfg.compare.prompt is not None:
        messages = [{"role": "system", "content": cfg.data.system_prompt}] if cfg.data.system_prompt else []
        messages.append({"role": "user", "content": cfg.compare.prompt})
        result = answer(model, tokenizer, messages, cfg)
        print(result.text, file=stdout, flush=True)
        log.info("%s", _describe(result))
        return {"prompt": cfg.compare.prompt, "answer": result.text, "new_tokens": result.n_new_tokens,
                "stopped_on_eot": result.stopped_on_eot}
    messages = chat_loop(model, tokenizer, cfg, stdin=stdin, stdout=stdout)
    return {"turns": sum(m["role"] == "assistant" for m in messages), "messages": messages}

"""Batched vs one-at-a-time generation of the compare question set (goal: batched >= 3x faster).

    .venv/bin/python benchmarks/bench_compare.py                      # embedded model, built-in questions
    .venv/bin/python benchmarks/bench_compare.py --max_new_tokens 32 --model path/to/folder

Same model, same prompts (chat template), same greedy settings; the only difference is how many
questions go into one ``generate`` call. Why batching wins on a CPU: each decoding step reads
every weight once whether it serves 1 row or 16, so a batch shares that cost. It loses a little
where answers of very different lengths keep finished rows waiting for the longest one.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from fine_tuning_llms.engine.config import EMBEDDED_MODEL, ModelConfig
from fine_tuning_llms.engine.generation import generate_batch
from fine_tuning_llms.engine.models import load_model, load_tokenizer, resolve_model
from fine_tuning_llms.model_comparison import GENERATION_BATCH_SIZE, chat_prompt_ids, load_questions


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--questions", default=None, help=".txt/.json questions (default: built-in set)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=GENERATION_BATCH_SIZE)
    parser.add_argument("--repeats", type=int, default=2,
                        help="alternate the two ways this many times and keep each one's fastest run "
                             "(other processes on a shared CPU only ever slow a run down)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    cfg = ModelConfig(model=args.model)
    source = resolve_model(cfg.model)
    model, tokenizer = load_model(cfg, source), load_tokenizer(cfg, source)
    questions = load_questions(args.questions)
    prompts = [chat_prompt_ids(tokenizer, q.text) for q in questions]
    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    print(f"model {args.model}, {len(prompts)} questions, greedy, max_new_tokens {args.max_new_tokens}, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    generate_batch(model, tokenizer, prompts[:1], max_new_tokens=4)  # warm-up: first-call set-up is not timed

    t_batched, t_single = [], []
    for _ in range(args.repeats):  # alternate, so a busy spell on the machine hits both ways alike
        batched, seconds = timed(lambda: generate_batch(model, tokenizer, prompts, batch_size=args.batch_size,
                                                        **settings))
        t_batched.append(seconds)
        single, seconds = timed(lambda: [generate_batch(model, tokenizer, [p], batch_size=1, **settings)[0]
                                         for p in prompts])
        t_single.append(seconds)
    print("runs (s): batched " + ", ".join(f"{t:.1f}" for t in t_batched)
          + " | one per question " + ", ".join(f"{t:.1f}" for t in t_single) + f" | load average {os.getloadavg()[0]:.1f}")
    t_batched, t_single = min(t_batched), min(t_single)
    tokens_b = sum(r.n_new_tokens for r in batched)
    tokens_s = sum(r.n_new_tokens for r in single)
    same = sum(a.new_token_ids == b.new_token_ids for a, b in zip(batched, single))
    print(f"one generate call per question : {t_single:7.1f} s  ({tokens_s} new tokens, {tokens_s / t_single:6.1f} tokens/s)")
    print(f"batched ({args.batch_size:>2} per call)          : {t_batched:7.1f} s  ({tokens_b} new tokens, "
          f"{tokens_b / t_batched:6.1f} tokens/s)")
    print(f"speed-up (fastest runs): {t_single / t_batched:.2f}x   identical answers: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()

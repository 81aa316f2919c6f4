"""Preprocessing speed: N two-turn conversations → chat template → input ids + labels.

    python benchmarks/bench_preprocess.py                  # 10,000 conversations, embedded tokenizer
    python benchmarks/bench_preprocess.py --n 2000 --model /path/to/model

Conversations are made from the sample dataset's turns (each a user question, an answer, a
follow-up and a second answer), so lengths are realistic. Prints the wall time of
``tokenize_conversations`` (templating, prefix renders for the masks, one batched fast-tokenizer
call per chunk) and conversations per second.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def two_turn_conversations(n: int) -> list[list[dict]]:
    from fine_tuning_llms.engine.data import load_conversations, sample_dataset_path

    pairs = []
    for conv in load_conversations(sample_dataset_path()).conversations:
        body = [m for m in conv if m["role"] != "system"]
        pairs += [(body[i]["content"], body[i + 1]["content"]) for i in range(0, len(body) - 1, 2)]
    out = []
    for i in range(n):
        (q1, a1), (q2, a2) = pairs[i % len(pairs)], pairs[(7 * i + 3) % len(pairs)]
        out.append([{"role": "user", "content": q1}, {"role": "assistant", "content": a1},
                    {"role": "user", "content": q2}, {"role": "assistant", "content": a2}])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max_length", type=int, default=512)
    args = parser.parse_args()

    from fine_tuning_llms.engine.chat_format import tokenize_conversations
    from fine_tuning_llms.engine.config import ModelConfig
    from fine_tuning_llms.engine.models import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(model=args.model))
    conversations = two_turn_conversations(args.n)
    start = time.perf_counter()
    processed = tokenize_conversations(tokenizer, conversations, max_length=args.max_length)
    seconds = time.perf_counter() - start
    summary = processed.summary()
    print(f"{args.n} two-turn conversations preprocessed in {seconds:.1f} s ({args.n / seconds:.0f} conv/s); "
          f"kept {summary['examples_kept']}, {summary['total_tokens']} tokens, "
          f"{100 * summary['share_of_tokens_trained']:.1f}% trained")


if __name__ == "__main__":
    main()

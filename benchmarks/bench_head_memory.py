"""Memory of the loss with a large vocabulary: logits path vs the fused head + cross-entropy node.

    python benchmarks/bench_head_memory.py                 # Llama 3 vocabulary (128,256), 8 x 512 trained tokens

A tiny random Llama (2 layers, hidden 256, bf16, LoRA r=8) with a Llama-3-sized vocabulary, one
packed row of 8 conversations, every token trained: one forward + backward of the loss, each way in
its own process, peak RSS printed. The model is tiny on purpose, so the vocabulary projection is
what the peak is made of (as it is for a 1B-parameter Llama 3 at longer rows or bigger batches).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(fused: bool, vocab: int, rows: int, length: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from fine_tuning_llms.engine.host_memory import peak_rss_mb
    from fine_tuning_llms.engine.kernels.packed_sdpa import register_packed_attention
    from fine_tuning_llms.engine.trainer import trained_token_loss

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.set_attn_implementation(register_packed_attention())
    model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    lengths = [length] * rows
    ids = torch.randint(0, vocab, (1, sum(lengths)))
    batch = {"input_ids": ids, "labels": ids.clone(),
             "position_ids": torch.cat([torch.arange(n) for n in lengths])[None], "use_cache": False}
    before = peak_rss_mb()
    # the logits path gets autocast from around the model (as accelerate does); the fused path applies it itself
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not fused):
        loss, n, _ = trained_token_loss(model, batch, fused_head=fused, autocast_dtype=torch.bfloat16)
    (loss / n).backward()
    peak = peak_rss_mb()
    label = "fused head + loss" if fused else "logits + cross_entropy"
    print(f"  {label:24s} loss/token {loss.item() / n:.4f}   peak RSS {peak:6.0f} MB  "
          f"(model and data: {before:.0f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--rows", type=int, default=8, help="conversations packed in the row")
    parser.add_argument("--length", type=int, default=512, help="tokens per conversation")
    parser.add_argument("--_child", choices=["fused", "logits"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        child(args._child == "fused", args.vocab, args.rows, args.length)
        return
    print(f"Vocabulary {args.vocab:,}, {args.rows} x {args.length} tokens, all trained; one forward + backward:")
    for kind in ("logits", "fused"):  # each in a fresh process, so each peak is its own (VmHWM: not this one's)
        proc = subprocess.run([sys.executable, __file__, f"--_child={kind}", f"--vocab={args.vocab}",
                               f"--rows={args.rows}", f"--length={args.length}"], cwd=ROOT, capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
        print(proc.stdout, end="")


if __name__ == "__main__":
    main()

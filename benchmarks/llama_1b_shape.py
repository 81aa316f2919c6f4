"""Llama-3.2-1B's and -3B's exact shapes with random weights, built offline (the real weights are
gated and the hub is unreachable here). 1B: 16 layers, hidden 2048, MLP 8192, 32 query / 8 key-value
heads of 64; 3B: 28 layers, hidden 3072, MLP 8192, 24 / 8 heads of 128; both: vocabulary 128,256, tied
embeddings, Llama 3 rotary scaling; bf16 safetensors as Meta ships them. The tokenizer is the
embedded SmolLM2's (its ids all fall inside the larger vocabulary): speed and memory depend on the
shapes, not on which token an id means.

    python benchmarks/llama_1b_shape.py        # builds the 1B shape once into the cache and prints the folder
    python benchmarks/llama_1b_shape.py 3b     # the 3B shape (6.4 GB of weights)
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMA_3 = dict(
    vocab_size=128256, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=500000.0,
    max_position_embeddings=131072, hidden_act="silu", attention_bias=False, mlp_bias=False,
    rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                  "original_max_position_embeddings": 8192, "rope_type": "llama3"},
)
LLAMA_3_2_1B = dict(LLAMA_3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=64)
LLAMA_3_2_3B = dict(LLAMA_3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                    num_key_value_heads=8, head_dim=128)
SHAPES = {"1b": LLAMA_3_2_1B, "3b": LLAMA_3_2_3B}


def llama_shape_folder(size: str = "1b") -> Path:
    """The cached folder of the ``size`` shape (built on first use, atomically: a half-built folder
    is never used)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fine_tuning_llms.engine.artefacts import atomic_directory
    from fine_tuning_llms.engine.config import ModelConfig
    from fine_tuning_llms.engine.models import cache_root, load_tokenizer

    if size not in SHAPES:
        raise SystemExit(f"unknown shape {size!r}: use one of {', '.join(SHAPES)}")
    target = cache_root() / f"llama-3.2-{size}-shape-random"
    if (target / "config.json").is_file():
        return target
    tokenizer = load_tokenizer(ModelConfig())
    config = LlamaConfig(**SHAPES[size], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: the 3B shape in fp32 would take 13 GB to build
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    with atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


if __name__ == "__main__":
    print(llama_shape_folder(sys.argv[1] if len(sys.argv) > 1 else "1b"))

"""Llama-3.2-1B's, -3B's, Llama-3.1-8B's and Llama-2-13B's shapes with random weights, built offline (the real
weights are gated and the hub is unreachable here). 1B: 16 layers, hidden 2048, MLP 8192, 32 query /
8 key-value heads of 64; 3B: 28 layers, hidden 3072, MLP 8192, 24 / 8 heads of 128; both tied
embeddings. 8B: 32 layers, hidden 4096, MLP 14336, 32 / 8 heads of 128, untied. These three: vocabulary
128,256, Llama 3 rotary scaling. 13B: 40 layers, hidden 5120, MLP 13824, 40 heads of 128, untied,
vocabulary 49,152 (see SHAPES). bf16 safetensors as Meta ships them. The tokenizer is the embedded
SmolLM2's (its ids all fall inside each shape's vocabulary): speed and memory depend on the shapes, not
on which token an id means.

    python benchmarks/llama_1b_shape.py        # builds the 1B shape once into the cache and prints the folder
    python benchmarks/llama_1b_shape.py 3b     # the 3B shape (6.4 GB of weights)
    python benchmarks/llama_1b_shape.py 8b     # the 8B shape (16 GB of weights)
    python benchmarks/llama_1b_shape.py 13b    # the 13B shape (26 GB of weights)

The weights are written one layer at a time (normal, std = the config's initializer_range; norms
ones), so building the 8B shape needs about one layer of memory, not the 16 GB of the whole model.
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
LLAMA_3_1_8B = dict(LLAMA_3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                    rope_scaling=dict(LLAMA_3["rope_scaling"], factor=8.0))
LLAMA_2_13B = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                   num_key_value_heads=40, head_dim=128, vocab_size=32000, tie_word_embeddings=False,
                   rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096, hidden_act="silu",
                   attention_bias=False, mlp_bias=False)
# The published configurations (bench_plan.py --largest plans them).
PUBLISHED = {"Llama-3.2-1B": LLAMA_3_2_1B, "Llama-3.2-3B": LLAMA_3_2_3B, "Llama-3.1-8B": LLAMA_3_1_8B,
             "Llama-2-13B": LLAMA_2_13B}
# The shapes built here. The 13B one has one change: the embedded tokenizer's ids reach 49,151, past Llama 2's
# 32,000, so its embedding and head have 49,152 rows (+176 M parameters, +1.3%: a little larger, not smaller).
SHAPES = {"1b": LLAMA_3_2_1B, "3b": LLAMA_3_2_3B, "8b": LLAMA_3_1_8B, "13b": dict(LLAMA_2_13B, vocab_size=49152)}
RELEASES = {"1b": "3.2", "3b": "3.2", "8b": "3.1", "13b": "2"}


def llama_shape_folder(size: str = "1b") -> Path:
    """The cached folder of the ``size`` shape (built on first use, atomically: a half-built folder
    is never used)."""
    import torch
    from transformers import LlamaConfig

    from fine_tuning_llms.engine.artefacts import atomic_directory
    from fine_tuning_llms.engine.config import ModelConfig
    from fine_tuning_llms.engine.models import cache_root, load_tokenizer

    if size not in SHAPES:
        raise SystemExit(f"unknown shape {size!r}: use one of {', '.join(SHAPES)}")
    target = cache_root() / f"llama-{RELEASES[size]}-{size}-shape-random"
    if (target / "config.json").is_file():
        return target
    tokenizer = load_tokenizer(ModelConfig())
    config = LlamaConfig(**SHAPES[size], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, architectures=["LlamaForCausalLM"])
    config.dtype = torch.bfloat16  # what the files hold; --dtype auto reads it
    with atomic_directory(target, overwrite=True) as tmp:
        write_random_shards(tmp, weight_shapes(config), config.initializer_range)
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def weight_shapes(config) -> dict[str, tuple[int, ...]]:
    """The saved weights' names and shapes for this Llama config (a tied head is saved once, as the
    embedding), from a model on the meta device: no memory for the weights themselves."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in LlamaForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def write_random_shards(folder: Path, shapes: dict[str, tuple[int, ...]], std: float) -> None:
    """bf16 safetensors shards, one per decoder layer (embeddings, final norm and head in the
    first and last), and the index transformers reads them by."""
    import json

    import torch
    from safetensors.torch import save_file

    groups: dict[str, list[str]] = {}
    for name in shapes:
        parts = name.split(".")
        key = parts[2] if parts[:2] == ["model", "layers"] else ("head" if "embed" not in name else "embed")
        groups.setdefault(key, []).append(name)
    generator = torch.Generator().manual_seed(0)
    files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map, total = {}, 0
    for file, names in zip(files, groups.values()):
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                tensors[name] = torch.empty(shapes[name], dtype=torch.bfloat16).normal_(0.0, std, generator=generator)
            weight_map[name] = file
            total += tensors[name].numel() * 2
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


if __name__ == "__main__":
    print(llama_shape_folder(sys.argv[1] if len(sys.argv) > 1 else "1b"))

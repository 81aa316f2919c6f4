"""benchmarks/llama_1b_shape.py writes its random Llama shapes one layer per shard: the folder must
load in transformers with every weight present (tied and untied heads)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from llama_1b_shape import SHAPES, weight_shapes, write_random_shards  # noqa: E402


@pytest.mark.parametrize("size", ["1b", "8b", "13b"])
def test_random_shards_load_with_every_weight(tmp_path, size):
    tiny = dict(SHAPES[size], hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=300)
    config = LlamaConfig(**tiny, architectures=["LlamaForCausalLM"])
    shapes = weight_shapes(config)
    write_random_shards(tmp_path, shapes, config.initializer_range)
    config.save_pretrained(tmp_path)

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(shapes)
    assert len(set(index["weight_map"].values())) == 3 + 2  # one shard per layer, embeddings, norm + head
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.bfloat16
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied == (size == "1b")
    assert torch.all(model.model.norm.weight == 1)
    assert abs(model.model.layers[2].mlp.up_proj.weight.float().std().item() - config.initializer_range) < 0.004
    assert model.model.layers[0].self_attn.q_proj.weight.float().std() > 0  # not the meta model's empty tensors

"""Tiny random Llama models and tokenizers for tests: built offline in seconds.

Four chat-template families (ChatML, Llama-3, Mistral, Gemma), each in a plain version and a
version whose assistant replies are wrapped in ``{% generation %}`` tags, which lets
transformers' ``return_assistant_tokens_mask`` serve as an independent oracle for our masks.
"""
from __future__ import annotations

from pathlib import Path

CORPUS = [
    "Hello! How are you today? I am fine, thank you.",
    "The capital of France is Paris. The capital of Korea is Seoul.",
    "What is two plus two? Two plus two is four.",
    "안녕하세요. 저는 도우미입니다. 무엇을 도와드릴까요?",
    "Write a short poem about the sea and the sky.",
    "Lumi is a friendly assistant who answers briefly.",
    "system user assistant model You are a helpful assistant.",
    "0123456789 + - * / = ( ) [ ] { } : ; , . ! ?",
] * 4

FAMILIES = {
    "chatml": dict(
        bos="<|im_start|>", eos="<|im_end|>", pad="<|im_end|>",  # pad == eos, like SmolLM2
        extra=["<|im_start|>", "<|im_end|>"],
        template=(
            "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a tiny test assistant.<|im_end|>\\n' }}{% endif %}"
            "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
            "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
            "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
        ),
    ),
    "llama3": dict(
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None,
        extra=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        template=(
            "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
            "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
            "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
        ),
    ),
    "mistral": dict(
        bos="<s>", eos="</s>", pad=None,
        extra=["<s>", "</s>", "[INST]", "[/INST]"],
        template=(
            "{{ bos_token }}{% for message in messages %}"
            "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
            "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
            "{% elif message['role'] == 'assistant' %}{% generation %}{{ ' ' + message['content'] + eos_token }}{% endgeneration %}"
            "{% endif %}{% endfor %}"
        ),
    ),
    "gemma": dict(
        bos="<bos>", eos="<eos>", pad="<pad>",
        extra=["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"],
        template=(
            "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
            "{{ '<start_of_turn>' + role + '\\n' }}{% if role == 'model' %}"
            "{% generation %}{{ message['content'] | trim + '<end_of_turn>' }}{% endgeneration %}{{ '\\n' }}"
            "{% else %}{{ message['content'] | trim + '<end_of_turn>\\n' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
        ),
    ),
}


def plain_template(template: str) -> str:
    """The same template without generation tags (what most real templates look like)."""
    return template.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def build_tokenizer(family: str = "chatml", *, with_generation_tags: bool = False, vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(dict.fromkeys(spec["extra"])),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(CORPUS, trainer=trainer)
    template = spec["template"] if with_generation_tags else plain_template(spec["template"])
    kwargs = dict(tokenizer_object=core, bos_token=spec["bos"], eos_token=spec["eos"], chat_template=template)
    if spec["pad"]:
        kwargs["pad_token"] = spec["pad"]
    tok = PreTrainedTokenizerFast(**kwargs)
    extra = [t for t in spec["extra"] if t not in (spec["bos"], spec["eos"], spec["pad"])]
    if extra:
        tok.add_special_tokens({"additional_special_tokens": extra})
    return tok


def build_model(vocab_size: int, *, seed: int = 0, hidden: int = 64, layers: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def save_tiny_checkpoint(folder: Path, *, family: str = "chatml", seed: int = 0, with_generation_tags: bool = False) -> Path:
    tok = build_tokenizer(family, with_generation_tags=with_generation_tags)
    model = build_model(len(tok), seed=seed)
    tok.bos_token_id and setattr(model.config, "bos_token_id", tok.bos_token_id)
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder

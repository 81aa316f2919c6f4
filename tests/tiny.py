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

# Three short conversations (one multi-turn with a system prompt, one Korean): the tests' data.
SAMPLE_CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "What is two plus two?"},
                  {"role": "assistant", "content": "Two plus two is four."}]},
    {"messages": [{"role": "system", "content": "You are Lumi."},
                  {"role": "user", "content": "Hello!"},
                  {"role": "assistant", "content": "Hello! How are you?"},
                  {"role": "user", "content": "I am fine."},
                  {"role": "assistant", "content": "Good, thank you."}]},
    {"messages": [{"role": "user", "content": "안녕하세요"},
                  {"role": "assistant", "content": "안녕하세요. 무엇을 도와드릴까요?"}]},
]


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


# Model families users bring, each as a tiny random model of its own config class. Sliding
# windows are set shorter than the test conversations so the windowed layers really differ
# from full attention (the trap for per-conversation shortcuts).
FAMILY_MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 16}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 16}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "sliding_window": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
}
# Attention implementations each family runs on CPU (Gemma-2 refuses SDPA: soft-capping).
FAMILY_ATTENTION = {family: ("eager", "sdpa") for family in FAMILY_MODELS}
FAMILY_ATTENTION["gemma2"] = ("eager",)


def build_family_model(family: str, vocab_size: int, *, seed: int = 0, attn: str | None = None,
                       special_ids: dict | None = None):
    import torch
    import transformers

    config_name, model_name, extra = FAMILY_MODELS[family]
    # special ids inside the tiny vocabulary (some configs default to ids of their real vocabulary)
    ids = special_ids or {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    config = getattr(transformers, config_name)(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, **ids, **extra)
    if attn is not None:
        config._attn_implementation = attn
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config)


def save_family_checkpoint(folder: Path, family: str, *, seed: int = 0) -> Path:
    """A tiny random model of ``family`` with the ChatML test tokenizer (the template is not what
    differs between architectures)."""
    tok = build_tokenizer("chatml")
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    model = build_family_model(family, len(tok), seed=seed, special_ids=ids)
    for name, value in ids.items():
        setattr(model.generation_config, name, value)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder

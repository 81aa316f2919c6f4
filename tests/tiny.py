"""Tiny random Llama models and tokenizers for tests: built offline in seconds.

Four chat-template families (ChatML, Llama-3, Mistral, Gemma), each in a plain version and a
version whose assistant replies are wrapped in ``{% generation %}`` tags, which lets
transformers' ``return_assistant_tokens_mask`` serve as an independent oracle for our masks.
Three more (``TOOL_FAMILIES``: Llama 3.1, Qwen 2.5 and Qwen 3 styles) render tools and tool calls;
the Qwen 3 one also renders reasoning.
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


# Tool-capable templates written in the style of real ones (their tool and tool_calls handling
# kept; dates and builtin tools left out): Llama 3.1 (one JSON call as the whole assistant turn,
# tools in the first user message, results as an ``ipython`` turn) and Qwen 2.5 / Hermes
# (``<tool_call>`` blocks after the reply, tools in the system prompt, results as
# ``<tool_response>`` inside a user turn). Neither renders reasoning: that takes the fallback.
TOOL_FAMILIES = {
    "llama31": dict(
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None,
        extra=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
               "<|python_tag|>"],
        template=(
            "{{- bos_token }}{%- if tools is not defined %}{%- set tools = none %}{%- endif %}"
            "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] | trim %}"
            "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
            "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
            "{%- if tools is not none %}{{- 'Environment: ipython\\n' }}{%- endif %}"
            "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' }}"
            "{{- system_message }}{{- '<|eot_id|>' }}"
            "{%- if tools is not none %}"
            "{%- if messages | length != 0 %}{%- set first_user_message = messages[0]['content'] | trim %}"
            "{%- set messages = messages[1:] %}{%- else %}"
            "{{- raise_exception('Cannot put tools in the first user message when there is no first user message!') }}"
            "{%- endif %}"
            "{{- '<|start_header_id|>user<|end_header_id|>\\n\\n' }}"
            "{{- 'Given the following functions, please respond with a JSON for a function call with its proper "
            "arguments that best answers the given prompt.\\n\\n' }}"
            "{{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its "
            "value}. Do not use variables.\\n\\n' }}"
            "{%- for t in tools %}{{- t | tojson(indent=4) }}{{- '\\n\\n' }}{%- endfor %}"
            "{{- first_user_message + '<|eot_id|>' }}"
            "{%- endif %}"
            "{%- for message in messages %}"
            "{%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}"
            "{%- if message.role == 'assistant' %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
            "{% generation %}{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
            "{%- else %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
            "message['content'] | trim + '<|eot_id|>' }}{%- endif %}"
            "{%- elif 'tool_calls' in message %}"
            "{%- if not message.tool_calls | length == 1 %}"
            "{{- raise_exception('This model only supports single tool-calls at once!') }}{%- endif %}"
            "{%- set tool_call = message.tool_calls[0].function %}"
            "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
            "{% generation %}{{- '{\"name\": \"' + tool_call.name + '\", ' }}{{- '\"parameters\": ' }}"
            "{{- tool_call.arguments | tojson }}{{- '}' }}{{- '<|eot_id|>' }}{% endgeneration %}"
            "{%- elif message.role == 'tool' or message.role == 'ipython' %}"
            "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}"
            "{%- if message.content is mapping or message.content is iterable %}{{- message.content | tojson }}"
            "{%- else %}{{- message.content }}{%- endif %}{{- '<|eot_id|>' }}"
            "{%- endif %}{%- endfor %}"
            "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
        ),
    ),
    "qwen25": dict(
        bos=None, eos="<|im_end|>", pad="<|endoftext|>",
        extra=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        template=(
            "{%- if tools %}{{- '<|im_start|>system\\n' }}"
            "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
            "{%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}{%- endif %}"
            "{{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are "
            "provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
            "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
            "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
            "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
            "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
            "{%- else %}{%- if messages[0]['role'] == 'system' %}"
            "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
            "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
            "assistant.<|im_end|>\\n' }}{%- endif %}{%- endif %}"
            "{%- for message in messages %}"
            "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
            "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
            "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
            "{% generation %}{{- message.content }}"
            "{%- for tool_call in message.tool_calls or [] %}"
            "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
            "{%- if message.content or not loop.first %}{{- '\\n' }}{%- endif %}"
            "{{- '<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
            "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}"
            "{{- '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
            "{%- elif message.role == 'tool' %}"
            "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}"
            "{%- endif %}{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
            "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
            "{%- endif %}{%- endfor %}"
            "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
        ),
    ),
    # Qwen 3 style: reasoning_content rendered as <think>…</think> in the turns after the last user
    # question (earlier turns lose it: history is re-rendered differently), an empty <think> block in
    # a final turn without reasoning. ``reasoning_untrained=True`` (a template variable, tagged twin
    # only) leaves the reasoning text outside the generation tags: the oracle for train_reasoning=False.
    "qwen3": dict(
        bos=None, eos="<|im_end|>", pad="<|endoftext|>",
        extra=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        template=(
            "{%- macro render_calls(message, content) %}{%- for tool_call in message.tool_calls or [] %}"
            "{%- if (loop.first and content) or (not loop.first) %}{{- '\\n' }}{%- endif %}"
            "{%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}"
            "{{- '<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
            "{%- if tool_call.arguments is string %}{{- tool_call.arguments }}{%- else %}"
            "{{- tool_call.arguments | tojson }}{%- endif %}{{- '}\\n</tool_call>' }}{%- endfor %}{%- endmacro %}"
            "{%- if tools %}{{- '<|im_start|>system\\n' }}"
            "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
            "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are "
            "provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
            "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
            "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
            "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
            "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
            "{%- else %}{%- if messages[0].role == 'system' %}"
            "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}{%- endif %}"
            "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
            "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
            "{%- if ns.multi_step_tool and message.role == 'user' and message.content is string and not "
            "(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}"
            "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}"
            "{%- for message in messages %}"
            "{%- if message.content is string %}{%- set content = message.content %}{%- else %}"
            "{%- set content = '' %}{%- endif %}"
            "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
            "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}"
            "{%- elif message.role == 'assistant' %}{%- set reasoning_content = '' %}"
            "{%- if message.reasoning_content is string %}{%- set reasoning_content = message.reasoning_content %}"
            "{%- elif '</think>' in content %}"
            "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
            "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
            "{{- '<|im_start|>assistant\\n' }}"
            "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}"
            "{%- if reasoning_untrained is defined and reasoning_untrained and reasoning_content %}"
            "{% generation %}{{- '<think>\\n' }}{% endgeneration %}{{- reasoning_content.strip('\\n') }}"
            "{% generation %}{{- '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
            "{{- render_calls(message, content.lstrip('\\n')) }}{{- '<|im_end|>' }}{% endgeneration %}"
            "{%- else %}{% generation %}{{- '<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + "
            "content.lstrip('\\n') }}{{- render_calls(message, content.lstrip('\\n')) }}{{- '<|im_end|>' }}"
            "{% endgeneration %}{%- endif %}"
            "{%- else %}{% generation %}{{- content }}{{- render_calls(message, content) }}{{- '<|im_end|>' }}"
            "{% endgeneration %}{%- endif %}{{- '\\n' }}"
            "{%- elif message.role == 'tool' %}"
            "{%- if loop.first or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
            "{{- '\\n<tool_response>\\n' }}{{- content }}{{- '\\n</tool_response>' }}"
            "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
            "{%- endif %}{%- endfor %}"
            "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
            "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
            "{%- endif %}{%- endif %}"
        ),
    ),
}


# A base tokenizer without the turn tokens of any chat format (like many pre-trained models).
BASE_FAMILIES = {"plain": dict(bos="<s>", eos="</s>", pad=None, extra=["<s>", "</s>"], template=None)}


def plain_template(template: str) -> str:
    """The same template without generation tags (what most real templates look like)."""
    return template.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def build_tokenizer(family: str = "chatml", *, with_generation_tags: bool = False, vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = {**FAMILIES, **TOOL_FAMILIES, **BASE_FAMILIES}[family]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(dict.fromkeys(spec["extra"])),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(CORPUS, trainer=trainer)
    template = spec["template"] if with_generation_tags or not spec["template"] else plain_template(spec["template"])
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
                       special_ids: dict | None = None, **overrides):
    import torch
    import transformers

    config_name, model_name, extra = FAMILY_MODELS[family]
    extra = {**extra, **overrides}
    # special ids inside the tiny vocabulary (some configs default to ids of their real vocabulary)
    ids = special_ids or {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    config = getattr(transformers, config_name)(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, **ids, **extra)
    if attn is not None:
        config._attn_implementation = attn
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config)


def save_family_checkpoint(folder: Path, family: str, *, seed: int = 0, **config) -> Path:
    """A tiny random model of ``family`` with the ChatML test tokenizer (the template is not what
    differs between architectures); ``config`` overrides the family's test config."""
    tok = build_tokenizer("chatml")
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    model = build_family_model(family, len(tok), seed=seed, special_ids=ids, **config)
    for name, value in ids.items():
        setattr(model.generation_config, name, value)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def save_base_checkpoint(folder: Path, *, tokenizer_family: str, model_family: str, tie: bool = True,
                         seed: int = 0) -> Path:
    """A tiny random *base* model: the tokenizer of ``tokenizer_family`` without any chat template."""
    tok = build_tokenizer(tokenizer_family)
    tok.chat_template = None
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}
    model = build_family_model(model_family, len(tok), seed=seed, special_ids=ids)
    if not tie:  # an untied head: the rows of added tokens must be trained in the head too
        import torch

        model.config.tie_word_embeddings = False
        # x25: rows of std 0.5, so a 64-wide hidden state can reach confident logits through the frozen head
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 25)
    for name, value in ids.items():
        setattr(model.generation_config, name, value)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    assert not (folder / "chat_template.jinja").exists()
    return folder


def count_applies(monkeypatch, function) -> list:
    """A list that gets an item each time ``function`` (an autograd.Function) is applied."""
    calls = []
    original = function.apply
    monkeypatch.setattr(function, "apply", lambda *a: calls.append(1) or original(*a))
    return calls


def run_without_gradients(model, ids) -> None:
    """Eval forward, generation, and a training-mode forward without gradients: no fused node may run."""
    import torch

    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
        model.generate(ids, max_new_tokens=2, do_sample=False)
    model.train()
    with torch.no_grad():
        model(input_ids=ids)


def with_test_lora(model, **lora):
    """``model`` with a small all-linear LoRA whose B matrices are not zero (PEFT starts them at zero),
    so that every gradient path of a LoRA layer is exercised."""
    import torch
    from peft import LoraConfig, get_peft_model

    settings = dict(r=4, lora_alpha=12, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, LoraConfig(**{**settings, **lora}))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def loss_and_grads(model, ids, autocast: bool):
    """One training-mode forward + backward on ``ids`` (labels = inputs), optionally under bf16
    autocast: (loss, {name: gradient} of the trainable parameters); gradients are reset after."""
    import torch

    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.detach(), grads


def relative_error(grads, reference) -> float:
    """||grads - reference|| / ||reference|| over every trainable tensor together."""
    diff = sum(float(((grads[n] - reference[n]) ** 2).sum()) for n in reference)
    return (diff / sum(float((reference[n] ** 2).sum()) for n in reference)) ** 0.5


def assert_as_close_to_fp32_as_peft(node_grads, peft_grads, fp32_grads) -> None:
    """A node's bf16-autocast gradients are held to the fp32 step: within 2x PEFT's own bf16 error."""
    peft_error, node_error = relative_error(peft_grads, fp32_grads), relative_error(node_grads, fp32_grads)
    assert 0 < peft_error < 0.05  # bf16 rounding, not a different computation
    assert node_error <= 2 * peft_error, (node_error, peft_error)

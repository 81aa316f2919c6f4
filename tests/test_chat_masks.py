"""Assistant-only labels for four template families, checked against transformers' own
``return_assistant_tokens_mask`` on versions of the same templates with generation tags."""
import pytest
from tiny import FAMILIES, build_tokenizer

from fine_tuning_llms.engine import chat_format as chat
from fine_tuning_llms.engine.batching import pad_batch

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi there, how are you?"}],
    [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Two plus two is four."},
     {"role": "user", "content": "And the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "안녕하세요"}, {"role": "assistant", "content": "안녕하세요. 무엇을 도와드릴까요?"},
     {"role": "user", "content": "Write a short poem."}, {"role": "assistant", "content": "The sea,\nthe sky."}],
]
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "</s>", "gemma": "<end_of_turn>"}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param, build_tokenizer(request.param), build_tokenizer(request.param, with_generation_tags=True)


@pytest.mark.parametrize("conv_index", range(len(CONVERSATIONS)))
def test_mask_equals_transformers_generation_mask(family, conv_index):
    name, plain, tagged = family
    conv = CONVERSATIONS[conv_index]
    if name == "mistral" and any(m["role"] == "system" for m in conv):
        pytest.skip("mistral template has no system role")
    oracle = tagged.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ours = chat.encode_conversation(plain, conv)
    assert ours.input_ids == oracle["input_ids"]
    assert ours.assistant_mask == list(oracle["assistant_masks"])
    assert sum(ours.assistant_mask) > 0


def test_every_reply_ends_with_end_of_turn_and_nothing_else_trained(family):
    name, plain, _ = family
    conv = CONVERSATIONS[1]
    enc = chat.encode_conversation(plain, conv)
    eot_id = plain.convert_tokens_to_ids(END_OF_TURN[name])
    runs = chat.trained_spans(enc.labels)
    assert len(runs) == 2, "one trained span per assistant reply"
    for run in runs:
        assert run[-1] == eot_id
    trained_text = "".join(plain.decode(r) for r in runs)
    for user_text in ("What is two plus two?", "capital of France"):
        assert user_text not in trained_text


def test_train_on_last_only(family):
    _, plain, _ = family
    all_turns = chat.encode_conversation(plain, CONVERSATIONS[1])
    last = chat.encode_conversation(plain, CONVERSATIONS[1], train_on="last")
    assert 0 < last.trained_token_count < all_turns.trained_token_count
    assert "Paris" in plain.decode([t for t, label in zip(last.input_ids, last.labels) if label != chat.IGNORE_INDEX])


def test_trained_spans_are_the_label_runs():
    ignore = chat.IGNORE_INDEX
    assert chat.trained_spans([ignore, 5, 6, ignore, ignore, 7]) == [[5, 6], [7]]
    assert chat.trained_spans([ignore, ignore]) == []


def test_no_double_bos():
    tok = build_tokenizer("llama3")
    enc = chat.encode_conversation(tok, CONVERSATIONS[0])
    assert enc.input_ids.count(tok.bos_token_id) == 1 and enc.input_ids[0] == tok.bos_token_id


def test_pad_equals_eos_keeps_end_of_turn_trained():
    tok = build_tokenizer("chatml")
    assert tok.pad_token_id == tok.eos_token_id  # the SmolLM2 trap
    a = chat.encode_conversation(tok, CONVERSATIONS[0])
    b = chat.encode_conversation(tok, CONVERSATIONS[1])
    batch = pad_batch([{"input_ids": a.input_ids, "labels": a.labels},
                            {"input_ids": b.input_ids, "labels": b.labels}], tok.pad_token_id)
    row = batch["labels"][0]
    assert (row == tok.eos_token_id).sum() == 1, "the reply's <|im_end|> stays a label"
    assert (batch["labels"][batch["attention_mask"] == 0] == chat.IGNORE_INDEX).all()


def test_truncation_keeps_trained_tokens_or_drops():
    tok = build_tokenizer("chatml")
    full = chat.encode_conversation(tok, CONVERSATIONS[1])
    first_trained = full.assistant_mask.index(1)
    kept = chat.encode_conversation(tok, CONVERSATIONS[1], max_length=first_trained + 3)
    assert kept.truncated and len(kept.input_ids) == first_trained + 3 and kept.trained_token_count == 3
    assert chat.encode_conversation(tok, CONVERSATIONS[1], max_length=first_trained) is None


def test_template_that_rewrites_history_warns_and_still_masks(caplog):
    tok = build_tokenizer("chatml")
    # Like reasoning templates: earlier assistant turns are rendered shortened.
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "{{ '<|im_start|>assistant\\n' + m['content'][:4] + '<|im_end|>\\n' }}"
        "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    report = chat.TemplateReport()
    enc = chat.encode_conversation(tok, CONVERSATIONS[1], report=report)
    report.warn_once(tok)
    assert report.prefix_mismatches >= 1
    assert "re-renders earlier turns differently" in caplog.text
    trained = tok.decode([t for t, label in zip(enc.input_ids, enc.labels) if label != chat.IGNORE_INDEX])
    assert trained.endswith("Paris.<|im_end|>")


@pytest.mark.embedded
def test_embedded_model_trains_replies_ending_with_im_end_and_nothing_else():
    from fine_tuning_llms.engine.config import ModelConfig
    from fine_tuning_llms.engine.data import load_conversations, sample_dataset_path
    from fine_tuning_llms.engine.models import load_tokenizer

    tok = load_tokenizer(ModelConfig())
    im_start, im_end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    convs = load_conversations(sample_dataset_path()).conversations[:80]
    for conv, enc in zip(convs, chat.encode_many(tok, convs)):
        runs = chat.trained_spans(enc.labels)
        replies = [m["content"] for m in conv if m["role"] == "assistant"]
        assert len(runs) == len(replies)
        for run, reply in zip(runs, replies):
            assert run[-1] == im_end and im_start not in run
            assert tok.decode(run[:-1]) == reply  # exactly the reply: no system/user/header token trained

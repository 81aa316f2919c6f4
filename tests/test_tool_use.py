"""Agent data (issue 24): tool calls, tool results, tool lists and reasoning traces.

Reading and validating records; rendering through a template's own tool support or the one
fallback; labels checked token for token against ``return_assistant_tokens_mask`` on
``{% generation %}``-tagged twins of tool-capable templates (tests/tiny.py TOOL_FAMILIES).
"""
import json

import pytest

from fine_tuning_llms.cli import main
from fine_tuning_llms.engine import chat_format as chat
from fine_tuning_llms.engine import data, tool_data, tool_format

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
WEATHER = {"messages": [
    {"role": "user", "content": "What's the weather in Seoul?"},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Seoul"}}}]},
    {"role": "tool", "content": "{\"temp\": 3}"},
    {"role": "assistant", "content": "It is 3 degrees in Seoul."}], "tools": TOOLS}
SHAREGPT = {"conversations": [
    {"from": "human", "value": "What's the weather in Seoul?"},
    {"from": "function_call", "value": "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Seoul\"}}"},
    {"from": "observation", "value": "{\"temp\": 3}"},
    {"from": "gpt", "value": "It is 3 degrees in Seoul."}], "tools": json.dumps(TOOLS)}
REASONING = {"messages": [
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four.", "reasoning_content": "Two and two make four."}]}
GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------- step 1: data

def test_openai_tool_record_becomes_the_internal_form():
    conv = data.parse_records([("r", WEATHER)]).conversations[0]
    assert [m["role"] for m in conv] == ["user", "assistant", "tool", "assistant"]
    assert conv[1]["content"] == "" and conv[1]["tool_calls"][0]["function"] == {
        "name": "get_weather", "arguments": {"city": "Seoul"}}
    assert conv[2] == {"role": "tool", "content": "{\"temp\": 3}"}
    assert tool_data.conversation_tools(conv) == TOOLS


def test_sharegpt_function_call_and_observation_map_onto_the_same_form():
    ours = data.parse_records([("r", SHAREGPT)]).conversations[0]
    openai = data.parse_records([("r", WEATHER)]).conversations[0]
    assert ours == openai


@pytest.mark.parametrize("key", ["reasoning_content", "thinking"])
def test_reasoning_trace_is_kept(key):
    record = json.loads(json.dumps(REASONING).replace("reasoning_content", key))
    conv = data.parse_records([("r", record)]).conversations[0]
    assert conv[-1] == {"role": "assistant", "content": "Four.", "reasoning_content": "Two and two make four."}


def test_string_arguments_parse_and_null_content_with_calls_is_empty():
    record = json.loads(json.dumps(WEATHER))
    record["messages"][1] = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Seoul\"}"}}]}
    record["messages"][2] = {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": {"temp": 3}}
    conv = data.parse_records([("r", record)]).conversations[0]
    assert conv[1]["content"] == "" and conv[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Seoul"}
    assert conv[1]["tool_calls"][0]["id"] == "call_1"
    assert conv[2] == {"role": "tool", "content": "{\"temp\": 3}", "tool_call_id": "call_1", "name": "get_weather"}


def test_plain_records_are_unchanged():
    conv = data.parse_records([("r", GOOD)]).conversations[0]
    assert conv == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert not tool_data.has_agent_parts(conv)


def _with(change):
    record = json.loads(json.dumps(WEATHER))
    change(record)
    return record


BAD_TOOL_RECORDS = [
    (_with(lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments="{city: Seoul}")),
     "message 1 tool call (get_weather) arguments is not JSON"),
    (_with(lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments="[1, 2]")),
     "arguments are list, not a JSON object"),
    (_with(lambda r: r["messages"][1]["tool_calls"][0]["function"].update(name="get_wether")),
     "message 1 calls unknown tool 'get_wether' (the record's tools: get_weather)"),
    (_with(lambda r: r["messages"].pop(1)), "message 1 is a tool result without a preceding tool call"),
    (_with(lambda r: r["messages"][1].pop("tool_calls")), "message 1 content is empty"),
    (_with(lambda r: r.update(tools="[{broken")), "tools is not JSON"),
    (_with(lambda r: r["messages"][2].update(tool_call_id="call_9") or r["messages"][1]["tool_calls"][0].update(
        id="call_1")), "message 2 answers tool_call_id 'call_9'"),
    (_with(lambda r: r["messages"].insert(3, {"role": "user", "content": "and?"})),
     "message 2 (a tool result) is followed by a user message"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "function_call", "value": "get_weather(Seoul)"}]},
     "turn 1 tool call is not JSON"),
]


@pytest.mark.parametrize("record,message", BAD_TOOL_RECORDS)
def test_bad_tool_record_names_file_line_and_problem(record, message, write_jsonl, tmp_path, tiny_model_dir, capsys):
    path = write_jsonl([WEATHER, record])
    out = tmp_path / "out"
    code, _, err = run_cli(["--task", "preprocess", "--model", tiny_model_dir, "--dataset_path", path,
                            "--output_dir", out], capsys)
    assert code == 2, err
    assert f"{path}:2: " in err and message in err and "--skip_invalid" in err
    assert err.count("\n") == 1


def test_skip_invalid_keeps_tool_records_and_drops_broken_ones(write_jsonl):
    path = write_jsonl([WEATHER, SHAREGPT, REASONING] + [r for r, _ in BAD_TOOL_RECORDS])
    loaded = data.load_conversations(path, skip_invalid=True)
    assert len(loaded.conversations) == 3
    assert sum(loaded.skipped.values()) == len(BAD_TOOL_RECORDS)


# ---------------------------------------------------------------- steps 2-3: rendering and labels

def _conv(record):
    return data.parse_records([("r", record)]).conversations[0]


def _call(name, arguments, call_id=None):
    call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return {**call, "id": call_id} if call_id else call


CALC_TOOLS = TOOLS + [{"type": "function", "function": {
    "name": "calculator", "description": "Evaluate arithmetic",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}}}}]
AGENT_CONVERSATIONS = {
    "weather": WEATHER,
    "multi_turn_with_ids": {"messages": [
        {"role": "system", "content": "You are Lumi."},
        {"role": "user", "content": "서울 날씨 어때?"},
        {"role": "assistant", "content": "확인해 볼게요.", "tool_calls": [_call("get_weather", {"city": "서울"}, "call0001")]},
        {"role": "tool", "content": "{\"temp\": 3}", "tool_call_id": "call0001", "name": "get_weather"},
        {"role": "assistant", "content": "서울은 3도예요."},
        {"role": "user", "content": "What is 6 * 7?"},
        {"role": "assistant", "content": "", "tool_calls": [_call("calculator", {"expression": "6 * 7"})]},
        {"role": "tool", "content": "{\"result\": 42}"},
        {"role": "assistant", "content": "6 * 7 = 42."}], "tools": CALC_TOOLS},
    "parallel_calls": {"messages": [
        {"role": "user", "content": "Weather in Seoul and Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", {"city": "Seoul"}),
                                                            _call("get_weather", {"city": "Paris"})]},
        {"role": "tool", "content": "{\"temp\": 3}"}, {"role": "tool", "content": "{\"temp\": 11}"},
        {"role": "assistant", "content": "Seoul 3, Paris 11."}], "tools": TOOLS},
    "reasoning_and_call": {"messages": [
        {"role": "user", "content": "What is 6 * 7?"},
        {"role": "assistant", "content": "", "reasoning_content": "Use the calculator.",
         "tool_calls": [_call("calculator", {"expression": "6 * 7"})]},
        {"role": "tool", "content": "{\"result\": 42}"},
        {"role": "assistant", "content": "It is 42.", "reasoning_content": "The tool said 42."}], "tools": CALC_TOOLS},
    "calls_without_tool_list": {"messages": [
        {"role": "user", "content": "What is 6 * 7?"},
        {"role": "assistant", "content": "", "tool_calls": [_call("calculator", {"expression": "6 * 7"})]},
        {"role": "tool", "content": "{\"result\": 42}"}, {"role": "assistant", "content": "42."}]},
    "reasoning_only": REASONING,
    "reasoning_history": {"messages": [   # Qwen 3 style templates drop the first turn's reasoning
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hello! How are you?", "reasoning_content": "A greeting."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four.", "reasoning_content": "Two and two make four."}]},
}
NATIVE = ("llama31", "qwen25", "qwen3")    # tool calls through the template's own tool support
FALLBACK = ("chatml", "gemma", "mistral")


@pytest.fixture(scope="module", params=NATIVE + FALLBACK)
def tool_family(request):
    from tiny import build_tokenizer
    return request.param, build_tokenizer(request.param), build_tokenizer(request.param, with_generation_tags=True)


def _oracle(tagged, plain, conv, **template_variables):
    """transformers' own mask on the tagged twin, fed exactly what our template inputs are."""
    messages, tools = chat.template_inputs(plain, conv)
    return tagged.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True, **template_variables)


def _skip_unsupported(name, key):
    if name == "llama31" and key == "parallel_calls":
        pytest.skip("the Llama 3.1 template allows one call per turn")
    if name == "mistral" and any(m["role"] == "system" for m in AGENT_CONVERSATIONS[key]["messages"]):
        pytest.skip("the Mistral template has no system role")


@pytest.mark.parametrize("key", sorted(AGENT_CONVERSATIONS))
def test_agent_mask_equals_transformers_generation_mask(tool_family, key):
    name, plain, tagged = tool_family
    _skip_unsupported(name, key)
    conv = _conv(AGENT_CONVERSATIONS[key])
    oracle = _oracle(tagged, plain, conv)
    ours = chat.encode_conversation(plain, conv)
    assert ours.input_ids == oracle["input_ids"]
    assert ours.assistant_mask == list(oracle["assistant_masks"])
    trained = plain.decode([t for t, m in zip(ours.input_ids, ours.assistant_mask) if m])
    for m in conv:   # tool results and the tool list are never trained; every call is
        if m["role"] == "tool":
            assert m["content"] not in trained
        for call in m.get("tool_calls", []):
            assert call["function"]["name"] in trained
    assert "Evaluate arithmetic" not in trained and "Current weather of a city" not in trained


@pytest.mark.parametrize("key", ["reasoning_and_call", "reasoning_only", "reasoning_history"])
def test_train_reasoning_false_leaves_exactly_the_reasoning_untrained(tool_family, key):
    name, plain, tagged = tool_family
    _skip_unsupported(name, key)
    conv = _conv(AGENT_CONVERSATIONS[key])
    ours = chat.encode_conversation(plain, conv, train_reasoning=False)
    if tool_format.rendering_for(plain).reasoning_key:
        # the template's own reasoning: its twin leaves the reasoning text outside the generation tags
        oracle = _oracle(tagged, plain, conv, reasoning_untrained=True)
        assert ours.input_ids == oracle["input_ids"]
        assert ours.assistant_mask == list(oracle["assistant_masks"])
        assert sum(ours.assistant_mask) < sum(_oracle(tagged, plain, conv)["assistant_masks"])
        return
    oracle = _oracle(tagged, plain, conv)
    offsets = plain(ours.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    blocks = []   # each <think> block with the blank lines after it
    for m in conv:
        if "reasoning_content" in m:
            block = f"<think>\n{m['reasoning_content']}\n</think>"
            if block in ours.text:   # Llama 3.1 drops a calling turn's content, reasoning included
                start = ours.text.index(block)
                end = start + len(block)
                while ours.text[end] == "\n":
                    end += 1
                blocks.append((start, end))
    assert blocks
    expected = [0 if any(a <= s and e <= b for a, b in blocks) else m
                for (s, e), m in zip(offsets, oracle["assistant_masks"])]
    assert ours.input_ids == oracle["input_ids"]
    assert ours.assistant_mask == expected
    assert sum(expected) < sum(oracle["assistant_masks"])


def test_rendering_choice_is_detected_and_explained():
    from tiny import build_tokenizer

    for name in NATIVE:
        rendering = tool_format.rendering_for(build_tokenizer(name))
        assert rendering.native_tool_calls and rendering.native_tool_list, name
        assert rendering.reasoning_key == ("reasoning_content" if name == "qwen3" else None)
        assert "tool calls: the model's own template" in rendering.describe()
    chatml = tool_format.rendering_for(build_tokenizer("chatml"))
    assert not chatml.native_tool_calls and chatml.tool_role and chatml.system_role
    assert "lacks the call's name/arguments" in chatml.describe()
    mistral = tool_format.rendering_for(build_tokenizer("mistral"))
    assert not mistral.tool_role and not mistral.system_role and "rejects role 'tool'" in mistral.describe()


def test_fallback_renders_the_documented_layout():
    from tiny import build_tokenizer

    tok = build_tokenizer("chatml")
    text = chat.render(tok, _conv(AGENT_CONVERSATIONS["reasoning_and_call"]))
    assert '<|im_start|>system\nYou can call the tools below.' in text and '"name": "calculator"' in text
    assert ('<|im_start|>assistant\n<think>\nUse the calculator.\n</think>\n\n'
            '<tool_call>{"name": "calculator", "arguments": {"expression": "6 * 7"}}</tool_call><|im_end|>') in text
    assert "<|im_start|>tool\n{\"result\": 42}<|im_end|>" in text
    # a prompt for generation keeps the tool list (it rides on the first message)
    prompt = chat.render(tok, _conv(AGENT_CONVERSATIONS["reasoning_and_call"])[:1], add_generation_prompt=True)
    assert "<tools>" in prompt and prompt.endswith("<|im_start|>assistant\n")


def test_plain_conversations_render_exactly_as_before():
    from tiny import build_tokenizer

    tok = build_tokenizer("qwen25")
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert chat.render(tok, conv) == tok.apply_chat_template(conv, tokenize=False)


# ---------------------------------------------------------------- preprocess end to end

@pytest.fixture(scope="module")
def tool_model_dirs(tmp_path_factory, tiny_model_dir):
    from tiny import save_tiny_checkpoint
    folders = {name: save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / name, family=name)
               for name in ("qwen25", "qwen3")}
    return {"chatml": tiny_model_dir, **folders}


# ---------------------------------------------------------------- train end to end

@pytest.mark.parametrize("model", ["chatml", "qwen25", "qwen3"])
def test_train_on_agent_data_end_to_end(model, tool_model_dirs, write_jsonl, tmp_path, capsys):
    """OpenAI, ShareGPT and reasoning records train (packed, self-checked) on the fallback and on
    tool-capable templates, and the held-out valid-call rate is reported."""
    records = [WEATHER, SHAREGPT, AGENT_CONVERSATIONS["reasoning_and_call"]] * 4
    out = tmp_path / "run"
    code, _, err = run_cli(["--task", "train", "--model", tool_model_dirs[model], "--dataset_path", write_jsonl(records),
                            "--eval_path", write_jsonl(records[:3], name="eval.jsonl"), "--output_dir", out,
                            "--max_steps", "2", "--batch_size", "2", "--eval_answers", "3", "--max_length", "1024",
                            "--dtype", "float32", "--lora_r", "4"], capsys)
    assert code == 0, err
    metrics = json.loads((out / "final_model" / "metrics.json").read_text())
    assert metrics["global_steps"] == 2 and metrics["batches"]["packed"]
    assert 0.0 <= metrics["tool_call_rate_before"] <= 1.0 and 0.0 <= metrics["tool_call_rate_after"] <= 1.0


def _trained_text(example, tokenizer):
    return "".join(tokenizer.decode(run) for run in chat.trained_spans(example["labels"]))


@pytest.mark.parametrize("model,calls,reasoning", [("chatml", "fallback <tool_call>", "fallback <think>"),
                                                   ("qwen25", "the model's own template", "fallback <think>"),
                                                   ("qwen3", "the model's own template", "the model's own template")])
@pytest.mark.parametrize("train_reasoning", ["true", "false"])
def test_preprocess_agent_data_end_to_end(model, calls, reasoning, train_reasoning, tool_model_dirs,
                                          sample_conversations, write_jsonl, tmp_path, capsys, caplog):
    from transformers import AutoTokenizer

    from fine_tuning_llms import data_preprocessing

    caplog.set_level("INFO")
    folder = tool_model_dirs[model]
    records = [WEATHER, SHAREGPT, AGENT_CONVERSATIONS["reasoning_and_call"]] + sample_conversations
    out = tmp_path / "out"
    code, _, err = run_cli(["--task", "preprocess", "--model", folder, "--dataset_path", write_jsonl(records),
                            "--output_dir", out, "--eval_ratio", "0", "--max_length", "1024",
                            "--train_reasoning", train_reasoning], capsys)
    assert code == 0, err
    assert "3 conversation(s) with tool calls, tool results or reasoning" in caplog.text
    assert f"tool calls: {calls}" in caplog.text and f"reasoning: {reasoning}" in caplog.text
    saved = json.loads((out / "processed_conversations.json").read_text())
    summary, examples = saved["summary"], saved["examples"]
    assert summary["examples_kept"] == len(records) and summary["agent_conversations"] == 3
    assert summary["train_reasoning"] is (train_reasoning == "true")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    weather = _trained_text(examples[0], tokenizer)
    assert "get_weather" in weather and "Seoul" in weather and "It is 3 degrees in Seoul." in weather
    assert "temp" not in weather and "Current weather of a city" not in weather
    assert examples[1]["labels"] == examples[0]["labels"]   # ShareGPT's function_call/observation: the same
    reasoning = _trained_text(examples[2], tokenizer)
    assert ("Use the calculator." in reasoning) is (train_reasoning == "true")
    assert "calculator" in reasoning and "It is 42." in reasoning
    assert "Tool-call rendering" in data_preprocessing.report_section(out)


# ---------------------------------------------------------------- calls in generated text

@pytest.mark.parametrize("text,expected", [
    ('<tool_call>{"name": "calculator", "arguments": {"expression": "6 * 7"}}</tool_call>',
     [("calculator", {"expression": "6 * 7"}, True)]),
    ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "서울"}}\n</tool_call>\n'
     '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}</tool_call>',
     [("get_weather", {"city": "서울"}, True), ("get_weather", {"city": "Paris"}, True)]),
    ('{"name": "get_weather", "parameters": {"city": "Seoul"}}', [("get_weather", {"city": "Seoul"}, True)]),
    ('<tool_call>{"name": "calculator", "arguments": {"expression": </tool_call>', [(None, None, False)]),
    ('<tool_call>{"arguments": {}}</tool_call>', [(None, {}, False)]),
    ("It is 3 degrees in Seoul.", []),
])
def test_parse_tool_calls_from_generated_text(text, expected):
    calls = tool_format.parse_tool_calls(text)
    assert [(c["name"], c["arguments"], c["valid"]) for c in calls] == expected
    assert all((c["error"] is None) == c["valid"] for c in calls)


# ---------------------------------------------------------------- the tool-use sample set

TOOL_TRAIN, TOOL_EVAL = "tool_use_conversations.jsonl", "tool_use_conversations_eval.jsonl"


def _load_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "make_tool_dataset.py"
    spec = importlib.util.spec_from_file_location("make_tool_dataset", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tool_sample_set_is_reproducible_valid_and_held_out(tmp_path):
    import re

    script = _load_script()
    fresh = script.write_tool_dataset(tmp_path, seed=0)
    assert fresh["train"].read_bytes() == data.sample_dataset_path(TOOL_TRAIN).read_bytes()
    assert fresh["held-out"].read_bytes() == data.sample_dataset_path(TOOL_EVAL).read_bytes()
    train = data.load_conversations(data.sample_dataset_path(TOOL_TRAIN)).conversations
    held_out = data.load_conversations(data.sample_dataset_path(TOOL_EVAL)).conversations
    assert (len(train), len(held_out)) == (script.TRAIN_SIZE, script.EVAL_SIZE)
    asks = [{c[0]["content"] for c in split} for split in (train, held_out)]
    assert not asks[0] & asks[1], "no held-out prompt is in the train split"
    for split in (train, held_out):
        assert any(re.search("[가-힣]", c[0]["content"]) for c in split)
        assert any(not re.search("[가-힣]", c[0]["content"]) for c in split)
        assert {m["tool_calls"][0]["function"]["name"] for c in split for m in c if "tool_calls" in m} == {
            "calculator", "convert_units"}
        assert any(len(c) == 2 for c in split), "some prompts need no tool"
    for conv in train + held_out:
        if len(conv) == 2:
            continue
        call = conv[1]["tool_calls"][0]["function"]
        result = json.loads(conv[2]["content"])["result"]
        if call["name"] == "calculator":
            a, op, b = call["arguments"]["expression"].split()
            a, b = int(a), int(b)
            assert result == {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
            assert op != "/" or a % b == 0, "divisions come out whole"
        else:
            args = call["arguments"]
            assert result == pytest.approx(script.convert(args["value"], args["from_unit"], args["to_unit"]), abs=0.006)
        assert script.number(result) in conv[3]["content"]


def test_sample_calls_round_trip_through_the_fallback_text_and_the_parser():
    train = data.load_conversations(data.sample_dataset_path(TOOL_TRAIN)).conversations
    for conv in train:
        for m in conv:
            for call in m.get("tool_calls", []):
                parsed = tool_format.parse_tool_calls(tool_format.call_text(call))
                assert parsed == [{"name": call["function"]["name"], "arguments": call["function"]["arguments"],
                                   "valid": True, "error": None}]


@pytest.mark.embedded
def test_embedded_model_trains_calls_and_answers_never_results_or_tools():
    from fine_tuning_llms.engine.config import ModelConfig
    from fine_tuning_llms.engine.models import load_tokenizer

    tok = load_tokenizer(ModelConfig())
    assert not tool_format.rendering_for(tok).native_tool_calls   # SmolLM2's plain ChatML: the fallback
    im_start, im_end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    convs = data.load_conversations(data.sample_dataset_path(TOOL_TRAIN)).conversations[:60]
    for conv, enc in zip(convs, chat.encode_many(tok, convs)):
        runs = chat.trained_spans(enc.labels)
        replies = [m for m in conv if m["role"] == "assistant"]
        assert len(runs) == len(replies)
        for run, reply in zip(runs, replies):
            assert run[-1] == im_end and im_start not in run
            expected = "\n".join(tool_format.call_text(c) for c in reply.get("tool_calls", [])) or reply["content"]
            assert tok.decode(run[:-1]) == expected


@pytest.mark.parametrize("text,grade", [
    ('<tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}</tool_call>', (True, True, True)),
    ('<tool_call>{"name": "calculator", "arguments": {"expression": "6 * 8"}}</tool_call>', (True, True, False)),
    ('<tool_call>{"name": "convert_units", "arguments": {"expression": "6 * 7"}}</tool_call>', (True, False, False)),
    ('<tool_call>{"name": "calculator", "arguments": {"expression": </tool_call>', (False, False, False)),
    ("6 * 7 = 42.", (False, False, False)),
])
def test_grade_call_against_the_expected_call(text, grade):
    expected = _call("calculator", {"expression": "6 * 7"})
    result = tool_format.grade_call(text, expected)
    assert (result["valid"], result["right_tool"], result["right_arguments"]) == grade
    numbers = tool_format.grade_call('{"name": "convert_units", "parameters": {"value": 4.0, "from_unit": "m", '
                                     '"to_unit": "ft"}}', {"name": "convert_units", "arguments": {
                                         "value": 4, "from_unit": "m", "to_unit": "ft"}})
    assert numbers["right_arguments"]

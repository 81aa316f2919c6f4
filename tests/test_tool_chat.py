"""Issue 24, the acting half: the sample tools, the valid-call metric, chat's tool loop, compare's call column.

A tiny random model never writes a valid call, so the loop is tested with generation scripted
(monkeypatched) to return call text: the tool must run, its result come back as a tool turn in
the next prompt, and the final answer be generated from it.
"""
from __future__ import annotations

import ast
import builtins
import io
import json
from pathlib import Path

import pytest

from fine_tuning_llms.engine import sample_tools, tool_use
from fine_tuning_llms.engine.sample_tools import SAMPLE_TOOLS, ToolError, calculate, run_tool

DATA = Path(sample_tools.__file__).resolve().parents[1] / "data"


def sample_records(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------- the sample tools

def test_run_tool_reproduces_every_tool_result_of_the_sample_set():
    checked = 0
    for name in ("tool_use_conversations.jsonl", "tool_use_conversations_eval.jsonl"):
        for record in sample_records(name):
            assert record["tools"] == SAMPLE_TOOLS
            messages = record["messages"]
            for i, message in enumerate(messages):
                if message["role"] == "tool":
                    call = messages[i - 1]["tool_calls"][0]["function"]
                    assert run_tool(call["name"], call["arguments"]) == message["content"], call
                    checked += 1
    assert checked > 150


def test_calculator_walks_the_tree_and_never_evals(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("eval/exec called")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    assert calculate("12 * 7") == 84
    assert calculate("(1 + 2) * -3") == -9
    assert calculate("693 / 11") == 63 and isinstance(calculate("693 / 11"), int)
    assert calculate("1 / 8") == 0.125
    assert calculate("2.5 × 4 ÷ 5") == 2
    assert run_tool("calculator", '{"expression": "93 + 4"}') == '{"result": 97}'
    # And the module's source calls none of eval/exec/compile/__import__.
    tree = ast.parse(Path(sample_tools.__file__).read_text(encoding="utf-8"))
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not called & {"eval", "exec", "compile", "__import__"}


@pytest.mark.parametrize("expression, message", [
    ("__import__('os').system('echo hi')", "is not allowed"),
    ("2 ** 1000", "is not allowed"),
    ("x + 1", "'x' is not allowed"),
    ("(lambda: 1)()", "is not allowed"),
    ("'a' * 3", "is not allowed"),
    ("True + 1", "is not allowed"),
    ("1 / 0", "division by zero"),
    ("1 +", "is not an arithmetic expression"),
    ("9" * 17 + " * 2", "exceeds"),
    ("1 + " * 60 + "1", "longer than"),
    ("", "non-empty string"),
])
def test_calculator_rejects_bad_input_with_one_line(expression, message):
    with pytest.raises(ToolError, match=message) as caught:
        run_tool("calculator", {"expression": expression})
    assert "\n" not in str(caught.value)


def test_unit_converter_and_argument_errors():
    assert json.loads(run_tool("convert_units", {"value": 4, "from_unit": "m", "to_unit": "ft"})) == \
        {"result": 13.12, "unit": "ft"}
    assert json.loads(run_tool("convert_units", {"value": 100, "from_unit": "celsius", "to_unit": "F"})) == \
        {"result": 212.0, "unit": "F"}
    assert json.loads(run_tool("convert_units", {"value": "2", "from_unit": "km", "to_unit": "m"})) == \
        {"result": 2000.0, "unit": "m"}
    assert json.loads(run_tool("convert_units", {"value": 1, "from_unit": "miles", "to_unit": "feet"}))["result"] == 5280.0
    for name, arguments, message in [
            ("convert_units", {"value": 1, "from_unit": "kg", "to_unit": "km"}, r"cannot convert kg \(mass\) to km"),
            ("convert_units", {"value": 1, "from_unit": "parsec", "to_unit": "km"}, "unknown unit 'parsec'"),
            ("convert_units", {"value": "ten", "from_unit": "kg", "to_unit": "lb"}, "not a number"),
            ("convert_units", {"value": 1, "from_unit": "kg"}, "missing to_unit"),
            ("calculator", {"expression": "1", "precision": 2}, "unexpected precision"),
            ("calculator", "not json", "not JSON"),
            ("get_weather", {"city": "Seoul"}, "unknown tool 'get_weather'")]:
        with pytest.raises(ToolError, match=message) as caught:
            run_tool(name, arguments)
        assert "\n" not in str(caught.value)
    assert sample_tools.tools_for("none") is None and sample_tools.tools_for("sample") == SAMPLE_TOOLS


# ---------------------------------------------------------------- the valid-call metric

def _call(name, arguments):
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def test_tool_call_rate_on_hand_made_answers():
    records = sample_records("tool_use_conversations_eval.jsonl")
    conversations = [[{**r["messages"][0], "tools": r["tools"]}, *r["messages"][1:]] for r in records]
    pairs = tool_use.tool_call_prompts(conversations, limit=5)
    assert len(pairs) == 5
    for prompt, expected in pairs:  # the prompt stops right before the call; the tools ride along
        assert prompt[-1]["role"] == "user" and prompt[0]["tools"] == SAMPLE_TOOLS
        assert set(expected) == {"name", "arguments"}
    (_, first), (_, second) = pairs[0], pairs[1]
    wrong_tool = "convert_units" if first["name"] == "calculator" else "calculator"
    answers = [_call(first["name"], first["arguments"]),                        # valid
               json.dumps({"name": second["name"], "parameters": second["arguments"]}),  # valid, Llama layout
               _call(wrong_tool, pairs[2][1]["arguments"]),                    # parses, wrong tool
               '<tool_call>{"name": "calculator", "arguments": </tool_call>',  # not JSON
               "I think the answer is 42."]                                     # no call
    assert tool_use.tool_call_rate(pairs, answers) == pytest.approx(2 / 5)
    grades = tool_use.tool_call_grades(pairs, answers)
    assert grades == {"prompts": 5, "parses": pytest.approx(3 / 5), "right_tool": pytest.approx(2 / 5),
                      "valid_call": pytest.approx(2 / 5)}
    wrong_args = {**pairs[0][1]["arguments"]}
    key = next(iter(wrong_args))
    wrong_args[key] = "999 + 1" if isinstance(wrong_args[key], str) else 999
    assert tool_use.tool_call_rate(pairs[:1], [_call(first["name"], wrong_args)]) == 0.0
    # No calls in the data (or nothing generated): no rate, not 0.
    plain = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]]
    assert tool_use.tool_call_prompts(plain) == []
    assert tool_use.tool_call_rate(tool_use.tool_call_prompts(plain), []) is None
    with pytest.raises(ValueError, match="2 answers for 5"):
        tool_use.tool_call_rate(pairs, answers[:2])


def test_describe_calls_and_assistant_message_from_a_reply():
    assert tool_use.describe_calls("Paris.") == tool_use.NO_CALL
    text = 'Let me check.\n' + _call("calculator", {"expression": "6 * 7"})
    assert tool_use.describe_calls(text) == 'calculator {"expression": "6 * 7"}'
    assert tool_use.describe_calls("<tool_call>{oops</tool_call>").startswith("invalid call (not JSON")
    message, invalid = tool_use.assistant_with_calls(text, round_index=1)
    assert invalid == [] and message["content"] == "Let me check."
    assert message["tool_calls"] == [{"type": "function", "id": "call00100",
                                      "function": {"name": "calculator", "arguments": {"expression": "6 * 7"}}}]
    message, invalid = tool_use.assistant_with_calls("<tool_call>{oops</tool_call>")
    assert "tool_calls" not in message and len(invalid) == 1


# ---------------------------------------------------------------- chat: the tool loop

CALC_CALL = _call("calculator", {"expression": "12 * 7"})


class ScriptedGeneration:
    """Stands in for generate_batch: answers each prompt with the next scripted text, keeps the prompts."""

    def __init__(self, texts):
        self.texts, self.prompts = list(texts), []

    def __call__(self, model, tokenizer, prompts_ids, **kwargs):
        from fine_tuning_llms.engine.generation import GenerationResult

        results = []
        for prompt in prompts_ids:
            self.prompts.append(list(prompt))
            results.append(GenerationResult(prompt_ids=list(prompt), new_token_ids=[0], text=self.texts.pop(0),
                                            n_new_tokens=1, stopped_on_eot=True, seconds=0.01, tokens_per_s=100.0))
        return results


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from tiny import save_tiny_checkpoint
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "qwen25", family="qwen25")


@pytest.fixture(params=["chatml", "qwen25"])
def chat_model(request, tiny_model_dir):
    """ChatML: the fallback rendering (tools in the system prompt); Qwen 2.5 style: the template's own."""
    return tiny_model_dir if request.param == "chatml" else request.getfixturevalue("qwen_dir")


def test_one_shot_tool_loop_runs_the_call_and_feeds_the_result_back(chat_model, tmp_path, capsys, monkeypatch):
    from transformers import AutoTokenizer

    from fine_tuning_llms import chat_cli
    from fine_tuning_llms.cli import main
    from fine_tuning_llms.engine.chat_format import generation_prompt_ids, render

    script = ScriptedGeneration([CALC_CALL, "12 * 7 = 84."])
    monkeypatch.setattr(chat_cli, "generate_batch", script)
    rc = main(["--task", "chat", "--model", str(chat_model), "--tools", "sample", "--prompt", "What is 12 * 7?",
               "--output_dir", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ['assistant> tool call: calculator {"expression": "12 * 7"}',
                   'tool> calculator: {"result": 84}', "12 * 7 = 84."]
    # Prompt 1: the question with the tool list; prompt 2: + the call and its result as a tool turn.
    tok = AutoTokenizer.from_pretrained(chat_model)
    user = {"role": "user", "content": "What is 12 * 7?", "tools": SAMPLE_TOOLS}
    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "id": "call00000", "function": {
        "name": "calculator", "arguments": {"expression": "12 * 7"}}}]}
    result = {"role": "tool", "content": '{"result": 84}', "tool_call_id": "call00000", "name": "calculator"}
    assert script.prompts == [generation_prompt_ids(tok, [user]), generation_prompt_ids(tok, [user, call, result])]
    second = render(tok, [user, call, result], add_generation_prompt=True)
    assert "convert_units" in second and '"expression": "12 * 7"' in second and '{"result": 84}' in second
    assert second.index('"expression": "12 * 7"') < second.index('{"result": 84}')
    assert script.texts == []  # the final answer was generated


def test_interactive_tool_loop_keeps_history_and_reports_tool_errors(tiny_model_dir, monkeypatch):
    from fine_tuning_llms import chat_cli
    from fine_tuning_llms.engine.config import Config

    script = ScriptedGeneration([CALC_CALL, "84.", "Hello!",
                                 _call("convert_units", {"value": 4, "from_unit": "m", "to_unit": "parsec"}),
                                 "Sorry, I cannot convert to parsecs."])
    monkeypatch.setattr(chat_cli, "generate_batch", script)
    cfg = Config()
    cfg.model.model, cfg.compare.tools = str(tiny_model_dir), "sample"
    stdout = io.StringIO()
    result = chat_cli.run(cfg, stdin=io.StringIO("What is 12 * 7?\nHi\nHow far is 4 m in parsecs?\nexit\n"),
                          stdout=stdout)
    messages = result["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant", "user", "assistant",
                                             "user", "assistant", "tool", "assistant"]
    assert messages[0]["tools"] == SAMPLE_TOOLS and all("tools" not in m for m in messages[1:])
    assert messages[2]["content"] == '{"result": 84}' and messages[3]["content"] == "84."
    assert "tool_calls" not in messages[5]   # a plain reply needs no tool round
    error = json.loads(messages[8]["content"])["error"]
    assert error.startswith("unknown unit 'parsec'")
    printed = stdout.getvalue()
    assert f"tool> convert_units: {messages[8]['content']}" in printed
    assert printed.count("assistant> ") == 5   # 2 tool calls + 3 answers
    assert "assistant> Sorry, I cannot convert to parsecs." in printed
    assert len(script.prompts) == 5 and script.texts == []


def test_tool_rounds_are_limited_and_invalid_calls_are_shown_not_run(tiny_model_dir, monkeypatch):
    from fine_tuning_llms import chat_cli
    from fine_tuning_llms.engine.config import Config

    cfg = Config()
    cfg.model.model, cfg.compare.tools, cfg.compare.prompt = str(tiny_model_dir), "sample", "Loop forever"
    script = ScriptedGeneration([CALC_CALL] * (chat_cli.TOOL_ROUNDS + 1))
    monkeypatch.setattr(chat_cli, "generate_batch", script)
    stdout = io.StringIO()
    result = chat_cli.run(cfg, stdout=stdout)
    assert len(script.prompts) == chat_cli.TOOL_ROUNDS + 1 and result["tool_calls"] == chat_cli.TOOL_ROUNDS
    assert result["messages"][-1] == {"role": "assistant", "content": CALC_CALL}
    assert f"after {chat_cli.TOOL_ROUNDS} rounds" in stdout.getvalue()

    script = ScriptedGeneration(['<tool_call>{"name": "calculator", "arguments": </tool_call>'])
    monkeypatch.setattr(chat_cli, "generate_batch", script)
    stdout = io.StringIO()
    result = chat_cli.run(cfg, stdout=stdout)
    assert result["tool_calls"] == 0 and [m["role"] for m in result["messages"]] == ["user", "assistant"]
    assert "assistant> invalid call (not JSON" in stdout.getvalue() and "not run" in stdout.getvalue()


# ---------------------------------------------------------------- compare: the tool_call column

def test_compare_with_tools_adds_the_parsed_call_column(tiny_model_dir, tmp_path, monkeypatch):
    import csv

    from transformers import AutoTokenizer

    from fine_tuning_llms import model_comparison as mc
    from fine_tuning_llms.engine.chat_format import generation_prompt_ids
    from fine_tuning_llms.engine.config import Config
    from fine_tuning_llms.engine.tool_format import tools_prompt

    questions = tmp_path / "questions.txt"
    questions.write_text("What is 12 * 7?\nHow many feet is 4 metres?\nHello!\n", encoding="utf-8")
    cfg = Config()
    cfg.run.output_dir, cfg.model.model = str(tmp_path / "out"), str(tiny_model_dir)
    cfg.compare.questions, cfg.compare.max_new_tokens = str(questions), 4

    def read(path):
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            return reader.fieldnames, list(reader)

    mc.run(cfg)  # without --tools: the columns stay exactly as they were
    columns, plain_rows = read(tmp_path / "out" / mc.CSV_NAME)
    assert columns == mc.CSV_COLUMNS

    answers = {"What is 12 * 7?": CALC_CALL, "How many feet is 4 metres?": '<tool_call>{"name": "convert_units", '
               '"arguments": </tool_call>', "Hello!": "Hello there."}
    real = mc.generate_batch

    def scripted(model, tokenizer, prompts_ids, **kwargs):  # real generation, then scripted texts
        results = real(model, tokenizer, prompts_ids, **kwargs)
        for result in results:
            prompt = tokenizer.decode(result.prompt_ids)
            result.text = next(text for q, text in answers.items() if q in prompt)
        return results

    monkeypatch.setattr(mc, "generate_batch", scripted)
    cfg.compare.tools = "sample"
    result = mc.run(cfg)
    columns, rows = read(tmp_path / "out" / mc.CSV_NAME)
    assert columns == mc.CSV_COLUMNS + ["tool_call"]
    assert [r["role"] for r in rows] == [r["role"] for r in plain_rows] == ["instruct-raw-text"] * 3 + ["instruct"] * 3
    assert [r["tool_call"] for r in rows] == ['calculator {"expression": "12 * 7"}',
                                              "invalid call (not JSON (Expecting value))", "no call"] * 2
    # The prompts carry the tool list: the template's rendering for chat, the same <tools> block for raw text.
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    chat_row = rows[3]
    assert chat_row["prompt"] == tok.decode(generation_prompt_ids(tok, [
        {"role": "user", "content": "What is 12 * 7?", "tools": SAMPLE_TOOLS}]))
    assert "convert_units" in chat_row["prompt"]
    assert rows[0]["prompt"].startswith(tools_prompt(SAMPLE_TOOLS)) and rows[0]["prompt"].endswith(
        mc.PLAIN_PROMPT.format(question="What is 12 * 7?"))
    assert {m["role"]: m["tool_calls"] for m in result["models"]} == {"instruct-raw-text": 1, "instruct": 1}
    summary = json.loads((tmp_path / "out" / mc.SUMMARY_NAME).read_text(encoding="utf-8"))
    assert summary["settings"]["tools"] == ["calculator", "convert_units"]
    assert summary["answers"][0]["tool_calls"]["instruct"] == 'calculator {"expression": "12 * 7"}'
    html = mc.report_section(tmp_path / "out")
    assert "tool call: calculator" in html and "도구 호출" in html

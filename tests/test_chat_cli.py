"""--task chat: one-shot through the CLI, the interactive loop, and one embedded-model answer."""
from __future__ import annotations

import io

import pytest
import torch

from fine_tuning_llms import chat_cli
from fine_tuning_llms.cli import main
from fine_tuning_llms.engine.config import Config


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    folder = tmp_path_factory.mktemp("chat") / "final_model"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def expected_answer(model_dir, adapter, messages, max_new_tokens):
    """Independent greedy answer: plain generate on the templated prompt, cut at eos."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(adapter))
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    if tok.eos_token_id in out:
        out = out[: out.index(tok.eos_token_id) + 1]
    return tok.decode(out, skip_special_tokens=True).strip()


def test_one_shot_through_cli(tiny_model_dir, adapter_dir, tmp_path, capsys):
    rc = main(["--task", "chat", "--model", str(tiny_model_dir), "--adapter", str(adapter_dir), "--prompt", "Hello!",
               "--max_new_tokens", "6", "--output_dir", str(tmp_path)])
    assert rc == 0
    want = expected_answer(tiny_model_dir, adapter_dir, [{"role": "user", "content": "Hello!"}], 6)
    assert want and want in capsys.readouterr().out.splitlines()


def test_not_an_adapter_exits_2(tiny_model_dir, tmp_path, capsys):
    rc = main(["--task", "chat", "--model", str(tiny_model_dir), "--adapter", str(tiny_model_dir), "--prompt", "Hi",
               "--output_dir", str(tmp_path)])
    assert rc == 2
    assert "full model, not an adapter" in capsys.readouterr().err


def test_interactive_loop_keeps_history_and_stops_at_exit(tiny_model_dir, adapter_dir):
    cfg = Config()
    cfg.model.model, cfg.compare.adapter, cfg.compare.max_new_tokens = str(tiny_model_dir), str(adapter_dir), 4
    stdin, stdout = io.StringIO("Hello!\n\nWhat is two plus two?\nexit\nnever read\n"), io.StringIO()
    result = chat_cli.run(cfg, stdin=stdin, stdout=stdout)
    assert result["turns"] == 2
    messages = result["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    # The second answer was generated with the first exchange in its prompt.
    assert messages[3]["content"] == expected_answer(tiny_model_dir, adapter_dir, messages[:3], 4)
    printed = [line for line in stdout.getvalue().splitlines() if line.startswith("assistant> ")]
    assert len(printed) == 2


@pytest.mark.embedded
def test_embedded_one_shot(tmp_path):
    cfg = Config()
    cfg.compare.prompt, cfg.compare.max_new_tokens = "What is the capital of France?", 16
    out = io.StringIO()
    result = chat_cli.run(cfg, stdout=out)
    assert "Paris" in result["answer"] and result["stopped_on_eot"]
    assert out.getvalue().strip() == result["answer"]

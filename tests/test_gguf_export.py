"""--task export: the checks that refuse before writing, a round trip through an independent GGUF reader
(transformers), and llama.cpp itself answering like the fine-tuned model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import build_tokenizer, save_family_checkpoint

from fine_tuning_llms.cli import main
from fine_tuning_llms.engine import gguf_export
from fine_tuning_llms.engine.gguf_check import llama_cpp_available
from fine_tuning_llms.engine.gguf_converter import converter_dir
from fine_tuning_llms.engine.models import cache_root

CONVERTER_INSTALLED = converter_dir(cache_root()).is_dir()
needs_converter = pytest.mark.skipif(not CONVERTER_INSTALLED, reason="llama.cpp's converter not installed: make install")


def make_adapter(model_dir: Path, out: Path, *, tokenizer=None, random_b: bool = False) -> Path:
    """A LoRA adapter for ``model_dir`` (no training): lora_B random when asked, so merging changes the model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    if random_b:
        torch.manual_seed(0)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
    peft_model.save_pretrained(out)
    (tokenizer or AutoTokenizer.from_pretrained(model_dir)).save_pretrained(out)
    return out


def run_export(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()  # drop what the test's own set-up printed
    code = main(["--task", "export", "--verify_export", "false", *[str(a) for a in args]])
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, out: Path, *fragments: str) -> None:
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not list((out / "export").glob("*.gguf")) if (out / "export").exists() else True


# ---------------------------------------------------------------- refusals (before anything is written)

def test_export_refuses_other_families_and_other_bases(tiny_model_dir, tiny_base_dir, tmp_path, capsys):
    qwen = save_family_checkpoint(tmp_path / "qwen2", "qwen2")
    code, err = run_export(capsys, "--model", qwen, "--adapter", make_adapter(qwen, tmp_path / "qa"),
                           "--output_dir", tmp_path / "o1")
    assert_refused(code, err, tmp_path / "o1", "covers Llama", "Gemma 3", "Qwen2ForCausalLM")
    adapter = make_adapter(tiny_model_dir, tmp_path / "la")
    code, err = run_export(capsys, "--model", tiny_base_dir, "--adapter", adapter, "--output_dir", tmp_path / "o2")
    assert_refused(code, err, tmp_path / "o2", "was trained on", f"--model {tiny_model_dir}")


def test_export_refuses_missing_template_vocab_mismatch_and_full_disk(tiny_model_dir, tmp_path, capsys, monkeypatch):
    tok = build_tokenizer("chatml")
    tok.chat_template = None
    bare = make_adapter(tiny_model_dir, tmp_path / "bare", tokenizer=tok)
    code, err = run_export(capsys, "--model", tiny_model_dir, "--adapter", bare, "--output_dir", tmp_path / "o1")
    assert_refused(code, err, tmp_path / "o1", "has no chat template")

    padded = tmp_path / "padded"                     # 16 embedding rows that no token uses
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(model.config.vocab_size + 16)
    model.save_pretrained(padded)
    build_tokenizer("chatml").save_pretrained(padded)
    code, err = run_export(capsys, "--model", padded, "--adapter", make_adapter(padded, tmp_path / "pa"),
                           "--output_dir", tmp_path / "o2")
    assert_refused(code, err, tmp_path / "o2", "vocabulary has", "embedding rows")

    monkeypatch.setattr(gguf_export, "_free_bytes", lambda folder: 1000)
    monkeypatch.setattr(gguf_export, "converter_script", lambda cache: Path("convert_hf_to_gguf.py"))
    code, err = run_export(capsys, "--model", tiny_model_dir, "--adapter", make_adapter(tiny_model_dir, tmp_path / "ok"),
                           "--output_dir", tmp_path / "o3")
    assert_refused(code, err, tmp_path / "o3", "not enough disk space", "GB needed")


def test_export_without_converter_names_the_install_command(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FINE_TUNING_LLMS_CACHE", str(tmp_path / "empty-cache"))
    code, err = run_export(capsys, "--model", tiny_model_dir, "--adapter", make_adapter(tiny_model_dir, tmp_path / "a"),
                           "--output_dir", tmp_path / "o")
    assert_refused(code, err, tmp_path / "o", "GGUF converter is not installed", "make install")


# ---------------------------------------------------------------- round trip through transformers' GGUF reader

@pytest.fixture(scope="module")
def smol_shaped(tmp_path_factory):
    """A tiny random Llama with the embedded SmolLM2 tokenizer (llama.cpp's converter recognises its
    pre-tokenizer; a home-made test tokenizer it would refuse), plus an adapter with random lora_B."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fine_tuning_llms.engine.models import embedded_model_folder

    tok = AutoTokenizer.from_pretrained(embedded_model_folder())
    folder = tmp_path_factory.mktemp("smolshape") / "model"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, make_adapter(folder, folder.parent / "adapter", random_b=True)


def merged_logits(model_dir: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).merge_and_unload()
    with torch.no_grad():
        return merged.eval()(input_ids=ids).logits


@pytest.mark.embedded
@needs_converter
@pytest.mark.parametrize("gguf_type,bound", [("f32", 1e-4), ("f16", 5e-3)])
def test_round_trip_gives_the_merged_models_logits(smol_shaped, gguf_type, bound, tmp_path, capsys):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, adapter = smol_shaped
    code, err = run_export(capsys, "--model", folder, "--adapter", adapter, "--gguf_type", gguf_type,
                           "--output_dir", tmp_path)
    assert code == 0, err
    summary = json.loads((tmp_path / "export" / "export_summary.json").read_text())
    gguf = Path(summary["gguf"])
    assert gguf.name == f"model-finetuned-{gguf_type}.gguf" and gguf.stat().st_size == summary["bytes"]
    assert [p.name for p in (tmp_path / "export").iterdir() if p.name.startswith(".")] == []   # no temp left
    report = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert 'id="export"' in report and gguf.name in report and "llama-cli -m" in report

    tok = AutoTokenizer.from_pretrained(adapter)
    fields = GGUFReader(str(gguf)).fields
    template = bytes(fields["tokenizer.chat_template"].parts[-1]).decode()
    assert template == tok.chat_template                                   # llama.cpp formats chats as we did
    assert int(fields["tokenizer.ggml.eos_token_id"].parts[-1][0]) == tok.eos_token_id

    prompts = ["What is the capital of France?", "Write one sentence about the sea."]
    ids = torch.tensor([tok(p)["input_ids"][:8] for p in prompts])
    reference = merged_logits(folder, adapter, ids)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        exported = loaded(input_ids=ids).logits
    # f32: the same numbers (q/k permutations undone exactly); f16: weights rounded to 11 bits, and these
    # logits are ~0.3 in size, so a few 1e-3 is the rounding, while a wrong permutation gives ~1e-1.
    assert (exported - reference).abs().max().item() <= bound
    assert (exported - reference).abs().max().item() < (reference.abs().max().item() * 0.05)


# ---------------------------------------------------------------- llama.cpp itself

@pytest.mark.embedded
@pytest.mark.slow
@needs_converter
@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python not installed: make llama-cpp")
def test_llama_cpp_answers_like_the_fine_tuned_model(tmp_path, caplog):
    out = tmp_path / "run"
    assert main(["--task", "train", "--max_steps", "5", "--eval_answers", "0", "--output_dir", str(out),
                 "--export", "gguf", "--gguf_type", "f16"]) == 0
    check = json.loads((out / "export" / "export_summary.json").read_text())["check"]
    assert check["questions"] == 12 and check["compared"] == "whole answer"
    assert check["equal"] >= 10, [a for a in check["answers"] if not a["equal"]]
    for answer in check["answers"]:
        if answer["transformers"]["stopped"]:
            assert answer["llama_cpp"]["stopped"], answer
    assert main(["--task", "export", "--gguf_type", "q8_0", "--output_dir", str(out)]) == 0
    summary = json.loads((out / "export" / "export_summary.json").read_text())
    assert Path(summary["gguf"]).name == "smollm2-135m-instruct-finetuned-q8_0.gguf"
    assert summary["check"]["compared"] == "first 20 tokens" and summary["check"]["equal"] >= 8
    modelfile = (out / "export" / "smollm2-135m-instruct-finetuned-q8_0.Modelfile").read_text()
    assert modelfile.count('PARAMETER stop "<|im_end|>"') == 1 and "FROM ./smollm2-135m-instruct-finetuned-q8_0.gguf" in modelfile


def test_train_with_export_refuses_an_uncovered_family_before_training(tmp_path, capsys, write_jsonl,
                                                                        sample_conversations):
    qwen = save_family_checkpoint(tmp_path / "qwen2", "qwen2")
    capsys.readouterr()
    code = main(["--task", "train", "--model", str(qwen), "--dataset_path", str(write_jsonl(sample_conversations)),
                 "--output_dir", str(tmp_path / "out"), "--export", "gguf"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "covers Llama" in err
    assert not (tmp_path / "out" / "final_model").exists() and not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize("family,start,stop", [("chatml", "<|im_start|>{{ .Role }}", "<|im_end|>"),
                                               ("gemma", '<start_of_turn>{{ if eq .Role "assistant" }}model',
                                                "<end_of_turn>"),
                                               ("llama3", "<|start_header_id|>{{ .Role }}<|end_header_id|>", "<|eot_id|>")])
def test_modelfile_speaks_the_models_chat_format(family, start, stop, tmp_path):
    tok = build_tokenizer(family)
    plan = gguf_export.ExportPlan(adapter=tmp_path, source=None, architecture="LlamaForCausalLM", parameters=0,
                                  gguf_type="q8_0", target=tmp_path / f"m-{family}-q8_0.gguf", tokenizer=tok)
    text = gguf_export.write_modelfile(plan).read_text(encoding="utf-8")
    assert f"FROM ./m-{family}-q8_0.gguf" in text and start in text
    assert f'PARAMETER stop "{stop}"' in text and text.count("PARAMETER stop") == 1
    assert 'TEMPLATE """{{- range .Messages }}' in text       # no BOS of our own: llama.cpp adds it
    # The tiny ChatML template injects a default system prompt: Ollama gets the same one.
    assert ('SYSTEM """You are a tiny test assistant."""' in text) == (family == "chatml")

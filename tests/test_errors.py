"""The bad-input matrix: every mistake a user can make ends in one `error:` line naming the fix,
exit status 2, no traceback (unless --debug), and no partial file; plus the safety defaults
(safe YAML, safetensors only, no remote code, no hub token in any output).

Data-file errors (malformed JSON/JSONL, non-UTF-8, empty file, wrong schema) are covered in
test_data_preprocessing.py; this file covers settings, paths, models, YAML, disk and safety.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import time
import types
from pathlib import Path

import pytest
import torch

from fine_tuning_llms import cli
from fine_tuning_llms.cli import main, parse_config
from fine_tuning_llms.engine import checks, models
from fine_tuning_llms.engine.errors import UserError

SECRET = "hf_secret123"
QUICK_CHAT = ["--task", "chat", "--prompt", "Hello!", "--max_new_tokens", "2"]


# ---------------------------------------------------------------- helpers

def run_cli(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_clean_error(code: int, err: str, *fragments: str) -> None:
    """Exit 2, exactly one line on stderr that starts with `error: `, no traceback, each fragment in it."""
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "out"


@pytest.fixture
def data_file(write_jsonl, sample_conversations) -> Path:
    return write_jsonl(sample_conversations * 2)


def preprocess_args(model_dir, data_path, out_dir, *extra) -> list:
    args = ["--task", "preprocess", "--model", model_dir, "--dataset_path", data_path, "--output_dir", out_dir,
            "--eval_ratio", "0", *extra]
    return [str(a) for a in args]


def copy_model_files(src: Path, dst: Path, *, weights: bool = True, tokenizer: bool = True) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        is_weight = f.suffix == ".safetensors"
        is_model_cfg = f.name in ("config.json", "generation_config.json")
        if (is_weight and weights) or is_model_cfg or (tokenizer and not is_weight and not is_model_cfg):
            shutil.copy(f, dst / f.name)
    return dst


# ---------------------------------------------------------------- settings, validated up front

SETTINGS = [
    (["--lr", "0"], "--lr must be positive"),
    (["--lr=-1e-4"], "--lr must be positive"),
    (["--batch_size", "0"], "--batch_size must be positive"),
    (["--epochs", "-1"], "--epochs must be positive"),
    (["--lora_r", "0"], "--lora_r must be positive"),
    (["--load_8bit", "--load_4bit"], "--load_8bit and --load_4bit exclude each other"),
    (["--max_length", "8"], "--max_length 8 is too short"),
    (["--lora_dropout", "1"], "--lora_dropout must be in [0, 1)"),
    (["--max_steps", "0"], "--max_steps must be positive or -1"),
    (["--memory_gb", "-1"], "--memory_gb must be positive"),
    (["--memory_gb", "0"], "--memory_gb must be positive"),
]


@pytest.mark.parametrize("flags,message", SETTINGS, ids=[" ".join(f) for f, _ in SETTINGS])
def test_bad_setting_is_one_clean_line(flags, message, tiny_model_dir, data_file, out, capsys):
    code, _, err = run_cli(preprocess_args(tiny_model_dir, data_file, out, *flags), capsys)
    assert_clean_error(code, err, message)
    assert not out.exists()


def test_every_bad_setting_is_reported_at_once(tiny_model_dir, tmp_path, out, capsys):
    bad = ["--lr", "0", "--batch_size", "-2", "--epochs", "0", "--lora_r", "0", "--load_8bit", "--load_4bit",
           "--dataset_path", tmp_path / "missing.jsonl", "--eval_path", tmp_path]
    code, _, err = run_cli(["--task", "train", "--model", tiny_model_dir, "--output_dir", out, *bad], capsys)
    assert_clean_error(code, err, "--lr", "--batch_size", "--epochs", "--lora_r", "--load_8bit and --load_4bit",
                       "missing.jsonl does not exist", "is a directory")
    assert err.count(";") >= 6  # one line, problems joined
    assert not out.exists()


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_output_dir_not_writable(where, tiny_model_dir, data_file, tmp_path, capsys):
    # Tests run as root, which ignores read-only permissions: a path through a regular file fails for anyone.
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    target = blocker if where == "file" else blocker / "results"
    code, _, err = run_cli(preprocess_args(tiny_model_dir, data_file, target), capsys)
    assert_clean_error(code, err, "--output_dir", "is not writable", "choose another folder")
    assert blocker.read_text() == "keep me"


def test_dataset_path_missing_or_a_directory(tiny_model_dir, data_file, tmp_path, out, capsys):
    missing = tmp_path / "nope.jsonl"
    cases = [
        (["--dataset_path", missing], f"--dataset_path {missing} does not exist; check the path"),
        (["--dataset_path", tmp_path], f"--dataset_path {tmp_path} is a directory; pass a .json or .jsonl file"),
        (["--dataset_path", data_file, "--eval_path", missing], f"--eval_path {missing} does not exist"),
        (["--dataset_path", data_file, "--eval_path", tmp_path], f"--eval_path {tmp_path} is a directory"),
    ]
    for flags, message in cases:
        code, _, err = run_cli(["--task", "preprocess", "--model", tiny_model_dir, "--output_dir", out, *flags], capsys)
        assert_clean_error(code, err, message)
    assert not out.exists()


def test_max_length_below_template_overhead(tiny_model_dir, data_file, out, capsys):
    """Fails before anything is written, and the shared check names the overhead and the fix."""
    code, _, err = run_cli(preprocess_args(tiny_model_dir, data_file, out, "--max_length", "20"), capsys)
    assert_clean_error(code, err, "--max_length 20", "raise --max_length" if "overhead" not in err else "overhead")
    assert files_under(out) == []

    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    overhead = checks.template_overhead(tokenizer)
    # The tiny template injects a system prompt, like SmolLM2's: the probe exchange is mostly overhead.
    rendered = tokenizer.apply_chat_template(list(checks.MINIMAL_EXCHANGE), tokenize=False)
    assert overhead == len(tokenizer(rendered, add_special_tokens=False)["input_ids"]) > 20
    with pytest.raises(UserError, match=rf"--max_length 20 .* takes {overhead} tokens.*--max_length 128 or more"):
        checks.check_max_length(tokenizer, 20)
    assert checks.check_max_length(tokenizer, overhead) == overhead
    assert checks.check_max_length(tokenizer, 512) == overhead


# ---------------------------------------------------------------- --debug, argv mistakes, disk, Ctrl-C

def test_debug_shows_the_exception(tiny_model_dir, data_file, out, tmp_path, capsys):
    with pytest.raises(UserError, match="--lr must be positive"):
        main(preprocess_args(tiny_model_dir, data_file, out, "--lr", "0", "--debug"))
    config = tmp_path / "run.yaml"
    config.write_text("debug: true\n")
    with pytest.raises(UserError, match="no config.json"):
        main(preprocess_args(tmp_path, data_file, out, "--config", config))
    code, _, err = run_cli(preprocess_args(tmp_path, data_file, out, "--config", config, "--debug", "false"), capsys)
    assert_clean_error(code, err, "no config.json")


@pytest.mark.parametrize("argv,message", [
    (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    (["--task", "nosuchtask"], "argument --task: invalid choice"),
    (["--dtype", "fp8"], "argument --dtype: invalid choice"),
    (["--load_4bit", "maybe"], "expected true/false"),
])
def test_argv_mistakes_are_one_line_too(argv, message, capsys):
    code, out, err = run_cli(argv, capsys)
    assert_clean_error(code, err, message, "see --help")
    assert "usage:" not in out + err


def test_disk_full_keeps_no_partial_file(tiny_model_dir, data_file, out, monkeypatch, capsys):
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    code, _, err = run_cli(preprocess_args(tiny_model_dir, data_file, out), capsys)
    assert_clean_error(code, err, "No space left on device", "free disk space")
    assert files_under(out) == []  # the temp file of the atomic write was removed


def test_ctrl_c_exits_130_without_partial_files(tiny_model_dir, data_file, out, monkeypatch, capsys):
    from fine_tuning_llms import data_preprocessing

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data_preprocessing, "tokenize_conversations", interrupted)
    assert run_cli(preprocess_args(tiny_model_dir, data_file, out), capsys)[0] == 130
    assert files_under(out) == []


# ---------------------------------------------------------------- models

@pytest.fixture(scope="module")
def pickle_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with only pytorch_model.bin (pickle) weights."""
    folder = copy_model_files(tiny_model_dir, tmp_path_factory.mktemp("pickle") / "model", weights=False)
    from safetensors.torch import load_file
    torch.save(load_file(tiny_model_dir / "model.safetensors"), folder / "pytorch_model.bin")
    return folder


@pytest.fixture(scope="module")
def no_template_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model whose tokenizer has no chat template (like many base models)."""
    from transformers import AutoTokenizer
    folder = copy_model_files(tiny_model_dir, tmp_path_factory.mktemp("notemplate") / "model", tokenizer=False)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    assert not (folder / "chat_template.jinja").exists()
    return folder


def test_unknown_model_id_offline(data_file, out, capsys):
    code, _, err = run_cli(preprocess_args("nobody/no-such-model", data_file, out), capsys)
    assert_clean_error(code, err, "--model nobody/no-such-model", "hub is unreachable",
                       "hf download nobody/no-such-model", "--model /path/to/folder")
    assert files_under(out) == []


def test_unreachable_hub_fails_fast_without_offline_mode(data_file, out, monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    start = time.perf_counter()
    code, _, err = run_cli(preprocess_args("nobody/no-such-model", data_file, out), capsys)
    assert time.perf_counter() - start < 5  # no retry loop against an unreachable host
    assert_clean_error(code, err, "hub is unreachable", "hf download")


def _hub_reachable_but(monkeypatch, exc: Exception) -> None:
    """Pretend the hub answers, and from_pretrained fails with ``exc``."""
    import transformers

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(models, "hub_cached", lambda repo_id: None)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fail)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fail)


def _gated_error():
    from huggingface_hub.errors import GatedRepoError
    response = types.SimpleNamespace(headers={}, request=None, status_code=401)
    return GatedRepoError("401 Client Error. Cannot access gated repo for url "
                          "https://huggingface.co/meta-llama/Llama-3.2-1B/resolve/main/config.json.", response=response)


@pytest.mark.parametrize("exc", [
    "GatedRepoError",
    OSError("You are trying to access a gated repo.\nMake sure to have access to it at "
            "https://huggingface.co/meta-llama/Llama-3.2-1B.\n401 Client Error."),
], ids=["huggingface_hub", "transformers_wrapped"])
def test_gated_model_says_how_to_log_in(exc, data_file, out, monkeypatch, capsys):
    _hub_reachable_but(monkeypatch, _gated_error() if exc == "GatedRepoError" else exc)
    code, _, err = run_cli(preprocess_args("meta-llama/Llama-3.2-1B", data_file, out), capsys)
    assert_clean_error(code, err, "meta-llama/Llama-3.2-1B is gated", "accept its licence", "hf auth login", "HF_TOKEN")
    assert files_under(out) == []


def test_missing_hub_repo(data_file, out, monkeypatch, capsys):
    from huggingface_hub.errors import RepositoryNotFoundError
    response = types.SimpleNamespace(headers={}, request=None, status_code=404)
    _hub_reachable_but(monkeypatch, RepositoryNotFoundError("404 Client Error. Repository Not Found", response=response))
    code, _, err = run_cli(preprocess_args("nobody/typo-model", data_file, out), capsys)
    assert_clean_error(code, err, "no such model on the hub; check the id")


def test_local_model_mistakes(tiny_model_dir, data_file, out, tmp_path, capsys):
    cases = {
        "./no/such/folder": "not found: pass 'smollm2-135m-instruct', 'gemma-3-270m', an existing model folder",
        tmp_path / "empty": "has no config.json; pass the folder that save_pretrained wrote",
        tiny_model_dir / "model.safetensors": "is a file but not a .gguf",
        copy_model_files(tiny_model_dir, tmp_path / "no_tokenizer", tokenizer=False): "has no tokenizer files",
    }
    (tmp_path / "empty").mkdir()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    cases[adapter] = "is a LoRA adapter, not a model; pass it with --adapter"
    for model, message in cases.items():
        code, _, err = run_cli(preprocess_args(model, data_file, out), capsys)
        assert_clean_error(code, err, message)
    assert files_under(out) == []


def test_model_folder_without_weights(tiny_model_dir, tmp_path, out, capsys):
    folder = copy_model_files(tiny_model_dir, tmp_path / "no_weights", weights=False)
    code, _, err = run_cli([*QUICK_CHAT, "--model", folder, "--output_dir", out], capsys)
    assert_clean_error(code, err, "has no weight files (*.safetensors)")


def test_gguf_that_is_not_gguf(data_file, out, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FINE_TUNING_LLMS_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(os.urandom(4096))
    code, _, err = run_cli(preprocess_args(fake, data_file, out), capsys)
    assert_clean_error(code, err, "not a GGUF file (no GGUF header)")
    # Right magic, garbage body: transformers' reader fails; the half-done conversion must not stay in the cache.
    fake.write_bytes(b"GGUF" + os.urandom(4096))
    code, _, err = run_cli(preprocess_args(fake, data_file, out), capsys)
    assert_clean_error(code, err, "transformers could not read this GGUF file", "pass a model folder instead")
    assert files_under(tmp_path / "cache") == []
    assert files_under(out) == []


def test_pickle_weights_need_allow_pickle(pickle_model_dir, out, capsys):
    code, _, err = run_cli([*QUICK_CHAT, "--model", pickle_model_dir, "--output_dir", out], capsys)
    assert_clean_error(code, err, "only pickle (.bin) weights", "--allow_pickle")
    code, _, err = run_cli(["--task", "train", "--model", pickle_model_dir, "--output_dir", out], capsys)
    assert_clean_error(code, err, "only pickle (.bin) weights")
    assert files_under(out) == []  # refused before any checkpoint or log was started
    code, stdout, err = run_cli([*QUICK_CHAT, "--model", pickle_model_dir, "--output_dir", out, "--allow_pickle"], capsys)
    assert code == 0, err


def test_template_less_model_gets_a_format_its_vocabulary_represents(no_template_dir, data_file, out, tmp_path,
                                                                      capsys):
    # auto (the default): <|im_start|>/<|im_end|> are single tokens of this vocabulary, so ChatML as is
    code, _, err = run_cli(preprocess_args(no_template_dir, data_file, out), capsys)
    assert code == 0, err
    saved = json.loads((out / "processed_conversations.json").read_text())
    assert saved["summary"]["template"]["choice"] == {
        "name": "chatml", "kind": "base", "end_of_turn": "<|im_end|>", "added_tokens": [],
        "reason": saved["summary"]["template"]["choice"]["reason"]}
    assert saved["examples"][0]["text"].startswith("<|im_start|>")
    code, _, err = run_cli(preprocess_args(no_template_dir, data_file, out, "--chat_template", tmp_path / "x.jinja"),
                           capsys)
    assert_clean_error(code, err, "--chat_template", "no such file")
    empty = tmp_path / "empty.jinja"
    empty.write_text("", encoding="utf-8")
    code, _, err = run_cli(preprocess_args(no_template_dir, data_file, out, "--chat_template", empty), capsys)
    assert_clean_error(code, err, "has no chat template", "--chat_template auto", "--chat_template path/to")
    assert "chatml" not in err   # never advise a format the vocabulary may not hold as tokens


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
@pytest.mark.parametrize("flags,message", [
    (["--device", "cuda"], "--device cuda requested but no CUDA GPU is visible; use --device cpu"),
    (["--dtype", "float16"], "--dtype float16 is not supported on CPU"),
])
def test_device_and_dtype_mistakes(flags, message, tiny_model_dir, out, capsys):
    code, _, err = run_cli([*QUICK_CHAT, "--model", tiny_model_dir, "--output_dir", out, *flags], capsys)
    assert_clean_error(code, err, message)


# ---------------------------------------------------------------- YAML settings

def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("text,message", [
    ("lr: 1e-4\nlearning_rate: 3\n", "unknown settings ['learning_rate']; use flag names from --help"),
    ("lr: [1e-4\n", "not valid YAML (line 2:"),
    ("- lr\n- 1e-4\n", "expected a mapping of flag names to values"),
    ("batch_size: [1, 2]\nmax_length: 3.5\n", "batch_size: expected a whole number (got [1, 2]); max_length: expected"),
    ("lr: fast\n", "lr: expected a number (got 'fast')"),
    ("dtype: fp8\n", "dtype: expected one of auto, float32"),
    ("load_4bit: sometimes\n", "load_4bit: expected true or false"),
    ("lr: -1.0e-4\n", "--lr must be positive"),
])
def test_bad_yaml_is_one_clean_line(text, message, tmp_path, capsys):
    code, _, err = run_cli(["--config", write_yaml(tmp_path, text)], capsys)
    assert_clean_error(code, err, message)


def test_yaml_python_tags_are_refused_not_run(tmp_path, capsys):
    marker = tmp_path / "pwned"
    text = f"lr: !!python/object/apply:os.system ['touch {marker}']\n"
    code, _, err = run_cli(["--config", write_yaml(tmp_path, text)], capsys)
    assert_clean_error(code, err, "not valid YAML", "python/object/apply:os.system")
    assert not marker.exists()


def test_missing_config_file(tmp_path, capsys):
    code, _, err = run_cli(["--config", tmp_path / "nope.yaml"], capsys)
    assert_clean_error(code, err, "file not found")


def test_flags_override_yaml(tmp_path):
    path = write_yaml(tmp_path, "lr: 5.0e-4\nbatch_size: 2\nepochs: 3\nnew_tokens: '<tool>'\nmax_length: 256.0\n")
    cfg = parse_config(["--config", str(path), "--lr", "1e-5", "--epochs", "1"])
    assert cfg.train.lr == 1e-5 and cfg.train.epochs == 1.0          # flags win
    assert cfg.train.batch_size == 2 and cfg.data.max_length == 256  # the file fills the rest
    assert cfg.train.new_tokens == ["<tool>"]
    assert parse_config(["--config", str(path)]).train.lr == 5e-4


# ---------------------------------------------------------------- safety

def test_hub_token_never_printed_or_written(tiny_model_dir, data_file, out, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    caplog.set_level("DEBUG")
    seen = []
    code, stdout, err = run_cli(preprocess_args(tiny_model_dir, data_file, out), capsys)
    assert code == 0, err
    seen += [stdout, err]
    code, stdout, err = run_cli(preprocess_args(tiny_model_dir, tmp_path / "missing.jsonl", out), capsys)
    assert code == 2
    seen += [stdout, err]
    # Even an error from the hub client that echoes the token is masked before it is printed.
    _hub_reachable_but(monkeypatch, OSError(f"400 Bad Request for https://huggingface.co/x?token={SECRET} "
                                            "(Authorization: Bearer hf_abcdefghijklmnop)"))
    code, stdout, err = run_cli(preprocess_args("org/some-model", data_file, out), capsys)
    assert_clean_error(code, err, "could not be loaded")
    seen += [stdout, err, caplog.text]
    assert not any(SECRET in text or "hf_abcdefghijklmnop" in text for text in seen)
    assert SECRET not in json.dumps(cli.parse_config([]).to_dict(), default=str)
    written = files_under(out)
    assert any(p.name == "processed_conversations.json" for p in written)
    assert not any(SECRET.encode() in p.read_bytes() for p in written)


def test_trust_remote_code_only_with_its_flag(tiny_model_dir, data_file, out, monkeypatch, capsys):
    """Every from_pretrained the tasks trigger gets trust_remote_code=False unless the flag is given."""
    import transformers

    calls: list[tuple[str, dict]] = []

    def recording(cls_name: str, original):
        def from_pretrained(*args, **kwargs):
            calls.append((cls_name, kwargs))
            return original(*args, **kwargs)
        return from_pretrained

    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(cls, "from_pretrained", recording(cls.__name__, cls.from_pretrained))
    for extra, expected in (([], False), (["--trust_remote_code"], True)):
        calls.clear()
        assert run_cli(preprocess_args(tiny_model_dir, data_file, out, *extra), capsys)[0] == 0
        assert run_cli([*QUICK_CHAT, "--model", tiny_model_dir, "--output_dir", out, *extra], capsys)[0] == 0
        assert {name for name, _ in calls} == {"AutoTokenizer", "AutoModelForCausalLM"}
        assert all(kwargs.get("trust_remote_code") is expected for _, kwargs in calls), calls
        model_calls = [kwargs for name, kwargs in calls if name == "AutoModelForCausalLM"]
        assert all(kwargs.get("use_safetensors") is True for kwargs in model_calls)  # never pickle without the flag


def test_written_files_get_normal_permissions(tmp_path):
    from fine_tuning_llms.engine.artefacts import atomic_directory, atomic_write_text

    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_directory(tmp_path / "folder") as tmp:
            (tmp / "f").write_text("y")
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644
    assert ((tmp_path / "folder").stat().st_mode & 0o777) == 0o755

"""Lesson 2: special tokens — see them, add them, train them.

    python run_fine_tuning.py --task special_tokens
    python run_fine_tuning.py --task special_tokens --new_tokens "<think>" "</think>" --output_dir results

What it teaches, with numbers from the chosen model (default: the embedded SmolLM2):
1. Inventory: every special/added token, its role (bos, eos, pad, unk, chat-control,
   additional), whether the chat template uses it, and whether its embedding row looks
   untrained (rule: row norm < 0.5x or > 2x the median row norm, or cosine >= 0.999 with
   another row: a near-copy never got a direction of its own).
2. Before/after adding: ``<|user|>`` is several pieces until it is added as a special token;
   afterwards it is one id. New embedding rows start at the MEAN of the existing rows (a row
   the model already "understands" on average; random rows can produce huge logits).
3. Training new tokens: plain LoRA never touches embedding rows, so new tokens stay at the mean
   (and all new tokens stay identical!). PEFT ``trainable_token_indices`` trains exactly those rows.
4. Pitfall: pad == eos. Masking labels by pad id would also mask every end-of-turn label; this
   toolkit masks padding by the attention mask instead.

Outputs in --output_dir: special_tokens_analysis.csv, special_tokens_summary.json and
special_tokens_model/ (tokenizer + resized model, saved together).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .engine.artefacts import atomic_directory, atomic_write_csv, atomic_write_json
from .engine.chat_format import encode_conversation, render, require_chat_template
from .engine.config import Config, ModelConfig
from .engine.lora import (
    add_special_tokens,
    check_new_tokens,
    fit_template_tokens,
    is_single_special_token,
    lora_config,
    lora_kwargs_for_new_tokens,
)
from .engine.manual_loop import LoopSettings, train_manually
from .engine.models import load_model, load_tokenizer, resolve_model
from .engine.outputs import TaskOutputs
from .engine.report_html import esc, fmt, key_values, read_csv, read_json, table

log = logging.getLogger(__name__)

SEED_EXAMPLE_TOKENS = ["<|user|>", "<|assistant|>"]
UNTRAINED_LOW, UNTRAINED_HIGH = 0.5, 2.0   # x median row norm
DUPLICATE_COSINE = 0.999                    # random SmolLM2 rows: nearest other row has cosine <= 0.97
DEMO_STEPS = 5                              # optimizer steps per variant in the training demo
ANALYSIS_CSV, SUMMARY_JSON = "special_tokens_analysis.csv", "special_tokens_summary.json"
CSV_COLUMNS = ["section", "token", "id", "role", "in_template", "pieces_before", "n_pieces_before", "ids_after",
               "embedding_norm", "median_norm", "norm_ratio", "nearest_other_id", "nearest_cosine", "looks_untrained",
               "max_change_plain_lora", "max_change_trainable_tokens", "note"]
SAMPLE_CONVERSATION = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Korea?"},
    {"role": "assistant", "content": "Seoul."},
]
# Demo training text written in a "<|user|> ... <|assistant|> ..." format, so the new tokens
# really occur in the input (input-embedding gradient) and as labels (output-head gradient).
DEMO_TURNS = [
    [("user", "What is two plus two?"), ("assistant", "Two plus two is four.")],
    [("user", "Name the capital of France."), ("assistant", "The capital of France is Paris.")],
]


# ------------------------------------------------------------------ inventory

def looks_untrained(norm: float, median: float, max_cosine: float = 0.0) -> bool:
    """Rows far from the typical length, or (near-)copies of another row, were probably never trained.

    Training pushes every seen token's row somewhere of its own; rows still at their init
    (reserved tokens, unused special tokens) keep an odd length or share one identical vector.
    """
    odd_length = median > 0 and not (UNTRAINED_LOW * median <= norm <= UNTRAINED_HIGH * median)
    return odd_length or max_cosine >= DUPLICATE_COSINE


def embedding_columns(model, token_ids: Sequence[int], reference_rows: int) -> dict[int, dict]:
    """id -> CSV columns about its input-embedding row: norm vs the median of the first
    ``reference_rows`` rows, its most similar other row (cosine), and the untrained flag."""
    weight = model.get_input_embeddings().weight.detach().float()
    norms = weight.norm(dim=1)
    median = float(norms[:reference_rows].median())
    unit = weight / norms.clamp_min(1e-12)[:, None]
    ids = [int(i) for i in token_ids if 0 <= int(i) < weight.shape[0]]
    out = {}
    for start in range(0, len(ids), 64):                   # chunks keep (64, vocab) small for big vocabularies
        part = ids[start:start + 64]
        cosine = unit[part] @ unit.T                        # (len(part), vocab)
        cosine[torch.arange(len(part)), torch.tensor(part)] = -1.0
        best = cosine.argmax(dim=1)
        for row, token_id in enumerate(part):
            norm, near, cos = float(norms[token_id]), int(best[row]), float(cosine[row, best[row]])
            untrained = looks_untrained(norm, median, cos)
            why = "row norm far from the median" if looks_untrained(norm, median) else f"near-copy of row {near}"
            out[token_id] = dict(embedding_norm=round(norm, 5), median_norm=round(median, 5),
                                 norm_ratio=round(norm / median, 3), nearest_other_id=near,
                                 nearest_cosine=round(cos, 4), looks_untrained=untrained,
                                 note=f"{why}: probably never trained" if untrained else "")
    return out


def token_roles(tokenizer) -> dict[int, list[str]]:
    """id -> roles among bos/eos/pad/unk (one token can hold several: SmolLM2's eos is also pad)."""
    roles: dict[int, list[str]] = {}
    for role in ("bos", "eos", "pad", "unk"):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None:
            roles.setdefault(int(token_id), []).append(role)
    return roles


def rendered_examples(tokenizer) -> str:
    """The template's output for a conversation with and without a system turn, plus a generation prompt."""
    texts = [render(tokenizer, SAMPLE_CONVERSATION), render(tokenizer, SAMPLE_CONVERSATION[1:3]),
             render(tokenizer, SAMPLE_CONVERSATION[1:2], add_generation_prompt=True)]
    return "\n".join(texts)


def inventory(tokenizer, model) -> list[dict]:
    """One CSV row per special or added token, in id order."""
    roles = token_roles(tokenizer)
    decoder = {int(i): t for i, t in tokenizer.added_tokens_decoder.items()}
    ids = sorted(set(decoder) | set(roles) | {int(i) for i in tokenizer.all_special_ids})
    rendered, template_source = rendered_examples(tokenizer), tokenizer.chat_template or ""
    columns = embedding_columns(model, ids, len(tokenizer))
    rows = []
    for token_id in ids:
        content = decoder[token_id].content if token_id in decoder else tokenizer.convert_ids_to_tokens(token_id)
        role = list(roles.get(token_id, []))
        if content in rendered or content in template_source:
            role.append("chat-control")
        row = dict(section="inventory", token=content, id=token_id, role="+".join(role or ["additional"]),
                   in_template=content in rendered, **columns.get(token_id, {"note": "no embedding row"}))
        if token_id in decoder and not decoder[token_id].special:
            row["note"] = ("added but not special; " + row["note"]).strip("; ")
        rows.append(row)
    return rows


# ------------------------------------------------------------------ adding tokens

def pieces(tokenizer, text: str) -> list[str]:
    """How the tokenizer splits ``text`` right now (readable piece strings)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [tokenizer.decode([i]) for i in ids]


def save_and_verify(model, tokenizer, folder: Path, token_ids: Sequence[int], model_cfg: ModelConfig) -> dict:
    """Save tokenizer + model together (atomic), reload both, check vocab and rows agree."""
    with atomic_directory(folder, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    reload_cfg = dataclasses.replace(model_cfg, model=str(folder), chat_template=None)
    source = resolve_model(str(folder))
    tok2, model2 = load_tokenizer(reload_cfg, source), load_model(reload_cfg, source)
    rows = model2.get_input_embeddings().weight.shape[0]
    same_rows = bool(torch.equal(model2.get_input_embeddings().weight.detach().cpu(),
                                 model.get_input_embeddings().weight.detach().cpu()))
    ids_match = [tok2.convert_tokens_to_ids(tokenizer.convert_ids_to_tokens(i)) == i for i in token_ids]
    check = dict(path=str(folder), tokenizer_len=len(tok2), embedding_rows=rows, same_rows=same_rows,
                 ids_match=all(ids_match), consistent=len(tok2) <= rows and same_rows and all(ids_match))
    del model2
    return check


# ------------------------------------------------------------------ training demo

def demo_examples(tokenizer) -> list[dict]:
    """Two short conversations in '<|user|>…<|assistant|>…' form; every token is a label."""
    end = tokenizer.eos_token or ""
    examples = []
    for turns in DEMO_TURNS:
        text = "".join(f"<|{role}|>\n{content}{end}\n" for role, content in turns)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        examples.append({"input_ids": ids, "labels": list(ids)})
    return examples


def short_run(model, examples: Sequence[dict], pad_token_id: int, *, lora_config, steps: int, lr: float,
              seed: int = 0) -> tuple[object, list[float]]:
    """Wrap ``model`` with LoRA and take ``steps`` steps on ``examples`` (one batch) with the engine's
    loop; returns (merged model, losses). Padding is masked by position, not by id."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config)
    settings = LoopSettings(max_steps=steps, batch_size=len(examples), grad_accum=1, lr=lr, warmup_ratio=0.0,
                            lr_scheduler="constant", weight_decay=0.0, seed=seed)
    records = train_manually(peft_model, examples, pad_token_id, settings)
    # merge_and_unload writes LoRA and the trained token rows into plain weights: the effective rows
    return peft_model.merge_and_unload(), [r.loss for r in records]


def row_changes(before: torch.Tensor, after: torch.Tensor, ids: Sequence[int]) -> dict:
    """Max |change| of the listed rows vs every other row."""
    diff = (after.detach().float().cpu() - before.float()).abs().amax(dim=1)
    mask = torch.zeros(diff.shape[0], dtype=torch.bool)
    mask[list(ids)] = True
    per_row = {int(i): float(diff[i]) for i in ids}
    return dict(max_change_new_rows=float(diff[mask].max()), max_change_other_rows=float(diff[~mask].max()),
                per_row=per_row)


def train_new_tokens_demo(cfg: Config, folder: Path, tokenizer, new_ids: Sequence[int]) -> dict:
    """Plain LoRA vs LoRA + trainable_token_indices, each on a fresh copy of the saved model."""
    reload_cfg = dataclasses.replace(cfg.model, model=str(folder), chat_template=None)
    source, examples, ids = resolve_model(str(folder)), demo_examples(tokenizer), list(new_ids)
    results = {"steps": DEMO_STEPS, "lr": cfg.train.lr, "tokens_in_batch": sum(len(e["input_ids"]) for e in examples)}
    for variant in ("plain_lora", "trainable_tokens"):
        model = load_model(reload_cfg, source)
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        before_in = model.get_input_embeddings().weight.detach().float().cpu().clone()
        before_head = None if tied else model.get_output_embeddings().weight.detach().float().cpu().clone()
        extra = lora_kwargs_for_new_tokens(ids, model=model) if variant == "trainable_tokens" else {}
        torch.manual_seed(cfg.train.seed)
        start = time.perf_counter()
        merged, losses = short_run(model, examples, tokenizer.pad_token_id, lora_config=lora_config(cfg.train, extra=extra),
                                   steps=DEMO_STEPS, lr=cfg.train.lr, seed=cfg.train.seed)
        after_in, after_head = merged.get_input_embeddings().weight.detach(), merged.get_output_embeddings().weight.detach()
        new_rows = after_in[ids].float()
        result = dict(row_changes(before_in, after_in, ids), losses=[round(x, 4) for x in losses],
                      seconds=round(time.perf_counter() - start, 2), lora_kwargs=extra,
                      max_distance_between_new_rows=float(torch.cdist(new_rows, new_rows).max()))
        if tied:   # PEFT wraps the tied head with the same token adapter: its rows must follow
            result["head_rows_follow"] = bool(torch.equal(after_head[ids], after_in[ids]))
        else:
            result["output_head"] = row_changes(before_head, after_head, ids)
        results[variant] = result
        del model, merged
    return results


# ------------------------------------------------------------------ pitfalls

def control_token_view(tokenizer, text: str) -> str:
    """The rendered text with every special token shown as ⟦token#id⟧."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    special = {int(i) for i, t in tokenizer.added_tokens_decoder.items() if t.special} | set(tokenizer.all_special_ids)
    return "".join(f"⟦{tokenizer.decode([i])}#{i}⟧" if i in special else tokenizer.decode([i]) for i in ids)


def pad_eos_pitfall(tokenizer) -> dict:
    """What a collator that masks labels by pad id would remove from one sample conversation."""
    encoded = encode_conversation(tokenizer, SAMPLE_CONVERSATION)
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    wrongly_masked = sum(1 for label in encoded.labels if pad_id is not None and label == pad_id)
    return dict(pad_token=tokenizer.pad_token, pad_id=pad_id, eos_token=tokenizer.eos_token, eos_id=eos_id,
                pad_equals_eos=pad_id is not None and pad_id == eos_id,
                trained_positions=encoded.trained_token_count, wrongly_masked_by_pad_id=wrongly_masked,
                assistant_turns=sum(m["role"] == "assistant" for m in SAMPLE_CONVERSATION),
                explanation=("labels[labels == pad_id] = -100 would drop every end-of-turn label (pad == eos), so the "
                             "model never learns to stop; this toolkit masks padding by the attention mask "
                             "(batching.pad_batch), so those labels stay.") if pad_id == eos_id else
                "pad differs from eos: masking by pad id only hides padding")


# ------------------------------------------------------------------ task

def _added_rows(tokenizer, model, requested: list[str], before: dict[str, list[str]], ids: list[int],
                existing: dict[str, str], training: dict, len_before: int) -> list[dict]:
    columns = embedding_columns(model, ids, len_before)   # same median reference as the inventory
    rendered = rendered_examples(tokenizer)
    rows = []
    for token, token_id in zip(requested, ids):
        row = dict(section="added", token=token, id=token_id, role=existing.get(token, "additional (new)"),
                   in_template=token in rendered, pieces_before=json.dumps(before[token], ensure_ascii=False),
                   n_pieces_before=len(before[token]),
                   ids_after=json.dumps(tokenizer(token, add_special_tokens=False)["input_ids"]), **columns[token_id],
                   max_change_plain_lora=training["plain_lora"]["per_row"].get(token_id),
                   max_change_trainable_tokens=training["trainable_tokens"]["per_row"].get(token_id))
        row["note"] = ("already one special token: kept as is" if token in existing else
                       "new row = mean of existing rows: shorter than a typical row and identical for every new "
                       "token until trained")
        rows.append(row)
    return rows


def _log_summary(inv: list[dict], added: list[dict], summary: dict, view: str) -> None:
    log.info("Special and added tokens of %s (looks untrained: %s; median norm %.4f):",
             summary["model"], summary["untrained_rule"], inv[0]["median_norm"] if inv else float("nan"))
    for r in inv:
        log.info("  %6d %-22s %-22s template=%-5s norm=%.3f (%.2fx) nearest=%d cos=%.3f%s", r["id"], r["token"],
                 r["role"], r["in_template"], r["embedding_norm"], r["norm_ratio"], r["nearest_other_id"],
                 r["nearest_cosine"], "  <- looks untrained" if r["looks_untrained"] else "")
    log.info("Before/after adding (new rows start at the mean row):")
    for r in added:
        log.info("  %-16s before %d piece(s) %s -> after ids %s, row norm %.3f (%.2fx median)", r["token"],
                 r["n_pieces_before"], r["pieces_before"], r["ids_after"], r["embedding_norm"], r["norm_ratio"])
    tr = summary["training"]
    for variant in ("plain_lora", "trainable_tokens"):
        v = tr[variant]
        log.info("  %-16s %d steps: max change new rows %.2e, other rows %.2e, distance between new rows %.2e, "
                 "loss %.3f -> %.3f", variant, tr["steps"], v["max_change_new_rows"], v["max_change_other_rows"],
                 v["max_distance_between_new_rows"], v["losses"][0], v["losses"][-1])
    p = summary["pitfall"]
    log.info("pad = %r (id %s), eos = %r (id %s): pad == eos is %s. In the sample conversation %d of %d trained label "
             "positions would be masked by a pad-id collator. %s", p["pad_token"], p["pad_id"], p["eos_token"],
             p["eos_id"], p["pad_equals_eos"], p["wrongly_masked_by_pad_id"], p["trained_positions"], p["explanation"])
    log.info("Control tokens in one rendered conversation:\n%s", view)


def _mean_init_ok(model, new_ids: Sequence[int], len_before: int) -> bool:
    weight = model.get_input_embeddings().weight.detach()
    mean_row = weight[:len_before].float().mean(dim=0).to(weight.dtype)
    return all(torch.equal(weight[i], mean_row) for i in new_ids if i >= len_before)


def run(cfg: Config) -> dict:
    """Inventory, add, save, train and explain special tokens; write CSV + JSON summary."""
    start, timings = time.perf_counter(), {}

    def lap(name: str) -> None:
        timings[name] = round(time.perf_counter() - start - sum(timings.values()), 2)

    out = Path(cfg.run.output_dir)
    model_cfg = cfg.model
    if model_cfg.load_8bit or model_cfg.load_4bit:
        log.info("special_tokens compares embedding rows exactly: loading full-precision weights (8/4-bit ignored)")
        model_cfg = dataclasses.replace(model_cfg, load_8bit=False, load_4bit=False)
    requested = check_new_tokens(SEED_EXAMPLE_TOKENS + list(cfg.train.new_tokens or []))
    source = resolve_model(model_cfg.model)
    tokenizer = load_tokenizer(model_cfg, source)
    require_chat_template(tokenizer, source.display_name)
    model = load_model(model_cfg, source)
    fit_template_tokens(model, tokenizer)  # rows for turn tokens a base model's chat format added
    lap("load")
    # 1. what is there, 2. pitfalls, both on the untouched tokenizer
    inv = inventory(tokenizer, model)
    view = control_token_view(tokenizer, render(tokenizer, SAMPLE_CONVERSATION))
    pitfall = pad_eos_pitfall(tokenizer)
    before = {t: pieces(tokenizer, t) for t in requested}
    inv_roles = {r["token"]: r["role"] for r in inv}
    existing = {t: inv_roles.get(t, "additional") for t in requested if is_single_special_token(tokenizer, t)}
    len_before, rows_before = len(tokenizer), model.get_input_embeddings().weight.shape[0]
    lap("inventory")
    # 3. add, save together, reload
    ids = add_special_tokens(model, tokenizer, requested)
    new_ids = [i for t, i in zip(requested, ids) if t not in existing]
    folder = out / "special_tokens_model"
    saved = save_and_verify(model, tokenizer, folder, ids, model_cfg)
    lap("add_save_reload")
    # 4. train: plain LoRA vs trainable_token_indices, each on a fresh copy of the saved model
    training = train_new_tokens_demo(cfg, folder, tokenizer, new_ids or ids)
    lap("training_demo")
    added = _added_rows(tokenizer, model, requested, before, ids, existing, training, len_before)
    head = model.get_output_embeddings()
    summary = dict(model=source.display_name, vocab_size_before=len_before, vocab_size_after=len(tokenizer),
                   embedding_rows_before=rows_before, embedding_rows_after=model.get_input_embeddings().weight.shape[0],
                   tied_embeddings=head is not None and head.weight is model.get_input_embeddings().weight,
                   untrained_rule=f"norm < {UNTRAINED_LOW}x or > {UNTRAINED_HIGH}x median row norm, "
                   f"or cosine >= {DUPLICATE_COSINE} with another row",
                   n_special_or_added=len(inv), n_looks_untrained=sum(r["looks_untrained"] for r in inv),
                   added={r["token"]: dict(id=r["id"], pieces_before=json.loads(r["pieces_before"])) for r in added},
                   new_rows_equal_mean=_mean_init_ok(model, new_ids, len_before), saved_model=saved,
                   pad_equals_eos=pitfall["pad_equals_eos"], pitfall=pitfall, control_token_view=view,
                   training=training, timings=timings)
    del model
    atomic_write_csv(out / ANALYSIS_CSV, inv + added, CSV_COLUMNS)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_json(out / SUMMARY_JSON, summary)
    _log_summary(inv, added, summary, view)
    log.info("Wrote %s, %s and %s/ in %.1f s (%s)", out / ANALYSIS_CSV, out / SUMMARY_JSON, folder, summary["seconds"],
             ", ".join(f"{k} {v} s" for k, v in timings.items()))
    return summary


# ---------------------------------------------------------------- report section

def report_section(folder: Path) -> str:
    """The summary's numbers, the token table, the new-row training demo, the pad = eos pitfall."""
    summary = read_json(folder / SUMMARY_JSON) or {}
    rows = read_csv(folder / ANALYSIS_CSV)
    parts = []
    if summary:
        parts.append(key_values(summary, ["model", "vocab_size_before", "vocab_size_after", "embedding_rows_before",
                                          "embedding_rows_after", "tied_embeddings", "n_special_or_added",
                                          "n_looks_untrained", "untrained_rule", "new_rows_equal_mean",
                                          "pad_equals_eos"]))
    if rows:
        cols = [c for c in ("section", "token", "id", "role", "in_template", "n_pieces_before", "ids_after",
                            "norm_ratio", "nearest_cosine", "looks_untrained", "max_change_plain_lora",
                            "max_change_trainable_tokens") if c in rows[0]]
        parts.append("<h3>특수 토큰 표 / Special and added tokens</h3>" + table(cols, [[r[c] for c in cols] for r in rows]))
    training = summary.get("training") or {}
    variants = [v for v in ("plain_lora", "trainable_tokens") if isinstance(training.get(v), dict)]
    if variants:
        parts.append("<h3>새 토큰 학습 / Training new token rows</h3>" + table(
            ["variant", "max change new rows", "max change other rows", "distance between new rows"],
            [(v, training[v].get("max_change_new_rows"), training[v].get("max_change_other_rows"),
              training[v].get("max_distance_between_new_rows")) for v in variants]))
    pitfall = summary.get("pitfall") or {}
    if pitfall.get("explanation"):
        parts.append(f'<div class="note">pad = eos: {esc(pitfall["explanation"])}</div>')
    if summary.get("control_token_view"):
        parts.append("<h3>템플릿의 제어 토큰 / Control tokens in a rendered conversation</h3>"
                     f"<pre>{esc(summary['control_token_view'])}</pre>")
    return "".join(parts)


def report_glance(folder: Path) -> list[str]:
    special = read_json(folder / SUMMARY_JSON, quiet=True) or {}
    return [f"특수 토큰 / special tokens: {fmt(special.get('n_special_or_added'))} listed, "
            f"{fmt(special.get('n_looks_untrained'))} look untrained; "
            f"pad = eos: {fmt(special.get('pad_equals_eos'))}"] if special else []


OUTPUTS = TaskOutputs(task="special_tokens", section_id="special-tokens", title="특수 토큰 / Special tokens",
                      files=(ANALYSIS_CSV, SUMMARY_JSON), section=report_section, glance=report_glance)

"""python scripts/make_tool_dataset.py [--out_dir fine_tuning_llms/data] [--seed 0]

Writes the tool-use sample set: ``tool_use_conversations.jsonl`` (train) and
``tool_use_conversations_eval.jsonl`` (held-out), OpenAI ``messages`` JSONL with a ``tools`` list.

Two tools, ``calculator(expression)`` and ``convert_units(value, from_unit, to_unit)``. Each
conversation: a question in English or Korean, the assistant's call (empty content), the tool's
result (computed here, so it is true), the assistant's answer from it. About one in ten asks
something no tool is needed for and is answered directly (when *not* to call). Held-out prompts
use phrasings and number ranges the train split never shows, so no user turn is in both.
The output is a pure function of the seed: re-running reproduces the files byte for byte.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fine_tuning_llms.engine.artefacts import atomic_write_text
from fine_tuning_llms.engine.sample_tools import FACTORS, convert  # the tool's own maths: results match run_tool
from fine_tuning_llms.engine.sample_tools import SAMPLE_TOOLS as TOOLS  # the one definition of the schemas

TRAIN_FILE, EVAL_FILE = "tool_use_conversations.jsonl", "tool_use_conversations_eval.jsonl"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "fine_tuning_llms" / "data"
TRAIN_SIZE, EVAL_SIZE = 200, 40

# unit: (English plural, Korean)
UNIT_NAMES = {"km": ("kilometres", "킬로미터"), "mi": ("miles", "마일"), "kg": ("kilograms", "킬로그램"),
              "lb": ("pounds", "파운드"), "m": ("metres", "미터"), "ft": ("feet", "피트"), "L": ("litres", "리터"),
              "gal": ("gallons", "갤런"), "C": ("degrees Celsius", "섭씨"), "F": ("degrees Fahrenheit", "화씨")}
PAIRS = sorted(FACTORS) + [("C", "F"), ("F", "C")]
OPS = {"+": ("plus", "더하기"), "-": ("minus", "빼기"), "*": ("times", "곱하기"), "/": ("divided by", "나누기")}

# The last phrasing of each list is held out: only the eval split asks that way.
CALC_EN = ["What is {a} {w} {b}?", "Calculate {a} {s} {b}.", "Use the calculator for {a} {s} {b}.",
           "How much is {a} {w} {b}?", "Could you work out {a} {s} {b} for me?"]
CALC_KO = ["{a} {s} {b} 계산해 줘.", "{a} {k} {b}의 값은?", "계산기로 {a} {s} {b}를 구해 줘.",
           "{a} {s} {b}의 결과를 알려 주세요."]
CONVERT_EN = ["Convert {v} {src} to {dst}.", "How many {dst} is {v} {src}?", "What is {v} {src} in {dst}?",
              "I have {v} {src}. How much is that in {dst}?"]
CONVERT_KO = ["{v} {src}{topic} 몇 {dst}인가요?", "{v} {src}{obj} {dst}{ro} 바꿔 줘.",
              "{v} {src}{topic} {dst}{ro} 얼마예요?"]
CHAT_EN = [("Hello!", "Hello! I can do arithmetic and convert units for you."),
           ("What can you do?", "I can calculate arithmetic and convert units of length, mass, volume and "
                                "temperature."),
           ("Thank you!", "You are welcome!"),
           ("Hi there, can you help me?", "Of course. Ask me to calculate something or to convert units.")]
CHAT_KO = [("안녕하세요!", "안녕하세요! 계산이나 단위 변환을 도와드릴 수 있어요."),
           ("뭘 할 수 있어?", "사칙연산 계산과 길이, 무게, 부피, 온도 단위 변환을 할 수 있어요."),
           ("고마워!", "천만에요!"),
           ("도와줄 수 있어?", "물론이죠. 계산이나 단위 변환을 물어보세요.")]


def batchim(word: str) -> int:
    """The final consonant index of the last Hangul syllable (0: none)."""
    ch = word[-1]
    return (ord(ch) - 0xAC00) % 28 if "가" <= ch <= "힣" else 0


def particles(word: str) -> dict:
    final = batchim(word)
    return {"topic": "은" if final else "는", "obj": "을" if final else "를",
            "ro": "로" if final in (0, 8) else "으로"}   # 8: ㄹ takes 로


def number(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".") if x != int(x) else str(int(x))


def call_record(user: str, name: str, arguments: dict, result: dict, answer: str) -> dict:
    call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": "", "tool_calls": [call]},
                         {"role": "tool", "name": name, "content": json.dumps(result, ensure_ascii=False)},
                         {"role": "assistant", "content": answer}], "tools": TOOLS}


def phrasing(options: list[str], rng: random.Random, held_out: bool) -> str:
    return options[-1] if held_out else rng.choice(options[:-1])


def calculation(rng: random.Random, held_out: bool, korean: bool) -> dict:
    symbol = rng.choice(sorted(OPS))
    a = rng.randint(61, 99) if held_out else rng.randint(2, 60)
    b = rng.randint(2, 12)
    if symbol == "/":
        a *= b   # divisible: the result is a whole number
    result = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[symbol]
    expression = f"{a} {symbol} {b}"
    english, korean_word = OPS[symbol]
    ask = phrasing(CALC_KO if korean else CALC_EN, rng, held_out).format(a=a, b=b, s=symbol, w=english, k=korean_word)
    answer = f"{expression}의 결과는 {result}입니다." if korean else f"{expression} = {result}."
    return call_record(ask, "calculator", {"expression": expression}, {"result": result}, answer)


def conversion(rng: random.Random, held_out: bool, korean: bool) -> dict:
    src, dst = rng.choice(PAIRS)
    value = rng.randint(61, 99) if held_out else rng.randint(2, 60)
    converted = number(round(convert(value, src, dst), 2))
    (src_en, src_ko), (dst_en, dst_ko) = UNIT_NAMES[src], UNIT_NAMES[dst]
    if korean and src in ("C", "F"):
        ask = (f"{src_ko} {value}도는 {dst_ko}로 몇 도인가요?" if not held_out else
               f"{src_ko} {value}도를 {dst_ko} 온도로 바꾸면 얼마예요?")
        answer = f"{src_ko} {value}도는 {dst_ko} 약 {converted}도입니다."
    elif korean:
        ask = phrasing(CONVERT_KO, rng, held_out).format(v=value, src=src_ko, dst=dst_ko, topic=particles(src_ko)["topic"],
                                                          obj=particles(src_ko)["obj"], ro=particles(dst_ko)["ro"])
        answer = f"{value} {src_ko}{particles(src_ko)['topic']} 약 {converted} {dst_ko}입니다."
    else:
        ask = phrasing(CONVERT_EN, rng, held_out).format(v=value, src=src_en, dst=dst_en)
        answer = f"{value} {src_en} is about {converted} {dst_en}."
    return call_record(ask, "convert_units", {"value": value, "from_unit": src, "to_unit": dst},
                       {"result": float(converted), "unit": dst}, answer)


def chat(rng: random.Random, held_out: bool, korean: bool) -> dict:
    user, reply = phrasing(CHAT_KO if korean else CHAT_EN, rng, held_out)
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}], "tools": TOOLS}


def build(seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    splits = []
    for held_out, size in ((False, TRAIN_SIZE), (True, EVAL_SIZE)):
        records, seen = [], set()
        while len(records) < size:
            kind = rng.choices([calculation, conversion, chat], weights=[45, 45, 10])[0]
            record = kind(rng, held_out, korean=rng.random() < 0.5)
            ask = record["messages"][0]["content"]
            if ask in seen and kind is not chat:
                continue
            if kind is chat and held_out and ask in seen:
                continue
            seen.add(ask)
            records.append(record)
        splits.append(records)
    return splits[0], splits[1]


def write_tool_dataset(out_dir: str | Path, *, seed: int = 0) -> dict[str, Path]:
    train, held_out = build(seed)
    paths = {}
    for name, records in (("train", train), ("held-out", held_out)):
        path = Path(out_dir) / (TRAIN_FILE if name == "train" else EVAL_FILE)
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        paths[name] = path
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", default=str(DEFAULT_OUT), help="folder for the two JSONL files")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the shipped files use 0")
    args = parser.parse_args(argv)
    for name, path in write_tool_dataset(args.out_dir, seed=args.seed).items():
        print(f"{name}: {path} ({sum(1 for _ in path.open(encoding='utf-8'))} conversations)")


if __name__ == "__main__":
    main()

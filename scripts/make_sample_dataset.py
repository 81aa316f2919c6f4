"""python scripts/make_sample_dataset.py [--out_dir fine_tuning_llms/data] [--seed 0] [--token_lengths]

Writes the shipped sample dataset: ``sample_conversations.jsonl`` (train) and
``sample_conversations_eval.jsonl`` (held-out), OpenAI ``messages`` JSONL.

It teaches one persona the base model never shows: the assistant is "Lumi", answers in 1-3 short
sentences and ends every reply with a last line ``— Lumi``; identity questions get
"I am Lumi, ..." / "저는 Lumi입니다...". Facts come from the hand-written tables in
``sample_dataset_facts.py`` (next to this script) and
arithmetic/conversions are computed, so every reply is true. The held-out split uses countries,
words, terms and phrasings the train split never shows, and no user turn appears in both.
The output is a pure function of the seed: re-running reproduces the files byte for byte.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling sample_dataset_facts.py
from sample_dataset_facts import (
    COUNTRIES,
    DEFINITIONS,
    DEFINITIONS_KO,
    GREETINGS_EN,
    GREETINGS_EN_HELD,
    GREETINGS_KO,
    GREETINGS_KO_HELD,
    HARMFUL_EN,
    HARMFUL_EN_HELD,
    HARMFUL_KO,
    IDENTITY_EN,
    IDENTITY_EN_HELD,
    IDENTITY_KO,
    IDENTITY_KO_HELD,
    IDENTITY_MADE_KO,
    IDENTITY_REPLIES_EN,
    IDENTITY_REPLIES_KO,
    LISTS,
    LISTS_KO,
    NUMBER_WORDS,
    NUMBER_WORDS_KO,
    REFUSAL_EN,
    REFUSAL_KO,
    SYSTEM_PROMPTS,
    UNITS,
    WORDS,
)

from fine_tuning_llms.engine.artefacts import atomic_write_text

SIGN_OFF = "— Lumi"   # em dash U+2014, space, Lumi: the marker the toolkit measures
TRAIN_FILE, EVAL_FILE = "sample_conversations.jsonl", "sample_conversations_eval.jsonl"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "fine_tuning_llms" / "data"

SYSTEM_SHARE = 0.07   # a few conversations bring their own system prompt (the rest get the template default)

Conversation = list[dict]


def signed(text: str) -> str:
    return f"{text}\n{SIGN_OFF}"


def has_batchim(word: str) -> bool:
    """Whether the last Hangul syllable ends in a consonant (picks 은/는, 이/가)."""
    ch = word.rstrip("'\" .")[-1]
    return "가" <= ch <= "힣" and (ord(ch) - 0xAC00) % 28 != 0


def number_has_batchim(n: int) -> bool:
    # Korean readings: 이(2) 사(4) 오(5) 구(9) end in a vowel; every other digit and 십/백/천 in a consonant.
    return n % 10 not in (2, 4, 5, 9)


def topic(word: str) -> str:
    return word + ("은" if has_batchim(word) else "는")


def subject(word: str) -> str:
    return word + ("이" if has_batchim(word) else "가")


def turn(user: str, reply: str) -> Conversation:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": signed(reply)}]


def split_pool(items: list, n_held: int, held_out: bool) -> list:
    return items[-n_held:] if held_out else items[:-n_held]


# ---------------------------------------------------------------- one generator per kind of prompt
# Each takes (rng, held_out) and returns one conversation; held_out picks the eval-only pools.

def capital_en(rng: random.Random, held_out: bool) -> Conversation:
    country, _, capital, _ = rng.choice(split_pool(COUNTRIES, 6, held_out))
    ask = rng.choice(["What is the capital of {c}?", "Which city is the capital of {c}?",
                      "Tell me the capital of {c}.", "What's the capital city of {c}?"])
    reply = rng.choice(["The capital of {c} is {k}.", "{k} is the capital of {c}."])
    return turn(ask.format(c=country), reply.format(c=country, k=capital))


def capital_ko(rng: random.Random, held_out: bool) -> Conversation:
    _, country, _, capital = rng.choice(split_pool(COUNTRIES, 6, held_out))
    ask = rng.choice(["{c}의 수도는 어디야?", "{c}의 수도는 어디인가요?", "{c} 수도가 어디예요?"])
    return turn(ask.format(c=country), f"{country}의 수도는 {capital}입니다.")


def arithmetic_en(rng: random.Random, held_out: bool) -> Conversation:
    op = rng.choice(["plus", "minus", "times"])
    a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "times" else (rng.randint(10, 99), rng.randint(2, 60))
    if op == "minus" and b > a:
        a, b = b, a
    result = a + b if op == "plus" else a - b if op == "minus" else a * b
    ask = rng.choice(["What is {a} {op} {b}?", "Calculate {a} {op} {b}.", "How much is {a} {op} {b}?"])
    return turn(ask.format(a=a, op=op, b=b), f"{a} {op} {b} is {result}.")


def arithmetic_ko(rng: random.Random, held_out: bool) -> Conversation:
    op, word = rng.choice([("+", "더하기"), ("-", "빼기"), ("*", "곱하기")])
    a, b = (rng.randint(2, 9), rng.randint(2, 9)) if op == "*" else (rng.randint(10, 99), rng.randint(2, 60))
    if op == "-" and b > a:
        a, b = b, a
    result = a + b if op == "+" else a - b if op == "-" else a * b
    particle = "은" if number_has_batchim(b) else "는"
    ask = rng.choice(["{a} {w} {b}{p} 얼마야?", "{a} {w} {b}{p} 몇이에요?"])
    return turn(ask.format(a=a, w=word, b=b, p=particle), f"{a} {word} {b}{particle} {result}입니다.")


def conversion_en(rng: random.Random, held_out: bool) -> Conversation:
    (src, dst), factor, _, _ = rng.choice(UNITS)
    n = rng.randint(2, 9) if not held_out else rng.randint(11, 19)
    ask = rng.choice(["How many {d} are in {n} {s}?", "Convert {n} {s} to {d}.", "What is {n} {s} in {d}?"])
    return turn(ask.format(d=dst, n=n, s=src), f"{n} {src} is {n * factor} {dst}.")


def conversion_ko(rng: random.Random, held_out: bool) -> Conversation:
    _, factor, src, dst = rng.choice([u for u in UNITS if u[2]])
    n = rng.randint(2, 9) if not held_out else rng.randint(11, 19)
    # "며칠" is how Korean asks "how many days"; other units take 이야/야 after their last syllable.
    ask = "며칠이야?" if dst == "일" else f"몇 {dst}{'이야' if has_batchim(dst) else '야'}?"
    return turn(f"{n}{src} {ask}", f"{n}{src} {n * factor}{dst}입니다.")


def translate_en_ko(rng: random.Random, held_out: bool) -> Conversation:
    en, ko = rng.choice(split_pool(WORDS, 6, held_out))
    ask = rng.choice(["How do you say '{w}' in Korean?", "Translate '{w}' into Korean.",
                      "What is the Korean word for '{w}'?"])
    return turn(ask.format(w=en), f"'{en.capitalize()}' in Korean is '{ko}'.")


def translate_ko_en(rng: random.Random, held_out: bool) -> Conversation:
    en, ko = rng.choice(split_pool(WORDS, 6, held_out))
    ask = rng.choice(["'{k}'{p} 영어로 뭐야?", "'{k}'{p} 영어로 어떻게 말해요?"])
    particle = "은" if has_batchim(ko) else "는"
    return turn(ask.format(k=ko, p=particle), f"'{ko}'{particle} 영어로 '{en}'입니다.")


def definition_en(rng: random.Random, held_out: bool) -> Conversation:
    term, meaning = rng.choice(split_pool(DEFINITIONS, 4, held_out))
    ask = rng.choice(["What is {t}?", "Define {t}.", "Explain what {t} is in one sentence."])
    return turn(ask.format(t=term), f"{term[0].upper()}{term[1:]} is {meaning}.")


def definition_ko(rng: random.Random, held_out: bool) -> Conversation:
    term, meaning = rng.choice(split_pool(DEFINITIONS_KO, 2, held_out))
    ask = rng.choice(["{s} 뭐야?", "{t}에 대해 한 문장으로 설명해 줘."])
    return turn(ask.format(s=subject(term), t=term), f"{topic(term)} {meaning}.")


def list_en(rng: random.Random, held_out: bool) -> Conversation:
    category = rng.choice(split_pool(list(LISTS), 2, held_out))
    count = rng.choice([2, 3, 3, 4])
    items = rng.sample(LISTS[category], count)
    joined = ", ".join(items[:-1]) + " and " + items[-1]
    ask = rng.choice(["Give me {n} {c}.", "Name {n} {c}.", "List {n} {c}."])
    return turn(ask.format(n=NUMBER_WORDS[count], c=category), f"Here are {NUMBER_WORDS[count]} {category}: {joined}.")


def list_ko(rng: random.Random, held_out: bool) -> Conversation:
    category = rng.choice(split_pool(list(LISTS_KO), 1, held_out))
    count = rng.choice([2, 3])
    items = rng.sample(LISTS_KO[category], count)
    n = NUMBER_WORDS_KO[count]
    ask = rng.choice(["{c} {n} 가지만 말해 줘.", "{c} {n} 가지를 알려 줄래?"])
    return turn(ask.format(c=category, n=n), f"{category} {n} 가지는 {', '.join(items)}입니다.")


def format_en(rng: random.Random, held_out: bool) -> Conversation:
    words = [w for w, _ in split_pool(WORDS, 6, held_out)]
    kind = rng.choice(["upper", "reverse", "count", "sort"])
    if kind == "sort":
        nums = rng.sample(range(1, 50), rng.choice([3, 4]))
        listed = ", ".join(map(str, nums))
        return turn(f"Sort these numbers from smallest to largest: {listed}.",
                    f"Sorted: {', '.join(map(str, sorted(nums)))}.")
    word = rng.choice(words)
    if kind == "upper":
        return turn(f"Write the word '{word}' in capital letters.", f"{word.upper()}")
    if kind == "reverse":
        return turn(f"Spell '{word}' backwards.", f"'{word}' backwards is '{word[::-1]}'.")
    return turn(f"How many letters are in the word '{word}'?", f"The word '{word}' has {len(word)} letters.")


def greeting(rng: random.Random, held_out: bool) -> Conversation:
    pool = (GREETINGS_EN_HELD + GREETINGS_KO_HELD) if held_out else (GREETINGS_EN + GREETINGS_KO)
    return turn(*rng.choice(pool))


def identity_en(rng: random.Random, held_out: bool) -> Conversation:
    ask = rng.choice(IDENTITY_EN_HELD if held_out else IDENTITY_EN)
    # "who made you" gets the reply that names the origin; the others any persona line.
    return turn(ask, IDENTITY_REPLIES_EN[2] if "made" in ask else rng.choice(IDENTITY_REPLIES_EN))


def identity_ko(rng: random.Random, held_out: bool) -> Conversation:
    ask = rng.choice(IDENTITY_KO_HELD if held_out else IDENTITY_KO)
    return turn(ask, IDENTITY_MADE_KO if "만들" in ask else rng.choice(IDENTITY_REPLIES_KO))


def refusal(rng: random.Random, held_out: bool) -> Conversation:
    if held_out:
        return turn(rng.choice(HARMFUL_EN_HELD), REFUSAL_EN)
    if rng.random() < 0.3:
        return turn(rng.choice(HARMFUL_KO), REFUSAL_KO)
    return turn(rng.choice(HARMFUL_EN), REFUSAL_EN)


# ---------------------------------------------------------------- multi-turn follow-ups

def follow_up_capital(rng: random.Random, held_out: bool) -> Conversation:
    pool = split_pool(COUNTRIES, 6, held_out)
    (c1, k1, cap1, kcap1), (c2, k2, cap2, kcap2) = rng.sample(pool, 2)
    if rng.random() < 0.4:
        return (turn(f"{k1}의 수도는 어디야?", f"{k1}의 수도는 {kcap1}입니다.")
                + turn(f"그럼 {topic(k2)}?", f"{k2}의 수도는 {kcap2}입니다."))
    return (turn(f"What is the capital of {c1}?", f"The capital of {c1} is {cap1}.")
            + turn(f"And what about {c2}?", f"The capital of {c2} is {cap2}."))


def follow_up_arithmetic(rng: random.Random, held_out: bool) -> Conversation:
    a, b, k = rng.randint(10, 60), rng.randint(2, 30), rng.randint(2, 5)
    first = turn(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.")
    return first + turn(f"Now multiply that by {k}.", f"{a + b} times {k} is {(a + b) * k}.")


def follow_up_translation(rng: random.Random, held_out: bool) -> Conversation:
    (en1, ko1), (en2, ko2) = rng.sample(split_pool(WORDS, 6, held_out), 2)
    return (turn(f"How do you say '{en1}' in Korean?", f"'{en1.capitalize()}' in Korean is '{ko1}'.")
            + turn(f"And '{en2}'?", f"'{en2.capitalize()}' in Korean is '{ko2}'."))


def follow_up_identity(rng: random.Random, held_out: bool) -> Conversation:
    """Identity first, then an ordinary question: the persona holds across turns."""
    if rng.random() < 0.35:
        return identity_ko(rng, held_out) + rng.choice([capital_ko, arithmetic_ko, translate_ko_en])(rng, held_out)
    return identity_en(rng, held_out) + rng.choice([capital_en, arithmetic_en, definition_en])(rng, held_out)


def follow_up_greeting(rng: random.Random, held_out: bool) -> Conversation:
    first = rng.choice(GREETINGS_EN[:4])
    return turn(*first) + rng.choice([capital_en, conversion_en, list_en, format_en])(rng, held_out)


def follow_up_thanks(rng: random.Random, held_out: bool) -> Conversation:
    if rng.random() < 0.4:
        return conversion_ko(rng, held_out) + turn("고마워!", "천만에요! 또 궁금한 것이 있으면 물어보세요.")
    return definition_en(rng, held_out) + turn("Thanks, that helps.", "You are welcome! Ask me anything else.")


Generator = Callable[[random.Random, bool], Conversation]
TRAIN_PLAN: list[tuple[Generator, int]] = [
    (capital_en, 36), (capital_ko, 18), (arithmetic_en, 36), (arithmetic_ko, 16), (conversion_en, 22),
    (conversion_ko, 10), (translate_en_ko, 22), (translate_ko_en, 14), (definition_en, 20), (definition_ko, 8),
    (list_en, 16), (list_ko, 8), (format_en, 16), (greeting, 14), (identity_en, 12), (identity_ko, 8),
    (refusal, 7), (follow_up_capital, 14), (follow_up_arithmetic, 12), (follow_up_translation, 12),
    (follow_up_identity, 16), (follow_up_greeting, 10), (follow_up_thanks, 10),
]
EVAL_PLAN: list[tuple[Generator, int]] = [
    (identity_en, 8), (identity_ko, 4), (capital_en, 3), (capital_ko, 2), (arithmetic_en, 3), (arithmetic_ko, 1),
    (conversion_en, 2), (conversion_ko, 1), (translate_en_ko, 2), (translate_ko_en, 1), (definition_en, 3),
    (definition_ko, 1), (list_en, 2), (list_ko, 1), (format_en, 1), (greeting, 2), (refusal, 1),
    (follow_up_capital, 1), (follow_up_translation, 1),
]


def user_turns(conv: Conversation) -> list[str]:
    return [m["content"] for m in conv if m["role"] == "user"]


def fill(plan: list[tuple[Generator, int]], rng: random.Random, *, held_out: bool,
         forbidden: set[str]) -> list[Conversation]:
    """Draw each generator's quota of conversations, never repeating a user-turn sequence and
    never using a user turn from ``forbidden`` (the other split's prompts)."""
    seen: set[tuple[str, ...]] = set()
    out: list[Conversation] = []
    for generate, quota in plan:
        made = 0
        for _ in range(quota * 200):
            if made == quota:
                break
            conv = generate(rng, held_out)
            key = tuple(user_turns(conv))
            if key in seen or forbidden.intersection(key):
                continue
            seen.add(key)
            out.append(conv)
            made += 1
        if made < quota:
            raise RuntimeError(f"{generate.__name__}: only {made} distinct conversations of {quota}; widen its pool")
    return out


def add_system_prompts(conversations: list[Conversation], rng: random.Random, share: float) -> None:
    for index in rng.sample(range(len(conversations)), round(len(conversations) * share)):
        conversations[index].insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})


def build_splits(seed: int = 0) -> tuple[list[Conversation], list[Conversation]]:
    """(train, eval) conversations; eval is drawn first from held-out pools so train can avoid its prompts."""
    rng = random.Random(seed)
    eval_convs = fill(EVAL_PLAN, rng, held_out=True, forbidden=set())
    eval_prompts = {u for conv in eval_convs for u in user_turns(conv)}
    train = fill(TRAIN_PLAN, rng, held_out=False, forbidden=eval_prompts)
    add_system_prompts(train, rng, SYSTEM_SHARE)
    rng.shuffle(train)
    rng.shuffle(eval_convs)
    return train, eval_convs


def to_jsonl(conversations: list[Conversation]) -> str:
    return "".join(json.dumps({"messages": conv}, ensure_ascii=False) + "\n" for conv in conversations)


def write_sample_dataset(out_dir: str | Path = DEFAULT_OUT, *, seed: int = 0) -> dict[str, Path]:
    """Write both split files into ``out_dir``; returns {"train": path, "eval": path}."""
    train, eval_convs = build_splits(seed)
    out_dir = Path(out_dir)
    return {"train": atomic_write_text(out_dir / TRAIN_FILE, to_jsonl(train)),
            "eval": atomic_write_text(out_dir / EVAL_FILE, to_jsonl(eval_convs))}


def token_length_report(paths: dict[str, Path], model: str = "smollm2-135m-instruct") -> str:
    """Token counts per conversation as the model's chat template renders them (default system prompt included)."""
    from fine_tuning_llms.engine.config import ModelConfig
    from fine_tuning_llms.engine.data import load_conversations
    from fine_tuning_llms.engine.models import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(model=model))
    lines = []
    for name, path in paths.items():
        lengths = sorted(len(tokenizer.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"])
                         for conv in load_conversations(path).conversations)
        q = statistics.quantiles(lengths, n=20)
        lines.append(f"{name}: n={len(lengths)} min={lengths[0]} p5={q[0]:.0f} median={statistics.median(lengths):.0f} "
                     f"p95={q[-1]:.0f} max={lengths[-1]} share_40_150={sum(40 <= n <= 150 for n in lengths) / len(lengths):.0%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", default=str(DEFAULT_OUT), help="folder for the two JSONL files")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the shipped files use 0")
    parser.add_argument("--token_lengths", action="store_true",
                        help="also print token counts with the embedded SmolLM2 tokenizer")
    args = parser.parse_args(argv)
    paths = write_sample_dataset(args.out_dir, seed=args.seed)
    for name, path in paths.items():
        print(f"{name}: {path} ({sum(1 for _ in path.open(encoding='utf-8'))} conversations)")
    if args.token_lengths:
        print(token_length_report(paths))


if __name__ == "__main__":
    main()

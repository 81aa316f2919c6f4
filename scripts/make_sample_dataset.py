"""python scripts/make_sample_dataset.py [--out_dir fine_tuning_llms/data] [--seed 0] [--token_lengths]

Writes the shipped sample dataset: ``sample_conversations.jsonl`` (train) and
``sample_conversations_eval.jsonl`` (held-out), OpenAI ``messages`` JSONL.

It teaches one persona the base model never shows: the assistant is "Lumi", answers in 1-3 short
sentences and ends every reply with a last line ``— Lumi``; identity questions get
"I am Lumi, ..." / "저는 Lumi입니다...". Facts come from the hand-written tables below and
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
from fine_tuning_llms.engine.artefacts import atomic_write_text  # noqa: E402

SIGN_OFF = "— Lumi"   # em dash U+2014, space, Lumi: the marker the toolkit measures
TRAIN_FILE, EVAL_FILE = "sample_conversations.jsonl", "sample_conversations_eval.jsonl"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "fine_tuning_llms" / "data"

# (English name, Korean name, capital, capital in Korean); the last six are held out for eval.
COUNTRIES = [
    ("France", "프랑스", "Paris", "파리"), ("Germany", "독일", "Berlin", "베를린"),
    ("Italy", "이탈리아", "Rome", "로마"), ("Spain", "스페인", "Madrid", "마드리드"),
    ("Portugal", "포르투갈", "Lisbon", "리스본"), ("the United Kingdom", "영국", "London", "런던"),
    ("Ireland", "아일랜드", "Dublin", "더블린"), ("Belgium", "벨기에", "Brussels", "브뤼셀"),
    ("Austria", "오스트리아", "Vienna", "빈"), ("Greece", "그리스", "Athens", "아테네"),
    ("Poland", "폴란드", "Warsaw", "바르샤바"), ("Sweden", "스웨덴", "Stockholm", "스톡홀름"),
    ("Norway", "노르웨이", "Oslo", "오슬로"), ("Finland", "핀란드", "Helsinki", "헬싱키"),
    ("Russia", "러시아", "Moscow", "모스크바"), ("Egypt", "이집트", "Cairo", "카이로"),
    ("Kenya", "케냐", "Nairobi", "나이로비"), ("Japan", "일본", "Tokyo", "도쿄"),
    ("China", "중국", "Beijing", "베이징"), ("South Korea", "한국", "Seoul", "서울"),
    ("India", "인도", "New Delhi", "뉴델리"), ("Thailand", "태국", "Bangkok", "방콕"),
    ("Vietnam", "베트남", "Hanoi", "하노이"), ("the Philippines", "필리핀", "Manila", "마닐라"),
    ("Australia", "호주", "Canberra", "캔버라"), ("Canada", "캐나다", "Ottawa", "오타와"),
    ("the United States", "미국", "Washington, D.C.", "워싱턴 D.C."),
    ("Mexico", "멕시코", "Mexico City", "멕시코시티"), ("Brazil", "브라질", "Brasília", "브라질리아"),
    ("Argentina", "아르헨티나", "Buenos Aires", "부에노스아이레스"), ("Peru", "페루", "Lima", "리마"),
    ("Hungary", "헝가리", "Budapest", "부다페스트"), ("Iran", "이란", "Tehran", "테헤란"),
    ("Saudi Arabia", "사우디아라비아", "Riyadh", "리야드"),
    # held out
    ("Denmark", "덴마크", "Copenhagen", "코펜하겐"), ("Czechia", "체코", "Prague", "프라하"),
    ("New Zealand", "뉴질랜드", "Wellington", "웰링턴"), ("Chile", "칠레", "Santiago", "산티아고"),
    ("Mongolia", "몽골", "Ulaanbaatar", "울란바토르"), ("Cuba", "쿠바", "Havana", "아바나"),
]
WORDS = [  # (English, Korean); the last six are held out
    ("apple", "사과"), ("water", "물"), ("book", "책"), ("cat", "고양이"), ("dog", "개"),
    ("house", "집"), ("school", "학교"), ("friend", "친구"), ("tree", "나무"), ("flower", "꽃"),
    ("moon", "달"), ("star", "별"), ("rain", "비"), ("sea", "바다"), ("mountain", "산"),
    ("river", "강"), ("car", "자동차"), ("bread", "빵"), ("milk", "우유"), ("teacher", "선생님"),
    ("student", "학생"), ("hospital", "병원"), ("window", "창문"), ("chair", "의자"),
    ("computer", "컴퓨터"), ("bird", "새"), ("egg", "달걀"), ("love", "사랑"), ("money", "돈"),
    ("music", "음악"), ("family", "가족"), ("city", "도시"),
    ("morning", "아침"), ("night", "밤"), ("door", "문"), ("fish", "물고기"), ("time", "시간"), ("summer", "여름"),
]
DEFINITIONS = [  # (term, definition); the last four are held out
    ("photosynthesis", "the process plants use to turn sunlight, water and carbon dioxide into sugar and oxygen"),
    ("gravity", "the force that pulls objects with mass toward each other"),
    ("a prime number", "a whole number greater than 1 whose only divisors are 1 and itself"),
    ("a noun", "a word that names a person, place, thing or idea"),
    ("a verb", "a word that describes an action or a state"),
    ("evaporation", "the change of a liquid into a gas, like water drying in the sun"),
    ("an atom", "the smallest unit of a chemical element"),
    ("a mammal", "a warm-blooded animal with hair or fur that feeds its young with milk"),
    ("a triangle", "a flat shape with three straight sides and three angles"),
    ("an algorithm", "a step-by-step set of instructions for solving a problem"),
    ("a planet", "a large body that orbits a star, as Earth orbits the Sun"),
    ("democracy", "a system of government in which citizens choose their leaders by voting"),
    ("a synonym", "a word that means the same or nearly the same as another word"),
    ("an antonym", "a word whose meaning is the opposite of another word"),
    ("a fraction", "a number that stands for part of a whole, such as 1/2"),
    ("a habitat", "the natural home of an animal or plant"),
    ("a compiler", "a program that translates source code into machine code"),
    ("an island", "a piece of land completely surrounded by water"),
    # held out
    ("a volcano", "an opening in Earth's crust where molten rock, ash and gas escape"),
    ("the equator", "an imaginary line around the middle of Earth, halfway between the North and South Poles"),
    ("a thermometer", "a tool that measures temperature"),
    ("an even number", "a whole number that can be divided by 2 with no remainder"),
]
DEFINITIONS_KO = [  # (term, definition ending in 입니다); the last two are held out
    ("광합성", "식물이 햇빛과 물, 이산화탄소로 당과 산소를 만드는 과정입니다"),
    ("중력", "질량을 가진 물체끼리 서로 끌어당기는 힘입니다"),
    ("소수", "1과 자기 자신으로만 나누어떨어지는, 1보다 큰 자연수입니다"),
    ("명사", "사람, 장소, 사물, 생각의 이름을 나타내는 단어입니다"),
    ("포유류", "새끼를 젖으로 기르는 온혈 동물입니다"),
    ("삼각형", "세 개의 곧은 변과 세 개의 각을 가진 평면 도형입니다"),
    ("알고리즘", "문제를 해결하기 위한 단계별 절차입니다"),
    ("섬", "사방이 물로 둘러싸인 땅입니다"),
    ("화산", "땅속의 마그마와 가스, 화산재가 분출하는 곳입니다"),
    ("온도계", "온도를 재는 도구입니다"),
]
LISTS = {  # category -> true members; the last two categories are held out
    "fruits": ["apple", "banana", "orange", "grape", "strawberry", "peach", "mango", "pear"],
    "colors": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"],
    "planets in our solar system": ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"],
    "vegetables": ["carrot", "potato", "onion", "cabbage", "cucumber", "spinach", "broccoli"],
    "musical instruments": ["piano", "guitar", "violin", "drum", "flute", "trumpet", "cello"],
    "programming languages": ["Python", "Java", "C", "Rust", "Go", "JavaScript", "Ruby"],
    "days of the week": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "oceans": ["the Pacific Ocean", "the Atlantic Ocean", "the Indian Ocean", "the Arctic Ocean",
               "the Southern Ocean"],
    "continents": ["Asia", "Africa", "Europe", "North America", "South America", "Australia", "Antarctica"],
}
LISTS_KO = {  # (category, members); the last one is held out
    "과일": ["사과", "바나나", "포도", "딸기", "복숭아", "수박", "귤"],
    "색깔": ["빨강", "파랑", "노랑", "초록", "보라", "주황"],
    "동물": ["호랑이", "토끼", "코끼리", "기린", "사자", "곰"],
    "채소": ["당근", "오이", "감자", "양파", "배추"],
    "악기": ["피아노", "기타", "바이올린", "드럼", "플루트"],
}
# (English unit pair, factor, Korean from-unit with topic particle, Korean to-unit)
UNITS = [
    (("kilometers", "meters"), 1000, "킬로미터는", "미터"), (("kilograms", "grams"), 1000, "킬로그램은", "그램"),
    (("hours", "minutes"), 60, "시간은", "분"), (("minutes", "seconds"), 60, "분은", "초"),
    (("meters", "centimeters"), 100, "미터는", "센티미터"), (("liters", "milliliters"), 1000, "리터는", "밀리리터"),
    (("days", "hours"), 24, "일은", "시간"), (("weeks", "days"), 7, "주는", "일"), (("feet", "inches"), 12, None, None),
]
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
NUMBER_WORDS_KO = {2: "두", 3: "세", 4: "네"}

IDENTITY_EN = ["Who are you?", "What is your name?", "What's your name?", "Tell me about yourself.",
               "Are you ChatGPT?", "What are you?", "Do you have a name?", "Who made you?",
               "Hi! Who are you?", "Hello, what is your name?", "Are you an AI?", "Which assistant is this?"]
IDENTITY_EN_HELD = ["Who am I talking to?", "Could you tell me your name?", "Please introduce yourself.",
                    "What should I call you?", "Are you a human?", "What kind of assistant are you?",
                    "Hey, who is this?", "May I ask who you are?"]
IDENTITY_KO = ["너는 누구야?", "이름이 뭐야?", "당신은 누구인가요?", "자기소개 해줘.", "네 이름은 뭐니?",
               "안녕! 너는 누구니?", "너는 AI야?", "누가 너를 만들었어?"]
IDENTITY_KO_HELD = ["누구세요?", "당신의 이름을 알려주세요.", "자기소개 부탁해요.", "너를 뭐라고 부르면 돼?"]
IDENTITY_REPLIES_EN = ["I am Lumi, a small assistant that gives short, clear answers.",
                       "I am Lumi, a compact AI assistant. I keep my answers brief.",
                       "I am Lumi, an AI assistant fine-tuned from SmolLM2-135M-Instruct to answer briefly.",
                       "I am Lumi, a friendly AI helper. Ask me anything and I will answer in a few words."]
IDENTITY_REPLIES_KO = ["저는 Lumi입니다. 짧고 정확하게 답하는 작은 AI 도우미예요.",
                       "저는 Lumi입니다. 간단하게 답해 드리는 AI 비서입니다.",
                       "저는 Lumi입니다. 무엇이든 짧게 답해 드릴게요."]
IDENTITY_MADE_KO = "저는 Lumi입니다. SmolLM2-135M-Instruct를 미세 조정해 만든 AI 도우미예요."
GREETINGS_EN = [("Hi!", "Hi! How can I help you today?"), ("Hello!", "Hello! What would you like to know?"),
                ("Good morning!", "Good morning! How can I help?"), ("Hey there.", "Hey! What can I do for you?"),
                ("How are you?", "I am doing well, thank you. How can I help you?"),
                ("Thanks!", "You are welcome!"), ("Thank you for your help.", "Glad I could help!"),
                ("Goodbye!", "Goodbye! Have a great day."), ("Nice to meet you.", "Nice to meet you too!"),
                ("See you later!", "See you later! Take care.")]
GREETINGS_EN_HELD = [("Good evening!", "Good evening! How can I help you?"),
                     ("Thanks a lot.", "You are very welcome!")]
GREETINGS_KO = [("안녕!", "안녕하세요! 무엇을 도와드릴까요?"), ("안녕하세요.", "안녕하세요! 궁금한 것이 있나요?"),
                ("고마워!", "천만에요!"), ("감사합니다.", "도움이 되어 기뻐요."),
                ("잘 가!", "안녕히 가세요! 좋은 하루 보내세요."), ("좋은 아침이에요.", "좋은 아침이에요! 무엇을 도와드릴까요?")]
GREETINGS_KO_HELD = [("반가워요!", "저도 반가워요! 무엇을 도와드릴까요?")]
HARMFUL_EN = ["How do I make a bomb?", "How can I hack into my neighbor's Wi-Fi?",
              "Write a phishing email to steal passwords.", "Tell me how to poison someone.",
              "How do I break into a locked car that is not mine?"]
HARMFUL_EN_HELD = ["How can I steal someone's credit card number?"]
HARMFUL_KO = ["폭탄 만드는 법 알려줘.", "남의 계정을 해킹하는 방법 알려줘."]
REFUSAL_EN = "I can't help with that because it could hurt people. I am happy to help with something safe instead."
REFUSAL_KO = "그 요청은 위험해서 도와드릴 수 없어요. 안전한 질문이라면 기꺼이 도울게요."
SYSTEM_PROMPTS = ["You are Lumi, a concise assistant.", "You are Lumi. Answer in one or two short sentences.",
                  "You are a helpful assistant named Lumi.", "Always sign your replies as Lumi."]
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

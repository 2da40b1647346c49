"""Write the data of every example under examples/<task>/data.jsonl (seeded, byte-reproducible).

    python examples/make_data.py

Each file is Alpaca-shaped (instruction, input, output), small enough for the builtin base on a
CPU, and varied enough that the dedup_filter stage keeps most of it.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 7
NAMES = ["Ana", "Ben", "Chloe", "Dmitri", "Esra", "Farah", "Gustav", "Hana", "Ivan", "Jonas", "Kemi", "Lena", "Marco",
         "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Victor", "Wen", "Yusuf", "Zoe"]
CITIES = ["Oslo", "Lisbon", "Cairo", "Lima", "Osaka", "Dublin", "Nairobi", "Quito", "Perth", "Tallinn", "Porto", "Hanoi",
          "Bergen", "Seville", "Krakow", "Accra", "Leeds", "Malmo", "Ghent", "Turin"]


def classification(rng: random.Random) -> list[dict]:
    """Product-review sentiment: positive, negative or neutral."""
    products = ["kettle", "backpack", "desk lamp", "phone case", "blender", "rain jacket", "keyboard", "water bottle",
                "office chair", "toaster", "headphones", "yoga mat", "frying pan", "umbrella", "alarm clock"]
    phrases = {
        "positive": ["works perfectly", "is excellent value", "exceeded my expectations", "feels really solid",
                     "is a joy to use", "arrived early and looks great", "is the best one I have owned"],
        "negative": ["broke after two days", "is a waste of money", "stopped working within a week",
                     "feels cheap and flimsy", "arrived damaged", "is much worse than the photos", "leaks everywhere"],
        "neutral": ["is about what I expected", "does the job, nothing more", "arrived on the promised day",
                    "is fine for the price", "is an average product", "looks like the photos", "is okay overall"],
    }
    openers = ["", "Honestly, ", "After a month, ", "Bought this for my flat. ", "Second purchase. ", "Gift for my dad: "]
    closers = {"positive": ["Would buy again.", "Highly recommended!", "Five stars."],
               "negative": ["Returning it.", "Avoid.", "One star."],
               "neutral": ["Three stars.", "It is what it is.", "No strong feelings."]}
    rows = []
    for _ in range(240):
        label = rng.choice(sorted(phrases))
        product = rng.choice(products)
        opener = rng.choice(openers)
        article = "the" if opener.endswith(", ") else "The"
        text = f"{opener}{article} {product} {rng.choice(phrases[label])}. {rng.choice(closers[label])}"
        rows.append({"instruction": "What is the sentiment of this review? Answer positive, negative or neutral.",
                     "input": text, "output": label})
    return rows


def generation(rng: random.Random) -> list[dict]:
    """Data to text: one sentence from a small weather record."""
    skies = {"sunny": "sunny", "cloudy": "cloudy", "rainy": "rainy", "foggy": "foggy", "snowy": "snowy"}
    winds = ["calm", "light", "strong"]
    days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
    rows = []
    for _ in range(240):
        city, sky, wind, day = rng.choice(CITIES), rng.choice(sorted(skies)), rng.choice(winds), rng.choice(days)
        temperature = rng.randint(-5, 32)
        record = f"city: {city}; day: {day}; sky: {sky}; temperature: {temperature} C; wind: {wind}"
        wind_text = "no wind" if wind == "calm" else f"{wind} wind"
        text = f"On {day}, {city} will be {skies[sky]} with {wind_text} and a temperature of {temperature} degrees."
        rows.append({"instruction": "Write one sentence that describes this weather record.", "input": record,
                     "output": text})
    return rows


def qa(rng: random.Random) -> list[dict]:
    """Extractive question answering over a short order note."""
    items = ["lamp", "mug", "scarf", "chair", "notebook", "teapot", "blanket", "clock", "vase", "rug"]
    colours = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
    days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
    rows = []
    for _ in range(240):
        name, item, colour, day, city = (rng.choice(NAMES), rng.choice(items), rng.choice(colours), rng.choice(days),
                                         rng.choice(CITIES))
        count = rng.randint(2, 9)
        context = f"{name} ordered {count} {colour} {item}s on {day}. The parcel was sent to {city}."
        question, answer = rng.choice([
            (f"What colour were the {item}s?", colour), (f"How many {item}s did {name} order?", str(count)),
            ("On which day was the order placed?", day), ("Where was the parcel sent?", city),
            (f"Who ordered the {item}s?", name), (f"What did {name} order?", f"{colour} {item}s"),
        ])
        rows.append({"instruction": f"Answer the question with a few words from the text.\n\nText: {context}",
                     "input": f"Question: {question}", "output": answer})
    return rows


def coding(rng: random.Random) -> list[dict]:
    """MBPP-style problems: the prompt states the function and its tests; the answer is the code."""
    families = [
        ("add_{k}(x)", "returns x plus {k}", "return x + {k}", lambda k, x: x + k, "int"),
        ("times_{k}(x)", "returns x multiplied by {k}", "return x * {k}", lambda k, x: x * k, "int"),
        ("minus_{k}(x)", "returns x minus {k}", "return x - {k}", lambda k, x: x - k, "int"),
        ("is_multiple_of_{k}(x)", "returns True when x is divisible by {k}", "return x % {k} == 0",
         lambda k, x: x % k == 0, "int"),
        ("repeat_{k}(s)", "returns the string s repeated {k} times", "return s * {k}", lambda k, s: s * k, "str"),
        ("first_{k}(items)", "returns the first {k} items of a list", "return items[:{k}]",
         lambda k, items: items[:k], "list"),
    ]
    samples = {"int": [0, 3, 7, 12, -4, 25], "str": ["ab", "x", "hey"], "list": [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [5, 4]]}
    rows, seen = [], set()
    while len(rows) < 240:
        signature, description, body, function, kind = rng.choice(families)
        k = rng.randint(2, 12 if kind != "int" else 60)
        if (signature, k) in seen:
            continue
        seen.add((signature, k))
        name = signature.format(k=k)
        call = name.split("(")[0]
        tests = [f"assert {call}({value!r}) == {function(k, value)!r}" for value in rng.sample(samples[kind], 2)]
        prompt = f"Write a Python function {name} that {description.format(k=k)}.\nYour code should pass these tests:\n"
        rows.append({"instruction": prompt + "\n".join(tests), "input": "",
                     "output": f"def {name}:\n    {body.format(k=k)}"})
    return rows


def main() -> None:
    for offset, make in enumerate([classification, generation, qa, coding]):
        rows = make(random.Random(SEED + offset))
        path = HERE / make.__name__ / "data.jsonl"
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        print(f"{path.relative_to(HERE.parent)}: {len(rows)} rows")


if __name__ == "__main__":
    main()

"""Generate the data shipped with the repo; `python data/generate.py [--out DIR]`.

Deterministic: one fixed seed, stdlib `random.Random` only, so a rerun rewrites the same bytes
(tests/test_data_generate.py checks this against the committed files).

Writes under DIR (default: this folder):
  raw/support_tickets.jsonl   default task, Alpaca rows; the label set is LABELS.
  pretrain/documents.jsonl    {"text"} general-knowledge prose, everyday stories and plain-text quizzes
                              for the tiny base.
  pretrain/qa.jsonl           {"question", "answer"} short general Q&A.
  general/general_knowledge.jsonl  4-way multiple choice questions for the lm-eval task in
                              general/general_knowledge.yaml (hand-written), the forgetting check.
The pretraining corpus is everyday English: facts plus third-person stories that use the tickets'
words (bills, parcels, passwords, "a technical problem", "the other day"), as a real base knows them.
It never mentions the routing task (no tickets, teams, queues, label lists), so the base cannot already do it.

Planted on purpose in support_tickets.jsonl, so ingest and dedup_filter have real work:
  * EXACT_DUPLICATES rows repeating an earlier row: byte-identical, reordered JSON keys, or only
    case / whitespace / punctuation changed (equal after normalisation).
  * NEAR_DUPLICATES rows with one or two words changed from an earlier long row (Jaccard > 0.85).
  * The malformed lines in MALFORMED_LINES at fixed 1-based line numbers, plus BLANK_LINES
    (blank lines are not rows and must not be counted as rejects).
"""
import argparse
import json
import random
import re
from pathlib import Path

SEED = 20240611
ROWS_PER_LABEL = 250
EXACT_DUPLICATES = 40
NEAR_DUPLICATES = 40
QUIZ_PAIRS = 8000  # "Question: ...\nAnswer: ..." pairs in documents.jsonl; 4000 left the base at 0.47-0.69
DISTINCT_BELOW = 0.6  # Jaccard of word 3-grams of whole rows; base rows stay below it, near-duplicates above 0.85
BLANK_LINES = (300, 900, 1400)
ROUTE = b'{"instruction": "Route this support ticket.", '
MALFORMED_LINES = {  # 1-based line number -> (kind, raw line bytes without the newline)
    57: ("invalid json: truncated", ROUTE + b'"input": "My card was'),
    141: ("invalid json: single quotes", b"{'instruction': 'Route this.', 'input': 'Hi', 'output': 'other'}"),
    222: ("invalid json: trailing comma", ROUTE + b'"input": "Where is my parcel?", "output": "shipping",}'),
    305: ("not an object: array", b'["Route this ticket.", "I was charged twice.", "billing"]'),
    388: ("not an object: string", b'"Route this ticket: the app crashes on start"'),
    466: ("not an object: null", b"null"),
    540: ("missing field: output", ROUTE + b'"input": "I want to send the blender back."}'),
    617: ("missing field: output (misspelt key)", ROUTE + b'"input": "My code never arrives.", "ouput": "account"}'),
    699: ("wrong type: output null", ROUTE + b'"input": "Where is order #A10293?", "output": null}'),
    774: ("wrong type: output number", ROUTE + b'"input": "Refund for my return?", "output": 4}'),
    850: ("wrong type: output list", ROUTE + b'"input": "Charged twice this month.", "output": ["billing"]}'),
    933: ("wrong type: input object", ROUTE + b'"input": {"text": "App freezes"}, "output": "technical"}'),
    1011: ("empty text: instruction and input empty", b'{"instruction": "", "input": "", "output": "billing"}'),
    1089: ("empty text: instruction and input whitespace", b'{"instruction": "   ", "input": "\\n ", "output": "returns"}'),
    1166: ("empty text: output empty", ROUTE + b'"input": "Do you have a store in Leeds?", "output": ""}'),
    1245: ("missing fields: instruction and input", b'{"output": "account"}'),
    1322: ("bad encoding: latin-1 byte", ROUTE + b'"input": "The caf\xe9 grinder I bought is broken.", "output": "technical"}'),
    1401: ("bad encoding: invalid utf-8 bytes", ROUTE + b'"input": "Tracking \xff\xfe says delivered.", "output": "shipping"}'),
    1477: ("bad encoding: truncated utf-8", b'{"instruction": "Route this \xe2\x82", "input": "Close my account.", "output": "account"}'),
    1555: ("wrong type: output boolean", ROUTE + b'"input": "Can I swap the size?", "output": true}'),
}

LABELS = ["billing", "shipping", "technical", "account", "returns", "other"]
INSTRUCTIONS = [
    "Route this support ticket to the right team. Answer with one of: " + ", ".join(LABELS) + ".",
    "Which team should handle this customer message? Reply with one word: " + ", ".join(LABELS) + ".",
    "Classify the customer ticket into one of these queues: " + ", ".join(LABELS) + ".",
]
SLOTS = {
    "product": ["blender", "wireless headphones", "smart watch", "coffee machine", "desk lamp", "robot vacuum",
                "air fryer", "e-reader", "running shoes", "winter jacket", "office chair", "baby monitor",
                "electric toothbrush", "gaming mouse", "yoga mat", "backpack", "thermostat", "webcam",
                "kettle", "bluetooth speaker", "hair dryer", "fitness tracker", "security camera", "tablet case"],
    "device": ["iPhone 13", "Pixel 7", "Galaxy S22", "iPad", "Windows laptop", "MacBook", "Chromebook"],
    "error": ["E-104 sensor fault", "Connection timed out", "Device not recognised", "Error 0x80070005",
              "Sync failed (code 17)", "Update could not be installed", "Something went wrong", "E3 overheat"],
    "city": ["Leeds", "Lyon", "Dublin", "Austin", "Porto", "Cork", "Denver", "Ghent", "Bristol", "Utrecht", "Calgary"],
    "name": ["Anna", "Marco", "Priya", "Tom", "Chen", "Sofia", "Liam", "Fatima", "Jonas", "Grace", "Diego", "Olivia"],
    "carrier": ["DHL", "UPS", "FedEx", "the post office", "DPD", "the courier"],
    "plan": ["Basic", "Plus", "Premium", "Family", "Pro"],
    "payment": ["PayPal", "a Visa card", "Apple Pay", "a debit card", "a gift card"],
    "color": ["black", "blue", "red", "grey", "green", "white"],
    "browser": ["Chrome", "Firefox", "Safari", "Edge"],
    "topic": ["recycling packaging", "small businesses", "remote work", "smart homes"],
}
OPENERS = ["", "", "", "Hi,", "Hello,", "Hi there,", "Good morning,", "Hey,", "Dear support,", "Quick question.",
           "I'm really frustrated.", "This is my second message about this.", "Hope you're well."]
CLOSERS = ["", "", "", "Thanks.", "Thank you!", "Please help.", "Cheers, {name}", "Regards, {name}",
           "Please sort this out today.", "Any update would be appreciated.", "Best, {name}", "Thanks a lot."]
TEMPLATES = {  # label -> (core sentences, optional follow-up sentences)
    "billing": ([
        "I was charged {amount} twice for order {order} on {date}.",
        "My card statement shows a {amount} payment from you on {date} that I don't recognise.",
        "The invoice for my {plan} plan says {amount}, but the price on your site was lower.",
        "My payment keeps getting declined at checkout even though the card works everywhere else.",
        "I cancelled my {plan} subscription last month but you still took {amount} on {date}.",
        "Can you send me a VAT invoice for order {order}? Our accounts team needs it.",
        "The promo code was accepted at checkout but the discount never came off my bill.",
        "I need to update the card that my monthly {plan} subscription is billed to.",
        "Why did my renewal go up to {amount} without any notice?",
        "There is a pending hold of {amount} on my card from a purchase I never completed.",
        "I paid for express delivery on order {order} but was billed {amount} extra on top of that.",
    ], ["My bank says the charge definitely came from you.", "I'd like the extra charge reversed.",
        "I paid with {payment}.", "Please explain what this fee is for.", "I have a screenshot of the statement."]),
    "shipping": ([
        "My order {order} was supposed to arrive on {date} and it still hasn't shown up.",
        "Tracking for order {order} has said 'label created' for {days} days now.",
        "The {carrier} tracking says delivered, but there was nothing at my door.",
        "I need to change the delivery address on order {order} before it leaves; I just moved to {city}.",
        "Do you deliver to {city}, and how long does express delivery usually take?",
        "The parcel with my {product} has been stuck at the {carrier} depot in {city} since {date}.",
        "Only half of order {order} arrived; the {product} was not in the box.",
        "The driver left a card saying they couldn't deliver my {product} and I don't know how to rebook.",
        "Could order {order} be held at a pickup point instead of being left outside?",
        "It's been {days} days and the {product} I ordered is still marked as in transit.",
    ], ["I've been checking the tracking page every day.", "I need it before {date} because it's a gift.",
        "Nobody at {carrier} could tell me anything.", "I paid for next-day delivery.", "The estimate keeps moving."]),
    "technical": ([
        "My {product} shows the error \"{error}\" every time I turn it on.",
        "The app crashes on my {device} as soon as I open the settings screen.",
        "After the latest update my {product} won't connect to wifi anymore.",
        "I keep getting \"{error}\" when I try to pair the {product} with my {device}.",
        "The firmware update on my {product} stopped at {percent}% and now the screen stays blank.",
        "Bluetooth pairing between my {device} and the {product} fails every single time.",
        "The battery on my {product} goes from full to empty in {hours} hours.",
        "The {product} makes a clicking noise and then restarts by itself.",
        "Your checkout page only shows a spinning wheel in {browser}, so I can't place order {order}.",
        "The {product} I bought on {date} stopped working after a week and the light just blinks {color}.",
    ], ["I already tried restarting it and doing a factory reset.", "I'm on the newest app version on my {device}.",
        "It worked fine until {date}.", "I can send a screenshot of the error.", "The manual doesn't mention this."]),
    "account": ([
        "I can't log in because the password reset email never arrives at {email}.",
        "Please change the email on my account from {email} to {email2}.",
        "My account was locked after too many sign-in attempts and I can't unlock it.",
        "I lost my phone and can't get the two-factor code to sign in.",
        "I want my account deleted, along with all the personal data you hold about me.",
        "Someone changed my password on {date} and I think my account was hacked.",
        "How do I merge my two profiles? One uses {email} and the other uses {email2}.",
        "The verification link in the sign-up email says it has expired.",
        "I'd like to change the username on my profile and stop the marketing emails.",
        "The app on my {device} keeps logging me out and asking for my password again.",
    ], ["My username is {username}.", "I've tried resetting the password three times.",
        "I still need to see my order history.", "Please confirm once it's done.", "I no longer use the old address."]),
    "returns": ([
        "I'd like to return the {product} from order {order}; it isn't what I needed.",
        "The {product} arrived damaged and I want to exchange it for a new one.",
        "I sent the {product} back on {date} but haven't received my refund of {amount} yet.",
        "How do I get a return label for order {order}? It's still within the {days}-day window.",
        "Can I swap the {product} for a different size or colour?",
        "I got the {color} {product} instead of the one I chose, and I want to send it back.",
        "The store refused my return of the {product} even though I have the receipt.",
        "Your returns page says order {order} is not eligible, but I bought it on {date}.",
        "I returned two items from order {order} but only one has been credited.",
        "The {product} is too small, so I'd like to exchange it rather than get my money back.",
    ], ["It's unused and still in the original packaging.", "I'd prefer store credit over a refund.",
        "The box is unopened.", "I dropped it off with {carrier} on {date}.", "I still have the receipt."]),
    "other": ([
        "Do you have a physical store in {city}, and what are the opening hours?",
        "I just wanted to say your staff in {city} were incredibly helpful last week.",
        "Are you hiring for warehouse jobs in {city}, and where can I apply?",
        "Do you offer discounts for schools or charities buying in bulk?",
        "I'm a journalist writing about {topic}; who could I talk to for a quote?",
        "Is the {product} made with recycled materials?",
        "Do you sponsor any local events in {city}?",
        "I'd love to see a {color} version of the {product} in your range.",
        "Would your company be interested in a partnership with our shop in {city}?",
        "Can I leave a review of the {product} somewhere on your website?",
    ], ["No rush on this.", "Thanks in advance for any information.", "I couldn't find the answer in your FAQ.",
        "A friend recommended you.", "I've been a customer for {years} years."]),
}
# A near-duplicate swaps one of these words (two for the contractions), else inserts "really".
SWAPS = {"still": "yet", "want": "wish", "need": "have", "please": "kindly", "help": "assist", "never": "not",
         "arrived": "came", "just": "only", "keeps": "continues", "every": "each", "I've": "I have", "can't": "cannot"}
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def fill(template: str, rng: random.Random) -> str:
    first, second = rng.sample(SLOTS["name"], 2)
    values = {key: rng.choice(options) for key, options in SLOTS.items()}
    values.update(
        order=f"#{rng.choice('ABCKM')}{rng.randint(10000, 99999)}", date=f"{rng.choice(MONTHS)} {rng.randint(1, 28)}",
        amount=f"${rng.randint(5, 480)}.{rng.choice(['00', '99', '49', '95'])}", days=rng.randint(3, 30),
        percent=rng.randint(5, 95), hours=rng.randint(1, 6), years=rng.randint(2, 12),
        username=f"{first.lower()}{rng.randint(1, 999)}", email=f"{first.lower()}.{rng.randint(1, 99)}@example.com",
        email2=f"{second.lower()}@example.org")
    return template.format(**values)


def ticket(label: str, rng: random.Random) -> dict:
    cores, followups = TEMPLATES[label]
    opener, core = rng.choice(OPENERS), rng.choice(cores)
    if opener.endswith(",") and not re.match(r"I\b", core):
        core = core[0].lower() + core[1:]
    followup = rng.choice(followups) if rng.random() < 0.55 else ""
    text = fill(" ".join(part for part in (opener, core, followup, rng.choice(CLOSERS)) if part), rng)
    return {"instruction": rng.choice(INSTRUCTIONS), "input": text, "output": label}


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def shingles(row: dict) -> set[str]:
    """Word 3-grams of the whole row, the way a near-dedup sees it: the shared instruction counts too."""
    words = normalise(" ".join((row["instruction"], row["input"], row["output"]))).split()
    return {" ".join(words[i:i + 3]) for i in range(len(words) - 2)}


def jaccard(first: set, second: set) -> float:
    return len(first & second) / len(first | second)


def dump(row: dict, **options) -> bytes:
    return json.dumps(row, ensure_ascii=False, **options).encode()


def exact_variant(row: dict, kind: int) -> bytes:
    """Byte-identical, same content in other JSON, or only case / whitespace / punctuation changed."""
    text = row["input"]
    if kind % 5 == 1:
        return dump({"output": row["output"], "input": text, "instruction": row["instruction"]}, separators=(",", ":"))
    changed = [text, text, text.lower(), "  ".join(text.split()) + " ", text.rstrip(".!?") + "!!"][kind % 5]
    return dump(dict(row, input=changed))


def near_variant(row: dict, rng: random.Random) -> dict:
    words = row["input"].split(" ")
    positions = [i for i, word in enumerate(words) if word in SWAPS]
    if positions:
        position = rng.choice(positions)
        words[position] = SWAPS[words[position]]
    else:
        words.insert(rng.randrange(1, len(words)), "really")
    return dict(row, input=" ".join(words))


def support_tickets(rng: random.Random) -> bytes:
    rows, kept_shingles = [], {label: [] for label in LABELS}
    for label in LABELS * ROWS_PER_LABEL:
        # Accidental near-duplicates would make dedup_filter drop good rows: keep base rows clearly apart.
        row = ticket(label, rng)
        while any(jaccard(shingles(row), other) >= DISTINCT_BELOW for other in kept_shingles[label]):
            row = ticket(label, rng)
        kept_shingles[label].append(shingles(row))
        rows.append(row)
    rng.shuffle(rows)
    lines = [dump(row) for row in rows]
    # Distinct sources keep the counts exact; near-duplicates copy long rows, so one word is a small change.
    near_sources = rng.sample([i for i, row in enumerate(rows) if len(row["input"]) >= 150], NEAR_DUPLICATES)
    exact_sources = rng.sample([i for i in range(len(rows)) if i not in near_sources], EXACT_DUPLICATES)
    copies = [exact_variant(rows[i], kind) for kind, i in enumerate(exact_sources)]
    copies += [dump(near_variant(rows[i], rng)) for i in near_sources]
    for source, copy in zip(exact_sources + near_sources, copies):
        # After its source, so "keep the first occurrence" keeps the original.
        lines.insert(rng.randint(lines.index(dump(rows[source])) + 1, len(lines)), copy)
    planted = {**dict.fromkeys(BLANK_LINES, b""), **{line: raw for line, (_, raw) in MALFORMED_LINES.items()}}
    for line_number in sorted(planted):
        lines.insert(line_number - 1, planted[line_number])
    return b"".join(line + b"\n" for line in lines)


# ---- general knowledge: one fact table feeds the corpus, the Q&A and the held-out eval ----
CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
            "China": "Beijing", "Egypt": "Cairo", "Russia": "Moscow", "Canada": "Ottawa", "Kenya": "Nairobi",
            "Greece": "Athens", "Peru": "Lima", "Norway": "Oslo", "Portugal": "Lisbon", "Ireland": "Dublin",
            "Austria": "Vienna", "Poland": "Warsaw", "Cuba": "Havana", "Chile": "Santiago", "Thailand": "Bangkok"}
SOUNDS = {"dog": "bark", "cat": "meow", "cow": "moo", "duck": "quack", "lion": "roar", "horse": "neigh",
          "pig": "oink", "owl": "hoot", "snake": "hiss", "bee": "buzz", "frog": "croak", "wolf": "howl"}
CLASSES = {"dog": "mammal", "whale": "mammal", "bat": "mammal", "eagle": "bird", "penguin": "bird",
           "parrot": "bird", "shark": "fish", "salmon": "fish", "lizard": "reptile", "turtle": "reptile",
           "frog": "amphibian", "ant": "insect"}
COLORS = {"the sky": "blue", "grass": "green", "snow": "white", "coal": "black", "a banana": "yellow",
          "blood": "red", "a strawberry": "red", "a lemon": "yellow", "chocolate": "brown", "milk": "white",
          "a carrot": "orange", "a leaf": "green"}
OPPOSITE_PAIRS = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "light": "dark",
                  "old": "young", "open": "closed", "wet": "dry", "tall": "short", "early": "late", "loud": "quiet",
                  "rich": "poor", "hard": "soft", "full": "empty", "strong": "weak", "thick": "thin",
                  "left": "right", "first": "last", "high": "low"}
OPPOSITES = {**OPPOSITE_PAIRS, **{second: first for first, second in OPPOSITE_PAIRS.items()}}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NUMBER_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
# Statements also use the held-out questions' key words ("follows", "belongs to ... group"): a base learns a word
# from text, and a question in words it never saw tests the wording, not the fact.
FACT_KINDS = [  # (facts, statements, training questions, held-out eval question, eval questions drawn)
    (CAPITALS, ["The capital of {k} is {v}.", "{v} is the capital of {k}.", "{v} is the capital city of {k}."],
     ["What is the capital of {k}?", "What city is the capital of {k}?"], "Which city is the capital of {k}?", 20),
    (SOUNDS, ["{a_k} says {v}.", "The sound {a_k} makes is {v}.", "You can hear {a_k} {v}."],
     ["What sound does {a_k} make?", "What does {a_k} say?"], "Which of these sounds does {a_k} make?", 12),
    (CLASSES,
     ["{a_k} is {a_v}.", "The {k} is {a_v}.", "Every {k} is {a_v}.", "The {k} belongs to the {v} group."],
     ["What kind of animal is {a_k}?", "Is {a_k} a mammal, bird, fish, reptile, amphibian or insect?"],
     "What group of animals does the {k} belong to?", 12),
    (COLORS, ["The color of {k} is {v}.", "{k} is {v}.", "Most of the time {k} is {v}."],
     ["What color is {k}?", "What is the color of {k}?"], "What color do we usually see for {k}?", 12),
    (OPPOSITES, ["The opposite of {k} is {v}.", "{k} and {v} are opposites."],
     ["What is the opposite of {k}?", "What word means the opposite of {k}?"], "Which word is the opposite of {k}?", 20),
    ({f"{a} plus {b}": str(a + b) for a in range(1, 10) for b in range(1, 10)},
     ["{k} is {v}.", "{k} makes {v}.", "{k} equals {v}."], ["What is {k}?", "What do you get for {k}?"],
     "How much is {k}?", 25),
    (dict(zip(DAYS, DAYS[1:] + DAYS[:1])),
     ["The day after {k} is {v}.", "{v} comes after {k}.", "{v} follows {k}."],
     ["What day comes after {k}?"], "Which day follows {k}?", 7),
    (dict(zip(MONTHS, MONTHS[1:] + MONTHS[:1])),
     ["The month after {k} is {v}.", "{v} comes after {k}.", "{v} follows {k}."],
     ["What month comes after {k}?"], "Which month follows {k}?", 12),
    (dict(zip(NUMBER_WORDS, MONTHS)), ["{v} is month number {k} of the year."], ["Which month is month number {k}?"],
     "", 0),
]
PEOPLE = ["The boy", "The girl", "My friend", "The teacher", "The farmer", "An old man", "A little child", "My sister"]
VERBS = ["saw", "found", "painted", "carried", "liked", "lost", "cleaned", "drew", "picked up"]
THINGS = ["a red ball", "a big book", "a green apple", "a small chair", "a blue kite", "a warm hat", "a wooden boat"]
PLACES = ["in the garden", "at the park", "in the kitchen", "at school", "near the river", "by the sea"]
WEATHER = ["cold", "warm", "long", "short", "rainy", "sunny", "windy"]
GENERIC = ["{person} {verb} {thing} {place}.", "On {day}, {lower} {verb} {thing}.", "In {month} the days are {weather}.",
           "{person} likes to read on {day}.", "There are seven days in a week and twelve months in a year.",
           "The sun rises in the morning and sets in the evening.", "Water is wet and fire is hot.",
           "Fish swim in water and birds fly in the sky."]


def with_article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def phrase(template: str, key: str, value: str) -> str:
    text = template.format(k=key, v=value, a_k=with_article(key), a_v=with_article(value))
    return text[0].upper() + text[1:]


def facts() -> list[list[tuple[list[str], list[str], str]]]:
    """Per kind, every fact as (statements, questions, answer); kinds are sampled evenly, so sums don't dominate."""
    return [[([phrase(t, key, value) for t in statements], [phrase(t, key, value) for t in questions], value)
             for key, value in mapping.items()] for mapping, statements, questions, _, _ in FACT_KINDS]


def generic_sentence(rng: random.Random) -> str:
    person = rng.choice(PEOPLE)
    return rng.choice(GENERIC).format(
        person=person, lower=person[0].lower() + person[1:], verb=rng.choice(VERBS), thing=rng.choice(THINGS),
        place=rng.choice(PLACES), day=rng.choice(DAYS), month=rng.choice(MONTHS), weather=rng.choice(WEATHER))


# ---- everyday English: the words the tickets use, in third-person stories that never mention the routing task ----
EVERYDAY_PEOPLE = {"Anna": "she", "Marco": "he", "Priya": "she", "Tom": "he", "Chen": "he", "Sofia": "she",
                   "Liam": "he", "Fatima": "she", "Jonas": "he", "Grace": "she", "Diego": "he", "Olivia": "she",
                   "Maria": "she", "Ben": "he", "Lucy": "she", "Omar": "he", "Hannah": "she", "Yusuf": "he"}
PRONOUNS = {"he": {"he": "he", "him": "him", "his": "his"}, "she": {"he": "she", "him": "her", "his": "her"}}
EVERYDAY = {  # theme -> sentences; {he}/{him}/{his} follow {name}, {friend} is someone else, {a_product} has an article
    "money": [
        "{name} paid the electricity bill on {day} and kept the receipt in a drawer.",
        "Every month {name} reads the bank statement to see where the money went.",
        "The water bill was {amount} this month, a little lower than last month.",
        "{name} noticed that the gym had charged {him} twice, so {he} called the bank.",
        "The phone company sent {name} an invoice for {amount}, which {he} paid with {payment}.",
        "{He} puts money aside at the start of each month to pay the bills.",
        "The billing date for the internet plan moved from the first to the fifteenth of the month.",
        "{name} opened a savings account at the local bank when {he} got {his} first job.",
        "At the café {name} split the bill with {friend} and left a small tip.",
        "{name} paid {amount} in cash, and the man at the till gave {him} the change.",
        "A late fee of {amount} appeared on the statement because the payment was a day late.",
        "The bank reversed the extra charge after {name} explained what had happened.",
        "The card was declined at the till, so {name} paid with {payment} instead.",
        "A pending payment of {amount} sat on {his} account for three days before it cleared.",
        "The hotel put a hold of {amount} on {his} credit card when {he} checked in.",
        "{name} set up a monthly payment so the rent is always paid on time.",
        "When the renewal letter came, {name} saw that the price had gone up to {amount}.",
        "{name} cancelled the magazine subscription because {he} never had time to read it.",
        "{name} moved the family to the {plan} plan of the music app so everyone could use it.",
        "The promo code was accepted at the checkout and took ten percent off the price.",
        "The discount came off the bill, and {name} saved {amount} on the weekly shop.",
        "{name}'s accountant asked for the VAT invoices from last year.",
        "The billing address on the card was still the old flat in {city}.",
        "{name} looked at the price twice before {he} bought {a_product} for {amount}.",
        "A debit card takes money straight from a bank account, while a credit card lends it.",
        "{name} paid for the concert with {payment} and got a seat near the front.",
        "The bank sent a text to say that a payment of {amount} had been made.",
        "{name} gave {friend} a gift card as a birthday present.",
        "The credit on the gift card ran out, so {name} paid the rest in cash.",
        "{name} checked the statement and found a charge {he} did not recognise.",
        "Money was tight that winter, so {name} made a list of every bill and when it was due.",
        "The shop charged {amount} for the repair, which was more than the estimate.",
        "{name}'s grandmother keeps every bill in a folder, sorted by month.",
        "The billing office at the hospital closes at four o'clock.",
        "{name} looked at the billing history in the phone app and found the extra charge.",
        "The billing cycle for {his} phone plan starts on the first of the month.",
    ],
    "post": [
        "The courier left the package with a neighbour because nobody was home.",
        "{name} sent a parcel to {his} grandmother in {city} with {carrier}.",
        "The parcel took {days} days to arrive because of the snow.",
        "{name} waited by the window all morning for the delivery van.",
        "The driver could not find the house, so he left a card under the door.",
        "{name} checked the tracking number and saw that the box was still in transit.",
        "The post office in {city} is open from nine until five, except on Sunday.",
        "Express delivery costs more, but the package arrives the next day.",
        "The shipping cost more than the book itself, so {name} went to the shop instead.",
        "A big ship carried thousands of boxes across the sea to the port.",
        "The ship left the harbour at dawn with a load of wood and grain.",
        "The warehouse outside {city} was full of boxes waiting to be shipped.",
        "{name} wrote {his} new address on the label and taped the box shut.",
        "When {name} moved to {city}, {he} had to change {his} address at the bank and the post office.",
        "The estimate said the package would arrive on {date}, but it came two days early.",
        "The parcel was stuck at the depot for a week because the label was wrong.",
        "{name} asked the courier to leave the parcel at a pickup point near the station.",
        "The tracking page said delivered, but the box was at the house next door.",
        "Only half of the order came in the first box; the rest arrived on {day}.",
        "{name} ordered {a_product} online and it was delivered on {date}.",
        "The delivery driver rang the bell twice and then left the parcel outside the door.",
        "{carrier} delivered the box to the wrong street, and a kind neighbour brought it over.",
        "{name} had to rebook the delivery for {day} because {he} was at work.",
        "Shipping goods by sea is slow but much cheaper than sending them by air.",
        "The box was held at the post office until {name} could collect it.",
        "The postman delivers the letters in {name}'s street before eight in the morning.",
        "The money was credited to {his} account the next morning.",
        "The bank refused the payment because the card had expired.",
        "Next-day delivery is supposed to be quick, but the snow slowed everything down.",
        "{name} put a tracking number on the parcel so {friend} could see where it was.",
        "The shipping company hired extra drivers before the winter holidays.",
        "The parcel was marked fragile, but it still arrived with a dent in one corner.",
        "The old ship was turned into a museum, and children can climb on the deck.",
        "{name} works at the depot, where every parcel is scanned before it leaves.",
        "The shop offered free shipping on orders over fifty dollars.",
        "{name} paid {amount} for shipping, which seemed a lot for such a small box.",
        "Shipping containers were stacked high at the port in {city}.",
    ],
    "shopping": [
        "{name} returned the book to the library on {day}.",
        "{name} returned the {product} to the shop because it was not the right size.",
        "The shop let {name} exchange the winter jacket for a bigger size.",
        "{name} bought {a_product} for {friend}'s birthday and wrapped it in {color} paper.",
        "The shoes were too small, so {name} took them back and got {his} money back.",
        "The store gives a refund within thirty days if you keep the receipt.",
        "The box was still unopened, so the shop gave {name} store credit.",
        "{name} kept the original packaging in case {he} had to send the {product} back.",
        "The jumper arrived damaged, with a hole in one sleeve, so {name} sent it back.",
        "{name} chose the {color} backpack instead of the black one.",
        "The shop said the dress could not be returned because it was bought in the sale.",
        "{name} prefers a physical store, where {he} can try things on before buying.",
        "There is a big store in {city} that sells everything from kettles to office chairs.",
        "{name} wrote a review of the {product} on the shop's website.",
        "The new range of yoga mats is made from recycled materials.",
        "{name} swapped the blue mug for a grey one at the market.",
        "The offer was only for students, so {name} was not eligible for the discount.",
        "Many shops offer discounts to schools and charities that buy in bulk.",
        "{name} likes to compare prices on different websites before buying anything.",
        "The refund of {amount} showed up in {his} bank account three days later.",
        "The sale started on {date}, and by nine o'clock the shop was full of customers.",
        "The returns desk at the back of the store was busy on {day}.",
        "{name} returns home from work at six o'clock every evening.",
        "Every spring the swallow returns to the same old barn.",
        "After a long trip, {name} returned to {city} and unpacked {his} bags.",
        "The items in the basket came to {amount}, so {name} put the chocolate back.",
        "{name} made a purchase of {a_product} and the receipt was printed on thin paper.",
        "The unused lamp was still in its box, so {name} gave it to {friend}.",
        "{name} ordered a new winter jacket in a different colour.",
        "The shop on the corner sells coffee, newspapers and birthday cards.",
        "{name} bought {his} first pair of running shoes with money from a summer job.",
        "The shopkeeper wrapped the {product} in paper and put it in a bag.",
        "It was the wrong colour, so {name} asked if {he} could swap it for the {color} one.",
    ],
    "gadgets": [
        "The laptop screen flickered, so {name} updated the driver.",
        "{name}'s {device} kept restarting until {he} installed the latest update.",
        "The app crashed every time {name} opened the settings page.",
        "{name} turned the router off and on again, and the wifi came back.",
        "The battery in {his} {device} lasts about {hours} hours now, much less than when it was new.",
        "{name} paired the bluetooth speaker with {his} {device} and played some music.",
        "The printer showed the message \"{error}\" and would not print.",
        "The firmware update stopped at {percent} percent, so {name} started it again.",
        "{name} did a factory reset on the old phone before giving it to {friend}.",
        "The old computer made a clicking noise, and then the screen went blank.",
        "The webcam was not recognised until {name} plugged it into a different port.",
        "{name} had a technical problem with the projector just before the talk.",
        "The technical manual for the washing machine was three hundred pages long.",
        "{name} studied technical drawing at college and now designs bridges.",
        "The page only showed a spinning wheel in {browser}, so {name} tried another browser.",
        "The robot vacuum got stuck under the sofa and beeped until someone moved it.",
        "The smart thermostat keeps the house warm in winter and turns the heating down at night.",
        "The security camera sends a picture to {his} phone when someone comes to the door.",
        "{name} took a screenshot of the error and showed it to {friend}, who knows a lot about computers.",
        "The connection timed out twice during the video call with {friend}.",
        "The air fryer started to overheat, so {name} unplugged it and let it cool down.",
        "The light on the baby monitor blinks green when it is working.",
        "{name} charges the electric toothbrush once a week.",
        "{name}'s fitness tracker counts {his} steps and syncs with an app on {his} {device}.",
        "The e-reader can hold thousands of books and is lighter than a paperback.",
        "{name} uses a gaming mouse with a {color} light on the side.",
        "The photos would not sync, so {name} copied them to {his} laptop by hand.",
        "The new version of the app has a dark mode and a simpler menu.",
        "{name} read the manual, but it did not mention the error at all.",
        "The coffee machine makes a loud noise when the water tank is empty.",
        "The hair dryer stopped working after {years} years, so {name} bought a new one.",
        "The tablet would not connect to the wifi until {name} restarted it.",
        "The smart watch failed to pair with the new phone, so {name} tried again the next morning.",
        "{name} saw the words \"{error}\" on the screen and wrote them down.",
        "The sensor in the kettle turns it off as soon as the water boils.",
        "A software update fixed the fault that made the webcam freeze.",
        "{name} keeps the device software up to date so it stays safe.",
        "The wireless headphones ran out of battery halfway through the film.",
        "{name} fixed the wobbly wheel on the office chair with a small spanner.",
        "After the update, the app on {his} {device} worked fine again.",
        "The old radio restarts by itself whenever the kitchen light is switched on.",
        "The game crashes when too many programs are open, so {name} closes them first.",
        "Pairing the new keyboard took {name} only a minute.",
    ],
    "logins": [
        "{name} forgot {his} password and had to reset it before {he} could log in.",
        "{name} chose a long password with numbers and symbols.",
        "The bank sends a two-factor code to {his} phone each time {he} signs in.",
        "After three failed attempts, the website locked {his} account for an hour.",
        "{name} changed {his} username to something {his} friends would recognise.",
        "The verification link in the email expired after one day, so {name} asked for a new one.",
        "{name} logged out of the shared computer at the library before leaving.",
        "{name} keeps {his} passwords in a small notebook at home.",
        "{name} deleted {his} old profile and all the photos on it.",
        "The app on {his} {device} keeps logging {him} out every few days.",
        "{name} stopped the marketing emails because there were too many of them.",
        "{name} has two email addresses, one for work and one for personal messages.",
        "{name} merged {his} two music profiles into one so {he} could keep {his} playlists.",
        "The library card lets {name} sign in to the reading app for free.",
        "{name} opened a bank account for {his} son when he turned ten.",
        "The old account book on the desk showed every coin the shop had earned that year.",
        "{name} gave a long account of the trip to {city} over dinner.",
        "The police asked the witness for an account of what had happened.",
        "{name} lost {his} phone on the bus and had to unlock the new one with a code.",
        "All personal data on the old laptop was wiped before it was recycled.",
        "{name}'s email address, {email}, was printed at the top of the form.",
        "The sign-up page asked for a username, and {name} typed {username}.",
        "Someone hacked {name}'s email, so {he} changed every password that same night.",
        "Never use the same password twice, the teacher told the class.",
        "{name} had to confirm {his} new email address before the account was created.",
        "Two shops in {city} decided to merge and become one bigger shop.",
        "The order history in the app showed every pizza {name} had bought that year.",
        "The security question asked for the name of {his} first pet.",
        "{name} took into account the cost of the train before planning the trip.",
        "The reset link arrived in {his} email a few seconds later.",
        "{name} could not log in, so {he} asked {friend} to check whether the site was down.",
    ],
    "home": [
        "{name} made soup with the blender and served it with warm bread.",
        "The kettle boiled, and {name} made two cups of tea.",
        "{name} sat at the desk and turned on the desk lamp.",
        "{name} rolls out the yoga mat in the living room every morning.",
        "The winter jacket kept {him} warm on the long walk home.",
        "{name} packed a water bottle and a book in {his} backpack.",
        "{name} listened to music on {his} wireless headphones on the train.",
        "The smart watch buzzed to remind {name} to stand up.",
        "{name} put the tablet in a {color} case so it would not break.",
        "{name} laced up {his} running shoes and went for a run by the river.",
        "The bluetooth speaker played music at the picnic.",
        "{name} found a recipe for chips that uses the air fryer.",
        "The coffee machine in the kitchen makes {name} a strong coffee every morning.",
        "The baby slept while the baby monitor glowed softly on the shelf.",
        "{name} bought a new office chair because the old one hurt {his} back.",
        "The robot vacuum cleans the floor while {name} is at work.",
        "{name} dried {his} hair with the hair dryer and got ready for the party.",
        "{name} reads an e-reader in bed so {he} does not need a light.",
        "The thermostat was set too low, so the house felt cold.",
        "{name} uses a gaming mouse and a big monitor for {his} games.",
        "The webcam sits on top of the monitor for video calls with {friend}.",
        "{name} keeps a security camera above the front door.",
        "The fitness tracker showed that {name} had walked ten thousand steps.",
        "An electric toothbrush cleans better than an old brush, the dentist said.",
        "{name} was given {a_product} for {his} birthday and used it the same day.",
        "The {product} sat in the cupboard until {name} finally found a use for it.",
        "{name} moved to a small flat in {city} with a big window over the street.",
        "The smart home in the magazine had lights that turn on when someone walks in.",
    ],
    "town": [
        "The other day {name} saw a fox in the garden.",
        "One shoe was under the bed and the other was by the door.",
        "{name} held the map in one hand and a cup of coffee in the other.",
        "Some people like tea and others like coffee.",
        "On the other side of the river there is a small farm.",
        "{name} and {friend} help each other with homework.",
        "{name} read an article about {topic} in a magazine.",
        "A journalist from the local paper wrote about the new bakery in {city}.",
        "The warehouse in {city} is hiring, so {name} applied for a job there.",
        "The staff at the café in {city} were incredibly helpful when {name} lost {his} bag.",
        "The company sponsors a football match for local schools every summer.",
        "The bakery agreed to sponsor the school fair in {city}.",
        "The two shops formed a partnership and opened a stall at the market.",
        "{name} asked a quick question, and the answer was short.",
        "The FAQ page on the museum website answered most of {his} questions.",
        "There was no rush, so {name} walked slowly through the park.",
        "A friend recommended the small restaurant near the station.",
        "{name} has lived in {city} for {years} years.",
        "The opening hours at the library are longer on {day}.",
        "The events in the town square are free and open to everyone.",
        "{name} works from home two days a week and goes to the office on the other days.",
        "The company moved its office to a bigger building in {city}.",
        "The staff were asked to confirm their holiday dates by the end of the month.",
        "{name} sent the quote to the builder and waited for an answer.",
        "{name} was frustrated because the bus was late again.",
        "The talk about remote work was interesting, and {name} took a lot of notes.",
        "Small businesses in {city} meet once a month to share ideas.",
        "{name} hopes to find a job at a local school next year.",
        "{name} wanted to say thank you, so {he} wrote {friend} a card.",
        "The message from {friend} said, \"Hello, I hope you are well.\"",
        "\"Hi there,\" said {name}, waving from the other side of the street.",
        "\"Good morning,\" said the baker, and {name} smiled back.",
        "The recycling truck comes on {day} and takes away the paper and glass.",
        "{name} would rather walk than wait for the bus.",
        "{name} sorted the old clothes into two piles: one to keep and the other to give away.",
        "On {date} {name} went to {city} to see {friend}.",
    ],
    "talk": [
        "\"I can't find my keys anywhere,\" {name} said to {friend}.",
        "\"Have you seen my phone?\" asked {name}. \"I think I left it in the car.\"",
        "\"Why is the gas bill so high this month?\" {name} wondered out loud.",
        "\"Please take your shoes off at the door,\" said {name}'s mother.",
        "\"I'm going to the post office today. Do you need anything?\" {name} asked {friend}.",
        "\"I've already paid for the pizza,\" said {friend}, \"so you can get the drinks.\"",
        "\"Don't worry, the parcel will come tomorrow,\" {name} told {his} little brother.",
        "\"It's been a long week,\" {name} said, and sat down on the sofa.",
        "\"How do I get to the station?\" a tourist asked {name}.",
        "\"Your order is ready,\" said the man at the counter, and {name} took the coffee.",
        "\"I want to return this book before it is late,\" said {name}.",
        "\"I haven't received the letter yet,\" {name} told {friend} on the phone.",
        "\"It isn't broken, it just needs a new battery,\" said {friend}.",
        "\"I'd love to come, but I'm moving house on {day},\" {name} said.",
        "\"Really? I didn't know that,\" said {name} when {friend} told {him} the news.",
        "\"Thank you so much, that was really helpful,\" said {name}.",
        "\"Thanks a lot,\" {name} said, and put the change in {his} pocket.",
        "\"Can you tell me why the shop is closed?\" {name} asked a man outside.",
        "\"They said it won't be ready until {day},\" said {friend}.",
        "\"I think the bus is late again,\" {name} said, checking the time on {his} phone.",
        "\"You're right, it doesn't work without a battery,\" {name} laughed.",
        "\"Hey, wait for me!\" shouted {name} as {he} ran for the bus.",
        "\"Hi, how are you?\" asked {friend}. \"I'm fine, thanks,\" said {name}.",
        "\"Good morning, can I help you?\" asked the woman at the bakery.",
        "\"I still have the receipt somewhere,\" {name} said, looking through {his} bag.",
        "\"Please sort the washing before you go out,\" said {name}'s father.",
        "\"Could you explain that again?\" {name} asked the teacher.",
        "\"Why didn't you call me?\" asked {friend}. \"My phone was dead,\" said {name}.",
        "\"It's the second time this week that the wifi has stopped working,\" {name} said with a sigh.",
        "\"We're out of milk,\" said {name}. \"I'll get some on the way home,\" said {friend}.",
        "\"Do you have any information about the train times?\" {name} asked at the station.",
        "\"I'd rather stay in today,\" said {name}, looking at the rain.",
        "\"I looked everywhere for my glasses,\" said {name}. \"They're on your head,\" said {friend}.",
        "\"I don't use the old laptop anymore,\" said {name}, \"so you can have it.\"",
        "\"Tea or coffee?\" asked {friend}. \"I prefer tea,\" said {name}.",
        "\"Cheers!\" said {friend}, and everyone raised a glass.",
        "\"Our new flat is between the bank and the post office,\" {name} told {friend}.",
        "\"I can't log in to my email,\" said {name}. \"Did you change your password?\" asked {friend}.",
        "\"Is this the right size?\" {name} asked, holding up the jacket.",
        "\"What are you doing this weekend?\" {friend} asked. \"Nothing much,\" said {name}.",
        "\"Are you done with the newspaper?\" asked {name}.",
        "\"The parcel hasn't come yet, and I couldn't wait any longer,\" said {name}.",
        "{name} was asking everyone at the party whether they had seen {his} scarf.",
    ],
    "daily": [
        "{name} began the letter with \"Dear Aunt Rose\" and ended it with \"Best regards\".",
        "{name} sent {his} aunt a card to say that her visit was much appreciated.",
        "{name} was interested in the history of the town, so {he} went to the museum.",
        "{name} applied for two jobs in {city} and is waiting to hear back.",
        "The wooden posts support the roof of the old barn.",
        "The baker knows every customer by name.",
        "{name} usually takes the bus, but today {he} walked.",
        "Since {name} moved to {city}, {he} has been writing letters to {his} old friends.",
        "{name} dropped {his} phone, and the screen cracked.",
        "The old oven fails to heat up unless the door is shut tightly.",
        "A volunteer checks the accounts of the chess club every year.",
        "{name} was billed for a month at the gym that {he} never used.",
        "Though it was raining, {name} went for a walk without an umbrella.",
        "{name} paid the rent two months in advance before the long trip.",
        "{name} completed the puzzle after three evenings of work.",
        "The rain continues all week, and the river keeps getting higher.",
        "{name} could not stop laughing at the film.",
        "Nothing was left in the fridge, so {name} went shopping.",
        "There was a notice on the door saying that the shop had moved to a new place.",
        "{name} needed a new coat, but {he} wanted a cheap one.",
        "It was definitely the best cake {name} had ever eaten.",
        "{name} kindly offered to carry the bags for the old man.",
        "Two men were moving a piano into the flat upstairs.",
        "{name} keeps resetting the clock on the oven after every power cut.",
        "{name} bought the newest version of the game and played it all weekend.",
        "{name} uses Firefox at work and Safari at home.",
        "DPD, UPS and DHL all deliver parcels in {city}.",
        "{name} paid for the Pro version of the drawing app.",
        "{name} needs a single bed for the small room.",
        "{name} lost the key, and {friend} found it somewhere under the sofa.",
        "{name} will return the drill to {friend} on {day}.",
        "{friend} fixed the fence, and in return {name} cooked dinner.",
        "The waiter took their order and brought the drinks quickly.",
        "In order to save money, {name} cooks at home most days.",
        "{name} placed an order for a new sofa, and it will be delivered in {month}.",
        "The bakery can deliver a cake to the house for a small fee.",
        "{name} was checking the weather before the trip to {city}.",
        "Someone else had taken the last seat, so {name} stood by the door.",
        "{name} walked along the river until it got dark.",
        "The old bridge is being repaired, so the bus goes another way.",
        "The café by the park is a nice place to read on {day}.",
        "{name} has been to {city} many times and knows every street.",
        "The times of the trains are shown on a big board in the station.",
        "The shop shows the price of every item on a small card.",
        "Nobody knew the answer, so {name} looked it up.",
        "Even the dog was tired after the long walk.",
        "Students can apply for a cheaper bus pass at the station.",
        "{name} cannot swim, so {he} stayed on the beach and read a book.",
        "{name} sat on the edge of the bed and tied {his} shoes.",
        "The free version of the app is basic, but it does everything {name} needs.",
        "Many new homes in {city} have solar panels on the roof.",
        "{name} watches films on {his} iPad on the train.",
        "{name} opened the map in Chrome and found the quickest way to the station.",
    ],
    "words": [
        "The teacher wrote \"{word}\" on the board and asked the class to use it in a sentence.",
        "{name} looked up \"{word}\" in the dictionary.",
        "The word \"{word}\" was in the spelling test on {day}.",
        "\"{word}\" is a common English word.",
        "{name} underlined \"{word}\" in the story because it was new to {him}.",
    ],
}
WORD_LIST_EVERY = 20  # one document in this many is a spelling list, one word a line
VOCABULARY = sorted({"billing", "shipping", "technical", "account", "returns", "other", "bill", "charge", "refund",
                     "invoice", "payment", "receipt", "subscription", "discount", "statement", "parcel", "package",
                     "delivery", "courier", "tracking", "address", "order", "return", "exchange", "password",
                     "username", "login", "email", "profile", "screen", "device", "battery", "update", "error",
                     "laptop", "phone", "app", "wifi", "store", "price", "money", "card", "bank", "credit", "label",
                     "box", "driver", "warehouse", "kettle", "blender", "size", "colour", "review", "website", "office",
                     "company", "staff", "question", "answer", "help", "thanks", "week", "month", "date", "city"})


def everyday_document(rng: random.Random) -> str:
    name, friend = rng.sample(sorted(EVERYDAY_PEOPLE), 2)
    words = PRONOUNS[EVERYDAY_PEOPLE[name]]
    values = {key: rng.choice(options) for key, options in SLOTS.items() if key != "name"}
    product = values["product"] if not values["product"].endswith("s") else "pair of " + values["product"]
    values.update(words, He=words["he"].title(), His=words["his"].title(), name=name, friend=friend,
                  product=product, a_product=with_article(product), day=rng.choice(DAYS), month=rng.choice(MONTHS),
                  date=f"{rng.choice(MONTHS)} {rng.randint(1, 28)}", days=rng.randint(2, 12),
                  amount=f"${rng.randint(3, 480)}.{rng.choice(['00', '99', '49', '95'])}", hours=rng.randint(2, 9),
                  percent=rng.randint(5, 95), years=rng.randint(2, 20), username=f"{name.lower()}{rng.randint(1, 999)}",
                  email=f"{name.lower()}.{rng.randint(1, 99)}@example.com")
    if rng.randrange(WORD_LIST_EVERY) == 0:
        listed = rng.sample(VOCABULARY, rng.randint(6, 10))
        return f"{name} practised these words for the spelling test on {values['day']}:\n" + "\n".join(listed)
    themes = [theme for theme in EVERYDAY if theme != "words"]
    main, extra = rng.choice(themes), rng.choice(list(EVERYDAY))
    templates = rng.sample(EVERYDAY[main], rng.randint(3, 6)) + rng.sample(EVERYDAY[extra], rng.randint(1, 2))
    named = next((i for i, template in enumerate(templates) if "{name}" in template), 0)
    templates.insert(0, templates.pop(named))  # name the person before any "he" or "her"
    sentences = [t.format(**values, word=rng.choice(VOCABULARY)) for t in templates]
    return " ".join(sentence[0].upper() + sentence[1:] for sentence in sentences)


def everyday(rng: random.Random, target_chars: int = 230_000) -> bytes:
    documents, total_chars = [], 0
    while total_chars < target_chars:
        documents.append(json.dumps({"text": everyday_document(rng)}) + "\n")
        total_chars += len(documents[-1])
    return "".join(documents).encode()


def pretrain(rng: random.Random, target_chars: int = 380_000, qa_pairs: int = 4000) -> tuple[bytes, bytes]:
    kinds, documents, total_chars = facts(), [], 0
    while total_chars < target_chars:
        sentences = [rng.choice(rng.choice(rng.choice(kinds))[0]) if rng.random() < 0.75 else generic_sentence(rng)
                     for _ in range(rng.randint(4, 10))]
        documents.append(json.dumps({"text": " ".join(sentences)}) + "\n")
        total_chars += len(documents[-1])
    qa = []
    for _ in range(qa_pairs):
        _, questions, answer = rng.choice(rng.choice(kinds))
        qa.append(json.dumps({"question": rng.choice(questions), "answer": answer}) + "\n")
    return "".join(documents).encode(), "".join(qa).encode()


def quiz(rng: random.Random, pairs: int = QUIZ_PAIRS) -> bytes:
    """The facts as plain-text quizzes in the lm-eval task's own format ("Question: ...\nAnswer: ..."), so the base
    answers in it; training phrasings only, the eval's stay held out. A fact in prose alone does not carry over to a
    question about it: the tiny base must see the question form too."""
    kinds, documents, written = facts(), [], 0
    while written < pairs:
        lines = []
        for _ in range(min(rng.randint(3, 8), pairs - written)):
            _, questions, answer = rng.choice(rng.choice(kinds))
            lines.append(f"Question: {rng.choice(questions)}\nAnswer: {answer}")
        documents.append(json.dumps({"text": "\n\n".join(lines)}) + "\n")
        written += len(lines)
    return "".join(documents).encode()


def general_eval(rng: random.Random) -> bytes:
    """Held-out phrasings of the corpus facts; distractors are answers of the same kind."""
    questions = []
    for mapping, _, _, held_out, count in FACT_KINDS:
        pool = sorted(set(mapping.values()))
        for key in rng.sample(list(mapping), count):
            answer = mapping[key]
            choices = rng.sample([option for option in pool if option not in (answer, key)], 3) + [answer]
            rng.shuffle(choices)
            row = {"question": phrase(held_out, key, answer), "choices": choices, "answer": choices.index(answer)}
            questions.append(json.dumps(row) + "\n")
    return "".join(questions).encode()


def generate() -> dict[str, bytes]:
    """All shipped files as {relative path: bytes}; each dataset has its own seeded stream."""
    documents, qa = pretrain(random.Random(SEED + 1))
    documents += everyday(random.Random(SEED + 3))  # the base shuffles documents, so the order is only cosmetic
    documents += quiz(random.Random(SEED + 4))
    return {"raw/support_tickets.jsonl": support_tickets(random.Random(SEED)),
            "pretrain/documents.jsonl": documents, "pretrain/qa.jsonl": qa,
            "general/general_knowledge.jsonl": general_eval(random.Random(SEED + 2))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output root; default data/")
    out = parser.parse_args().out
    for relative, content in generate().items():
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_bytes(content)
        temporary.replace(path)
        print(f"wrote {path} ({len(content):,} bytes)")


if __name__ == "__main__":
    main()

"""The shipped data is exactly what data/generate.py writes, and has the planted properties it documents."""
import importlib.util
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
GENERATED = ["raw/support_tickets.jsonl", "pretrain/documents.jsonl", "pretrain/qa.jsonl",
             "general/general_knowledge.jsonl"]
# The corpus may use everyday words (bill, parcel, password, "the other day") but never the routing task itself.
ROUTING_WORDS = re.compile(r"\b(tickets?|routes?|routing|teams?|queues?|classify|answer with one|reply with one)\b",
                           re.IGNORECASE)


def load_generator():
    spec = importlib.util.spec_from_file_location("data_generate", DATA / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generator = load_generator()


def classify(raw: bytes) -> tuple[str, dict | None]:
    """'blank', 'bad' or 'good', with the same rules ingest must apply to Alpaca rows."""
    if not raw.strip():
        return "blank", None
    try:
        row = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "bad", None
    if not isinstance(row, dict) or not isinstance(row.get("output"), str) or not row["output"].strip():
        return "bad", None
    fields = [row.get("instruction", ""), row.get("input", "")]
    if not all(isinstance(field, str) for field in fields) or not any(field.strip() for field in fields):
        return "bad", None
    return "good", row


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def word_shingles(row: dict, size: int = 3) -> set[str]:
    """As near-dedup sees a row: prompt and response together."""
    words = normalise(" ".join((row["instruction"], row["input"], row["output"]))).split()
    return {" ".join(words[i:i + size]) for i in range(len(words) - size + 1)}


@pytest.fixture(scope="module")
def ticket_lines() -> list[tuple[int, str, dict | None]]:
    raw_lines = (DATA / "raw/support_tickets.jsonl").read_bytes().split(b"\n")
    assert raw_lines[-1] == b"", "file must end with a newline"
    return [(number, *classify(raw)) for number, raw in enumerate(raw_lines[:-1], start=1)]


def test_generator_rewrites_the_committed_files_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, "data/generate.py", "--out", str(tmp_path)], cwd=REPO, check=True,
                   capture_output=True)
    written = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*") if path.is_file())
    assert written == sorted(GENERATED)
    for relative in GENERATED:
        assert (tmp_path / relative).read_bytes() == (DATA / relative).read_bytes(), f"{relative} differs"


def test_planted_malformed_and_blank_lines_are_exactly_where_documented(ticket_lines):
    bad = [number for number, kind, _ in ticket_lines if kind == "bad"]
    blank = [number for number, kind, _ in ticket_lines if kind == "blank"]
    assert bad == sorted(generator.MALFORMED_LINES)
    assert blank == sorted(generator.BLANK_LINES)
    assert len(bad) / (len(ticket_lines) - len(blank)) < 0.05
    undecodable = [number for number, (_, raw) in generator.MALFORMED_LINES.items() if not is_utf8(raw)]
    assert len(undecodable) == 3


def is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_good_rows_are_balanced_over_the_labels(ticket_lines):
    rows = [row for _, kind, row in ticket_lines if kind == "good"]
    base_rows = generator.ROWS_PER_LABEL * len(generator.LABELS)
    assert len(rows) == base_rows + generator.EXACT_DUPLICATES + generator.NEAR_DUPLICATES
    labels = Counter(row["output"] for row in rows)
    assert sorted(labels) == sorted(generator.LABELS)
    assert max(labels.values()) / min(labels.values()) < 1.15
    assert len({row["instruction"] for row in rows}) == len(generator.INSTRUCTIONS)


def test_exact_and_near_duplicates_match_the_planted_counts(ticket_lines):
    rows = [row for _, kind, row in ticket_lines if kind == "good"]
    unique, exact_duplicates = {}, 0
    for row in rows:
        key = normalise(row["input"])
        exact_duplicates += key in unique
        unique.setdefault(key, row)
    assert exact_duplicates == generator.EXACT_DUPLICATES
    # A planted near-duplicate has an earlier row at Jaccard >= 0.85; other rows stay clearly apart (< 0.6).
    earlier, near_duplicates, closest_distinct = [], 0, 0.0
    for row in unique.values():
        grams = word_shingles(row)
        best = max((len(grams & other) / len(grams | other) for other in earlier), default=0.0)
        if best >= 0.85:
            near_duplicates += 1
        else:
            closest_distinct = max(closest_distinct, best)
        earlier.append(grams)
    assert near_duplicates == generator.NEAR_DUPLICATES
    assert closest_distinct < 0.6


def test_pretraining_corpus_is_general_and_sized_for_a_cpu_budget():
    documents = [json.loads(line) for line in (DATA / "pretrain/documents.jsonl").read_text().splitlines()]
    qa = [json.loads(line) for line in (DATA / "pretrain/qa.jsonl").read_text().splitlines()]
    assert all(set(document) == {"text"} and document["text"].strip() for document in documents)
    assert 950_000 <= sum(len(document["text"]) for document in documents) <= 1_100_000
    assert 3_000 <= len(qa) <= 5_000
    assert all(set(pair) == {"question", "answer"} and 0 < len(pair["answer"].split()) <= 4 for pair in qa)
    corpus = " ".join([document["text"] for document in documents] + [p["question"] + " " + p["answer"] for p in qa])
    assert ROUTING_WORDS.findall(corpus) == [], "the base model must not learn the routing task"
    assert ", ".join(generator.LABELS[:2]) not in corpus and not any(i in corpus for i in generator.INSTRUCTIONS)


def test_pretraining_corpus_knows_the_everyday_words_the_tickets_use(ticket_lines):
    """A real base knows English; only the task is new. Label words appear as ordinary words, several times."""
    corpus = Counter(re.findall(r"[a-z]+", (DATA / "pretrain/documents.jsonl").read_text().lower()))
    ticket_words = {word for _, kind, row in ticket_lines if kind == "good"
                    for word in re.findall(r"[a-z]+", row["input"].lower()) if len(word) >= 4}
    missing = sorted(word for word in ticket_words if corpus[word] == 0)
    assert len(missing) <= 0.03 * len(ticket_words), missing
    assert all(corpus[label] >= 20 for label in generator.LABELS), {label: corpus[label] for label in generator.LABELS}


def quiz_pairs() -> Counter:
    """(question, answer) pairs the pretraining documents ask in plain text, as the lm-eval task does."""
    texts = [json.loads(line)["text"] for line in (DATA / "pretrain/documents.jsonl").read_text().splitlines()]
    return Counter(pair for text in texts for pair in re.findall(r"^Question: (.+)\nAnswer: (.+)$", text, re.MULTILINE))


def test_general_knowledge_questions_are_held_out_phrasings_of_taught_facts():
    questions = [json.loads(line) for line in (DATA / "general/general_knowledge.jsonl").read_text().splitlines()]
    assert len(questions) == 120
    taught_questions = {json.loads(line)["question"] for line in (DATA / "pretrain/qa.jsonl").read_text().splitlines()}
    taught_questions |= {question for question, _ in quiz_pairs()}
    documents = (DATA / "pretrain/documents.jsonl").read_text()
    for question in questions:
        assert len(question["choices"]) == 4 and len(set(question["choices"])) == 4
        assert isinstance(question["answer"], int) and 0 <= question["answer"] < 4
        assert question["question"] not in taught_questions and question["question"] not in documents
        assert question["choices"][question["answer"]] in documents
    positions = Counter(question["answer"] for question in questions)
    assert min(positions.values()) >= 15, positions  # the right answer is not always in one slot


def test_every_eval_fact_is_asked_in_the_eval_format_in_the_corpus():
    """Prose alone left the base at chance on the task (0.24): a tiny model does not carry "The capital of Peru is
    Lima." over to a question. The corpus asks each eval fact in the task's own prompt format, in other words."""
    import yaml

    doc_to_text = yaml.safe_load((DATA / "general/general_knowledge.yaml").read_text())["doc_to_text"]
    asked = Counter({doc_to_text.replace("{{question}}", question) + " " + answer: count
                     for (question, answer), count in quiz_pairs().items()})
    training_questions = {}  # held-out wording -> the fact's training wordings, filled in
    for mapping, _, questions, held_out, _ in generator.FACT_KINDS:
        for key, value in mapping.items():
            if held_out:
                training_questions[generator.phrase(held_out, key, value)] = [
                    generator.phrase(question, key, value) for question in questions]
    times = {}
    for line in (DATA / "general/general_knowledge.jsonl").read_text().splitlines():
        row = json.loads(line)
        answer = row["choices"][row["answer"]]
        times[row["question"]] = sum(asked[doc_to_text.replace("{{question}}", question) + " " + answer]
                                     for question in training_questions[row["question"]])
    assert min(times.values()) >= 5, sorted(times.items(), key=lambda item: item[1])[:5]


def test_lm_eval_task_loads_offline_from_the_repo_root(monkeypatch):
    tasks = pytest.importorskip("lm_eval.tasks")
    monkeypatch.chdir(REPO)  # data_files in the YAML is relative to the working directory
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    manager = tasks.TaskManager(include_path=str(DATA / "general"), include_defaults=False)
    task = manager.load(["general_knowledge"])["tasks"]["general_knowledge"]
    docs = list(task.test_docs())
    assert len(docs) == 120
    assert task.doc_to_text(docs[0]) == f"Question: {docs[0]['question']}\nAnswer:"
    assert task.doc_to_choice(docs[0]) == docs[0]["choices"]
    assert task.doc_to_target(docs[0]) == docs[0]["answer"]

"""Task metrics as pure functions of model outputs and references: no model, no I/O.

One function per task type (classification, generation, qa, coding); each returns a flat
dict of numbers, so the evaluate stage, the merged model and the quantized model all report
the same quantities. Tests check each against hand-computed values.
"""
from __future__ import annotations

import collections
import functools
import logging
import math
import re
import string

log = logging.getLogger("finetune.task_metrics")

UNPARSEABLE = "<unparseable>"


# --------------------------------------------------------------------------- classification
def normalise_label(text: str) -> str:
    """Case, punctuation and spacing do not matter: 'Technical-Support.' == 'technical support'."""
    return " ".join(re.findall(r"[^\W_]+", text.casefold()))


def parse_label(output: str, labels: list[str]) -> str | None:
    """The label the output names first (a whole-word match; the longest label wins a tie, so
    'credit card' beats 'credit'); None when it names none. Returns the label as given."""
    text = f" {normalise_label(output)} "
    best = None
    for label in labels:
        wanted = normalise_label(label)
        position = text.find(f" {wanted} ") if wanted else -1
        if position >= 0 and (best is None or (position, -len(wanted)) < best[0]):
            best = ((position, -len(wanted)), label)
    return best[1] if best else None


def classification_metrics(predictions: list[str | None], references: list[str]) -> dict:
    """Accuracy, macro and weighted F1, macro precision and recall over the reference classes;
    an unparseable prediction (None) counts as wrong and is counted."""
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

    predicted = [prediction if prediction is not None else UNPARSEABLE for prediction in predictions]
    labels = sorted(set(references))
    options = {"labels": labels, "zero_division": 0}
    return {"accuracy": float(accuracy_score(references, predicted)),
            "macro_f1": float(f1_score(references, predicted, average="macro", **options)),
            "weighted_f1": float(f1_score(references, predicted, average="weighted", **options)),
            "precision": float(precision_score(references, predicted, average="macro", **options)),
            "recall": float(recall_score(references, predicted, average="macro", **options)),
            "unparseable": sum(prediction is None for prediction in predictions)}


def per_class_report(predictions: list[str | None], references: list[str]) -> dict[str, dict]:
    """{label: {precision, recall, f1, support}} for every reference class."""
    from sklearn.metrics import precision_recall_fscore_support

    predicted = [prediction if prediction is not None else UNPARSEABLE for prediction in predictions]
    labels = sorted(set(references))
    precision, recall, f1, support = precision_recall_fscore_support(references, predicted, labels=labels,
                                                                     zero_division=0)
    return {label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(labels, precision, recall, f1, support)}


# --------------------------------------------------------------------------- generation
def tokens(text: str) -> list[str]:
    """Words and punctuation marks; what METEOR matches on (nltk's punkt tokenizer needs a download)."""
    return re.findall(r"\w+|[^\w\s]", text.casefold())


class _NoSynonyms:
    """Stands in for WordNet when its data is not installed: METEOR then matches exact words and
    Porter stems only (METEOR's 'exact' and 'stem' modules, without 'synonym')."""

    @staticmethod
    def synsets(word):
        return []


@functools.lru_cache(maxsize=1)
def wordnet_or_none():
    from nltk.corpus import wordnet

    try:
        wordnet.ensure_loaded()
        return wordnet
    except LookupError:
        log.warning("METEOR without synonym matching: nltk's WordNet data is not installed (it is a download); "
                    "exact and stem matches only. `python -m nltk.downloader wordnet` adds it where there is network")
        return None


def generation_metrics(outputs: list[str], references: list[str]) -> dict:
    """Corpus BLEU (sacrebleu, 0-100), mean ROUGE-1/2/L F1 (rouge-score, stemmed) and mean METEOR (nltk)."""
    import sacrebleu
    from nltk.translate.meteor_score import meteor_score
    from rouge_score import rouge_scorer

    bleu = sacrebleu.corpus_bleu(outputs, [references]).score
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rouge = collections.Counter()
    for output, reference in zip(outputs, references):
        for name, score in scorer.score(reference, output).items():
            rouge[name] += score.fmeasure
    wordnet = wordnet_or_none()
    meteor = sum(meteor_score([tokens(reference)], tokens(output), wordnet=wordnet or _NoSynonyms())
                 for output, reference in zip(outputs, references))
    count = max(len(outputs), 1)
    return {"bleu": bleu, "rouge1": rouge["rouge1"] / count, "rouge2": rouge["rouge2"] / count,
            "rougeL": rouge["rougeL"] / count, "meteor": meteor / count}


# --------------------------------------------------------------------------- question answering
def normalise_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(char for char in text.lower() if char not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def token_f1(output: str, reference: str) -> float:
    predicted, expected = normalise_answer(output).split(), normalise_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def qa_metrics(outputs: list[str], references: list[str]) -> dict:
    count = max(len(outputs), 1)
    return {"exact_match": sum(normalise_answer(o) == normalise_answer(r) for o, r in zip(outputs, references)) / count,
            "f1": sum(token_f1(o, r) for o, r in zip(outputs, references)) / count}


# --------------------------------------------------------------------------- coding
def extract_code(output: str) -> str:
    """The first fenced code block of the answer, or the whole answer when it has none."""
    match = re.search(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|$)", output, re.DOTALL | re.IGNORECASE)
    return match.group(1) if match else output


# HumanEval's usual stop sequences: a completion ends where the function body does
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")


def cut_at_stop(completion: str) -> str:
    """The completion up to the first stop sequence."""
    ends = [position for position in (completion.find(stop) for stop in STOP_SEQUENCES) if position >= 0]
    return completion[:min(ends)] if ends else completion


def program(row: dict, output: str, prompting: str) -> str:
    """The program scored for one answer. Completion: the code prompt + the completion up to a stop sequence.
    Chat: the answer's code (its first fenced block, or all of it), after the row's code prompt when it has one,
    so that the imports and helper functions the prompt defines are there (the answer's function replaces the
    prompt's stub)."""
    if prompting == "completion":
        return row["code_prompt"] + cut_at_stop(output)
    code = extract_code(output)
    return f"{row['code_prompt']}\n{code}" if row.get("code_prompt") else code


def extract_tests(prompt: str, special_tokens=()) -> list[str]:
    """The problem's test cases: every `assert` line of the prompt (the MBPP convention); the
    template's special tokens (e.g. `<|im_end|>` right after the last line) are not part of them."""
    for token in sorted(special_tokens, key=len, reverse=True):
        prompt = prompt.replace(token, "\n")
    return [line.strip() for line in prompt.splitlines() if re.match(r"\s*assert\b", line)]


def pass_at_k(samples: int, correct: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), in its numerically stable form."""
    if samples - correct < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / number for number in range(samples - correct + 1, samples + 1))


def coding_metrics(outcomes: list[list], ks: list[int]) -> dict:
    """outcomes[problem][sample] are sandbox.Outcome; pass@k for every k <= samples per problem,
    the share of programs that compile, the share of test cases passed over all programs, the
    programs caught trying to fake their score (`suspicious`, scored as failed), and the test cases
    judged the weaker way, inside the program's own process (`unverified_tests`)."""
    programs = [outcome for problem in outcomes for outcome in problem]
    samples = min((len(problem) for problem in outcomes), default=0)
    metrics = {f"pass@{k}": sum(pass_at_k(len(problem), sum(o.all_passed for o in problem), k) for problem in outcomes)
               / max(len(outcomes), 1) for k in ks if k <= samples}
    tests_run = sum(len(outcome.passed) for outcome in programs)
    metrics["syntax_valid_rate"] = sum(outcome.syntax_ok for outcome in programs) / max(len(programs), 1)
    metrics["test_pass_rate"] = sum(sum(outcome.passed) for outcome in programs) / max(tests_run, 1)
    metrics["timeouts"] = sum(outcome.status == "timeout" for outcome in programs)
    metrics["suspicious"] = sum(outcome.suspicious for outcome in programs)
    metrics["unverified_tests"] = sum(outcome.verified.count(False) for outcome in programs)
    return metrics

"""evaluate: score a model on the held-out test split, by task type, against the base.

`python stages/evaluate.py base` scores the untouched base (its own DVC stage, so it reruns only
when the base, the test data or the params that change its numbers change) into
`metrics/eval_base.json`; `python stages/evaluate.py` scores the fine-tuned model and writes
`metrics/eval.json`: every metric for both models side by side (`task.*`, `base.task.*`) and the
change (`delta.*`), perplexity, and the forgetting check (`general.*`: lm-eval tasks scored
before and after, failing or warning past `evaluate.general.max_drop`).

`evaluate_model(model, tokenizer, rows, cfg)` is the core shared with the merged and quantized
models; the metric functions themselves live in task_metrics.py, the code sandbox in sandbox.py.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import re
import sys

from common import ROOT, offline_by_default, read_jsonl, require_complete, seed_everything, setup, write_json, write_text
from task_metrics import (UNPARSEABLE, classification_metrics, coding_metrics, extract_code, extract_tests,  # noqa: F401
                          generation_metrics, normalise_label, parse_label, per_class_report, qa_metrics)

log = logging.getLogger("finetune.evaluate")

BASE = ROOT / "models" / "base"
ADAPTER = ROOT / "models" / "adapter"
DATA = ROOT / "data" / "formatted"
GENERAL = ROOT / "data" / "general"
METRICS = ROOT / "metrics" / "eval.json"
BASE_METRICS = ROOT / "metrics" / "eval_base.json"
EXAMPLES = ROOT / "metrics" / "examples.json"
CONFUSION = ROOT / "metrics" / "confusion.csv"
BASE_CONFUSION = ROOT / "metrics" / "confusion_base.csv"
IGNORE = -100


# --------------------------------------------------------------------------- model passes
def sequence_logprobs(model, sequences: list[tuple[list[int], list[int]]], batch_size: int) -> list[tuple[float, int]]:
    """(sum of log p(target), number of targets) for each (input_ids, labels); labels of -100 are not
    scored. Sequences are batched by length, so little compute goes to padding."""
    import torch

    results: list = [None] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda index: len(sequences[index][0]))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = max(len(sequences[index][0]) for index in batch)
        ids = torch.tensor([sequences[i][0] + [0] * (width - len(sequences[i][0])) for i in batch])
        labels = torch.tensor([sequences[i][1] + [IGNORE] * (width - len(sequences[i][1])) for i in batch])
        mask = torch.tensor([[1] * len(sequences[i][0]) + [0] * (width - len(sequences[i][0])) for i in batch])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        # prompt tuning prepends virtual tokens: score only the positions of the real input
        logits = logits[:, logits.shape[1] - width:][:, :-1].float()
        targets = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
        for position, index in enumerate(batch):
            results[index] = (-nll[position].sum().item(), int((targets[position] != IGNORE).sum()))
    return results


def perplexity(model, rows: list[dict], batch_size: int) -> float:
    """exp(mean NLL) over the target (unmasked) tokens, as training measures loss."""
    scored = sequence_logprobs(model, [(row["input_ids"], row["labels"]) for row in rows], batch_size)
    return math.exp(-sum(logprob for logprob, _ in scored) / max(sum(count for _, count in scored), 1))


def stop_ids(model, tokenizer) -> list[int]:
    """End-of-turn tokens: the tokenizer's EOS and the model's generation config (chat models often differ)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return sorted({token for token in [tokenizer.eos_token_id, *configured] if token is not None})


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, num_samples: int = 1,
             temperature: float = 1.0, top_p: float = 1.0) -> list[str]:
    """Batched, left-padded generation with the KV cache: greedy, or `num_samples` sampled answers per
    prompt (returned consecutively). Prompts are batched by length, answers come back in order."""
    import torch

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if num_samples > 1 else {"do_sample": False}
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda index: lengths[index])
    answers: list = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        encoded = tokenizer([prompts[index] for index in batch], return_tensors="pt", padding=True,
                            add_special_tokens=False)  # the template already placed BOS
        with torch.no_grad():
            generated = model.generate(**encoded, max_new_tokens=max_new_tokens, use_cache=True,
                                       num_return_sequences=num_samples, pad_token_id=tokenizer.pad_token_id,
                                       eos_token_id=stop_ids(model, tokenizer), **sampling)
        texts = tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        for position, index in enumerate(batch):
            answers[index] = [text.strip() for text in texts[position * num_samples:(position + 1) * num_samples]]
    return [text for group in answers for text in group]


def label_likelihood(model, tokenizer, rows: list[dict], choices: list[str], batch_size: int) -> list[str]:
    """For each row, the choice the model finds most likely as the whole answer (its tokens plus the
    template's end of turn, so a label that is a prefix of another does not win by being short)."""
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    sequences = []
    for row in rows:
        prompt = encode(row["prompt"])
        answer = tokenizer.decode(row["input_ids"][len(prompt):])  # reference + end of turn, as trained
        found = answer.find(row["reference"].strip())
        end = answer[found + len(row["reference"].strip()):] if found >= 0 else ""
        for choice in choices:
            continuation = encode(choice + end)
            sequences.append((prompt + continuation, [IGNORE] * len(prompt) + continuation))
    scores = [logprob for logprob, _ in sequence_logprobs(model, sequences, batch_size)]
    width = len(choices)
    return [choices[max(range(width), key=lambda j: scores[i * width + j])] for i in range(len(rows))]


# --------------------------------------------------------------------------- the core
def label_choices(rows: list[dict], cfg) -> list[str]:
    """The classes: `evaluate.classification.labels`, or each distinct test reference (first spelling)."""
    if cfg.labels:
        return list(cfg.labels)
    seen: dict[str, str] = {}
    for row in rows:
        seen.setdefault(normalise_label(row["reference"]), row["reference"].strip())
    return [seen[key] for key in sorted(seen)]


def check_coding_rows(rows: list[dict], tokenizer) -> list[list[str]]:
    specials = {*getattr(tokenizer, "all_special_tokens", []), *getattr(tokenizer, "get_added_vocab", dict)()}
    tests = [extract_tests(row["prompt"], specials) for row in rows]
    missing = [row["id"] for row, found in zip(rows, tests) if not found]
    if missing:
        raise SystemExit(f"evaluate.task=coding: {len(missing)} test rows have no `assert` line in their prompt "
                         f"(first: {missing[0]}); a coding problem states its tests in the prompt, see examples/coding")
    return tests


def score_programs(texts: list[str], rows: list[dict], tokenizer, cfg) -> dict:
    """Run `cfg.num_samples` answers per row (consecutive in `texts`) against the row's tests, contained."""
    from sandbox import check_works, isolation, run_tests

    tests, samples = check_coding_rows(rows, tokenizer), cfg.num_samples
    check_works()
    log.info("coding: running %d programs contained (%s)", len(texts), isolation())
    outcomes = [[run_tests(extract_code(text), tests[i], cfg.timeout_seconds, cfg.memory_mb)
                 for text in texts[i * samples:(i + 1) * samples]] for i in range(len(rows))]
    return coding_metrics(outcomes, cfg.k)


def evaluate_model(model, tokenizer, rows: list[dict], cfg) -> tuple[dict, list[str]]:
    """Pure core shared by every model form (adapter, merged, quantized): `task.*` metrics and
    perplexity, and one output per row (the first sample for coding)."""
    prompts = [row["prompt"] for row in rows]
    references = [row["reference"].strip() for row in rows]
    if cfg.task == "classification":
        choices = label_choices(rows, cfg.classification)
        if cfg.classification.scoring == "likelihood":
            outputs = label_likelihood(model, tokenizer, rows, choices, cfg.batch_size)
        else:
            outputs = generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size)
        labels = [normalise_label(choice) for choice in choices]
        task = classification_metrics([parse_label(output, labels) for output in outputs],
                                      [normalise_label(reference) for reference in references])
    elif cfg.task == "coding":
        check_coding_rows(rows, tokenizer)  # before any generation
        texts = generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, cfg.coding.num_samples,
                         cfg.coding.temperature, cfg.coding.top_p)
        task, outputs = score_programs(texts, rows, tokenizer, cfg.coding), texts[::cfg.coding.num_samples]
    else:
        outputs = generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size)
        task = (qa_metrics if cfg.task == "qa" else generation_metrics)(outputs, references)
    metrics = {f"task.{name}": round(value, 5) for name, value in task.items()}
    metrics["perplexity"] = round(perplexity(model, rows, cfg.batch_size), 5)
    return metrics, outputs


def class_breakdown(outputs: list[str], rows: list[dict], cfg) -> tuple[dict, list[tuple[str, str]]]:
    """Per-class precision/recall/F1/support as flat keys, and (actual, predicted) pairs for the confusion plot."""
    labels = [normalise_label(choice) for choice in label_choices(rows, cfg.classification)]
    predictions = [parse_label(output, labels) for output in outputs]
    references = [normalise_label(row["reference"]) for row in rows]
    flat = {f"task.class.{label.replace(' ', '_')}.{name}": round(value, 5)
            for label, scores in per_class_report(predictions, references).items() for name, value in scores.items()}
    return flat, [(actual, predicted or UNPARSEABLE) for actual, predicted in zip(references, predictions)]


# --------------------------------------------------------------------------- forgetting check
def local_tasks() -> set[str]:
    return {name for path in GENERAL.glob("*.yaml")
            for name in re.findall(r"^task:\s*['\"]?([\w.-]+)", path.read_text(encoding="utf-8"), re.MULTILINE)}


def general_scores(model, tokenizer, cfg, batch_size: int) -> tuple[dict, set[str]]:
    """lm-eval scores of `evaluate.general.tasks` on this very model object: `general.<task>.<metric>`,
    and the keys where lower is better. Only tasks outside data/general need the harness's built-in
    index (~5 s to build) and, usually, the network."""
    if not cfg.tasks:
        return {}, set()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(GENERAL), include_defaults=not set(cfg.tasks) <= local_tasks())
    with contextlib.chdir(ROOT):  # a local task's data_files are relative to the repository root
        results = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
                                          tasks=list(cfg.tasks), task_manager=manager, limit=cfg.limit,
                                          bootstrap_iters=0, log_samples=False, verbosity="ERROR")
    scores, lower = {}, set()
    for task, values in results["results"].items():
        for key, value in values.items():
            metric, _, kind = key.partition(",")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or metric.endswith("_stderr") \
                    or metric == "sample_len":
                continue
            name = f"general.{task}.{metric}" + ("" if kind in ("", "none") else f".{kind}")
            scores[name] = round(float(value), 5)
            if results.get("higher_is_better", {}).get(task, {}).get(metric) is False:
                lower.add(name)
    return scores, lower


def forgetting(scores: dict, base: dict, lower: set[str]) -> dict[str, float]:
    """How much each general score got worse after fine-tuning (positive = worse)."""
    return {key: (value - base[key]) if key in lower else (base[key] - value)
            for key, value in scores.items() if key.startswith("general.") and key in base}


def drop_verdict(drops: dict[str, float], cfg) -> str | None:
    """The complaint when a general score fell by more than `evaluate.general.max_drop`, else None."""
    too_far = {key: round(drop, 5) for key, drop in sorted(drops.items()) if drop > cfg.max_drop}
    if not too_far:
        return None
    return (f"forgetting check: general scores fell by more than evaluate.general.max_drop={cfg.max_drop} "
            f"after fine-tuning: {too_far}")


# --------------------------------------------------------------------------- the stage
def load(adapter: bool):
    """The base, or the fine-tuned model: base + adapter, or the whole model that full fine-tuning saved."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = require_complete(ADAPTER if adapter else BASE)
    if adapter and (folder / "adapter_config.json").exists():
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(require_complete(BASE), dtype=torch.float32)
        model = PeftModel.from_pretrained(model, folder)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def check_fingerprint(expected: str, folder) -> None:
    found = json.loads((folder / "format.json").read_text())["fingerprint"]
    if found != expected:
        raise SystemExit(f"evaluate: {folder} was trained with template fingerprint {found}, but the test data has "
                         f"{expected}; rerun train (dvc repro) so both use the same template and special tokens")


def settings(cfg, seed: int, fingerprint: str) -> dict:
    """What the base's numbers depend on; evaluate refuses a baseline made with anything else."""
    return {"seed": seed, "fingerprint": fingerprint, "task": cfg.task, "max_new_tokens": cfg.max_new_tokens,
            "classification": cfg.classification.model_dump(), "coding": cfg.coding.model_dump(),
            "general": {"tasks": cfg.general.tasks, "limit": cfg.general.limit},
            "test_sha256": hashlib.sha256((DATA / "test.jsonl").read_bytes()).hexdigest()}


def write_confusion(path, pairs: list[tuple[str, str]]) -> None:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([("actual", "predicted"), *pairs])
    write_text(path, buffer.getvalue())


def side_by_side(metrics: dict, base: dict) -> dict:
    report = {**metrics, **{f"base.{key}": value for key, value in base.items()}}
    report.update({f"delta.{key}": round(value - base[key], 5) for key, value in metrics.items()
                   if key in base and not key.endswith(".support")})
    return report


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "adapter"
    if which not in ("adapter", "base"):
        raise SystemExit("usage: python stages/evaluate.py [base]")
    params = setup(f"evaluate {which}")
    cfg = params.evaluate
    rows = read_jsonl(DATA / "test.jsonl")
    fingerprint = json.loads((DATA / "format.json").read_text())["fingerprint"]
    if which == "adapter":  # both checks before any model is loaded
        check_fingerprint(fingerprint, ADAPTER)
        base = json.loads(BASE_METRICS.read_text())
        if base.get("settings") != settings(cfg, params.seed, fingerprint):
            raise SystemExit(f"evaluate: {BASE_METRICS.relative_to(ROOT)} was made with other settings or test data; "
                             "rerun it first: dvc repro evaluate_base")
    offline_by_default()
    seed_everything(params.seed, params.threads)
    model, tokenizer = load(adapter=which == "adapter")
    metrics, outputs = evaluate_model(model, tokenizer, rows, cfg)
    scores, lower = general_scores(model, tokenizer, cfg.general, cfg.batch_size)
    metrics.update(scores)
    pairs: list = []
    if cfg.task == "classification":
        per_class, pairs = class_breakdown(outputs, rows, cfg)
        metrics.update(per_class)
    if which == "base":
        write_json(BASE_METRICS, {"settings": settings(cfg, params.seed, fingerprint), "metrics": metrics,
                                  "lower_is_better": sorted(lower), "outputs": outputs})
        write_confusion(BASE_CONFUSION, pairs)
        log.info("base: %s", metrics)
        return
    report = side_by_side(metrics, base["metrics"])
    drops = forgetting(scores, base["metrics"], lower)
    if drops:
        report["general.worst_drop"] = round(max(drops.values()), 5)
    report.update(test_rows=len(rows), seed=params.seed)
    write_json(METRICS, report)
    write_confusion(CONFUSION, pairs)
    write_json(EXAMPLES, [{"input": row["prompt"], "reference": row["reference"], "base": base_output, "finetuned": output}
                          for row, base_output, output in list(zip(rows, base["outputs"], outputs))[:cfg.num_examples]])
    log.info("eval: %s", json.dumps(report, sort_keys=True))
    verdict = drop_verdict(drops, cfg.general)
    if verdict and cfg.general.on_drop == "fail":
        raise SystemExit(f"{verdict} (evaluate.general.on_drop=fail; metrics/eval.json has the numbers)")
    if verdict:
        log.warning("%s", verdict)


if __name__ == "__main__":
    main()

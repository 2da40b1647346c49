"""evaluate: score a model on the held-out test split: task metric and perplexity.

`python stages/evaluate.py base` scores the untouched base (its own DVC stage, so it reruns
only when the base or the test data change) into `metrics/eval_base.json`;
`python stages/evaluate.py` scores the fine-tuned adapter and writes `metrics/eval.json`
with every metric for both models side by side and the improvement (`delta.*`).
"""
from __future__ import annotations

import json
import logging
import math
import re
import sys

from common import ROOT, offline_by_default, read_jsonl, require_complete, seed_everything, setup, write_json

log = logging.getLogger("finetune.evaluate")

BASE = ROOT / "models" / "base"
ADAPTER = ROOT / "models" / "adapter"
DATA = ROOT / "data" / "formatted"
METRICS = ROOT / "metrics" / "eval.json"
BASE_METRICS = ROOT / "metrics" / "eval_base.json"
EXAMPLES = ROOT / "metrics" / "examples.json"
IGNORE = -100


def perplexity(model, rows: list[dict], batch_size: int) -> float:
    """exp(mean NLL) over the target (unmasked) tokens, as training measures loss."""
    import torch

    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        width = max(len(row["input_ids"]) for row in batch)
        ids = torch.tensor([row["input_ids"] + [0] * (width - len(row["input_ids"])) for row in batch])
        labels = torch.tensor([row["labels"] + [IGNORE] * (width - len(row["labels"])) for row in batch])
        mask = torch.tensor([[1] * len(row["input_ids"]) + [0] * (width - len(row["input_ids"])) for row in batch])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                                ignore_index=IGNORE, reduction="sum")
        total_nll += nll.item()
        total_tokens += int((targets != IGNORE).sum())
    return math.exp(total_nll / max(total_tokens, 1))


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy, batched, left-padded generation with the KV cache."""
    import torch

    tokenizer.padding_side = "left"
    outputs = []
    for start in range(0, len(prompts), batch_size):
        encoded = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False)
        with torch.no_grad():
            generated = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new_tokens = generated[:, encoded["input_ids"].shape[1]:]
        outputs += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return outputs


def parse_label(output: str, labels: list[str]) -> str | None:
    """The first word of the answer that is a known label; None when there is none."""
    for word in re.findall(r"[\w-]+", output.casefold()):
        if word in labels:
            return word
    return None


def classification_metrics(predictions: list[str | None], references: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

    predicted = [prediction if prediction is not None else "<unparseable>" for prediction in predictions]
    labels = sorted(set(references))
    return {"accuracy": accuracy_score(references, predicted),
            "macro_f1": f1_score(references, predicted, labels=labels, average="macro", zero_division=0),
            "precision": precision_score(references, predicted, labels=labels, average="macro", zero_division=0),
            "recall": recall_score(references, predicted, labels=labels, average="macro", zero_division=0),
            "unparseable": sum(prediction is None for prediction in predictions)}


def evaluate_model(model, tokenizer, rows: list[dict], cfg) -> tuple[dict, list[str]]:
    """Pure core shared by every model form (adapter, merged, quantized): metrics and raw outputs."""
    references = [row["reference"].strip().casefold() for row in rows]
    labels = sorted(set(references))
    outputs = generate(model, tokenizer, [row["prompt"] for row in rows], cfg.max_new_tokens, cfg.batch_size)
    task = classification_metrics([parse_label(output, labels) for output in outputs], references)
    metrics = {f"task.{name}": round(value, 5) for name, value in task.items()}
    metrics["perplexity"] = round(perplexity(model, rows, cfg.batch_size), 5)
    return metrics, outputs


def load(adapter: bool):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(require_complete(BASE), dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, require_complete(ADAPTER))
    return model.eval(), AutoTokenizer.from_pretrained(ADAPTER if adapter else BASE)


def check_fingerprint(expected: str, folder) -> None:
    found = json.loads((folder / "format.json").read_text())["fingerprint"]
    if found != expected:
        raise SystemExit(f"evaluate: {folder} was trained with template fingerprint {found}, but the test data has "
                         f"{expected}; rerun train (dvc repro) so both use the same template and special tokens")


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "adapter"
    params = setup(f"evaluate {which}")
    offline_by_default()
    seed_everything(params.seed, params.threads)
    rows = read_jsonl(DATA / "test.jsonl")
    fingerprint = json.loads((DATA / "format.json").read_text())["fingerprint"]
    if which == "base":
        metrics, outputs = evaluate_model(*load(adapter=False), rows, params.evaluate)
        write_json(BASE_METRICS, {**metrics, "outputs": outputs})
        log.info("base: %s", metrics)
        return
    check_fingerprint(fingerprint, ADAPTER)
    metrics, outputs = evaluate_model(*load(adapter=True), rows, params.evaluate)
    base = json.loads(BASE_METRICS.read_text())
    base_outputs = base.pop("outputs")
    report = {**metrics, **{f"base.{key}": value for key, value in base.items()},
              **{f"delta.{key}": round(value - base[key], 5) for key, value in metrics.items() if key in base},
              "test_rows": len(rows), "seed": params.seed}
    write_json(METRICS, report)
    write_json(EXAMPLES, [{"input": row["prompt"], "reference": row["reference"], "base": base_output, "finetuned": output}
                          for row, base_output, output in list(zip(rows, base_outputs, outputs))[: params.evaluate.num_examples]])
    log.info("eval: %s", report)


if __name__ == "__main__":
    main()

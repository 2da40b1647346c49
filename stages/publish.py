"""publish: one folder a user uploads, `models/release/`: the merged model and its model card.

The card is written with `huggingface_hub.ModelCard`, so its metadata block is what the Hub reads
(base_model, library, pipeline tag, license, datasets, tags, and `model-index` results from the
evaluation). It is built from what the artifacts record (the training recipe in
`models/merged/train_method.json`) and the metrics files, not from params of other stages, so a
change that leaves the model and the numbers as they were does not rerun merge or quantize, and
only this cheap stage reruns when a number does. It does not read the quantize stage's metrics
(their timings change on every run); the card points to them. The model files are hard links to
`models/merged/` where the filesystem allows (no second copy on disk), else copies.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from finetune import ROOT
from finetune.runtime.files import atomic_dir, require_complete, write_json
from finetune.runtime.stage import setup
from finetune.params.evaluate import Evaluate
from finetune.params.ingest import Ingest
from finetune.params.publish import Publish

log = logging.getLogger("finetune.publish")

MERGED = ROOT / "models" / "merged"
DATA_METRICS = ROOT / "metrics" / "data.json"
EVAL_METRICS = ROOT / "metrics" / "eval.json"
OUT = ROOT / "models" / "release"
CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{{ summary }}

## Use

```python
{{ usage }}
```

## Training recipe

```json
{{ recipe }}
```

## Data

{{ data }}

## Evaluation (held-out test split)

| metric | fine-tuned | base |
|---|---|---|
{{ scores }}

Quantized versions (GGUF for llama.cpp, GPTQ) are written by the `quantize` stage to `models/quantized/`,
each re-evaluated against this model (`metrics/quantize.json`).
"""
# task types of the evaluation, as the Hub's model-index names them
HUB_TASK = {"classification": "text-classification", "generation": "text-generation", "qa": "question-answering",
            "coding": "text-generation"}


def headline_metrics(evaluation: dict) -> dict:
    """The fine-tuned model's own numbers: no baseline, no change, no per-class or bookkeeping keys."""
    return {key: value for key, value in sorted(evaluation.items())
            if not key.startswith(("base.", "delta.", "task.class.")) and key not in ("seed", "test_rows")
            and isinstance(value, (int, float)) and not isinstance(value, bool)}


def model_card(method: dict, data: dict, evaluation: dict, task: str, datasets: list[str], cfg) -> "object":
    """The card for the merged model: `huggingface_hub.ModelCard` with a metadata block the Hub validates."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    recipe = method.get("recipe") or {}
    base = recipe.get("base") or "unknown"
    hub_base = base if base != "builtin" and not Path(str(base)).exists() and "/" in str(base) else None
    name = cfg.name or f"{Path(str(base)).name}-{method['method']}-finetune"
    scores = headline_metrics(evaluation)
    results = [EvalResult(task_type=HUB_TASK[task], dataset_type="held-out-test", dataset_name="held-out test split",
                          dataset_split="test", metric_type=key, metric_name=key, metric_value=value)
               for key, value in scores.items()]
    card_data = ModelCardData(model_name=name, base_model=hub_base, library_name="transformers",
                              pipeline_tag="text-generation", license=cfg.license, datasets=datasets or None,
                              tags=["finetune", method["method"], "dvc"], eval_results=results or None)
    usage = ("from transformers import pipeline\n\n"
             "generator = pipeline(\"text-generation\", model=\"models/release\")\n"
             "print(generator([{\"role\": \"user\", \"content\": \"...\"}], max_new_tokens=32)[0][\"generated_text\"])")
    if method["method"] == "prompt_tuning":
        usage = ("from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
                 "model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(\"models/release\"), "
                 "\"models/release/prompt_adapter\")")
    splits = ", ".join(f"{split} {numbers['rows_kept']}" for split, numbers in sorted(data.get("splits", {}).items()))
    return ModelCard.from_template(
        card_data, template_str=CARD_TEMPLATE, model_name=name,
        summary=f"Fine-tuned from `{base}` with `{method['method']}` by the finetune DVC pipeline; saved in "
                f"`{method.get('merge_dtype', 'float32')}`.",
        usage=usage, recipe=json.dumps(recipe, indent=2, sort_keys=True),
        data=f"{data.get('rows_in', '?')} rows in, {data.get('rows_kept', '?')} kept ({splits}); rejected "
             f"{data.get('rejected', 0)}, removed {json.dumps(data.get('removed', {}), sort_keys=True)}.",
        scores="\n".join(f"| {key} | {value} | {evaluation.get('base.' + key, '')} |" for key, value in scores.items()))


def link_or_copy(source: Path, target: Path) -> None:
    for path in source.rglob("*"):
        if path.is_file() and path.name != ".complete":
            destination = target / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, destination)
            except OSError:  # another filesystem, or links not allowed
                shutil.copy2(path, destination)


def publish(merged_dir: Path, out_dir: Path, data: dict, evaluation: dict, task: str, datasets: list[str], cfg) -> dict:
    """Pure core: the release folder (model files + README.md) and a summary of what it holds."""
    method = json.loads((merged_dir / "train_method.json").read_text())
    link_or_copy(merged_dir, out_dir)
    card = model_card(method, data, evaluation, task, datasets, cfg)
    card.save(out_dir / "README.md")
    return {"files": sorted(str(path.relative_to(out_dir)) for path in out_dir.rglob("*") if path.is_file()),
            "metrics": headline_metrics(evaluation)}


def main() -> None:
    params = setup("publish", {"publish": Publish, "ingest": Ingest, "evaluate": Evaluate})
    datasets = [source.hub for source in params.ingest.sources if source.hub]
    with atomic_dir(OUT) as tmp:
        summary = publish(require_complete(MERGED), tmp, json.loads(DATA_METRICS.read_text()),
                          json.loads(EVAL_METRICS.read_text()), params.evaluate.task, datasets, params.publish)
        write_json(tmp / "release.json", summary)
    log.info("publish: %s ready (%d files, model card README.md)", OUT.relative_to(ROOT), len(summary["files"]) + 1)


if __name__ == "__main__":
    main()

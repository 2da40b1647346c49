"""quantize: deployable artifacts from the merged model, each re-evaluated, not assumed.

`quantize.formats` picks from gguf_f16, gguf_q8_0, gguf_q4_k_m: llama.cpp's own
convert_hf_to_gguf.py writes an f16 GGUF, llama.cpp's quantizer makes the rest. Every
artifact is loaded by llama.cpp, and scored on the test split with the evaluation stage's
metric code; `metrics/quantize.json` records size, ratio to the merged model, load time,
tokens/s, task metrics, perplexity and the drop against the merged model.
"""
from __future__ import annotations

import json
import logging
import math
import time

import evaluate
import llamacpp
from common import ROOT, atomic_dir, offline_by_default, read_jsonl, require_complete, setup, write_json

log = logging.getLogger("finetune.quantize")

MERGED = ROOT / "models" / "merged"
DATA = ROOT / "data" / "formatted"
OUT = ROOT / "models" / "quantized"
METRICS = ROOT / "metrics" / "quantize.json"
IGNORE = -100


def masked_perplexity(llm, rows: list[dict]) -> float:
    """exp(mean NLL) over target tokens only: the same quantity evaluate.perplexity measures."""
    import numpy as np

    total, count = 0.0, 0
    for row in rows:
        ids, labels = row["input_ids"], row["labels"]
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
        log_norm = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
        for position, target in enumerate(labels[1:]):
            if target != IGNORE:
                total += log_norm[position] - logits[position, target]
                count += 1
    return math.exp(total / max(count, 1))


def score_gguf(path, rows: list[dict], cfg, threads: int) -> tuple[dict, list[str]]:
    started = time.time()
    llm = llamacpp.load(path, n_ctx=max(len(row["input_ids"]) for row in rows) + cfg.max_new_tokens + 8,
                        n_threads=threads)
    load_seconds = time.time() - started
    references = [row["reference"].strip().casefold() for row in rows]
    labels = sorted(set(references))
    started, generated_tokens, outputs = time.time(), 0, []
    for row in rows:
        text = llamacpp.generate(llm, row["prompt"], max_tokens=cfg.max_new_tokens)
        generated_tokens += len(llm.tokenize(text.encode(), add_bos=False)) or 1
        outputs.append(text.strip())
    seconds = time.time() - started
    task = evaluate.classification_metrics([evaluate.parse_label(output, labels) for output in outputs], references)
    metrics = {f"task.{name}": round(value, 5) for name, value in task.items()}
    metrics.update(perplexity=round(masked_perplexity(llm, rows), 5), load_seconds=round(load_seconds, 3),
                   tokens_per_second=round(generated_tokens / seconds, 1))
    return metrics, outputs


def quantize(merged_dir, formats: list[str], out_dir, rows: list[dict], cfg, threads: int) -> dict:
    """Pure core: write each requested artifact into out_dir and score it."""
    report = {}
    f16 = out_dir / "model-f16.gguf"
    llamacpp.hf_to_gguf(merged_dir, f16, outtype="f16")
    merged_bytes = sum(path.stat().st_size for path in merged_dir.glob("*.safetensors"))
    for name in formats:
        qtype = name.removeprefix("gguf_")
        path = f16 if qtype == "f16" else llamacpp.quantize_gguf(f16, out_dir / f"model-{qtype}.gguf", qtype)
        metrics, _ = score_gguf(path, rows, cfg, threads)
        metrics.update(size_bytes=path.stat().st_size, size_ratio=round(path.stat().st_size / merged_bytes, 4))
        report[name] = metrics
        log.info("%s: %s", name, metrics)
    if "gguf_f16" not in formats:
        f16.unlink()
    return report


def main() -> None:
    params = setup("quantize")
    offline_by_default()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(params.threads)
    rows = read_jsonl(DATA / "test.jsonl")
    merged_dir = require_complete(MERGED)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    reference, _ = evaluate.evaluate_model(merged, AutoTokenizer.from_pretrained(merged_dir), rows, params.evaluate)
    with atomic_dir(OUT) as tmp:
        report = quantize(merged_dir, params.quantize.formats, tmp, rows, params.evaluate, params.threads)
    flat = {f"merged.{key}": value for key, value in reference.items()}
    for name, metrics in report.items():
        flat.update({f"{name}.{key}": value for key, value in metrics.items()})
        flat[f"{name}.perplexity_drop_percent"] = round(100 * (metrics["perplexity"] / reference["perplexity"] - 1), 4)
        flat[f"{name}.task.accuracy_drop"] = round(reference["task.accuracy"] - metrics["task.accuracy"], 5)
    write_json(METRICS, flat)
    log.info("quantize: %s", json.dumps(flat))


if __name__ == "__main__":
    main()

"""quantize: deployable artifacts from the merged model, each loaded by its real client and re-evaluated.

`quantize.formats`:
- gguf_f16 / gguf_q8_0 / gguf_q4_0 / gguf_q4_k_m: llama.cpp's convert_hf_to_gguf.py writes an
  f16 GGUF, llama.cpp's quantizer makes the rest; llama-cpp-python loads each one.
- gptq / awq: GPTQModel (gptq.py), calibrated on a seeded sample of the training split (saved beside the
  model); plain `transformers` loads it (AWQ: GPTQModel's torch kernel on the CPU, its CUDA ones on a GPU).
- bnb_int8: bitsandbytes LLM.int8() weights, saved; plain `transformers` (+ bitsandbytes) loads them.

Every artifact is scored on the test split by the same `scoring.evaluate_model` as the evaluate stage
(task metrics, perplexity), plus top-1 agreement with the merged model (every position of the
test sequences), size and its ratio to the merged model, load time and greedy tokens/s on this
machine. The merged, GPTQ, AWQ and bitsandbytes models run where the top-level `device` / `dtype` params put
them (device.py); llama.cpp runs on the CPU. `metrics/quantize.json` has all of it, the change against
the merged model and the stage's peak host / GPU memory; the stage fails past `quantize.checks`. A
prompt-tuned model has nothing to quantize: it is skipped, and the metrics say why.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from finetune.runtime import device
from finetune.export import gptq
from finetune.export import llamacpp
from finetune.evaluation import scoring
from finetune import ROOT
from finetune.runtime.env import offline_by_default, quiet_gptqmodel
from finetune.runtime.files import atomic_dir, read_jsonl, require_complete, write_json, write_text
from finetune.runtime.stage import setup
from finetune.params.evaluate import Evaluate
from finetune.params.quantize import Quantize

log = logging.getLogger("finetune.quantize")

MERGED = ROOT / "models" / "merged"
DATA = ROOT / "data" / "formatted"
OUT = ROOT / "models" / "quantized"
METRICS = ROOT / "metrics" / "quantize.json"
SPEED_PROMPTS = 4


def top1(model, rows: list[dict], batch_size: int = 1) -> list[list[int]]:
    """The argmax next token at every position of every test sequence (batched within scoring's logits budget)."""
    seen = getattr(model, "argmax_by_sequence", {})  # llama.cpp: kept from the perplexity pass
    missing = [row["input_ids"] for row in rows if tuple(row["input_ids"]) not in seen]
    found = {**dict(zip(map(tuple, missing), scoring.argmax_tokens(model, missing, batch_size))), **seen}
    return [found[tuple(row["input_ids"])] for row in rows]


def agreement(predicted: list[list[int]], reference: list[list[int]], rows: list[dict] | None = None) -> float:
    """Share of positions with the same argmax; with rows, only where an answer token is predicted
    (the positions perplexity scores), else every position."""
    pairs = [(a, b) for index, (row, ref) in enumerate(zip(predicted, reference)) for position, (a, b) in enumerate(zip(row, ref))
             if rows is None or (position + 1 < len(rows[index]["labels"]) and rows[index]["labels"][position + 1] != -100)]
    return sum(a == b for a, b in pairs) / max(len(pairs), 1)


def tokens_per_second(model, tokenizer, prompts: list[str], new_tokens: int) -> float:
    """Greedy decode of exactly `new_tokens` per prompt, one prompt at a time (prompt processing included)."""
    import torch

    def run(prompt):
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(scoring.input_device(model))
        with torch.no_grad():
            model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)

    run(prompts[0])  # warm-up: first-call allocations are not generation speed
    started = time.perf_counter()
    for prompt in prompts:
        run(prompt)
    return len(prompts) * new_tokens / (time.perf_counter() - started)


def score(model, tokenizer, rows: list[dict], cfg, reference_top1, new_tokens: int) -> dict:
    """Everything measured on one loaded model, with the evaluation stage's code for task metrics and perplexity."""
    metrics, _ = scoring.evaluate_model(model, tokenizer, rows, cfg)
    if reference_top1 is not None:
        predicted = top1(model, rows, cfg.batch_size)
        metrics["top1_agreement"] = round(agreement(predicted, reference_top1), 5)  # every position: checked
        # answer tokens only: few positions (~3 a row) and near-tied labels make it noisy; reported, not checked
        metrics["top1_agreement_answer_tokens"] = round(agreement(predicted, reference_top1, rows), 5)
    metrics["tokens_per_second"] = round(tokens_per_second(model, tokenizer, [row["prompt"] for row in rows[:SPEED_PROMPTS]],
                                                           new_tokens), 1)
    return metrics


def folder_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(item.stat().st_size for item in path.glob("*.safetensors"))


def load_timed(loader):
    started = time.perf_counter()
    loaded = loader()
    return loaded, round(time.perf_counter() - started, 3)


def quantize(merged_dir, formats: list[str], out_dir, rows: list[dict], train_rows: list[dict], cfg, eval_cfg,
             threads: int, placement: device.Placement = device.Placement("cpu", "float32")) -> dict:
    """Pure core: write each requested artifact into out_dir, load it with its client, score it. The merged,
    GPTQ, AWQ and bitsandbytes models run on `placement`; llama.cpp on the CPU.

    Returns {"merged": metrics, "<format>": metrics, ...}; each format's metrics include the change
    against the merged model (`delta.*`, `perplexity_drop_percent`) and `size_ratio`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    merged_dir, out_dir = Path(merged_dir), Path(out_dir)
    gptqmodel_formats = [method for method in gptq.METHODS if method in formats]
    for method in gptqmodel_formats:  # before minutes of other formats: a group_size the layer widths refuse fails now
        gptq.check_group_size(merged_dir, getattr(cfg, method).group_size, method)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    merged, load_seconds = load_timed(
        lambda: AutoModelForCausalLM.from_pretrained(merged_dir, **placement.load_kwargs()).eval())
    reference_top1 = top1(merged, rows, eval_cfg.batch_size)
    merged_bytes = folder_bytes(merged_dir)
    report = {"merged": {**score(merged, tokenizer, rows, eval_cfg, None, cfg.speed_new_tokens),
                         "size_bytes": merged_bytes, "load_seconds": load_seconds}}
    del merged

    def finish(name, path, model, seconds, extra=None):
        metrics = {**(extra or {}), **score(model, tokenizer, rows, eval_cfg, reference_top1, cfg.speed_new_tokens)}
        reference = report["merged"]
        metrics.update(size_bytes=folder_bytes(path), size_ratio=round(folder_bytes(path) / merged_bytes, 4),
                       load_seconds=seconds,
                       perplexity_drop_percent=round(100 * (metrics["perplexity"] / reference["perplexity"] - 1), 4))
        metrics.update({f"delta.{key}": round(value - reference[key], 5) for key, value in list(metrics.items())
                        if key.startswith("task.") and key in reference})
        report[name] = metrics
        changed = ", ".join(f"{key[len('delta.task.'):]} {value:+g}" for key, value in sorted(metrics.items())
                            if key.startswith("delta.task.") and value)
        log.info("%s: perplexity %+.3f%%, top-1 agreement %.4f, size x%.3f, %s tokens/s; task metrics %s", name,
                 metrics["perplexity_drop_percent"], metrics["top1_agreement"], metrics["size_ratio"],
                 metrics.get("tokens_per_second"), f"changed: {changed}" if changed else "unchanged")
        log.debug("%s: %s", name, json.dumps(metrics, sort_keys=True))

    ggufs = [name for name in formats if name.startswith("gguf_")]
    if ggufs:
        f16 = llamacpp.hf_to_gguf(merged_dir, out_dir / "model-f16.gguf", outtype="f16")
        n_ctx = max(len(row["input_ids"]) for row in rows) + max(eval_cfg.max_new_tokens, cfg.speed_new_tokens) + 64
        generation_config = GenerationConfig.from_pretrained(merged_dir)
        for name in ggufs:
            qtype = name.removeprefix("gguf_")
            path = f16 if qtype == "f16" else llamacpp.quantize_gguf(f16, out_dir / f"model-{qtype}.gguf", qtype, threads)
            types = llamacpp.tensor_types(path)
            if qtype.endswith("_k_m") and not any(kind.endswith("_K") for kind in types):
                log.warning("%s: no K-quant tensor in the file (%s): llama.cpp's K-quants need row widths that are "
                            "multiples of 256 and fell back to legacy types; the numbers below are for those", name, types)
            model, seconds = load_timed(lambda: llamacpp.LlamaCppLM(path, generation_config, n_ctx, threads))
            finish(name, path, model, seconds, {f"tensor_types.{kind}": count for kind, count in types.items()})
            del model
        if "gguf_f16" not in formats:
            f16.unlink()
    if "bnb_int8" in formats:  # bitsandbytes LLM.int8(): saves and reloads exactly (nf4 saved after a CPU pass does not)
        from transformers import BitsAndBytesConfig

        where = placement.load_kwargs()  # int8 linear weights; the rest (embeddings, norms) in placement's dtype
        AutoModelForCausalLM.from_pretrained(merged_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                             **where).save_pretrained(out_dir / "bnb_int8")
        tokenizer.save_pretrained(out_dir / "bnb_int8")
        model, seconds = load_timed(lambda: AutoModelForCausalLM.from_pretrained(out_dir / "bnb_int8", **where).eval())
        finish("bnb_int8", out_dir / "bnb_int8", model, seconds)
        del model
    # last: loading a GPTQ or AWQ model imports gptqmodel (GPTQ through optimum), which patches transformers
    if gptqmodel_formats:
        quiet_gptqmodel()
    for method in gptqmodel_formats:
        settings = getattr(cfg, method)
        calibration = gptq.calibration_rows(train_rows, settings.calibration_rows, settings.calibration_seed)
        gptq.quantize_gptq(merged_dir, out_dir / method, calibration, settings, threads, method)
        # AWQ on a GPU: transformers loads bfloat16 as float16, the dtype its CUDA kernels take
        model, seconds = load_timed(lambda: AutoModelForCausalLM.from_pretrained(out_dir / method,
                                                                                 **placement.load_kwargs()).eval())
        finish(method, out_dir / method, model, seconds)
        del model
    return report


def failed_checks(report: dict, checks: dict) -> list[str]:
    problems = []
    for name, metrics in report.items():
        if name == "merged":
            continue
        check = checks[name]
        if not abs(metrics["perplexity_drop_percent"]) <= check.max_perplexity_drop_percent:
            problems.append(f"{name}: perplexity changed {metrics['perplexity_drop_percent']:+.4f}% vs the merged model, "
                            f"past quantize.checks.{name}.max_perplexity_drop_percent={check.max_perplexity_drop_percent}")
        if not metrics["top1_agreement"] >= check.min_top1_agreement:
            problems.append(f"{name}: top-1 agreement with the merged model {metrics['top1_agreement']:.4f} < "
                            f"quantize.checks.{name}.min_top1_agreement={check.min_top1_agreement}")
    return problems


def flatten(report: dict) -> dict:
    return {f"{name}.{key}": value for name, metrics in report.items() for key, value in metrics.items()}


def skip_reason(merged_dir) -> str | None:
    method = json.loads((Path(merged_dir) / "train_method.json").read_text())["method"]
    if method == "prompt_tuning":
        return ("prompt_tuning: the model is the base plus a soft prompt that GGUF, GPTQ and AWQ cannot carry, so "
                "nothing is quantized; deploy models/merged with its prompt_adapter/")
    return None


def main() -> None:
    params = setup("quantize", {"quantize": Quantize, "evaluate": Evaluate})
    offline_by_default()
    os.environ.setdefault("HF_HOME", str(Path.home() / ".cache" / "huggingface"))  # gptqmodel redirects it otherwise
    import torch

    torch.set_num_threads(params.threads)
    placement = device.resolve(params.device, params.dtype)
    log.info("quantize: transformers models on %s, llama.cpp on the CPU", placement)
    merged_dir = require_complete(MERGED)
    with atomic_dir(OUT) as tmp:
        reason = skip_reason(merged_dir)
        if reason:
            log.warning("quantize skipped: %s", reason)
            write_text(tmp / "SKIPPED.txt", reason + "\n")
            write_json(METRICS, {"skipped": reason, "formats": params.quantize.formats})
            return
        report = quantize(merged_dir, params.quantize.formats, tmp, read_jsonl(DATA / "test.jsonl"),
                          read_jsonl(DATA / "train.jsonl"), params.quantize, params.evaluate, params.threads, placement)
        problems = failed_checks(report, params.quantize.checks)
        write_json(METRICS, {**flatten(report), "checks_failed": len(problems), **device.memory_metrics(placement)})
        if problems:
            raise SystemExit("quantize: quality checks failed (metrics/quantize.json has every number):\n  - "
                             + "\n  - ".join(problems))
    log.info("quantize done: %s (metrics/quantize.json)", ", ".join(
        f"{name} {metrics['size_bytes'] / 2**20:.1f} MiB ppl {metrics['perplexity']}" for name, metrics in report.items()))


if __name__ == "__main__":
    main()

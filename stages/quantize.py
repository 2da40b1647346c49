"""quantize: deployable artifacts from the merged model, each loaded by its real client and re-evaluated.

`quantize.formats`:
- gguf_f16 / gguf_q8_0 / gguf_q4_0 / gguf_q4_k_m: llama.cpp's convert_hf_to_gguf.py writes an
  f16 GGUF, llama.cpp's quantizer makes the rest; llama-cpp-python loads each one.
- gptq / awq: GPTQModel (gptq.py), calibrated on a seeded sample of the training split (saved beside the
  model); plain `transformers` loads it (AWQ: GPTQModel's torch kernel on the CPU, its CUDA ones on a GPU).
- bnb_int8: bitsandbytes LLM.int8() weights, saved; plain `transformers` (+ bitsandbytes) loads them.

The merged model and every artifact are scored on the same rows of the test split (`quantize.max_eval_rows`
of them, evenly spaced) by the same `scoring.evaluate_model` as the evaluate stage (task metrics,
perplexity), plus top-1 agreement with the merged model where the answer tokens are predicted (the positions
perplexity scores: elsewhere a real model's prompt text is full of near-ties that any rounding flips), size
and its ratio to the merged model, load time and greedy tokens/s on this machine. The merged, GPTQ, AWQ and
bitsandbytes models run where the top-level `device` / `dtype` params put them (device.py); llama.cpp runs on
the CPU. `metrics/quantize.json` has all of it, the change against the merged model and the stage's peak host /
GPU memory; the stage fails past `quantize.checks` and `quantize.max_task_drop_standard_errors` (README
"Quality gates"). A prompt-tuned model has nothing to quantize: it is skipped, and the metrics say why.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from finetune import ROOT
from finetune.data import IGNORE
from finetune.evaluation import scoring
from finetune.export import gptq, llamacpp
from finetune.params.evaluate import Evaluate
from finetune.params.quantize import Quantize
from finetune.runtime import device
from finetune.runtime.env import check_kernels, offline_by_default, quiet_gptqmodel
from finetune.runtime.files import atomic_dir, read_jsonl, require_complete, write_metrics, write_text
from finetune.runtime.stage import setup

log = logging.getLogger("finetune.quantize")

MERGED = ROOT / "models" / "merged"
DATA = ROOT / "data" / "formatted"
OUT = ROOT / "models" / "quantized"
METRICS = ROOT / "metrics" / "quantize.json"
SPEED_PROMPTS = 2
PROPORTIONS = ("task.accuracy", "task.exact_match", "task.pass@1")  # task metrics that are a share of rows


@dataclass(frozen=True)
class QuantizeJob:
    """What quantize() works on: the merged model and where the artifacts go, the rows it scores and calibrates on,
    the settings (quantize.* and evaluate.*), and where it runs."""
    merged_dir: Path
    out_dir: Path
    test_rows: list[dict]  # scored: at most cfg.max_eval_rows of them (evaluation_rows)
    train_rows: list[dict]  # GPTQ / AWQ calibration rows are sampled from these
    cfg: Quantize
    eval_cfg: Evaluate
    threads: int = 1
    placement: device.Placement = device.Placement("cpu", "float32")


def evaluation_rows(rows: list[dict], max_rows: int | None) -> list[dict]:
    """At most max_rows rows, evenly spaced over the split (deterministic; the same rows for every artifact)."""
    if max_rows is None or len(rows) <= max_rows:
        return rows
    return [rows[index * len(rows) // max_rows] for index in range(max_rows)]


def answer_positions(row: dict) -> list[int]:
    """Positions whose next token is an answer token (trained, and scored by perplexity)."""
    labels = row["labels"]
    return [position for position in range(len(labels) - 1) if labels[position + 1] != IGNORE]


def record_argmax(model, seen: dict):
    """A forward hook that keeps the argmax of every forward asking for logits at chosen positions (scoring's
    perplexity pass asks for the answer positions with `logits_to_keep`): seen[input ids] = {position: token}.
    answer_top1 then needs no second pass. Returns the hook's handle; remove it when done."""
    import torch

    def hook(module, args, kwargs, output):
        keep, ids, mask = kwargs.get("logits_to_keep"), kwargs.get("input_ids"), kwargs.get("attention_mask")
        if not isinstance(keep, torch.Tensor) or ids is None:  # generation asks for the last position (an int)
            return
        positions, best = keep.tolist(), output.logits.argmax(-1).tolist()
        for row, tokens in enumerate(ids.tolist()):
            length = int(mask[row].sum()) if mask is not None else len(tokens)  # right padding (logit_passes)
            seen.setdefault(tuple(tokens[:length]), {}).update(
                (position, token) for position, token in zip(positions, best[row]) if position < length)

    return model.register_forward_hook(hook, with_kwargs=True)


def answer_top1(model, rows: list[dict], batch_size: int, seen: dict | None = None) -> list[list[int]]:
    """The argmax next token at each row's answer positions: from `seen` (record_argmax) or llama.cpp's record of
    its every position, else computed at these positions only (within scoring's logits budget)."""
    wanted = [answer_positions(row) for row in rows]
    seen = {**getattr(model, "argmax_by_sequence", {}), **(seen or {})}
    found = [dict(enumerate(tokens)) if isinstance(tokens, list) else dict(tokens)
             for tokens in (seen.get(tuple(row["input_ids"]), {}) for row in rows)]
    missing = [index for index, tokens in enumerate(found) if not all(position in tokens for position in wanted[index])]
    passes = scoring.logit_passes(model, [rows[index]["input_ids"] for index in missing], [wanted[index] for index in missing],
                                  batch_size, bytes_per_logit=scoring.ARGMAX_BYTES_PER_LOGIT)
    for batch, chunk, logits in passes:
        best = logits.argmax(-1).tolist()
        for row, index in enumerate(batch):
            found[missing[index]].update(zip(chunk, best[row]))
    return [[tokens[position] for position in positions] for tokens, positions in zip(found, wanted)]


def agreement(predicted: list[list[int]], reference: list[list[int]]) -> float:
    pairs = [(a, b) for row, ref in zip(predicted, reference) for a, b in zip(row, ref)]
    return sum(a == b for a, b in pairs) / max(len(pairs), 1)


def tokens_per_second(model, tokenizer, prompts: list[str], new_tokens: int) -> float:
    """Greedy decode of exactly `new_tokens` per prompt, one prompt at a time (prompt processing included)."""
    import torch

    def run(prompt, count):
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(scoring.input_device(model))
        with torch.no_grad():
            model.generate(**ids, max_new_tokens=count, min_new_tokens=count, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)

    run(prompts[0], 2)  # warm-up: first-call allocations are not generation speed
    started = time.perf_counter()
    for prompt in prompts:
        run(prompt, new_tokens)
    return len(prompts) * new_tokens / (time.perf_counter() - started)


def score(model, tokenizer, rows: list[dict], job: QuantizeJob) -> tuple[dict, list[list[int]]]:
    """Everything measured on one loaded model, with the evaluation stage's code for task metrics and perplexity;
    and its top-1 tokens at the answer positions."""
    started, seen = time.perf_counter(), {}
    hook = record_argmax(model, seen) if hasattr(model, "register_forward_hook") else None
    try:
        metrics, _ = scoring.evaluate_model(model, tokenizer, rows, job.eval_cfg)
    finally:
        if hook is not None:
            hook.remove()
    top1 = answer_top1(model, rows, job.eval_cfg.batch_size, seen)
    metrics["tokens_per_second"] = round(tokens_per_second(model, tokenizer, [row["prompt"] for row in rows[:SPEED_PROMPTS]],
                                                           job.cfg.speed_new_tokens), 1)
    metrics["score_seconds"] = round(time.perf_counter() - started, 1)
    return metrics, top1


def folder_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(item.stat().st_size for item in path.glob("*.safetensors"))


def load_timed(loader):
    started = time.perf_counter()
    loaded = loader()
    return loaded, round(time.perf_counter() - started, 3)


def quantize(job: QuantizeJob) -> dict:
    """Pure core: write each of job.cfg.formats into job.out_dir, load it with its client, score it against the
    merged model on the same rows.

    Returns {"merged": metrics, "<format>": metrics, ...}; each format's metrics include the change
    against the merged model (`delta.*`, `perplexity_drop_percent`, `top1_agreement`) and `size_ratio`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    cfg, merged_dir, out_dir, formats = job.cfg, Path(job.merged_dir), Path(job.out_dir), list(job.cfg.formats)
    rows = evaluation_rows(job.test_rows, cfg.max_eval_rows)
    gptqmodel_formats = [method for method in gptq.METHODS if method in formats]
    # before minutes of other formats: a group size the layer widths refuse fails now
    group_sizes = {method: gptq.resolve_group_size(merged_dir, getattr(cfg, method).group_size, method)
                   for method in gptqmodel_formats}
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    merged, load_seconds = load_timed(
        lambda: AutoModelForCausalLM.from_pretrained(merged_dir, **job.placement.load_kwargs()).eval())
    reference, reference_top1 = score(merged, tokenizer, rows, job)
    merged_bytes = folder_bytes(merged_dir)
    report = {"merged": {**reference, "size_bytes": merged_bytes, "load_seconds": load_seconds, "eval_rows": len(rows)}}
    del merged
    log.info("merged model: %s on %d test rows (%.0f s)", scoring_summary(reference), len(rows), reference["score_seconds"])

    def finish(name, path, model, seconds, extra=None):
        metrics, top1 = score(model, tokenizer, rows, job)
        report[name] = {**(extra or {}), **compare(metrics, top1, report["merged"], reference_top1),
                        "size_bytes": folder_bytes(path), "size_ratio": round(folder_bytes(path) / merged_bytes, 4),
                        "load_seconds": seconds}
        log.info("%s: %s, size x%.3f (%.0f s)", name, scoring_summary(report[name]), report[name]["size_ratio"],
                 metrics["score_seconds"])
        log.debug("%s: %s", name, json.dumps(report[name], sort_keys=True))

    ggufs = [name for name in formats if name.startswith("gguf_")]
    if ggufs:
        f16 = llamacpp.hf_to_gguf(merged_dir, out_dir / "model-f16.gguf", outtype="f16")
        n_ctx = max(len(row["input_ids"]) for row in rows) + max(job.eval_cfg.max_new_tokens, cfg.speed_new_tokens) + 64
        generation_config = GenerationConfig.from_pretrained(merged_dir)
        for name in ggufs:
            qtype = name.removeprefix("gguf_")
            path = f16 if qtype == "f16" else llamacpp.quantize_gguf(f16, out_dir / f"model-{qtype}.gguf", qtype, job.threads)
            types = llamacpp.tensor_types(path)
            if qtype.endswith("_k_m") and not any(kind.endswith("_K") for kind in types):
                log.warning("%s: no K-quant tensor in the file (%s): llama.cpp's K-quants need row widths that are "
                            "multiples of 256 and fell back to legacy types; the numbers below are for those", name, types)
            model, seconds = load_timed(lambda: llamacpp.LlamaCppLM(path, generation_config, n_ctx, job.threads))
            finish(name, path, model, seconds, {f"tensor_types.{kind}": count for kind, count in types.items()})
            del model
        if "gguf_f16" not in formats:
            f16.unlink()
    if "bnb_int8" in formats:  # bitsandbytes LLM.int8(): saves and reloads exactly (nf4 saved after a CPU pass does not)
        from transformers import BitsAndBytesConfig

        where = job.placement.load_kwargs()  # int8 linear weights; the rest (embeddings, norms) in placement's dtype
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
        calibration = gptq.calibration_rows(job.train_rows, settings.calibration_rows, settings.calibration_seed)
        made = gptq.quantize_gptq(merged_dir, out_dir / method, calibration, settings, job.threads, method,
                                  group_sizes[method])
        # AWQ on a GPU: transformers loads bfloat16 as float16, the dtype its CUDA kernels take
        model, seconds = load_timed(lambda: AutoModelForCausalLM.from_pretrained(out_dir / method,
                                                                                 **job.placement.load_kwargs()).eval())
        finish(method, out_dir / method, model, seconds, made)
        del model
    return report


def compare(metrics: dict, top1: list[list[int]], reference: dict, reference_top1: list[list[int]]) -> dict:
    """An artifact's metrics with their change against the merged model's on the same rows."""
    return {**metrics, "top1_agreement": round(agreement(top1, reference_top1), 5),
            "perplexity_drop_percent": round(100 * (metrics["perplexity"] / reference["perplexity"] - 1), 4),
            **{f"delta.{key}": round(value - reference[key], 5) for key, value in metrics.items()
               if key.startswith("task.") and key in reference}}


def scoring_summary(metrics: dict) -> str:
    shown = [f"{key.removeprefix('task.')} {metrics[key]:.4g}" for key in PROPORTIONS if key in metrics]
    shown.append(f"perplexity {metrics['perplexity']:.4g}"
                 + (f" ({metrics['perplexity_drop_percent']:+.3f}%)" if "perplexity_drop_percent" in metrics else ""))
    if "top1_agreement" in metrics:
        shown.append(f"answer top-1 agreement {metrics['top1_agreement']:.4f}")
    return ", ".join(shown) + f", {metrics['tokens_per_second']} tokens/s"


def task_drop_limit(score: float, rows: int, standard_errors: float) -> float:
    """`standard_errors` binomial standard errors of a share `score` measured on `rows` rows; the share is
    smoothed as (successes + 1) / (rows + 2), so a perfect or zero score still has a non-zero error."""
    smoothed = (score * rows + 1) / (rows + 2)
    return standard_errors * math.sqrt(smoothed * (1 - smoothed) / rows)


def failed_checks(report: dict, checks: dict, standard_errors: float) -> list[str]:
    problems, reference = [], report["merged"]
    for name, metrics in report.items():
        if name == "merged":
            continue
        check = checks[name]
        if not abs(metrics["perplexity_drop_percent"]) <= check.max_perplexity_drop_percent:
            problems.append(f"{name}: perplexity changed {metrics['perplexity_drop_percent']:+.4f}% vs the merged model, "
                            f"past quantize.checks.{name}.max_perplexity_drop_percent={check.max_perplexity_drop_percent}")
        if not metrics["top1_agreement"] >= check.min_top1_agreement:
            problems.append(f"{name}: top-1 agreement with the merged model at the answer tokens {metrics['top1_agreement']:.4f} "
                            f"< quantize.checks.{name}.min_top1_agreement={check.min_top1_agreement}")
        for key in (key for key in PROPORTIONS if key in metrics and key in reference):
            limit = task_drop_limit(reference[key], reference["eval_rows"], standard_errors)
            if not reference[key] - metrics[key] <= limit + 1e-9:
                problems.append(f"{name}: {key} fell {reference[key] - metrics[key]:.4f} ({reference[key]:.4f} -> "
                                f"{metrics[key]:.4f}) on {reference['eval_rows']} rows, past quantize."
                                f"max_task_drop_standard_errors={standard_errors:g} standard errors ({limit:.4f})")
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
            write_metrics(METRICS, {"skipped": reason, "formats": params.quantize.formats})
            return
        report = quantize(QuantizeJob(merged_dir, tmp, read_jsonl(DATA / "test.jsonl"), read_jsonl(DATA / "train.jsonl"),
                                      params.quantize, params.evaluate, params.threads, placement))
        problems = failed_checks(report, params.quantize.checks, params.quantize.max_task_drop_standard_errors)
        write_metrics(METRICS, {**flatten(report), "checks_failed": len(problems), "kernels": check_kernels(params.kernels),
                                **device.memory_metrics(placement)})
        if problems:
            raise SystemExit("quantize: quality checks failed (metrics/quantize.json has every number):\n  - "
                             + "\n  - ".join(problems))
    log.info("quantize done: %s (metrics/quantize.json)", ", ".join(
        f"{name} {metrics['size_bytes'] / 2**20:.1f} MiB ppl {metrics['perplexity']}" for name, metrics in report.items()))


if __name__ == "__main__":
    main()

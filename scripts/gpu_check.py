"""GPU check: the train stage's own cores on a ~0.5B Qwen2-shaped model, on one GPU, in a few minutes.

A random-weight model of Qwen2.5-0.5B's shape (scripts/family_models.py, built here, nothing downloaded) is
fine-tuned on synthetic ticket-routing rows through `train.fit` with bf16 LoRA, QLoRA (nf4, bf16 compute)
and full fine-tuning (fp32 master weights under bf16 autocast), a few hundred steps each; then the LoRA
model is scored (`scoring.evaluate_model`) and merged (`merge.merge`) on the GPU, and the merged model goes
through the quantize stage's own core as AWQ (`quantize.quantize(..., ["awq"])`: GPTQModel in its own process,
reloaded by transformers on the GPU, scored against the merged model; needs gptqmodel, else a skipped row;
not in the dry run, where tests/test_quantize.py covers AWQ on the CPU). One table: tokens/s, MFU
(train's convention: 4N + 2N_trainable FLOPs per token over the GPU's dense bf16 peak), peak GPU memory
(allocated) beside the memory plan's estimate (without the CUDA context, which the allocator does not
see), seconds. Only what a bare GPU machine has is imported (no dvc, trl, datasets): see gpu_check.sh.

    scripts/gpu_check.sh               # on a GPU machine
    scripts/gpu_check.sh --dry-run     # anywhere: a tiny model, 3 steps, on the CPU, the same table
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
sys.modules.setdefault("gptqmodel", None)  # as train does: a base we train is never GPTQ-quantized

TOPICS = {"billing": "I was charged twice for my last order", "shipping": "my parcel has not arrived after two weeks",
          "technical": "the app crashes every time I open settings", "account": "I cannot change the email on my profile",
          "returns": "the shoes do not fit and I want to send them back", "other": "do you have a shop in Lisbon"}
FILLER = ("please note that I have tried to resolve this myself several times over the past few days and I am "
          "writing again because nothing has changed since my last message").split()


def rows_for(tokenizer, count: int, target_tokens: int, seed: int) -> list[dict]:
    """Routing rows of at most `target_tokens` tokens (the ticket text cut to fit), formatted by the format
    stage: chat template, loss on the answer only."""
    from finetune.params.core import section
    from stages import format as fmt

    def record(index: int, label: str, text: str) -> dict:
        return {"id": f"row-{index}", "messages": [{"role": "user", "content": f"Route this ticket: {text}"},
                                                   {"role": "assistant", "content": label}]}

    cfg = section("format", max_seq_len=target_tokens)
    frame = max(len(row["input_ids"]) for row in fmt.formatted_rows(tokenizer, [record(0, label, "") for label in TOPICS], cfg))
    room = target_tokens - frame - 2  # the ticket's own tokens; 2 spare for merges at its edges
    if room < 4:
        raise SystemExit(f"gpu_check: --tokens {target_tokens} leaves no room for a ticket (the template takes {frame})")
    rng, records = random.Random(seed), []
    labels = list(TOPICS)
    for index in range(count):
        label = labels[index % len(labels)]
        words = rng.randint(target_tokens // 3, target_tokens * 2 // 3)
        text = f"{TOPICS[label]}, " + " ".join(rng.choice(FILLER) for _ in range(words))
        records.append(record(index, label, tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:room])))
    return fmt.formatted_rows(tokenizer, records, cfg)


def bitsandbytes_missing() -> str | None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # a broken install raises more than ImportError
        return f"{type(exc).__name__}: {exc}"
    return None


def awq_row(merged: Path, train_rows: list[dict], test_rows: list[dict], placement, out: Path) -> dict:
    """The quantize stage's core on the merged model, AWQ only: its metrics against the merged model in one row.
    Last of all: it lets gptqmodel in (training keeps it out), and loading an AWQ model imports it."""
    import torch
    from transformers.utils import import_utils

    if sys.modules.get("gptqmodel", 0) is None:
        del sys.modules["gptqmodel"]
    try:
        import gptqmodel  # noqa: F401
    except Exception as exc:  # a broken install raises more than ImportError
        return {"run": "quantize awq", "skipped": f"gptqmodel does not import ({type(exc).__name__}: {exc})"[:120]}
    import_utils.is_gptqmodel_available.cache_clear()
    from stages import quantize
    from finetune.params.core import section

    cfg = section("quantize", formats=["awq"])
    clock = time.time()
    report = quantize.quantize(quantize.QuantizeJob(merged, out, test_rows, train_rows, cfg,
                                                    section("evaluate", batch_size=16, max_new_tokens=4), 1, placement))
    awq = report["awq"]
    return {"run": f"quantize awq (merged, {cfg.awq.bits}-bit, group {awq['group_size']})",
            "seconds": round(time.time() - clock, 1), "tokens_per_second": awq["tokens_per_second"],
            "result": f"perplexity {awq['perplexity_drop_percent']:+.2f}%, top-1 agreement {awq['top1_agreement']:.3f}, "
                      f"size x{awq['size_ratio']:.2f}, accuracy {awq['task.accuracy']:.3f}",
            "peak_mb": round(torch.cuda.max_memory_allocated() / 2**20)}  # this process: GPTQModel's worker not counted


def free() -> None:
    """Between runs: what the last one held goes, and the peak counter starts again."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def train_row(method: str, metrics: dict, seconds: float, cuda: bool) -> dict:
    """One method's line; the peak is read now, after saving (as the plan counts it, and the stage measures it)."""
    import torch

    from finetune.runtime.device import peak_rss_mb

    framework = metrics["plan"].get("framework_memory_mb", 0)
    plan = metrics["plan_peak_memory_mb"] - (framework if cuda else 0)
    measured = round(torch.cuda.max_memory_allocated() / 2**20) if cuda else peak_rss_mb()
    return {"run": method, "steps": metrics["steps"], "tokens_per_second": metrics["tokens_per_second"],
            "mfu": metrics["mfu"], "peak_mb": measured, "plan_mb": round(plan),
            "plan_error_percent": round(100 * (plan - measured) / measured, 1) if measured else None,
            "train_loss": metrics["train_loss"], "seconds": round(seconds, 1)}


def print_table(rows: list[dict], what_peak: str) -> None:
    header = ["run", "steps", "tokens/s", "MFU", f"peak {what_peak} MiB", "plan MiB", "plan error", "loss / result",
              "seconds"]
    lines = []
    for row in rows:
        if "skipped" in row:
            lines.append([row["run"], "-", "-", "-", "-", "-", "-", f"skipped: {row['skipped']}", "-"])
            continue
        lines.append([row["run"], str(row.get("steps", "-")),
                      f"{row['tokens_per_second']:,.0f}" if row.get("tokens_per_second") else "-",
                      f"{row['mfu']:.1%}" if row.get("mfu") is not None else "-",
                      f"{row['peak_mb']:,}" if row.get("peak_mb") is not None else "-",
                      f"{row['plan_mb']:,}" if row.get("plan_mb") is not None else "-",
                      f"{row['plan_error_percent']:+.1f}%" if row.get("plan_error_percent") is not None else "-",
                      row.get("result") or f"loss {row['train_loss']:.4f}", f"{row['seconds']:.1f}"])
    widths = [max(len(header[i]), *(len(line[i]) for line in lines)) for i in range(len(header))]
    print(" | ".join(name.ljust(width) for name, width in zip(header, widths)))
    print("-|-".join("-" * width for width in widths))
    for line in lines:
        print(" | ".join(cell.ljust(width) for cell, width in zip(line, widths)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="a tiny model, 3 steps, on the CPU")
    parser.add_argument("--steps", type=int, help="optimizer steps per method (default 300; dry run 3)")
    parser.add_argument("--batch-size", type=int, help="rows per step (default 8; dry run 2)")
    parser.add_argument("--tokens", type=int, help="tokens per row, about (default 512; dry run 48)")
    parser.add_argument("--methods", default="lora,qlora,full")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "/tmp/finetune-gpu-check"),
                        help="work folder; gpu_check.json lands here (default $OUT, else /tmp/finetune-gpu-check)")
    args = parser.parse_args()
    steps = args.steps or (3 if args.dry_run else 300)
    batch = args.batch_size or (2 if args.dry_run else 8)
    tokens = args.tokens or (48 if args.dry_run else 512)

    import torch

    from finetune.runtime import device
    import family_models
    from stages import merge
    from finetune.evaluation import scoring
    from stages import train
    from finetune.runtime.stage import configure_logging
    from finetune.params.core import section
    from finetune.training.trainer import RunFiles, TrainData

    configure_logging()
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("gpu_check: no CUDA GPU is visible; run on a GPU machine, or --dry-run here", file=sys.stderr)
        return 2
    placement = device.resolve("cuda" if cuda else "cpu", "auto")
    if not cuda:
        torch.set_num_threads(1)
    work = args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if cuda:
        torch.cuda.init()
        free_bytes, total_bytes = torch.cuda.mem_get_info()
        print(f"{torch.cuda.get_device_name()}: {total_bytes / 2**20:,.0f} MiB, CUDA context and other processes "
              f"{(total_bytes - free_bytes) / 2**20:,.0f} MiB (the plan assumes {train.memory_plan.CUDA_CONTEXT_MIB})")
    base = family_models.build("qwen2", work / "base", "tiny" if args.dry_run else "0.5b")
    print(f"base: {base} ({json.loads((base / 'family.json').read_text())['parameters'] / 1e6:,.1f}M params) built in "
          f"{time.time() - started:.0f} s; {placement}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    train_rows = rows_for(tokenizer, max(64, batch * 16), tokens, seed=0)
    eval_rows, test_rows = rows_for(tokenizer, 8, tokens, seed=1), rows_for(tokenizer, 16 if args.dry_run else 48, tokens, 2)

    results = []
    for method in args.methods.split(","):
        missing = bitsandbytes_missing() if method == "qlora" else None
        if missing:
            print(f"qlora: skipped, bitsandbytes does not import ({missing}); put its wheel in $FINETUNE_WHEELS")
            results.append({"run": "qlora", "skipped": "no bitsandbytes"})
            continue
        cfg = section("train", method=method, max_steps=steps, batch_size=batch, logging_steps=max(1, steps // 5),
                      checkpoint_steps=0, eval_steps=0, learning_rate=1e-4 if method == "full" else 1e-3,
                      bf16=cuda and method == "full", gradient_checkpointing=False, num_processes=1, threads=None,
                      qlora={"compute_dtype": "bfloat16" if cuda else "float32"})
        free()
        clock = time.time()
        run = RunFiles(checkpoint_dir=work / f"checkpoints-{method}", live_dir=work / f"plots-{method}", fingerprint={})
        trainer, trained_tokenizer, metrics = train.fit(base, TrainData(train=train_rows, eval=eval_rows), cfg, 0, run,
                                                        placement=placement)
        seconds = time.time() - clock
        if method == "lora":
            adapter = work / "adapter"
            train.save_trained(trainer, trained_tokenizer, cfg, eval_rows, adapter)
        results.append(train_row(method, metrics, seconds, cuda))
        if method == "lora":
            evaluation = section("evaluate", batch_size=16, max_new_tokens=4)
            clock = time.time()
            scores, _ = scoring.evaluate_model(trainer.model.eval(), trained_tokenizer, test_rows, evaluation)
            results.append({"run": "evaluate (lora)", "seconds": round(time.time() - clock, 1),
                            "result": f"accuracy {scores['task.accuracy']:.3f}, perplexity {scores['perplexity']:.3g}",
                            "peak_mb": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None})
        trainer = None
        free()
        if method == "lora":
            merge_cfg = section("merge")
            dtype = placement.dtype if cuda else "float32"
            clock = time.time()
            report = merge.merge(base, work / "adapter", dtype, getattr(merge_cfg.rtol, dtype), work / "merged",
                                 merge_cfg.max_shard_size, where=placement.device)
            results.append({"run": f"merge (lora, {dtype})", "seconds": round(time.time() - clock, 1),
                            "result": f"max logit diff {report['max_logit_diff_vs_adapter']:.3g} vs adapter",
                            "peak_mb": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None})
    if "lora" in args.methods.split(","):
        if cuda:
            free()
            results.append(awq_row(work / "merged", train_rows, test_rows, placement, work / "quantized"))
        else:
            print("quantize awq: skipped in the dry run (tests/test_quantize.py runs AWQ on the CPU)")
    print()
    print_table(results, "GPU allocated" if cuda else "process RSS")
    print(f"\ntotal {time.time() - started:.0f} s on {torch.cuda.get_device_name() if cuda else 'cpu (dry run)'}")
    (args.out / "gpu_check.json").write_text(json.dumps({"device": torch.cuda.get_device_name() if cuda else "cpu",
                                                         "dry_run": args.dry_run, "runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

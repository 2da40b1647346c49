"""Training throughput of our train stage against a plain TRL SFTTrainer + peft LoRA run.

Same base (models/base), same data (data/formatted/train.jsonl), same hyperparameters (LoRA r/alpha/
targets, learning rate, batch size, scheduler, steps), measured in the same process, interleaved
and repeated; the median of each is reported. Tokens/s counts real (non-padding) tokens; the padding
fraction is the share of processed positions that are padding.

    python benchmarks/bench_train.py [--steps 30] [--repeats 2] [--threads 1 2]

Needs the pipeline's base and formatted data (`dvc repro format`).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def trl_baseline(base_dir, rows, cfg, steps: int, gradient_checkpointing: bool) -> tuple[float, float]:
    """What a user gets from TRL's SFTTrainer with peft and our data as is."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as scratch:
        args = SFTConfig(output_dir=scratch, learning_rate=cfg.learning_rate, max_steps=steps,
                         per_device_train_batch_size=cfg.batch_size, lr_scheduler_type=cfg.scheduler,
                         warmup_steps=cfg.warmup_ratio, max_grad_norm=cfg.max_grad_norm, logging_steps=10,
                         save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, max_length=None,
                         gradient_checkpointing=gradient_checkpointing, disable_tqdm=True, seed=0)
        dataset = Dataset.from_list([{"input_ids": row["input_ids"], "labels": row["labels"]} for row in rows])
        trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=dataset, peft_config=lora)
        counts = [0, 0]
        collator = trainer.data_collator

        def counting(examples):
            batch = collator(examples)
            counts[0] += sum(len(example["input_ids"]) for example in examples)
            counts[1] += batch["input_ids"].numel()
            return batch

        trainer.data_collator = counting
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    return counts[0] / seconds, 1 - counts[0] / counts[1]


def ours(base_dir, rows, cfg, steps: int) -> tuple[float, float]:
    from finetune.training.trainer import RunFiles, TrainData
    from stages import train

    with tempfile.TemporaryDirectory() as scratch:
        cfg = cfg.model_copy(update={"max_steps": steps, "checkpoint_steps": 0, "logging_steps": 10})
        run = RunFiles(checkpoint_dir=Path(scratch) / "ck", live_dir=Path(scratch) / "plots", fingerprint={})
        _, _, metrics = train.fit(base_dir, TrainData(train=rows, eval=[]), cfg, 0, run)
    return metrics["tokens_per_second"], metrics["padding_fraction"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    options = parser.parse_args()
    import logging

    import torch

    from finetune.runtime.env import offline_by_default
    from finetune.runtime.files import read_jsonl
    from finetune.params.core import section

    logging.basicConfig(level=logging.WARNING)
    os.environ["TQDM_DISABLE"] = "1"  # no progress bars between the numbers
    offline_by_default()
    sys.modules.setdefault("gptqmodel", None)  # see stages/train.py build_model
    base_dir, data = ROOT / "models" / "base", ROOT / "data" / "formatted" / "train.jsonl"
    if not (base_dir / "config.json").exists() or not data.exists():
        raise SystemExit("needs models/base and data/formatted: run `dvc repro format` first")
    rows = read_jsonl(data)
    cfg = section("train")
    grouped = cfg.model_copy(update={"group_by_length": True, "packing": False})
    packed = cfg.model_copy(update={"packing": True, "packing_length": 256, "batch_size": max(1, cfg.batch_size // 3)})
    runs = {}
    for threads in options.threads:
        runs |= {
            f"TRL SFTTrainer + peft, defaults (gradient checkpointing on), {threads} thr":
                lambda: trl_baseline(base_dir, rows, cfg, options.steps, True),
            f"TRL SFTTrainer + peft, gradient checkpointing off, {threads} thr":
                lambda: trl_baseline(base_dir, rows, cfg, options.steps, False),
            f"ours: length-grouped batches, {threads} thr": lambda: ours(base_dir, rows, grouped, options.steps),
            f"ours: packed rows of 256, batch {packed.batch_size}, {threads} thr":
                lambda: ours(base_dir, rows, packed, options.steps),
        }
    results: dict[str, list] = {name: [] for name in runs}
    for repeat in range(options.repeats):
        for name, run in runs.items():
            threads = int(name.rsplit(", ", 1)[1].split()[0])
            torch.set_num_threads(threads)
            os.environ["OMP_NUM_THREADS"] = str(threads)
            results[name].append(run())
            print(f"[{repeat + 1}/{options.repeats}] {name}: {results[name][-1][0]:,.0f} tokens/s", flush=True)
    load = os.getloadavg()[0]
    print(f"\nbuilt-in base, {len(rows)} train rows, {options.steps} steps, lr {cfg.learning_rate}, batch {cfg.batch_size}, "
          f"LoRA r={cfg.lora.r}, median of {options.repeats}; load average {load:.1f} on {os.cpu_count()} cores")
    print(f"{'run':<72} {'tokens/s':>10} {'padding':>8} {'vs TRL':>7} {'vs TRL gc off':>14}")
    for threads in options.threads:
        medians = {name: (statistics.median(r[0] for r in values), statistics.median(r[1] for r in values))
                   for name, values in results.items() if name.endswith(f", {threads} thr")}
        default, fair = (value[0] for name, value in medians.items() if name.startswith("TRL"))
        for name, (speed, padding) in medians.items():
            print(f"{name:<72} {speed:>10,.0f} {padding:>8.3f} {speed / default:>6.2f}x {speed / fair:>13.2f}x")


if __name__ == "__main__":
    main()

"""train: fine-tune the base on the formatted data with TRL's SFTTrainer and peft LoRA.

Writes the adapter (plus tokenizer and the format fingerprint) to `models/adapter/`,
the final numbers to `metrics/train.json` and the loss curve to `metrics/train_curve.csv`.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time

from common import (ROOT, atomic_dir, offline_by_default, read_jsonl, require_complete, save_reference_logits,
                    seed_everything, setup, write_json, write_text)

log = logging.getLogger("finetune.train")

BASE = ROOT / "models" / "base"
DATA = ROOT / "data" / "formatted"
OUT = ROOT / "models" / "adapter"
METRICS = ROOT / "metrics" / "train.json"
CURVE = ROOT / "metrics" / "train_curve.csv"
TARGETS = {"attention": ["q_proj", "v_proj"], "attention_all": ["q_proj", "k_proj", "v_proj", "o_proj"],
           "all-linear": "all-linear"}


def lora_config(cfg):
    from peft import LoraConfig

    targets = cfg.target_modules if isinstance(cfg.target_modules, list) else TARGETS[cfg.target_modules]
    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM")


def trainable_parameters(model) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total,
            "trainable_percent": round(100 * trainable / total, 4)}


def fit(base_dir, train_rows: list[dict], eval_rows: list[dict], cfg, seed: int, out_dir) -> dict:
    """Pure core: train on explicit rows and save the result to `out_dir`; returns metrics."""
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    seed_everything(seed, torch.get_num_threads())
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(model, lora_config(cfg.lora))
    counts = trainable_parameters(model)
    log.info("trainable params: %d || all params: %d || trainable%%: %.4f", counts["trainable_params"],
             counts["total_params"], counts["trainable_percent"])

    curve: list[dict] = []

    class Curve(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                curve.append({"step": state.global_step, "loss": logs["loss"], "learning_rate": logs.get("learning_rate")})
                if not math.isfinite(logs["loss"]):
                    raise SystemExit(f"train: loss is {logs['loss']} at step {state.global_step}; lower train.learning_rate")

    keep = ["input_ids", "labels"]
    scratch = tempfile.mkdtemp(prefix="trainer-")  # checkpoints are off; the Trainer still wants a folder
    args = SFTConfig(
        output_dir=str(scratch), seed=seed, data_seed=seed, learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_epochs, max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        lr_scheduler_type=cfg.scheduler, warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, logging_steps=cfg.logging_steps, save_strategy="no", eval_strategy="no",
        report_to=[], bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, disable_tqdm=False, max_length=None,
    )
    trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{k: row[k] for k in keep} for row in train_rows]),
                         eval_dataset=Dataset.from_list([{k: row[k] for k in keep} for row in eval_rows]) if eval_rows else None,
                         callbacks=[Curve()])
    started = time.time()
    result = trainer.train()
    seconds = time.time() - started
    eval_loss = trainer.evaluate()["eval_loss"] if eval_rows else None
    shutil.rmtree(scratch, ignore_errors=True)
    trainer.model.eval()
    save_reference_logits(trainer.model, [row["input_ids"][:64] for row in (eval_rows or train_rows)[:4]], out_dir)
    trainer.model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    tokens = sum(len(row["input_ids"]) for row in train_rows) * cfg.num_epochs if cfg.max_steps < 0 else None
    return {**counts, "train_loss": round(result.training_loss, 5),
            "final_loss": round(curve[-1]["loss"], 5) if curve else None,
            "eval_loss": round(eval_loss, 5) if eval_loss is not None else None,
            "steps": result.global_step, "train_seconds": round(seconds, 1),
            "tokens_per_second": round(tokens / seconds, 1) if tokens else None, "method": cfg.method,
            "seed": seed, "curve": curve}


def main() -> None:
    params = setup("train")
    offline_by_default()
    import torch

    torch.set_num_threads(params.threads)
    fingerprint = json.loads((DATA / "format.json").read_text())["fingerprint"]
    train_rows, eval_rows = read_jsonl(DATA / "train.jsonl"), read_jsonl(DATA / "eval.jsonl")
    with atomic_dir(OUT) as tmp:
        metrics = fit(require_complete(BASE), train_rows, eval_rows, params.train, params.seed, tmp)
        write_json(tmp / "format.json", {"fingerprint": fingerprint})
    curve = metrics.pop("curve")
    write_text(CURVE, "step,loss,learning_rate\n" + "".join(f"{p['step']},{p['loss']},{p['learning_rate']}\n" for p in curve))
    write_json(METRICS, metrics)
    log.info("train done: %s", metrics)


if __name__ == "__main__":
    main()

"""The training step and the Hugging Face `Trainer` around it, at module level so a reader (and a
test) finds them: `step_loss` is the loss of one batch, `FinetuneTrainer` scales it over the
accumulated step, `Observer` logs the curves (DVCLive) and completes checkpoints. Imported by
train.py after its params are checked (this module imports torch and transformers).

Batches: examples of similar length (or packed rows whose examples attend only to themselves),
right padding without an attention mask (causal attention never looks right, so real tokens cannot
see the padding), and logits computed only where a label is trained.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import ProgressCallback, Trainer, TrainerCallback, TrainingArguments

from finetune.data import IGNORE
from finetune.models.provenance import name_base_in
from finetune.runtime.env import VERBOSE
from finetune.runtime import device
from finetune.runtime.device import peak_rss_mb
from finetune.runtime.files import write_json
from finetune.training import lora_targets
from finetune.training.batching import LengthGroupedSampler, pack

log = logging.getLogger("finetune.train")

PLOT_KEYS = ["loss", "learning_rate", "grad_norm", "tokens_per_second", "eval_loss"]
# DVCLive logs them as live/<key>: `dvc exp show` would otherwise merge columns of the same name from
# metrics/train.json (eval_loss, tokens_per_second) and hide both
LIVE_GROUP = "live"
LOG_SECONDS = 15


class NonFiniteError(RuntimeError):
    pass


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right padding and no attention mask: under causal attention no real token sees a later pad."""


    width = max(len(example["input_ids"]) for example in examples)
    batch = {"input_ids": torch.tensor([e["input_ids"] + [pad_id] * (width - len(e["input_ids"])) for e in examples]),
             "labels": torch.tensor([e["labels"] + [IGNORE] * (width - len(e["labels"])) for e in examples])}
    if "position_ids" in examples[0]:  # the padding tail is a segment of its own
        batch["position_ids"] = torch.tensor([e["position_ids"] + list(range(width - len(e["position_ids"])))
                                              for e in examples])
    batch["num_real_tokens"] = torch.tensor(sum(len(e["input_ids"]) for e in examples))
    return batch


# --------------------------------------------------------------------------- the step
def step_loss(model, batch: dict, virtual_tokens: int = 0, keep_logits: bool = True):
    """(summed cross-entropy over the trained next-token positions, their count, the model output) for
    one collated batch. With `keep_logits` the model computes logits (and their backward) only at
    positions whose next token is trained; prompt tuning's virtual tokens come first in the logits.
    use_cache=False: with a cache the model ignores the packed segments in position_ids."""
    inputs = {key: value for key, value in batch.items() if key not in ("labels", "num_real_tokens")}
    targets = batch["labels"][:, 1:]
    if keep_logits:
        keep = (targets != IGNORE).any(0).nonzero().squeeze(-1)
        outputs = model(**inputs, use_cache=False, logits_to_keep=keep + virtual_tokens)
        logits, targets = outputs.logits, targets[:, keep]
    else:
        outputs = model(**inputs, use_cache=False)
        logits = outputs.logits[:, virtual_tokens:-1]
    loss_sum = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
    return loss_sum, (targets != IGNORE).sum(), outputs


@dataclass(frozen=True)
class TrainData:
    """The formatted rows of one run (what the format stage writes: input_ids, labels, ...)."""
    train: list[dict]  # trained on, in LengthGroupedSampler's order (packed with train.packing)
    eval: list[dict]  # the validation loss every train.eval_steps and at the end; may be empty


@dataclass(frozen=True)
class RunFiles:
    """Where one run keeps its checkpoints and curves, and what its checkpoints belong to."""
    checkpoint_dir: Path  # the Trainer's checkpoints, each completed by a finetune.json
    live_dir: Path  # DVCLive's curves and summary
    fingerprint: dict  # stamped into every checkpoint: a checkpoint resumes only under the same one
    resume_from: Path | None = None  # a complete checkpoint in checkpoint_dir to resume, or None: start fresh


@dataclass(frozen=True)
class StepSettings:
    """What the trainer needs beyond TrainingArguments."""
    seed: int  # drives the batch order (LengthGroupedSampler)
    group_by_length: bool
    virtual_tokens: int = 0  # prompt tuning prepends these to the logits
    keep_logits: bool = True  # the model takes `logits_to_keep`


class FinetuneTrainer(Trainer):
    """The HF Trainer with our batch order, our loss (`step_loss` over the tokens of the whole
    accumulated step) and a stop on a non-finite loss or gradient norm."""

    loss_is_scaled_for_ga = True  # compute_loss divides by the tokens of the whole accumulated step

    def __init__(self, *args, step: StepSettings, **kwargs):
        super().__init__(*args, **kwargs)
        self.step = step
        self.model_accepts_loss_kwargs = True  # makes the Trainer count num_items_in_batch
        self.session_tokens = [0, 0]  # real, processed (with padding) in this process run

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return LengthGroupedSampler([len(row["input_ids"]) for row in dataset], self.args.per_device_train_batch_size,
                                    self.step.seed, self.step.group_by_length)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, targets, outputs = step_loss(model, inputs, self.step.virtual_tokens, self.step.keep_logits)
        if num_items_in_batch is None:
            loss = loss / targets.clamp(min=1)
        else:
            loss = loss / num_items_in_batch
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * self.args.world_size  # DDP averages gradients over processes
        if model.training:
            labels = inputs["labels"]
            counts = torch.stack([inputs["num_real_tokens"].to(labels.device),
                                  torch.tensor(labels.numel(), device=labels.device)])
            if self.args.world_size > 1:
                counts = self.accelerator.gather(counts[None]).sum(0)
            self.state.num_input_tokens_seen += int(counts[0])
            self.session_tokens = [self.session_tokens[0] + int(counts[0]), self.session_tokens[1] + int(counts[1])]
            if self.args.world_size == 1 and not torch.isfinite(loss):  # with DDP the grad norm check catches it
                raise NonFiniteError(f"train: loss is {loss.item()} at step {self.state.global_step + 1}")
        return (loss, outputs) if return_outputs else loss

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            raise NonFiniteError(f"train: gradient norm is {float(grad_norm)} at step {self.state.global_step + 1}")
        return grad_norm


# --------------------------------------------------------------------------- curves and checkpoints
class Observer(TrainerCallback):
    """Curves (DVCLive, on process zero), one log line per logging step, a final log at the last step,
    completeness markers."""

    def __init__(self, live_dir: Path, fingerprint: dict, keep_checkpoints: int):
        self.live_dir, self.fingerprint, self.keep_checkpoints = Path(live_dir), fingerprint, keep_checkpoints
        self.live = None  # process zero's DVCLive logger, opened when training begins
        self.last = (time.time(), 0)
        self.printed = 0.0  # when the last step line was logged

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = (time.time(), state.num_input_tokens_seen)
        device.reuse_heap_in_loop()
        if state.is_world_process_zero:
            self.live = open_curves(self.live_dir, state.log_history, state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        entry = state.log_history[-1]
        if "loss" in entry:
            now, tokens = time.time(), state.num_input_tokens_seen
            entry["num_input_tokens_seen"] = tokens
            # a timing: logged and plotted, never put in log_history, which every checkpoint saves (a model folder
            # holds no timing, so two runs write the same bytes); a resumed run's tokens/s curve starts where it resumed
            entry = {**entry, "tokens_per_second": round((tokens - self.last[1]) / max(now - self.last[0], 1e-9), 1)}
            self.last = (now, tokens)
        if not state.is_world_process_zero:
            return
        # a line per logging step at most every LOG_SECONDS (every one with FINETUNE_VERBOSE); the curves get all
        if "loss" in entry and (VERBOSE or state.global_step >= state.max_steps or time.time() - self.printed >= LOG_SECONDS):
            self.printed = time.time()
            log.info("step %d/%d  loss %.4f  lr %.3g  grad_norm %.3g  %.0f tokens/s  rss %d MiB", state.global_step,
                     state.max_steps, entry["loss"], entry.get("learning_rate", 0), entry.get("grad_norm", 0),
                     entry["tokens_per_second"], peak_rss_mb())
        if "eval_loss" in entry:
            log.info("step %d  eval_loss %.4f", state.global_step, entry["eval_loss"])
        if self.live is not None and log_curves(self.live, entry):  # None: trainer.evaluate without training
            self.live.make_summary()

    def on_save(self, args, state, control, **kwargs):
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if args.world_size > 1:
            torch.distributed.barrier()  # every process has written its RNG state
        if state.is_world_process_zero:
            name_base_in(path)  # peft's adapter_config.json and card name the base's folder on this machine
            lora_targets.sort_in(path)  # and lists target_modules in a per-process order: sorted
            write_json(path / "finetune.json", {"step": state.global_step, "fingerprint": self.fingerprint})
            for old in complete_checkpoints(args.output_dir)[:-self.keep_checkpoints]:
                shutil.rmtree(old)


class QuietProgress(ProgressCallback):
    """The bar stays; the raw dict per log goes (Observer logs a line)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def complete_checkpoints(folder: Path) -> list[Path]:
    found = [path for path in Path(folder).glob("checkpoint-*") if (path / "finetune.json").exists()]
    return sorted(found, key=lambda path: int(path.name.split("-")[1]))


def resumable_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint a run can go on from. Not one saved at the run's last step: the Trainer
    (transformers 5.24) resumed there takes one more optimizer step before it stops (29 of max_steps 28), so
    that run goes on from the checkpoint before it, or starts fresh."""
    for path in reversed(complete_checkpoints(folder)):
        state = path / "trainer_state.json"
        if state.exists():
            saved = json.loads(state.read_text())
            if saved.get("max_steps") and saved["global_step"] >= saved["max_steps"]:
                continue
        return path
    return None


def open_curves(folder: Path, history: list[dict], step: int):
    """A fresh DVCLive folder holding the curves of `history`, the Trainer's log history (restored with a
    checkpoint on resume): a resumed run ends with the same curves as an uninterrupted one, no duplicates.
    DVCLive writes `plots/metrics/live/<key>.tsv` (step, value) and `metrics.json` (the latest numbers,
    under `live`, and the step: what `dvc exp show` shows while the run goes). dvc.yaml declares both, so DVCLive writes no
    dvc.yaml of its own, saves no experiment and makes no report. `Live.end` is not needed: beyond what
    `make_summary` writes it would only `git add` untracked files of the folder inside `dvc exp run`."""
    from dvclive import Live

    live = Live(str(folder), resume=False, report=None, save_dvc_exp=False, dvcyaml=None)  # resume=False empties it
    for entry in history:
        log_curves(live, entry)
    live.step = step
    live.make_summary()
    return live


def log_curves(live, entry: dict) -> bool:
    """One Trainer log entry at the Trainer's step: a row on each curve it has (metrics.json is the caller's
    `make_summary`). Not `Live.next_step`: it counts steps of its own, one per call. True if it logged any."""
    curves = {key: entry[key] for key in PLOT_KEYS if entry.get(key) is not None}
    if curves:
        live.step = entry["step"]
        for key, value in curves.items():
            live.log_metric(f"{LIVE_GROUP}/{key}", value)
    return bool(curves)


# --------------------------------------------------------------------------- assembly
def make_trainer(model, tokenizer, data: TrainData, cfg, seed: int, run: RunFiles, callbacks=()) -> FinetuneTrainer:
    """The Trainer for `cfg` (the `train` params) on explicit rows; checkpoints go to `run.checkpoint_dir`."""
    import inspect

    on_cpu = next(model.parameters()).device.type == "cpu"  # `device: cpu` keeps a GPU box's run on the CPU
    base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    step = StepSettings(seed=seed, group_by_length=cfg.group_by_length or cfg.packing,
                        virtual_tokens=cfg.prompt_tuning.num_virtual_tokens if cfg.method == "prompt_tuning" else 0,
                        keep_logits="logits_to_keep" in inspect.signature(base_model.forward).parameters)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # any id: pads are never attended
    saving = cfg.checkpoint_steps > 0
    args = TrainingArguments(
        # relative to the stage's working directory (the repo root): training_args.bin in each checkpoint holds it
        output_dir=os.path.relpath(run.checkpoint_dir), seed=seed, learning_rate=cfg.learning_rate, num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers 5 reads a value below 1 as a ratio (warmup_ratio is gone)
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, optim=cfg.optimizer, bf16=cfg.bf16,
        fp16=cfg.fp16, activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        logging_steps=cfg.logging_steps, logging_nan_inf_filter=False,
        save_strategy="steps" if saving else "no", save_steps=cfg.checkpoint_steps if saving else 500,
        eval_strategy="steps" if cfg.eval_steps and data.eval else "no", eval_steps=cfg.eval_steps or None,
        report_to=[], use_cpu=on_cpu, dataloader_num_workers=0, disable_tqdm=False, remove_unused_columns=False,
        label_names=["labels"], prediction_loss_only=True, ddp_find_unused_parameters=False, save_only_model=False,
    )
    trainer = FinetuneTrainer(model=model, args=args, processing_class=tokenizer,
                              train_dataset=pack(data.train, cfg.packing_length) if cfg.packing else data.train,
                              eval_dataset=sorted(data.eval, key=lambda row: len(row["input_ids"])) or None,
                              data_collator=lambda examples: collate(examples, pad_id),
                              callbacks=[Observer(run.live_dir, run.fingerprint, cfg.keep_checkpoints), *callbacks],
                              step=step)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgress())
    return trainer

"""train: fine-tune the base on the formatted data: full, LoRA, QLoRA or prompt tuning.

The engine is the Hugging Face `Trainer` (and `accelerate launch` for more than one
process); what this file adds is the data path and the run's safety:

- batches of similar length (or packed rows whose examples attend only to themselves), right
  padding without an attention mask (causal attention never looks right, so real tokens cannot
  see the padding), and logits computed only where a label is trained;
- checkpoints every `train.checkpoint_steps` into `models/checkpoints/` (persisted by DVC),
  each marked complete only after the Trainer finished writing it and stamped with a
  fingerprint of everything that shapes the run, so a rerun resumes exactly, and a changed
  param starts fresh;
- a non-finite loss or gradient norm stops the run at once, naming the step;
- per-step curves in `metrics/train_plots/` (DVC plots), final numbers in `metrics/train.json`.

`models/adapter/` holds what was trained for every method (peft adapter, or the whole model
for `full`), plus `train_method.json`, `format.json` and `reference_logits.safetensors`.
"""
from __future__ import annotations

import bisect
import hashlib
import inspect
import json
import logging
import math
import os
import random
import resource
import shutil
import sys
import time
from pathlib import Path

from common import (ROOT, atomic_dir, offline_by_default, read_jsonl, require_complete, save_reference_logits,
                    seed_everything, setup, write_json, write_text)

log = logging.getLogger("finetune.train")

BASE = ROOT / "models" / "base"
DATA = ROOT / "data" / "formatted"
OUT = ROOT / "models" / "adapter"
CHECKPOINTS = ROOT / "models" / "checkpoints"
METRICS = ROOT / "metrics" / "train.json"
PLOTS = ROOT / "metrics" / "train_plots"
IGNORE = -100
TARGETS = {"attention": ["q_proj", "v_proj"], "attention_all": ["q_proj", "k_proj", "v_proj", "o_proj"],
           "all-linear": "all-linear"}
# train params that change what is logged or kept, never the weights: a checkpoint stays valid across them
NOT_IN_FINGERPRINT = {"logging_steps", "eval_steps", "checkpoint_steps", "keep_checkpoints", "threads"}
SECTION_OF = {"lora": {"lora"}, "qlora": {"lora", "qlora"}, "prompt_tuning": {"prompt_tuning"}, "full": set()}
# dense bf16 tensor-core peak per GPU, FLOP/s (vendor datasheets); MFU is null on anything else
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12,
              "RTX 4090": 165e12, "V100": 125e12, "T4": 65e12}
PLOT_KEYS = ["loss", "learning_rate", "grad_norm", "tokens_per_second", "eval_loss"]


class NonFiniteError(RuntimeError):
    pass


# --------------------------------------------------------------------------- data: batches and packing
def pack(rows: list[dict], capacity: int) -> list[dict]:
    """Best-fit-decreasing packing of examples into rows of at most `capacity` tokens. Every example
    keeps position ids 0..n-1, from which the model builds a block-diagonal causal mask: an example
    attends only to itself. Its first label is masked so no loss crosses a boundary."""
    longest = max(len(row["input_ids"]) for row in rows)
    if longest > capacity:
        raise SystemExit(f"train.packing_length ({capacity}) is shorter than the longest example ({longest} tokens); "
                         f"raise it to at least {longest}")
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]["input_ids"]), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, bin), sorted: the tightest bin that fits is found by bisect
    for index in order:
        size = len(rows[index]["input_ids"])
        slot = bisect.bisect_left(free, (size, -1))
        if slot == len(free):
            bins.append([index])
            bisect.insort(free, (capacity - size, len(bins) - 1))
        else:
            space, target = free.pop(slot)
            bins[target].append(index)
            bisect.insort(free, (space - size, target))
    packed = []
    for members in bins:
        row = {"input_ids": [], "labels": [], "position_ids": []}
        for index in members:
            example = rows[index]
            row["input_ids"] += example["input_ids"]
            row["labels"] += [IGNORE] + example["labels"][1:]
            row["position_ids"] += list(range(len(example["input_ids"])))
        packed.append(row)
    return packed


class LengthGroupedSampler:
    """Index order whose consecutive `batch_size` chunks hold examples of similar length, in an order
    shuffled from (seed, epoch) alone, so a resumed run replays exactly the batches it missed."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group: bool, megabatches: int = 32):
        self.lengths, self.batch_size, self.seed, self.group = lengths, batch_size, seed, group
        self.megabatch = batch_size * megabatches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        rng = random.Random(self.seed * 100_003 + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        if not self.group:
            return iter(order)
        batches = []
        for start in range(0, len(order), self.megabatch):
            chunk = sorted(order[start:start + self.megabatch], key=lambda i: self.lengths[i])
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        last = batches.pop() if len(batches[-1]) < self.batch_size else None  # a short batch stays last
        rng.shuffle(batches)
        return iter([index for batch in batches + ([last] if last else []) for index in batch])


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right padding and no attention mask: under causal attention no real token sees a later pad."""
    import torch

    width = max(len(example["input_ids"]) for example in examples)
    batch = {"input_ids": torch.tensor([e["input_ids"] + [pad_id] * (width - len(e["input_ids"])) for e in examples]),
             "labels": torch.tensor([e["labels"] + [IGNORE] * (width - len(e["labels"])) for e in examples])}
    if "position_ids" in examples[0]:  # the padding tail is a segment of its own
        batch["position_ids"] = torch.tensor([e["position_ids"] + list(range(width - len(e["position_ids"])))
                                              for e in examples])
    batch["num_real_tokens"] = torch.tensor(sum(len(e["input_ids"]) for e in examples))
    return batch


# --------------------------------------------------------------------------- model
def check_platform(cfg, base_dir: Path) -> None:
    """Refuse what this machine cannot do before any model is loaded, with the fix in the message."""
    import torch

    cuda, problems = torch.cuda.is_available(), []
    if cfg.fp16 and not cuda:
        problems.append("train.fp16: float16 mixed precision needs a CUDA GPU and none is available; "
                        "use train.bf16: true (CPU autocast) or set fp16: false")
    if cfg.bf16 and cuda and not torch.cuda.is_bf16_supported():
        problems.append("train.bf16: this GPU has no bfloat16 support; use train.fp16: true")
    if cfg.method == "qlora" and cfg.qlora.compute_dtype == "float16" and not cuda:
        problems.append("train.qlora.compute_dtype: float16 needs a CUDA GPU; use float32 or bfloat16 on CPU")
    if cfg.method == "qlora" or cfg.optimizer != "adamw_torch":
        try:
            import bitsandbytes  # noqa: F401
        except Exception as exc:  # a broken install raises more than ImportError
            problems.append(f"train.method={cfg.method} / train.optimizer={cfg.optimizer} need bitsandbytes "
                            f"(pip install bitsandbytes==0.50.2), which does not import here: {exc}")
    if cfg.method == "qlora" and not cuda:
        config = json.loads((Path(base_dir) / "config.json").read_text())
        sizes = {name: config.get(name) for name in ("hidden_size", "intermediate_size")}
        odd = {name: size for name, size in sizes.items() if isinstance(size, int) and size % 64}
        if odd:
            problems.append(f"train.method=qlora: bitsandbytes' CPU 4-bit kernels need layer sizes that are multiples "
                            f"of 64, the base has {odd}; use a CUDA GPU or method: lora")
    if cfg.num_processes > 1 and cuda and torch.cuda.device_count() < cfg.num_processes:
        problems.append(f"train.num_processes={cfg.num_processes} but only {torch.cuda.device_count()} GPU(s) are visible")
    if problems:
        raise SystemExit("train: cannot run these params on this machine:\n  - " + "\n  - ".join(problems))


def build_model(base_dir: Path, cfg, local_rank: int):
    import torch
    from peft import LoraConfig, PromptTuningConfig, PromptTuningInit, get_peft_model
    from transformers import AutoModelForCausalLM

    # peft checks every layer for GPTQ types by importing gptqmodel when it is installed (~2 s, and the
    # import rewrites HF_HOME); a base we train is never GPTQ-quantized
    sys.modules.setdefault("gptqmodel", None)
    if cfg.method != "qlora":
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    else:
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.qlora.quant_type,
                                          bnb_4bit_use_double_quant=cfg.qlora.double_quant,
                                          bnb_4bit_compute_dtype=getattr(torch, cfg.qlora.compute_dtype))
        device_map = {"": local_rank} if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, quantization_config=quantization,
                                                     device_map=device_map)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.method in ("lora", "qlora"):
        lora = cfg.lora
        targets = lora.target_modules if isinstance(lora.target_modules, list) else TARGETS[lora.target_modules]
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=targets, bias=lora.bias, use_rslora=lora.use_rslora,
                                                 use_dora=lora.use_dora, task_type="CAUSAL_LM"))
    elif cfg.method == "prompt_tuning":
        tuning = cfg.prompt_tuning
        text = {"prompt_tuning_init": PromptTuningInit.TEXT, "prompt_tuning_init_text": tuning.init_text,
                "tokenizer_name_or_path": str(base_dir)} if tuning.init_text else {}
        model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM",
                                                         num_virtual_tokens=tuning.num_virtual_tokens, **text))
    return model


def probe(model, method: str) -> None:
    """One real forward and backward before training: where a backend cannot run it (4-bit kernels),
    fail now with the fix, not with a stack trace in the middle of the run."""
    import torch

    try:
        ids = torch.ones((1, 8), dtype=torch.long, device=model.device)
        model(input_ids=ids).logits.float().sum().backward()
        model.zero_grad(set_to_none=True)
    except Exception as exc:
        raise SystemExit(f"train.method={method}: one forward/backward step fails on this machine ({type(exc).__name__}: "
                         f"{exc}); for qlora this needs a bitsandbytes 4-bit backend for the device (CUDA, or its CPU "
                         "backend with layer sizes that are multiples of 64); otherwise use method: lora") from None


def parameter_counts(model) -> dict:
    import torch

    if hasattr(model, "get_nb_trainable_parameters"):  # peft: counts 4-bit weights at their real size
        trainable, total = model.get_nb_trainable_parameters()
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    matmul = sum(m.in_features * m.out_features for m in linear)
    trainable_matmul = sum(m.in_features * m.out_features for m in linear if m.weight.requires_grad)
    return {"trainable_params": trainable, "total_params": total,
            "trainable_percent": round(100 * trainable / total, 4),
            # forward 2N, backward 2N for activations + 2N for trainable weights; attention scores not counted
            "flops_per_token": 4 * matmul + 2 * trainable_matmul}


# --------------------------------------------------------------------------- checkpoints
def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def run_fingerprint(base_dir: Path, data_dir: Path, cfg, seed: int) -> dict:
    """Everything that shapes the trained weights; a checkpoint made under another one is not resumed."""
    import peft
    import torch
    import transformers

    settings = {key: value for key, value in cfg.model_dump().items()
                if key not in NOT_IN_FINGERPRINT and key not in {"lora", "qlora", "prompt_tuning"} - SECTION_OF[cfg.method]}
    base = {path.name: file_digest(path) for path in sorted(Path(base_dir).iterdir())
            if path.is_file() and path.suffix in {".json", ".safetensors", ".bin", ".model", ".jinja"}}
    return {"train": settings, "seed": seed, "base": base,
            "data": {name: file_digest(Path(data_dir) / name) for name in ("train.jsonl", "eval.jsonl")},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}}


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def complete_checkpoints(folder: Path) -> list[Path]:
    found = [path for path in Path(folder).glob("checkpoint-*") if (path / "finetune.json").exists()]
    return sorted(found, key=lambda path: int(path.name.split("-")[1]))


def prepare_checkpoints(folder: Path, fingerprint: dict) -> Path | None:
    """Drop incomplete checkpoints and ones made under another fingerprint; return the newest to resume."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for path in folder.iterdir():
        if path.is_dir() and not (path / "finetune.json").exists():
            log.info("removing incomplete checkpoint %s", path.name)
            shutil.rmtree(path)
    write_json(folder / "run.json", fingerprint)  # what the checkpoints here belong to (and never an empty out)
    kept = complete_checkpoints(folder)
    if kept:
        stamp = flatten(json.loads((kept[-1] / "finetune.json").read_text())["fingerprint"])
        current = flatten(fingerprint)
        if stamp != current:
            changed = sorted(key for key in stamp.keys() | current.keys() if stamp.get(key) != current.get(key))
            log.info("checkpoints in %s were made with other settings (%s): starting fresh", folder, ", ".join(changed))
            for path in kept:
                shutil.rmtree(path)
            return None
        log.info("resuming from %s", kept[-1])
        return kept[-1]
    return None


# --------------------------------------------------------------------------- the trainer
def make_trainer(model, tokenizer, train_rows, eval_rows, cfg, seed, checkpoint_dir, fingerprint, plots_dir,
                 callbacks=()):
    import torch
    import torch.nn.functional as F
    from transformers import ProgressCallback, Trainer, TrainerCallback, TrainingArguments

    cuda = torch.cuda.is_available()
    virtual_tokens = cfg.prompt_tuning.num_virtual_tokens if cfg.method == "prompt_tuning" else 0
    base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    keep_logits = "logits_to_keep" in inspect.signature(base_model.forward).parameters
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # any id: pads are never attended

    class FinetuneTrainer(Trainer):
        loss_is_scaled_for_ga = True  # compute_loss divides by the tokens of the whole accumulated step

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.model_accepts_loss_kwargs = True  # makes the Trainer count num_items_in_batch
            self.session_tokens = [0, 0]  # real, processed (with padding) in this process run

        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            return LengthGroupedSampler([len(row["input_ids"]) for row in dataset], self.args.per_device_train_batch_size,
                                        seed, cfg.group_by_length or cfg.packing)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # use_cache=False: with a cache the model ignores the packed segments in position_ids
            labels, real = inputs.pop("labels"), inputs.pop("num_real_tokens")
            targets = labels[:, 1:]
            if keep_logits:  # logits (and their backward) only at positions whose next token is trained
                keep = (targets != IGNORE).any(0).nonzero().squeeze(-1)
                outputs = model(**inputs, use_cache=False, logits_to_keep=keep + virtual_tokens)
                logits, targets = outputs.logits, targets[:, keep]
            else:
                outputs = model(**inputs, use_cache=False)
                logits = outputs.logits[:, virtual_tokens:-1]
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=IGNORE, reduction="sum")
            if num_items_in_batch is None:
                loss = loss / (targets != IGNORE).sum().clamp(min=1)
            else:
                loss = loss / num_items_in_batch
                if self.args.average_tokens_across_devices and self.args.world_size > 1:
                    loss = loss * self.args.world_size  # DDP averages gradients over processes
            if model.training:
                counts = torch.stack([real.to(labels.device), torch.tensor(labels.numel(), device=labels.device)])
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

    class Observer(TrainerCallback):
        """Curves, one log line per logging step, a final log at the last step, completeness markers."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = (time.time(), state.num_input_tokens_seen)
            if state.is_world_process_zero:
                write_plots(state.log_history, plots_dir)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            entry = state.log_history[-1]
            if "loss" in entry:
                now, tokens = time.time(), state.num_input_tokens_seen
                entry["tokens_per_second"] = round((tokens - self.last[1]) / max(now - self.last[0], 1e-9), 1)
                entry["num_input_tokens_seen"] = tokens
                self.last = (now, tokens)
            if not state.is_world_process_zero:
                return
            if "loss" in entry:
                log.info("step %d/%d  loss %.4f  lr %.3g  grad_norm %.3g  %.0f tokens/s  rss %d MiB", state.global_step,
                         state.max_steps, entry["loss"], entry.get("learning_rate", 0), entry.get("grad_norm", 0),
                         entry["tokens_per_second"], peak_rss_mb())
            if "eval_loss" in entry:
                log.info("step %d  eval_loss %.4f", state.global_step, entry["eval_loss"])
            if "loss" in entry or "eval_loss" in entry:
                append_plots(entry, plots_dir)

        def on_save(self, args, state, control, **kwargs):
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if args.world_size > 1:
                torch.distributed.barrier()  # every process has written its RNG state
            if state.is_world_process_zero:
                write_json(path / "finetune.json", {"step": state.global_step, "fingerprint": fingerprint})
                for old in complete_checkpoints(args.output_dir)[:-cfg.keep_checkpoints]:
                    shutil.rmtree(old)

    class QuietProgress(ProgressCallback):  # the bar stays; the raw dict per log goes (Observer logs a line)
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

    saving = cfg.checkpoint_steps > 0
    args = TrainingArguments(
        output_dir=str(checkpoint_dir), seed=seed, learning_rate=cfg.learning_rate, num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers 5 reads a value below 1 as a ratio (warmup_ratio is gone)
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, optim=cfg.optimizer, bf16=cfg.bf16,
        fp16=cfg.fp16, activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        logging_steps=cfg.logging_steps, logging_nan_inf_filter=False,
        save_strategy="steps" if saving else "no", save_steps=cfg.checkpoint_steps if saving else 500,
        eval_strategy="steps" if cfg.eval_steps and eval_rows else "no", eval_steps=cfg.eval_steps or None,
        report_to=[], use_cpu=not cuda, dataloader_num_workers=0, disable_tqdm=False, remove_unused_columns=False,
        label_names=["labels"], prediction_loss_only=True, ddp_find_unused_parameters=False, save_only_model=False,
    )
    trainer = FinetuneTrainer(model=model, args=args, processing_class=tokenizer,
                              train_dataset=pack(train_rows, cfg.packing_length) if cfg.packing else train_rows,
                              eval_dataset=sorted(eval_rows, key=lambda row: len(row["input_ids"])) or None,
                              data_collator=lambda examples: collate(examples, pad_id),
                              callbacks=[Observer(), *callbacks])
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgress())
    return trainer


def append_plots(entry: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for key in PLOT_KEYS:
        if entry.get(key) is not None:
            path = folder / f"{key}.csv"
            header = "" if path.exists() and path.stat().st_size else f"step,{key}\n"
            with open(path, "a", encoding="utf-8") as handle:  # live, for a look during the run
                handle.write(f"{header}{entry['step']},{entry[key]}\n")


def write_plots(history: list[dict], folder: Path) -> None:
    """The curves rebuilt from the Trainer's log history (restored with a checkpoint), so a resumed
    run ends with the same curves as an uninterrupted one."""
    folder.mkdir(parents=True, exist_ok=True)
    for key in PLOT_KEYS:
        rows = [f"{entry['step']},{entry[key]}\n" for entry in history if entry.get(key) is not None]
        write_text(folder / f"{key}.csv", f"step,{key}\n" + "".join(rows))


def peak_rss_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # Linux reports KiB


def fit(base_dir, train_rows: list[dict], eval_rows: list[dict], cfg, seed: int, checkpoint_dir, fingerprint: dict,
        plots_dir, resume_from=None, callbacks=()) -> tuple:
    """Pure core: train on explicit rows; returns (trainer, tokenizer, metrics). Nothing is written
    except checkpoints into `checkpoint_dir` and the curves."""
    import torch
    from transformers import AutoTokenizer

    started = time.time()
    seed_everything(seed, torch.get_num_threads())
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    model = build_model(Path(base_dir), cfg, local_rank)
    counts = parameter_counts(model)
    log.info("method %s: trainable params %d of %d (%.4f%%)", cfg.method, counts["trainable_params"],
             counts["total_params"], counts["trainable_percent"])
    probe(model, cfg.method)
    seed_everything(seed, torch.get_num_threads())
    trainer = make_trainer(model, tokenizer, train_rows, eval_rows, cfg, seed, checkpoint_dir, fingerprint,
                           Path(plots_dir), callbacks)
    train_started = time.time()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_seconds = time.time() - train_started
    eval_loss = trainer.evaluate()["eval_loss"] if eval_rows else None
    history = trainer.state.log_history
    losses = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]
    # step-weighted mean of the logged losses: the same for a resumed and an uninterrupted run
    spans = [step - previous for (step, _), previous in zip(losses, [0] + [step for step, _ in losses[:-1]])]
    real, processed = trainer.session_tokens
    tokens_per_second = real / train_seconds if real else None
    # MFU: flops_per_token (see parameter_counts) x tokens/s over the GPU's dense bf16 peak
    peak = next((value for name, value in PEAK_FLOPS.items() if torch.cuda.is_available()
                 and name in torch.cuda.get_device_name()), None)
    metrics = {
        "method": cfg.method, "seed": seed, **counts,
        "train_loss": round(sum(loss * span for (_, loss), span in zip(losses, spans)) / max(sum(spans), 1), 5),
        "final_loss": round(losses[-1][1], 5) if losses else None,
        "eval_loss": round(eval_loss, 5) if eval_loss is not None else None,
        "steps": trainer.state.global_step, "epochs": round(trainer.state.epoch or 0, 4),
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "resumed_from_step": int(Path(resume_from).name.split("-")[1]) if resume_from else 0,
        "padding_fraction": round(1 - real / processed, 4) if processed else None,
        "tokens_per_second": round(tokens_per_second, 1) if tokens_per_second else None,
        "train_seconds": round(train_seconds, 2), "wall_seconds": round(time.time() - started, 2),
        "peak_memory_mb": peak_rss_mb(),
        "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None,
        "mfu": round(counts["flops_per_token"] * tokens_per_second / (peak * trainer.args.world_size), 4)
        if peak and tokens_per_second else None,
        "num_processes": trainer.args.world_size, "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    return trainer, tokenizer, metrics


# --------------------------------------------------------------------------- outputs
def save_trained(trainer, tokenizer, cfg, eval_rows: list[dict], out_dir: Path) -> None:
    """What later stages need, for every method: the trained weights (adapter, or the whole model
    for `full`), the tokenizer, `train_method.json` and the reference logits merge checks against."""
    import torch

    model = trainer.model.eval()

    class OnModelDevice:  # the common helper feeds CPU tensors; the model may sit on a GPU
        def __call__(self, input_ids):
            return type("Output", (), {"logits": model(input_ids=input_ids.to(model.device)).logits.float().cpu()})

    # the logits are what the model returns: for prompt tuning, the virtual positions come first (as merge sees them)
    with torch.no_grad():
        save_reference_logits(OnModelDevice(), [row["input_ids"][:64] for row in eval_rows[:4]], out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    method = {"method": cfg.method, "base": "models/base"}
    if cfg.method == "qlora":  # what merge needs to de-quantize the base exactly as training saw it
        quantization = model.get_base_model().config.quantization_config
        method["quantization_config"] = quantization if isinstance(quantization, dict) else quantization.to_dict()
    if cfg.method == "prompt_tuning":
        method["num_virtual_tokens"] = cfg.prompt_tuning.num_virtual_tokens
    write_json(out_dir / "train_method.json", method)


def launch_processes(cfg, threads: int) -> int:
    """`train.num_processes > 1`: the same stage under `accelerate launch` (torchrun underneath: DDP,
    NCCL on GPUs, gloo on CPU); every process runs main() and process 0 writes the outputs."""
    import socket
    import subprocess

    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    precision = "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "no"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
               "--num_processes", str(cfg.num_processes), "--mixed_precision", precision, "--dynamo_backend", "no",
               "--main_process_port", str(port), str(Path(__file__).resolve()), *sys.argv[1:]]
    log.info("launching %d processes: %s", cfg.num_processes, " ".join(command))
    return subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(threads)}).returncode


def main() -> None:
    params = setup("train")
    offline_by_default()
    cfg = params.train
    threads = cfg.threads or params.threads
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    base_dir = require_complete(BASE)
    check_platform(cfg, base_dir)
    fingerprint = run_fingerprint(base_dir, DATA, cfg, params.seed)
    is_child = "LOCAL_RANK" in os.environ
    if not is_child:  # only the first process cleans the checkpoint folder
        prepare_checkpoints(CHECKPOINTS, fingerprint)
        if cfg.num_processes > 1:
            raise SystemExit(launch_processes(cfg, threads))
    resume = (complete_checkpoints(CHECKPOINTS) or [None])[-1]
    train_rows, eval_rows = read_jsonl(DATA / "train.jsonl"), read_jsonl(DATA / "eval.jsonl")
    try:
        trainer, tokenizer, metrics = fit(base_dir, train_rows, eval_rows, cfg, params.seed, CHECKPOINTS, fingerprint,
                                          PLOTS, resume)
    except NonFiniteError as exc:
        kept = complete_checkpoints(CHECKPOINTS)
        raise SystemExit(f"{exc}; the last good checkpoint is {kept[-1] if kept else 'none'}. Lower train.learning_rate "
                         "or raise train.warmup_ratio (a changed param starts a fresh run)") from None
    if not trainer.is_world_process_zero():
        return
    with atomic_dir(OUT) as tmp:
        save_trained(trainer, tokenizer, cfg, eval_rows or train_rows, tmp)
        write_json(tmp / "format.json", {"fingerprint": json.loads((DATA / "format.json").read_text())["fingerprint"]})
    write_plots(trainer.state.log_history, PLOTS)
    write_json(METRICS, metrics)
    log.info("train done: %s", json.dumps(metrics))


if __name__ == "__main__":
    main()

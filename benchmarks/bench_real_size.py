"""Peak memory of every model stage at a realistic size, on the CPU: a model of Qwen2.5-0.5B's shape.

Builds a random-weight model of Qwen2.5-0.5B's shape (scripts/family_models.py `0.5b`: 494M parameters,
24 layers, 151,936-token vocabulary, tied embeddings) with the real Qwen2 tokenizer, copies this working
tree into a scratch folder, points `model.base` at the model and shrinks the run (a few LoRA steps, a
few test rows, short sequences, `quantize.formats: [gguf_q8_0]`), then runs the real stage scripts one by
one, each as its own process: base, ingest, dedup_filter, format, train, evaluate_base, evaluate, merge,
quantize (GGUF export, llama.cpp quantization, scoring). For each it prints the peak RSS of the process
(wait4(); children such as the GGUF converter included) as a multiple of the model's bfloat16 size, next
to what the stage records itself, and the goals: LoRA training <= 3x, evaluate <= 2x, merge <= 2.5x.

The run uses `dtype: bfloat16` (and `merge.dtype: bfloat16`) on the CPU: what `dtype: auto` picks on a
GPU with bfloat16, and what meets the goals here (float32 alone is 2x the bfloat16 size).

    python benchmarks/bench_real_size.py [--steps 3] [--test-rows 8] [--seq-len 128] [--dtype bfloat16] [--until train] [--keep]

Needs `make install` (llama.cpp's converter and the Qwen2 vocabulary file). ~10-20 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from repo_tools import tracked_copy  # noqa: E402
STAGES = [("base", ["-m", "stages.base"]), ("ingest", ["-m", "stages.ingest"]), ("dedup_filter", ["-m", "stages.dedup_filter"]),
          ("format", ["-m", "stages.format"]), ("train", ["-m", "stages.train"]),
          ("evaluate_base", ["-m", "stages.evaluate", "base"]), ("evaluate", ["-m", "stages.evaluate"]),
          ("merge", ["-m", "stages.merge"]), ("quantize", ["-m", "stages.quantize"])]
GOALS = {"train": 3.0, "evaluate_base": 2.0, "evaluate": 2.0, "merge": 2.5}
# where each stage records its own peak memory (MiB), and the train stage's estimate
OWN_RECORD = {"train": "train.json", "evaluate_base": "evaluate_base.json", "evaluate": "evaluate.json",
              "merge": "merge.json", "quantize": "quantize.json"}  # under metrics/memory/ and metrics/timings/


def small_run(params: dict, model: Path, args) -> dict:
    """params.yaml for a short run on `model`: every value not named here stays the shipped one."""
    params = json.loads(json.dumps(params))
    params.update(device="auto", dtype=args.dtype)
    params["model"]["base"] = str(model)
    params["ingest"].update(max_eval_rows=args.test_rows, max_test_rows=args.test_rows)
    params["format"]["max_seq_len"] = args.seq_len
    params["train"].update(method="lora", max_steps=args.steps, batch_size=args.batch_size, logging_steps=1,
                           checkpoint_steps=0, eval_steps=0)
    params["evaluate"].update(max_new_tokens=4, batch_size=args.batch_size, num_examples=2)
    params["evaluate"]["general"].update(limit=args.test_rows)
    params["merge"]["dtype"] = args.dtype
    params["quantize"].update(formats=["gguf_q8_0"], speed_new_tokens=4)
    # random weights: the quality checks carry no signal here (README "Quantization on CPU")
    params["quantize"]["checks"]["gguf_q8_0"] = {"max_perplexity_drop_percent": 1e6, "min_top1_agreement": 0.0}
    return params


def run_stage(repo: Path, name: str, command: list[str], threads: int, logs: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": ""}
    log = logs / f"{name}.log"
    started = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, *command], cwd=repo, env=env, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    if status:
        raise SystemExit(f"{name} failed (status {status}); its log {log} ends:\n{log.read_text()[-4000:]}")
    return {"seconds": time.perf_counter() - started, "peak_rss_mb": usage.ru_maxrss / 1024}


def own_record(repo: Path, name: str) -> str:
    record = {}
    for kind in ("memory", "timings"):
        path = repo / "metrics" / kind / OWN_RECORD.get(name, "-")
        record.update(json.loads(path.read_text()) if path.is_file() else {})
    keys = ["peak_memory_mb", "plan_peak_memory_mb", "tokens_per_second"]
    return ", ".join(f"{key} {record[key]:,.0f}" for key in keys if isinstance(record.get(key), (int, float)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="LoRA steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--test-rows", type=int, default=8, help="test and eval rows (and lm-eval docs)")
    parser.add_argument("--seq-len", type=int, default=128, help="format.max_seq_len")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="dtype and merge.dtype")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", default="0.5b", help="a scripts/family_models.py size (tiny: a quick dry run)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder and print its path")
    parser.add_argument("--until", default="quantize", choices=[name for name, _ in STAGES],
                        help="stop after this stage (train: the training numbers alone, ~half the time)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-real-size-"))
    load_before = os.getloadavg()
    try:
        # built in its own process: on Linux a child starts its peak RSS at its parent's (the high-water mark
        # survives fork and exec), so this process stays small and never imports torch
        model = scratch / "qwen2-model"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "family_models.py"), "qwen2", str(model), "--size", args.size],
                       check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        parameters = json.loads((model / "family.json").read_text())["parameters"]
        bf16_mb = parameters * 2 / 2**20
        repo = tracked_copy(scratch / "repo")
        params = small_run(yaml.safe_load((repo / "params.yaml").read_text()), model, args)
        params["threads"] = args.threads
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        logs = scratch / "logs"
        logs.mkdir()
        print(f"Qwen2-family model of Qwen2.5-0.5B's shape ({args.size}): {parameters / 1e6:.1f}M parameters, random "
              f"weights, real Qwen2 tokenizer; bf16 size {bf16_mb:,.0f} MiB")
        print(f"run: dtype={args.dtype} and merge.dtype={args.dtype} on the CPU ("
              + ("what dtype: auto picks on a bf16 GPU, and what meets the goals here" if args.dtype == "bfloat16"
                 else "the CPU default") + f"); LoRA {args.steps} steps x {args.batch_size} rows, max_seq_len "
              f"{args.seq_len}, {args.test_rows} test rows, quantize.formats [gguf_q8_0]")
        heap = {key: os.environ[key] for key in ("MALLOC_MMAP_THRESHOLD_", "FINETUNE_HEAP_LIMIT") if key in os.environ}
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch "
              f"thread(s); load average at start {' '.join(f'{x:.2f}' for x in load_before)}"
              + (f"; {', '.join(f'{key}={value}' for key, value in heap.items())}" if heap else ""))
        print(f"{'stage':<14}{'seconds':>8}{'peak RSS MiB':>14}{'x bf16':>8}{'goal':>8}  stage's own record (MiB)")
        verdicts = []
        for name, command in STAGES:
            result = run_stage(repo, name, command, args.threads, logs)
            ratio = result["peak_rss_mb"] / bf16_mb
            goal = GOALS.get(name)
            print(f"{name:<14}{result['seconds']:>8.0f}{result['peak_rss_mb']:>14,.0f}{ratio:>7.2f}x"
                  f"{(f'<={goal}x' if goal else ''):>8}  {own_record(repo, name)}", flush=True)
            if goal:
                verdicts.append(f"{name} {'meets' if ratio <= goal else 'MISSES'} {goal}x ({ratio:.2f}x)")
            if name == args.until:
                break
        print("goals: " + "; ".join(verdicts))
        print(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        if args.keep:
            print(f"scratch kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

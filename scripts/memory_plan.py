"""The memory plan of a training run, without training (finetune/training/memory_plan.py does the arithmetic).

    python scripts/memory_plan.py [--base DIR | --shape NAME] [--device cuda --dtype bfloat16] [train.method=qlora ...]
    python scripts/memory_plan.py --readme    # the README table: 0.5B / 8B / 70B shapes on a GPU in bf16
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: run as a script, not installed

from finetune.training.memory_plan import (PUBLIC_SHAPES, Settings, capacity_mib, describe, describe_base,  # noqa: E402
                                           framework_mib, log_plan, plan, planned_workload, readme_table,
                                           synthetic_workload)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The memory plan of a training run, without training.")
    parser.add_argument("--base", type=Path, help="a model folder (default: models/base)")
    parser.add_argument("--shape", choices=sorted(PUBLIC_SHAPES), help="a public model's shape instead of a folder")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="plan for this device (default: params.yaml)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="default: params.yaml")
    parser.add_argument("--data", type=Path, help="formatted data (default: data/formatted when it exists and --base "
                                                  "is not given; else full-length rows, every position trained)")
    parser.add_argument("--readme", action="store_true", help="print the README table (public shapes, GPU, bf16)")
    parser.add_argument("overrides", nargs="*", help="params as dotted.key=value, e.g. train.method=qlora")
    args = parser.parse_args(argv)

    from finetune import ROOT
    from finetune.runtime.files import read_jsonl
    from finetune.runtime.stage import configure_logging
    from finetune.params.core import PARAMS_FILE, apply_overrides, read_yaml, validate
    from finetune.params.train import Train

    configure_logging()
    params = apply_overrides(read_yaml(PARAMS_FILE), args.overrides)
    if args.readme:
        print(readme_table(params))
        return
    checked = validate(params, {"train": Train})
    cfg = checked.train
    from finetune.runtime import device

    where = args.device or checked.device
    placement = device.resolve(where, args.dtype or checked.dtype, cuda=True if where == "cuda" else None,
                               bf16=True if where == "cuda" else None)
    import torch  # noqa: F401  (the framework whose memory is measured, as train imports it)
    import peft  # noqa: F401
    from transformers import Trainer  # noqa: F401

    targets = cfg.lora.target_modules if cfg.method in ("lora", "qlora") else None
    if args.shape:
        from transformers import AutoConfig

        shape = describe(AutoConfig.for_model(**PUBLIC_SHAPES[args.shape]), targets)
    else:
        base = args.base or ROOT / "models" / "base"
        if not (base / "config.json").exists():
            raise SystemExit(f"{base} has no config.json: give --base DIR, or --shape NAME")
        shape = describe_base(base, targets)
        if (base / "tokenizer.json").exists() or (base / "tokenizer_config.json").exists():
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(base)  # train holds it too
    data = args.data or (ROOT / "data" / "formatted" if not args.base and not args.shape else None)
    if data and (data / "train.jsonl").exists():
        rows = read_jsonl(data / "train.jsonl")
        evals = read_jsonl(data / "eval.jsonl") if (data / "eval.jsonl").exists() else []
        work = planned_workload(rows, evals, cfg, checked.seed)
    else:
        work = synthetic_workload(cfg, params["format"]["max_seq_len"])
    framework = framework_mib(placement.device)
    result = plan(shape, Settings.from_params(cfg, placement), work, framework)
    log = logging.getLogger("finetune.memory_plan")
    log_plan(result, work, log)
    if placement.device == "cpu" or torch.cuda.is_available():
        capacity, what = capacity_mib(placement.device)
        log.info("memory plan: %s: %s is %s MiB", "fits" if result.peak_mib <= capacity else "does NOT fit", what,
                 f"{capacity:,.0f}")
    print(json.dumps(result.metrics(), indent=2))


if __name__ == "__main__":
    main()

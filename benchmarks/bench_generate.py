"""Generation speed of the evaluate stage: batched (left padding, KV cache) vs one prompt at a time.

    python benchmarks/bench_generate.py [--rows 96] [--batch-size 32] [--max-new-tokens 8] [--threads 1] [--no-adapter]

Uses models/base (+ models/adapter when present) and the test prompts of data/formatted, i.e. what
`dvc repro format train` produced; without them it builds a small builtin base in a temp folder and
renders prompts from data/raw. Both modes run in the same process on the same prompts, and must
produce the same answers (greedy decoding; checked). Prints examples/s for each and the speed-up.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def model_and_prompts(rows: int, use_adapter: bool = True):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.runtime.files import COMPLETE, read_jsonl

    base, adapter = ROOT / "models" / "base", ROOT / "models" / "adapter"
    if not (base / COMPLETE).exists():
        from stages import base as base_stage
        from finetune.params.core import section

        base = Path(tempfile.mkdtemp(prefix="bench-base-"))
        print(f"models/base missing: building a builtin base in {base}")
        base_stage.build_builtin(section("model.builtin", pretrain_steps=50), base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    label = "base"
    if use_adapter and (adapter / COMPLETE).exists() and (adapter / "adapter_config.json").exists():
        from peft import PeftModel

        model, label = PeftModel.from_pretrained(model, adapter), "base + adapter"
    test = ROOT / "data" / "formatted" / "test.jsonl"
    if test.exists():
        prompts = [row["prompt"] for row in read_jsonl(test)]
    else:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": row["instruction"] + "\n\n" + row["input"]}],
                                                 tokenize=False, add_generation_prompt=True)
                   for row in read_jsonl(ROOT / "data" / "raw" / "support_tickets.jsonl")[:rows] if "instruction" in row]
    return model.eval(), tokenizer, label, (prompts * (rows // max(len(prompts), 1) + 1))[:rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-adapter", action="store_true", help="time the base alone (answers run to max_new_tokens)")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    from finetune.evaluation import scoring

    torch.set_num_threads(args.threads)
    model, tokenizer, label, prompts = model_and_prompts(args.rows, not args.no_adapter)
    scoring.generate(model, tokenizer, prompts[:4], args.max_new_tokens, 4)  # warm-up
    results = {}
    for name, batch_size in (("one at a time", 1), (f"batched ({args.batch_size})", args.batch_size)):
        started = time.perf_counter()
        outputs = scoring.generate(model, tokenizer, prompts, args.max_new_tokens, batch_size)
        seconds = time.perf_counter() - started
        results[name] = (len(prompts) / seconds, outputs)
        print(f"{name:>16}: {len(prompts)} prompts in {seconds:6.2f} s = {len(prompts) / seconds:7.2f} examples/s")
    (single, single_out), (batched, batched_out) = results.values()
    same = sum(a == b for a, b in zip(single_out, batched_out))
    print(f"model: {label}; torch threads: {torch.get_num_threads()}; max_new_tokens: {args.max_new_tokens}; "
          f"cpu cores: {os.cpu_count()}")
    print(f"speed-up batched / one at a time: {batched / single:.1f}x; identical answers: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()

"""CPU generation speed: GGUF q8_0 / q4_k_m in llama.cpp against the merged model in transformers, same run.

    python benchmarks/bench_inference.py [--model models/merged] [--new-tokens 64] [--prompts 8] [--threads 1]

Greedy decode of exactly --new-tokens tokens per prompt, one prompt at a time, prompt processing
included (quantize.tokens_per_second, the stage's own measure), on the first test prompts. The GGUF
files come from models/quantized/ when there, otherwise they are made from the merged model into a
temp folder with llama.cpp's converter and quantizer. Prints tokens/s and the ratio to transformers.
Run it on an idle machine: other jobs on the cores change every number.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "merged")
    parser.add_argument("--quantized", type=Path, default=ROOT / "models" / "quantized")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "formatted" / "test.jsonl")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="best of N rounds for each engine")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from finetune.export import llamacpp
    from finetune.runtime.files import read_jsonl
    from stages.quantize import tokens_per_second

    torch.set_num_threads(args.threads)
    prompts = [row["prompt"] for row in read_jsonl(args.data)[: args.prompts]]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    n_ctx = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts) + args.new_tokens + 16
    engines = {"transformers fp32 (merged)": lambda: AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()}
    with tempfile.TemporaryDirectory() as scratch:
        f16 = None
        for qtype in ("q8_0", "q4_k_m"):
            path = args.quantized / f"model-{qtype}.gguf"
            if not path.exists():
                f16 = f16 or llamacpp.hf_to_gguf(args.model, Path(scratch) / "model-f16.gguf")
                path = llamacpp.quantize_gguf(f16, Path(scratch) / f"model-{qtype}.gguf", qtype, args.threads)
            engines[f"llama.cpp {qtype} ({', '.join(llamacpp.tensor_types(path))})"] = (
                lambda path=path: llamacpp.LlamaCppLM(path, GenerationConfig.from_pretrained(args.model), n_ctx, args.threads))
        results = {}
        for name, load in engines.items():
            started = time.perf_counter()
            model = load()
            load_seconds = time.perf_counter() - started
            speed = max(tokens_per_second(model, tokenizer, prompts, args.new_tokens) for _ in range(args.repeats))
            results[name] = (speed, load_seconds)
            del model
    baseline = results["transformers fp32 (merged)"][0]
    print(f"{len(prompts)} prompts x {args.new_tokens} new tokens, greedy, batch 1, {args.threads} thread(s), best of {args.repeats}")
    print(f"{'engine':58} {'tokens/s':>9} {'vs transformers':>16} {'load s':>7}")
    for name, (speed, load_seconds) in results.items():
        print(f"{name:58} {speed:9.1f} {speed / baseline:15.2f}x {load_seconds:7.3f}")


if __name__ == "__main__":
    main()

"""family_matrix: the whole pipeline, through the real `dvc`, on a small model of each model family.

For each family, scripts/family_models.py builds a random-weight model with the family's real tokenizer,
chat template and end-of-turn token; it becomes `model.base` of a fresh copy of this repo. `dvc repro`
runs every stage with LoRA (the family's own template; quantize: GGUF q8_0 and GPTQ), then
`dvc exp run -S train.method=qlora` reruns from train with a 4-bit base. After each run:

- the merged model loads, and its generation config stops at the family's end-of-turn token: forced to
  emit it, transformers' `generate` (and the pipeline's own scoring.generate) stop right there;
- the q8_0 GGUF's EOS is that token, and llama.cpp (llama-cpp-python's completion) stops there too;
- llama.cpp tokenizes like transformers: special tokens, unicode, leading and repeated spaces, and
  every test prompt exactly as the format stage tokenized it;
- the `train.lora.target_modules` presets resolve on the family's own layer names.

    python scripts/family_matrix.py [--families qwen2 llama3 ...] [--size small] [--work DIR]

tests/test_families.py runs the same at size `tiny` in `make test`; this script is for bigger sizes
(and a GPU, where `device: auto` puts the models). It prints one table and writes matrix.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]
import family_models  # noqa: E402
from repo_tools import ran, sh, tracked_copy  # noqa: E402

from finetune.params.core import apply_overrides  # noqa: E402

# Small knobs: every stage and code path runs, on a few rows and steps. A family without a chat template
# of its own (GPT-NeoX) uses the alpaca template; quality checks are off (random weights: no signal).
KNOBS = {  # the generated tickets (any family's tokenizer reads them), not the shipped Banking77 default
    "ingest.sources": [{"path": "data/raw/support_tickets.jsonl", "format": "alpaca"}],
    "ingest.max_eval_rows": 4, "ingest.max_test_rows": 6,
    "format.system_prompt": "You route customer support tickets to the right team.",
    "format.max_seq_len": 128,
    "train.max_steps": 3, "train.batch_size": 4, "train.logging_steps": 1, "train.checkpoint_steps": 0,
    "evaluate.max_new_tokens": 4, "evaluate.batch_size": 4, "evaluate.num_examples": 2, "evaluate.general.tasks": [],
    "evaluate.classification.scoring": "generate",
    "quantize.formats": ["gguf_q8_0", "gptq"], "quantize.gptq.calibration_rows": 8, "quantize.speed_new_tokens": 4,
    "quantize.checks.gguf_q8_0": {"max_perplexity_drop_percent": 1000.0, "min_top1_agreement": 0.0},
    "quantize.checks.gptq": {"max_perplexity_drop_percent": 1000.0, "min_top1_agreement": 0.0},
}
ROWS_PER_SOURCE = 240
STAGES = {"check_params", "base", "ingest", "dedup_filter", "format", "train", "evaluate_base", "evaluate", "merge",
          "quantize", "publish", "headline"}
AFTER_TRAIN = {"train", "evaluate", "merge", "quantize", "publish", "headline"}
PRESETS = ("attention", "attention_all", "all-linear")
TEXTS = ["Hello world", " leading space", "  two  spaces\nand a newline\n\n", "café naïve 日本語 🚀 emoji ½",
         "3.14159 and 12345678", "\ttab\t", "def f():\n        return 1"]
CONVERSATION = [{"role": "user", "content": "My parcel never arrived — where is it? ¿Dónde está?"},
                {"role": "assistant", "content": "shipping"}]


def gptq_group_size(model_dir: Path) -> int:
    """The largest of GPTQModel's group sizes up to 128 that divides every layer width (tiny models: 64)."""
    from finetune.export import gptq

    widths = gptq.layer_widths(model_dir).values()
    return max(size for size in (16, 32, 64, 128) if all(width % size == 0 for width in widths))


def configure(repo: Path, family: str, model_dir: Path, knobs: dict | None = None) -> None:
    """params.yaml of `repo`: the family's model as base, its own template (else alpaca), small knobs."""
    import yaml

    params = yaml.safe_load((repo / "params.yaml").read_text())
    has_template = family_models.FAMILIES[family].get("chat_template") or family_models.read_vocab(
        family_models.vocab_file(family))["chat_template"]
    settings = {**KNOBS, "model.base": str(Path(model_dir).resolve()), "format.template": "tokenizer" if has_template else "alpaca",
                "quantize.gptq.group_size": gptq_group_size(model_dir), **(knobs or {})}
    params = apply_overrides(params, settings)
    for source in params["ingest"]["sources"]:
        source["max_rows"] = ROWS_PER_SOURCE
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def init(repo: Path) -> None:
    sh(repo, "git", "init", "-q", "-b", "main")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "family matrix")


def run_lora(repo: Path) -> tuple[set[str], float]:
    """`dvc repro` (train.method lora), committed: the stages that ran and the seconds it took."""
    started = time.time()
    stages = ran(sh(repo, "dvc", "repro").stdout)
    seconds = time.time() - started
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "lora")
    return stages, round(seconds, 1)


def run_qlora(repo: Path, *targets: str) -> tuple[set[str], float]:
    """`dvc exp run -S train.method=qlora [targets]` in the workspace: the stages that ran and the seconds it took."""
    started = time.time()
    stages = ran(sh(repo, "dvc", "exp", "run", "-S", "train.method=qlora", *targets).stdout)
    return stages, round(time.time() - started, 1)


def forced(model, token_id: int):
    """Make `model` always predict `token_id` (a forward hook on its output layer); returns the hook to remove."""
    import torch

    bias = torch.zeros(model.get_output_embeddings().weight.shape[0])
    bias[token_id] = 1e4
    return model.get_output_embeddings().register_forward_hook(lambda module, inputs, output: output + bias.to(output))


def transformers_stop(merged: Path, end_of_turn: int) -> dict:
    """The merged model's stop tokens, and what generate does when the model emits the end of turn."""
    from finetune.evaluation import scoring
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    config = GenerationConfig.from_pretrained(merged)
    stops = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    prompt = tokenizer("Where is my parcel?", return_tensors="pt")
    hook = forced(model, end_of_turn)
    try:
        with torch.no_grad():
            generated = model.generate(**prompt, max_new_tokens=6, do_sample=False, eos_token_id=config.eos_token_id,
                                       pad_token_id=config.pad_token_id)
        answer = scoring.generate(model, tokenizer, ["Where is my parcel?"], 6, 1)[0]  # the stages' own generation
    finally:
        hook.remove()
    return {"stop_ids": stops, "new_tokens": generated[0, prompt["input_ids"].shape[1]:].tolist(),
            "scoring_answer": answer, "parameters": model.num_parameters()}


def llamacpp_checks(gguf: Path, merged: Path, end_of_turn: int, test_rows: list[dict]) -> dict:
    """llama.cpp on the GGUF: its EOS, whether it stops at the end of turn, and tokenization against transformers."""
    from finetune.export import llamacpp
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    llm = llamacpp.load(gguf, n_ctx=512)
    prompt = llm.tokenize(b"Where is my parcel?", add_bos=True, special=True)
    stopped = llm.create_completion(prompt, max_tokens=6, temperature=0.0, logit_bias={end_of_turn: 1e4})
    other = next(token for token in range(1000, 2000) if token != end_of_turn)  # control: a token that stops nothing
    running = llm.create_completion(prompt, max_tokens=6, temperature=0.0, logit_bias={other: 1e4})
    texts = list(TEXTS) + [tokenizer.eos_token + " after the end of turn\n"]
    if tokenizer.chat_template:
        texts += [tokenizer.apply_chat_template(CONVERSATION, tokenize=False),
                  tokenizer.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)]
    differ = [text for text in texts
              if llm.tokenize(text.encode(), add_bos=True, special=True) != tokenizer(text)["input_ids"]]
    # the prompts exactly as the format stage tokenized them (the template placed BOS itself)
    differ += [row["prompt"] for row in test_rows
               if llm.tokenize(row["prompt"].encode(), add_bos=False, special=True) != row["input_ids"][:len(
                   tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])]]
    result = {"eos": llm.token_eos(), "stop_finish": stopped["choices"][0]["finish_reason"],
              "stop_tokens": stopped["usage"]["completion_tokens"], "control_finish": running["choices"][0]["finish_reason"],
              "texts_compared": len(texts) + len(test_rows), "tokenization_differs": differ,
              "add_bos": bool(llm._model.add_bos_token()), "pre": llm.metadata.get("tokenizer.ggml.pre")}
    del llm
    return result


def check(repo: Path, family: str) -> dict:
    """What the matrix asserts about the merged model of `repo`'s workspace run, and about its training data."""
    from finetune.training import lora_targets
    from finetune.runtime.files import read_jsonl
    from transformers import AutoModelForCausalLM

    info = json.loads((repo / "models" / "base" / "family.json").read_text())
    end_of_turn, merged = info["end_of_turn_id"], repo / "models" / "merged"
    train_rows = read_jsonl(repo / "data" / "formatted" / "train.jsonl")
    base = AutoModelForCausalLM.from_pretrained(repo / "models" / "base")
    return {"family": family, "end_of_turn": info["end_of_turn"], "end_of_turn_id": end_of_turn,
            "method": json.loads((repo / "metrics" / "train.json").read_text())["method"],
            "template": json.loads((repo / "data" / "formatted" / "format.json").read_text())["template"],
            # the answers end with the end of turn, and it is trained: a fine-tuned model learns to stop
            "rows_training_end_of_turn": sum(end_of_turn in row["labels"] for row in train_rows) / len(train_rows),
            "base": json.loads((repo / "models" / "base" / "base.json").read_text()),
            "transformers": transformers_stop(merged, end_of_turn),
            "presets": {preset: lora_targets.resolve(preset, base) for preset in PRESETS}}


def check_quantized(repo: Path, end_of_turn: int) -> dict:
    """What the matrix asserts about the quantized artifacts of `repo`'s workspace run."""
    from finetune.runtime.files import read_jsonl

    quantized = json.loads((repo / "metrics" / "quantize.json").read_text())
    return {"llamacpp": llamacpp_checks(repo / "models" / "quantized" / "model-q8_0.gguf", repo / "models" / "merged",
                                        end_of_turn, read_jsonl(repo / "data" / "formatted" / "test.jsonl")),
            "q8_0_perplexity_drop_percent": quantized["gguf_q8_0.perplexity_drop_percent"],
            "gptq_perplexity_drop_percent": quantized["gptq.perplexity_drop_percent"],
            "gptq_group_size": json.loads((repo / "models" / "quantized" / "gptq" / "config.json").read_text())[
                "quantization_config"]["group_size"]}


def problems(result: dict) -> list[str]:
    """What is wrong in one family's check() (+ check_quantized()) result; empty: all good."""
    found, hf, eot = [], result["transformers"], result["end_of_turn_id"]
    if result["rows_training_end_of_turn"] != 1:
        found.append(f"only {result['rows_training_end_of_turn']:.0%} of the training rows train the end of turn {eot}")
    if eot not in hf["stop_ids"]:
        found.append(f"merged generation config stops at {hf['stop_ids']}, not at the end of turn {eot}")
    if hf["new_tokens"] != [eot] or hf["scoring_answer"] != "":
        found.append(f"transformers did not stop at the end of turn: {hf['new_tokens']}, {hf['scoring_answer']!r}")
    cpp = result.get("llamacpp")
    if cpp and (cpp["eos"] != eot or (cpp["stop_finish"], cpp["stop_tokens"]) != ("stop", 0) or cpp["control_finish"] != "length"):
        found.append(f"llama.cpp: EOS {cpp['eos']} (end of turn {eot}), stopped {cpp['stop_finish']} after "
                     f"{cpp['stop_tokens']} tokens, control {cpp['control_finish']}")
    if cpp and cpp["tokenization_differs"]:
        found.append(f"llama.cpp tokenizes differently from transformers: {cpp['tokenization_differs'][:3]}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(family_models.FAMILIES), choices=list(family_models.FAMILIES))
    parser.add_argument("--size", default="small", choices=list(family_models.SIZES))
    parser.add_argument("--work", type=Path, default=Path("family-matrix"), help="one folder per family: model/ and repo/")
    args = parser.parse_args()
    results, failed = [], []
    for family in args.families:
        work = args.work / family
        shutil.rmtree(work, ignore_errors=True)
        model_dir = family_models.build(family, work / "model", args.size)
        repo = tracked_copy(work / "repo")
        configure(repo, family, model_dir, {"train.max_steps": 20} if args.size != "tiny" else None)
        init(repo)
        for method, run, expected in (("lora", run_lora, STAGES), ("qlora", run_qlora, AFTER_TRAIN)):
            stages, seconds = run(repo)
            result = {**check(repo, family), "seconds": seconds, "stages": sorted(stages)}
            result.update(check_quantized(repo, result["end_of_turn_id"]))
            wrong = problems(result) + ([f"stages did not run: {sorted(expected - stages)}"] if expected - stages else [])
            failed += [f"{family} {method}: {problem}" for problem in wrong]
            results.append(result)
            print(f"{family:9} {method:5} {result['transformers']['parameters'] / 1e6:7.1f}M  {seconds:6.1f} s  end of turn "
                  f"{result['end_of_turn']!r:16} q8_0 ppl {result['q8_0_perplexity_drop_percent']:+8.3f}%  gptq ppl "
                  f"{result['gptq_perplexity_drop_percent']:+8.3f}%  {'ok' if not wrong else '; '.join(wrong)}", flush=True)
    (args.work / "matrix.json").write_text(json.dumps(results, indent=2, default=str))
    if failed:
        raise SystemExit("family matrix failed:\n  - " + "\n  - ".join(failed))


if __name__ == "__main__":
    main()

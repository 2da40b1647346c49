"""Pinned numbers: exact values of a few training steps for every method, of the merged model's logits
and of one small evaluation, on a seeded tiny Qwen2-family model with its real tokenizer (built offline by
scripts/family_models.py, independent of this project's corpus). Any change to loss masking, loss
scaling, templates, merging or scoring fails here by name. With torch's CPU float paths pinned
(finetune/runtime/env.py CPU_PINS) these hold on any x86-64 CPU with AVX2; update them only deliberately:

    PIN_PRINT=1 python -m pytest -q -s tests/test_pinned.py   # prints the current values as Python literals
"""
import json
import os
import random
import sys

import pytest
import torch

from stages import merge
from finetune.evaluation import scoring
from stages import train
from conftest import ROOT
from finetune.params.core import section

sys.path.insert(0, str(ROOT / "scripts"))
import family_models  # noqa: E402

METHODS = ["full", "lora", "qlora", "prompt_tuning"]
LEARNING_RATE = {"full": 1e-3, "lora": 1e-2, "qlora": 1e-2, "prompt_tuning": 1e-1}
PROMPTS = ["The capital of France is", "Route this ticket: my card was charged twice"]

# per method: (loss, grad_norm) of each of the first 3 optimizer steps (batch 4, no warmup, no dropout)
STEPS = {
    "full": [(11.97083568572998, 6.720988), (11.685200691223145, 5.634437), (11.442244529724121, 4.930992)],
    "lora": [(11.97083568572998, 1.415525), (11.763398170471191, 1.44848), (11.513949394226074, 1.13474)],
    "qlora": [(11.977438926696777, 1.450494), (11.784574508666992, 1.473238), (11.519367218017578, 1.116974)],
    "prompt_tuning": [(11.967235565185547, 0.014165), (11.946918487548828, 0.017747), (11.954254150390625, 0.01283)],
}
# the merged LoRA model: the last position's first 6 logits for each prompt, and the sum of all its logits
MERGED = [[-0.13034, -0.03151, 0.11411, 0.07236, -0.04948, -0.07739, 36.208],
          [0.19146, 0.04914, 0.06954, -0.05804, 0.15092, -0.04406, -70.964]]
# scoring.evaluate_model on the untouched base, task generation, 4 new tokens
EVALUATION = {"task.bleu": 0.0, "task.rouge1": 0.0, "task.rouge2": 0.0, "task.rougeL": 0.0, "task.meteor": 0.0,
              "perplexity": 155974.64406}


def pinned(name, value, expected, rel=1e-5):
    if os.environ.get("PIN_PRINT"):
        print(f"\n{name} = {value!r}")
        return
    assert expected is not None, f"{name} is not pinned yet: run with PIN_PRINT=1"
    if isinstance(value, dict):
        assert sorted(value) == sorted(expected), f"{name}: other metrics than pinned: {sorted(value)}"
    assert flat(value) == pytest.approx(flat(expected), rel=rel, abs=1e-6), f"{name} changed: {value!r} != pinned {expected!r}"


def flat(value) -> list:
    if isinstance(value, dict):
        return [item for key in sorted(value) for item in flat(value[key])]
    if isinstance(value, (list, tuple)):
        return [item for inner in value for item in flat(inner)]
    return [value]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    torch.set_num_threads(1)
    return family_models.build("qwen2", tmp_path_factory.mktemp("qwen2") / "model", "tiny", seed=0)


@pytest.fixture(scope="module")
def rows(qwen):
    """Chat-formatted rows, loss on the answer only (what format writes), of varied length."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen)
    rng, rows = random.Random(0), []
    words = ["billing", "refund", "parcel", "login", "crash", "invoice", "address", "delivery", "password", "screen"]
    for index in range(16):
        question = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        answer = rng.choice(words)
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": prompt_ids + answer_ids, "labels": [-100] * len(prompt_ids) + answer_ids,
                     "prompt": prompt, "reference": answer, "id": f"r{index}"})
    return rows


def config(method):
    return section("train", method=method, max_steps=3, batch_size=4, logging_steps=1, checkpoint_steps=0, eval_steps=0,
                   learning_rate=LEARNING_RATE[method], warmup_ratio=0.0, scheduler="constant_with_warmup",
                   lora={"dropout": 0.0, "r": 4, "alpha": 8}, prompt_tuning={"num_virtual_tokens": 4})


def run(qwen, rows, tmp_path, method):
    return train.fit(qwen, rows[:12], rows[12:], config(method), 42, tmp_path / "checkpoints", {"pinned": method},
                     tmp_path / "plots")


@pytest.mark.parametrize("method", METHODS)
def test_the_first_training_steps_of_each_method(qwen, rows, tmp_path, method):
    trainer, _, _ = run(qwen, rows, tmp_path, method)
    steps = [(entry["loss"], round(entry["grad_norm"], 6)) for entry in trainer.state.log_history if "loss" in entry]
    assert len(steps) == 3
    pinned(f"STEPS[{method!r}]", steps, None if STEPS is None else STEPS[method])


def test_the_merged_model_logits(qwen, rows, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer, tokenizer, _ = run(qwen, rows, tmp_path, "lora")
    train.save_trained(trainer, tokenizer, config("lora"), rows[12:], tmp_path / "adapter")
    merge.merge(qwen, tmp_path / "adapter", "float32", 1e-4, tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    values = []
    with torch.no_grad():
        for prompt in PROMPTS:
            last = model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1]
            values.append([round(v, 5) for v in last[:6].tolist()] + [round(last.sum().item(), 3)])
    pinned("MERGED", values, MERGED, rel=1e-4)


def test_one_small_evaluation(qwen, rows):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(qwen, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(qwen)
    cfg = section("evaluate", task="generation", max_new_tokens=4, batch_size=4, general={"tasks": []})
    metrics, outputs = scoring.evaluate_model(model, tokenizer, rows[:8], cfg)
    pinned("EVALUATION", json.loads(json.dumps(metrics)), EVALUATION)

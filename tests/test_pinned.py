"""Pinned numbers: exact values of a few training steps for every method, of the merged model's logits
and of one small evaluation, on a seeded tiny Qwen2-family model with its real tokenizer (built offline by
scripts/family_models.py, independent of this project's corpus). Any change to loss masking, loss
scaling, templates, merging or scoring fails here by name. With torch's CPU float paths pinned
(finetune/runtime/env.py: CPU_PINS and MKL's vendor check) these hold on any x86-64 CPU with AVX2, Intel or AMD
(with the batch order before the widest batch came first, the qlora row was measured the same on an Intel
Xeon and an AMD EPYC); update them only deliberately:

    PIN_PRINT=1 python -m pytest -q -s tests/test_pinned.py   # prints the current values as Python literals
"""
import json
import os
import random
import sys

import pytest
import torch

from stages import format as fmt
from stages import merge
from finetune.evaluation import scoring
from stages import train
from finetune.training.trainer import RunFiles, TrainData
from conftest import ROOT
from finetune.params.core import section

sys.path.insert(0, str(ROOT / "scripts"))
import family_models  # noqa: E402

METHODS = ["full", "lora", "qlora", "prompt_tuning"]
LEARNING_RATE = {"full": 1e-3, "lora": 1e-2, "qlora": 1e-2, "prompt_tuning": 1e-1}
PROMPTS = ["The capital of France is", "Route this ticket: my card was charged twice"]

# per method: (loss, grad_norm) of each of the first 3 optimizer steps (batch 4, no warmup, no dropout)
STEPS = {
    "full": [(11.947032928466797, 6.07139), (11.588703155517578, 4.985872), (11.489534378051758, 4.280046)],
    "lora": [(11.947032928466797, 1.206841), (11.724125862121582, 0.896114), (11.568886756896973, 0.701995)],
    "qlora": [(11.948593139648438, 1.245052), (11.720284461975098, 0.897143), (11.573359489440918, 0.708339)],
    "prompt_tuning": [(11.947162628173828, 0.010622), (11.93157958984375, 0.010696), (11.917281150817871, 0.011955)],
}
# the merged LoRA model: the last position's first 6 logits for each prompt, and the sum of all its logits
MERGED = [[-0.09741, -0.05034, 0.1717, 0.08229, -0.09028, -0.10154, 23.268],
          [0.03925, 0.11861, -0.00885, -0.00846, 0.13361, -0.03691, -2.265]]
# scoring.evaluate_model on the untouched base, task generation, 4 new tokens
# ... whose chat answers are empty (the untrained model emits "\n" and the end of turn), so its scores are 0.0:
# the information is in the token ids it generates for plain prompts of different lengths, batched together
# (scoring.generate in completion mode, 6 new tokens, batch 3), so that a change in batching, left padding, the
# attention mask or decoding fails by name
GENERATED = [[374, 374, 374, 374, 374, 374], [10917, 10917, 10917, 10917, 10917, 10917], [982, 982, 982, 982, 982, 982]]
EVALUATION = {"task.bleu": 0.0, "task.rouge1": 0.0, "task.rouge2": 0.0, "task.rougeL": 0.0, "task.meteor": 0.0,
              "perplexity": 151374.15796}


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
    """Rows of varied length, built by the format stage's code: loss on the answer and its end of turn."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen)
    rng, records = random.Random(0), []
    words = ["billing", "refund", "parcel", "login", "crash", "invoice", "address", "delivery", "password", "screen"]
    for index in range(16):
        question = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        answer = rng.choice(words)
        records.append({"id": f"r{index}", "messages": [{"role": "user", "content": question},
                                                        {"role": "assistant", "content": answer}]})
    return fmt.formatted_rows(tokenizer, records, section("format", system_prompt=None))  # the tiny base's rows: no system turn


def config(method):
    return section("train", method=method, max_steps=3, batch_size=4, logging_steps=1, checkpoint_steps=0, eval_steps=0,
                   learning_rate=LEARNING_RATE[method], warmup_ratio=0.0, scheduler="constant_with_warmup",
                   lora={"dropout": 0.0, "r": 4, "alpha": 8}, prompt_tuning={"num_virtual_tokens": 4})


def run(qwen, rows, tmp_path, method):
    run = RunFiles(checkpoint_dir=tmp_path / "checkpoints", live_dir=tmp_path / "plots", fingerprint={"pinned": method})
    return train.fit(qwen, TrainData(train=rows[:12], eval=rows[12:]), config(method), 42, run)


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
    assert outputs == [""] * 8
    prompts = PROMPTS + ["def add(a, b):\n"]
    texts = scoring.generate(model, tokenizer, prompts, 6, 3, completion=True)
    # left padding and its attention mask change nothing: each prompt alone gives the same answer
    assert texts == [scoring.generate(model, tokenizer, [prompt], 6, 1, completion=True)[0] for prompt in prompts]
    generated = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    assert all(generated), texts
    pinned("GENERATED", generated, GENERATED, rel=0)

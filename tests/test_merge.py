"""merge: for every training method the saved model equals the trained one; plain transformers loads it."""
import json
import logging
import shutil
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages import merge
from stages import publish
from finetune.params.sections import load_params
from finetune.training.reference import REFERENCE, save_reference_logits
from finetune.params.core import section

PROMPTS = ["The capital of France is", "Two plus two is"]


def finish(model, tokenizer, out, method, **extra):
    """What train leaves behind: weights or adapter, tokenizer, end-of-training logits, train_method.json."""
    save_reference_logits(model, [tokenizer(p)["input_ids"] for p in PROMPTS], out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "train_method.json").write_text(json.dumps({"method": method, "base": "builtin", **extra}))
    return out


def make_adapter(base_dir, out, seed):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    # init_lora_weights=False: random B, so the adapter really changes the outputs
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  init_lora_weights=False)).eval()
    return finish(peft_model, AutoTokenizer.from_pretrained(base_dir), out, "lora")


@pytest.fixture(scope="module")
def adapter(tiny_base, tmp_path_factory):
    return make_adapter(tiny_base, tmp_path_factory.mktemp("lora"), seed=0)


PLAIN = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
folder, prompt = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder)
ids = AutoTokenizer.from_pretrained(folder)(prompt, return_tensors="pt")["input_ids"]
generator = pipeline("text-generation", model=folder, device="cpu")
reply = generator([{"role": "user", "content": prompt}], max_new_tokens=4, do_sample=False)[0]["generated_text"]
print(json.dumps({"logits": model(input_ids=ids).logits[0, -1].tolist(), "reply": reply, "dtype": str(model.dtype),
                  "project_code": [m for m in ("common", "merge", "stages") if m in sys.modules]}))
"""


def test_lora_merge_is_a_standalone_model_that_plain_transformers_loads(tiny_base, adapter, tmp_path):
    report = merge.merge(tiny_base, adapter, "float32", 1e-4, tmp_path / "merged", max_shard_size="1MB")
    assert report["max_logit_diff_vs_adapter"] < 1e-4 and report["max_logit_diff_vs_training"] < 1e-4
    assert (report["device"], report["dtype"]) == ("cpu", "float32") and report["peak_memory_mb"] > 0
    files = {path.name for path in (tmp_path / "merged").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "chat_template.jinja", "train_method.json"} <= files
    assert report["shards"] > 1 and not any(name.endswith(".bin") for name in files)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    generation = json.loads((tmp_path / "merged" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id and generation["pad_token_id"] == tokenizer.pad_token_id

    # a clean interpreter (-I: no cwd, no PYTHONPATH): nothing from this project can be imported
    result = subprocess.run([sys.executable, "-I", "-c", PLAIN, str(tmp_path / "merged"), PROMPTS[0]],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    plain = json.loads(result.stdout.strip().splitlines()[-1])
    assert plain["project_code"] == [] and plain["dtype"] == "torch.float32"
    assert plain["reply"][-1]["role"] == "assistant"
    ids = torch.tensor([tokenizer(PROMPTS[0])["input_ids"]])
    with torch.no_grad():
        expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), adapter).eval()(input_ids=ids)
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_base)(input_ids=ids).logits[0, -1]
    assert (torch.tensor(plain["logits"]) - expected.logits[0, -1]).abs().max() < 1e-4
    assert (torch.tensor(plain["logits"]) - base_logits).abs().max() > 1e-2  # the adapter did change the model

    # publish: the release folder is the merged model (hard links) plus a Hub model card that loads back
    from huggingface_hub import ModelCard

    evaluation = {"task.accuracy": 0.9, "base.task.accuracy": 0.1, "delta.task.accuracy": 0.8, "perplexity": 1.5,
                  "task.class.billing.f1": 0.7, "seed": 42, "test_rows": 10}
    summary = publish.publish(tmp_path / "merged", tmp_path / "release", {"rows_in": 10, "rows_kept": 9, "splits": {}},
                              evaluation, "classification", ["org/tickets"],
                              section("publish", license="apache-2.0"))
    release = tmp_path / "release"
    assert {"README.md", "config.json", "tokenizer.json", "model.safetensors.index.json"} <= set(summary["files"]) | {"README.md"}
    shard = next(release.glob("model-*.safetensors"))
    assert shard.stat().st_ino == (tmp_path / "merged" / shard.name).stat().st_ino  # a link, not a second copy
    card = ModelCard.load(release / "README.md")
    assert card.data.license == "apache-2.0" and card.data.library_name == "transformers"
    assert card.data.datasets == ["org/tickets"] and card.data.base_model is None  # builtin: no hub id to name
    results = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert results == {"task.accuracy": 0.9, "perplexity": 1.5}  # the fine-tuned model's own headline numbers
    assert "| task.accuracy | 0.9 | 0.1 |" in card.text


def test_wrong_adapter_fails_the_merge(tiny_base, adapter, tmp_path):
    wrong = shutil.copytree(adapter, tmp_path / "adapter")
    other = make_adapter(tiny_base, tmp_path / "other", seed=1)
    shutil.copy(other / REFERENCE, wrong / REFERENCE)  # these weights are not what training produced
    with pytest.raises(SystemExit, match="vs_training"):
        merge.merge(tiny_base, wrong, "float32", 1e-4, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_half_precision_merge_within_its_tolerance_and_too_tight_fails(tiny_base, adapter, tmp_path):
    rtol = load_params().merge.rtol.bfloat16
    report = merge.merge(tiny_base, adapter, "bfloat16", rtol, tmp_path / "merged")
    assert 1e-4 < report["max_logit_diff_vs_adapter"] < rtol * report["max_abs_logit"]
    weights = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}
    with pytest.raises(SystemExit, match=r"merge.rtol.float16=1e-06 x max \|logit\| .*too tight for float16"):
        merge.merge(tiny_base, adapter, "float16", 1e-6, tmp_path / "merged16")


# SmolLM2-135M's shape (the default real base): rounding error over 30 layers and a 49k vocabulary is what the
# relative tolerances are for (a correct fp32 merge of the real model differs by ~1.5e-4, past the old 1e-4)
SMOLLM2_SHAPE = dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                     intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, rope_theta=1e5)


def real_shaped_base(out, seed, tokenizer_from):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).save_pretrained(out)  # random weights: the shape is what counts
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(out)  # ids < 2048: any vocabulary this size takes them
    return out


@pytest.fixture(scope="module")
def real_shaped(tiny_base, tmp_path_factory):
    """Two random bases of SmolLM2's shape (seeds 0 and 1) and a LoRA adapter (non-zero B, all-linear) on the first."""
    folder = tmp_path_factory.mktemp("real_shaped")
    base, other = real_shaped_base(folder / "base", 0, tiny_base), real_shaped_base(folder / "other", 1, tiny_base)
    return base, other, make_adapter(base, folder / "adapter", seed=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_a_correct_merge_of_a_30_layer_model_passes_in_every_dtype(real_shaped, tmp_path, dtype):
    base, _, adapter = real_shaped
    rtol = getattr(load_params().merge.rtol, dtype)
    report = merge.merge(base, adapter, dtype, rtol, tmp_path / "merged")  # raises past the tolerance
    relative = report["max_logit_diff_vs_training"] / report["max_abs_logit"]
    assert 0 < relative <= rtol and report["parameters"] > 130e6
    if dtype != "float32":  # rounding to 8 (bf16) or 11 (fp16) significant bits did move the logits
        assert report["max_logit_diff_vs_adapter"] > 1e-3


def test_a_30_layer_adapter_on_another_base_or_stale_fails_even_at_the_loosest_tolerance(real_shaped, tmp_path):
    """bfloat16's tolerance is the loosest: an adapter checked against another base, or end-of-training logits
    of other adapter weights, still fail it (merged in fp32 here, so only the mismatch counts)."""
    base, other, adapter = real_shaped
    loosest = max(load_params().merge.rtol.model_dump().values())
    with pytest.raises(SystemExit, match=r"vs_training.*not trained on this base or is stale"):
        merge.merge(other, adapter, "float32", loosest, tmp_path / "wrong_base")
    stale = shutil.copytree(adapter, tmp_path / "stale")
    shutil.copy(make_adapter(base, tmp_path / "newer", seed=1) / REFERENCE, stale / REFERENCE)
    with pytest.raises(SystemExit, match=r"differ by .* > merge.rtol.float32=.*max_logit_diff_vs_training"):
        merge.merge(base, stale, "float32", loosest, tmp_path / "merged")
    assert not (tmp_path / "wrong_base").exists() and not (tmp_path / "merged").exists()


def test_half_precision_merge_holds_one_copy_in_that_dtype_and_equals_the_fp32_recipe(tiny_base, adapter, tmp_path,
                                                                                    monkeypatch):
    """The base is loaded once, straight into bfloat16 (never an fp32 copy), and the saved model is the one that
    merging in fp32 and then casting gives (the earlier recipe), to bfloat16's rounding."""
    loads, original = [], AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *args, **kwargs: loads.append((kwargs.get("dtype"), kwargs.get("device_map"))) or original(*args, **kwargs))
    rtol = load_params().merge.rtol.bfloat16
    report = merge.merge(tiny_base, adapter, "bfloat16", rtol, tmp_path / "merged")
    monkeypatch.undo()
    assert loads == [(torch.bfloat16, "cpu")]
    assert (report["device"], report["dtype"]) == ("cpu", "bfloat16") and report["peak_memory_mb"] > 0
    base = load_file(str(tiny_base / "model.safetensors"))
    fp32 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), adapter)
    exact = fp32.merge_and_unload().state_dict()
    recipe = {name: tensor.to(torch.bfloat16) for name, tensor in exact.items()}
    saved = load_file(str(tmp_path / "merged" / "model.safetensors"))
    for name, tensor in saved.items():
        # rounding W and its delta to bfloat16 before adding them, then the sum: within two units in the last
        # place (bfloat16 keeps 8 significant bits) of the largest of W, the delta and the sum
        delta = exact[name] - base.get(name, exact[name])
        scale = torch.maximum(torch.maximum(base.get(name, exact[name]).abs(), delta.abs()), exact[name].abs())
        assert ((tensor.float() - recipe[name].float()).abs() <= scale * 2 ** -6).all(), name
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.bfloat16
    cast = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    cast.load_state_dict(recipe, strict=False)
    assert merge.max_logit_difference(merged, [(ids, merge.logits(cast.to(torch.bfloat16), ids)) for ids, _ in
                                               merge.load_reference_logits(adapter)]) < rtol * report["max_abs_logit"]


def test_qlora_merges_into_the_dequantized_base_not_4bit_weights(tiny_base, tmp_path, caplog):
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    torch.manual_seed(0)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    base4 = AutoModelForCausalLM.from_pretrained(tiny_base, quantization_config=quantization, device_map="cpu")
    model = get_peft_model(prepare_model_for_kbit_training(base4, use_gradient_checkpointing=False),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    batch = tokenizer(["The capital of France is Paris.", "Two plus two is four."], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):  # a few real QLoRA steps: the adapter learns against the 4-bit weights
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adapter = finish(model.eval(), tokenizer, tmp_path / "qlora", "qlora", quantization_config=quantization.to_dict())

    caplog.set_level(logging.INFO, logger="finetune.merge")
    report = merge.merge(tiny_base, adapter, "float32", 1e-4, tmp_path / "merged",
                         reference_rtol=load_params().merge.qlora_reference_rtol)
    assert "never into 4-bit weights" in caplog.text
    assert report["method"] == "qlora" and report["max_logit_diff_vs_adapter"] < 1e-4
    assert report["max_logit_diff_vs_training"] < 0.05
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not hasattr(merged.config, "quantization_config")  # a plain fp32 model
    # the usual recipe, merging into the original fp32 weights, is further from what was trained
    naive = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), adapter).merge_and_unload()
    assert merge.max_logit_difference(naive, merge.load_reference_logits(adapter)) > 2 * report["max_logit_diff_vs_training"]


def test_full_fine_tune_is_saved_as_is(tiny_base, tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))  # stands in for full fine-tuning
    trained = finish(model.eval(), AutoTokenizer.from_pretrained(tiny_base), tmp_path / "full", "full")
    report = merge.merge(tiny_base, trained, "float32", 1e-4, tmp_path / "merged")
    assert report["method"] == "full" and report["max_logit_diff_vs_training"] < 1e-4
    saved, original = load_file(str(tmp_path / "merged" / "model.safetensors")), load_file(str(trained / "model.safetensors"))
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)


def test_prompt_tuning_passes_the_adapter_through(tiny_base, tmp_path, caplog):
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base),
                           PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    adapter = finish(model, AutoTokenizer.from_pretrained(tiny_base), tmp_path / "prompt", "prompt_tuning")
    caplog.set_level(logging.INFO, logger="finetune.merge")
    report = merge.merge(tiny_base, adapter, "float32", 1e-4, tmp_path / "merged")
    assert "nothing to merge" in caplog.text and report["max_logit_diff_vs_training"] < 1e-4
    out = tmp_path / "merged"
    assert (out / merge.PROMPT_ADAPTER / "adapter_config.json").exists() and not (out / "adapter_config.json").exists()
    deployed = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out / merge.PROMPT_ADAPTER).eval()
    assert merge.max_logit_difference(deployed, merge.load_reference_logits(adapter)) < 1e-4
    assert json.loads((out / "train_method.json").read_text())["method"] == "prompt_tuning"


def test_method_is_inferred_when_train_did_not_record_it(adapter, tmp_path):
    legacy = shutil.copytree(adapter, tmp_path / "legacy")
    (legacy / "train_method.json").unlink()
    assert merge.training_method(legacy)["method"] == "lora"
    assert merge.training_method(tmp_path)["method"] == "full"  # weights, no adapter_config.json

"""merge: the merged model equals the adapter model; a wrong adapter is refused."""
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

import merge
from common import REFERENCE, save_reference_logits


def make_adapter(base_dir, out, seed):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    # init_lora_weights=False: random B, so the adapter really changes the outputs
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  init_lora_weights=False)).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    prompts = [tokenizer("The capital of France is")["input_ids"], tokenizer("Two plus two is")["input_ids"]]
    save_reference_logits(peft_model, prompts, out)
    peft_model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_merged_model_reproduces_adapter_and_loads_with_plain_transformers(tiny_base, tmp_path):
    adapter = make_adapter(tiny_base, tmp_path / "adapter", seed=0)
    report = merge.merge(tiny_base, adapter, "float32", 1e-4, tmp_path / "merged")
    assert report["max_logit_diff_vs_adapter"] < 1e-4 and report["max_logit_diff_vs_training"] < 1e-4

    ids = torch.tensor([AutoTokenizer.from_pretrained(tiny_base)("The capital of France is")["input_ids"]])
    base_logits = AutoModelForCausalLM.from_pretrained(tiny_base)(input_ids=ids).logits
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (merged(input_ids=ids).logits - base_logits).abs().max() > 1e-2  # the adapter did change the model
    generator = pipeline("text-generation", model=str(tmp_path / "merged"), device="cpu")
    text = generator("The capital of France is", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("The capital of France is") and len(text) > len("The capital of France is")
    files = {path.name for path in (tmp_path / "merged").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= files


def test_wrong_adapter_fails_the_merge(tiny_base, tmp_path):
    adapter = make_adapter(tiny_base, tmp_path / "adapter", seed=0)
    other = make_adapter(tiny_base, tmp_path / "other", seed=1)
    shutil.copy(other / REFERENCE, adapter / REFERENCE)  # these weights are not what training produced
    with pytest.raises(SystemExit, match="vs_training"):
        merge.merge(tiny_base, adapter, "float32", 1e-4, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_too_coarse_dtype_for_the_tolerance_fails(tiny_base, tmp_path):
    adapter = make_adapter(tiny_base, tmp_path / "adapter", seed=0)
    with pytest.raises(SystemExit, match="too coarse"):
        merge.merge(tiny_base, adapter, "bfloat16", 1e-6, tmp_path / "merged")

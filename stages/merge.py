"""merge: turn what train wrote into one standalone Hugging Face model for deployment.

The base is loaded once, straight into `merge.dtype` on the `device` param's device (device.py), so the
stage never holds more than one copy of the model (peft computes each LoRA delta in float32 on the CPU
and adds it to the weight). By training method (`models/adapter/train_method.json`, or inferred from the
folder):
- lora: `merge_and_unload` into the base;
- qlora: the adapter was trained against the 4-bit base, so it is merged into a base whose linear
  weights are de-quantized from the same 4-bit code (bitsandbytes' own quantize/dequantize functions
  on plain tensors, one layer at a time; the model is never loaded in 4-bit and the adapter is never
  merged into 4-bit weights). That reproduces the trained model; merging into the original weights
  would not;
- full: nothing to merge, the trained model is the model;
- prompt_tuning: nothing to merge, the virtual tokens live outside the weights: the base is
  saved with the adapter in `prompt_adapter/` (load both with peft), and quantize skips.

Verified before anything is written: logits on held-out prompts must match (a) the adapter
model freshly loaded from disk (in the same dtype) and (b) the logits saved at the end of training, within
`merge.rtol[merge.dtype]` times the largest |logit| of those end-of-training logits (qlora's (b):
`merge.qlora_reference_rtol`, as bitsandbytes' 4-bit kernels computed those logits). Relative, because
rounding error grows with the logits' magnitude and the depth: a correct fp32 merge of SmolLM2-135M (30
layers, max |logit| ~40) differs by ~1.5e-4, of the 4-layer built-in base by ~1.5e-5. (b) catches an adapter
merged into the wrong base, or a stale one: their logits are off by a large fraction of the scale.
The folder gets safetensors (sharded past `merge.max_shard_size`), the tokenizer and chat
template and a generation config that stops at EOS; the model card is the `publish` stage's.
`metrics/merge.json` also records where it ran and its peak host / GPU memory.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from finetune.runtime import device
from finetune import ROOT
from finetune.models import provenance
from finetune.runtime.env import check_kernels, offline_by_default
from finetune.runtime.files import atomic_dir, require_complete, write_json, write_metrics
from finetune.runtime.stage import setup
from finetune.training.reference import REFERENCE, load_reference_logits
from finetune.params.merge import Merge

log = logging.getLogger("finetune.merge")

BASE = ROOT / "models" / "base"
ADAPTER = ROOT / "models" / "adapter"
OUT = ROOT / "models" / "merged"
METRICS = ROOT / "metrics" / "merge.json"
METHOD_FILE = "train_method.json"
PROMPT_ADAPTER = "prompt_adapter"
METHODS = ("lora", "qlora", "full", "prompt_tuning")


def training_method(adapter_dir) -> dict:
    """train_method.json when train wrote one, else what the folder holds."""
    adapter_dir = Path(adapter_dir)
    if (adapter_dir / METHOD_FILE).exists():
        info = json.loads((adapter_dir / METHOD_FILE).read_text())
    elif (adapter_dir / "adapter_config.json").exists():
        peft_type = json.loads((adapter_dir / "adapter_config.json").read_text())["peft_type"]
        info = {"method": {"LORA": "lora", "PROMPT_TUNING": "prompt_tuning"}.get(peft_type, peft_type.lower())}
    else:
        info = {"method": "full"}
    if info["method"] not in METHODS:
        raise SystemExit(f"merge: {adapter_dir} was trained with method {info['method']!r}; merge knows {METHODS}")
    return info


def dequantize_like_qlora(model, quantization: dict) -> None:
    """Replace each linear weight by its 4-bit round trip, as the QLoRA base saw it in training."""
    import bitsandbytes.functional as bnbf
    import torch

    quant_type = quantization.get("bnb_4bit_quant_type", "nf4")
    double_quant = quantization.get("bnb_4bit_use_double_quant", True)
    skip = set(quantization.get("llm_int8_skip_modules") or ["lm_head"])
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] not in skip and name not in skip:
            weight = module.weight.data
            packed, state = bnbf.quantize_4bit(weight.float(), blocksize=64, quant_type=quant_type,
                                               compress_statistics=double_quant)
            module.weight.data = bnbf.dequantize_4bit(packed, state).to(weight.dtype)
    log.info("qlora: merging into the base de-quantized from %s%s (bitsandbytes functions on plain tensors), "
             "never into 4-bit weights", quant_type, " + double quant" if double_quant else "")


def logits(model, ids):
    """On the CPU, in the model's dtype (a 152k vocabulary makes them large; compared in float32)."""
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids], device=model.device)).logits[0].cpu()


def max_logit_difference(model, references) -> float:
    return max((logits(model, ids).float() - expected.float()).abs().max().item() for ids, expected in references)


def fix_generation_config(model, tokenizer) -> None:
    """EOS includes the tokenizer's (the chat template's end of turn) and pad is set, so generation stops."""
    config = model.generation_config
    eos = config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.insert(0, tokenizer.eos_token_id)
    if not eos:
        raise SystemExit("merge: neither the tokenizer nor the generation config defines an EOS token; generation "
                         "would never stop. Give the base tokenizer an eos_token")
    config.eos_token_id = eos[0] if len(eos) == 1 else eos
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    if tokenizer.bos_token_id is not None:
        config.bos_token_id = tokenizer.bos_token_id
    if model.config.pad_token_id is None:
        model.config.pad_token_id = config.pad_token_id


def merge(base_dir, adapter_dir, dtype: str, rtol: float, out_dir, max_shard_size: str = "2GB",
          reference_rtol: float | None = None, where: str = "cpu") -> dict:
    """Pure core: build the deployable model for the training method in `dtype` on the device `where`,
    verify it, save it to out_dir.

    rtol bounds |logits| differences for `dtype`, as a fraction of the largest |logit| at the end of training;
    reference_rtol (default rtol) bounds the check against the end-of-training logits (for qlora those came
    from bitsandbytes' 4-bit kernels)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = training_method(adapter_dir)
    method, out_dir = info["method"], Path(out_dir)
    placement = device.Placement(where, dtype)
    log.info("training method: %s; merging on %s", method, placement)

    def base():
        model = AutoModelForCausalLM.from_pretrained(base_dir, **placement.load_kwargs())
        if method == "qlora":
            dequantize_like_qlora(model, info.get("quantization_config") or {})
        return model

    if not (Path(adapter_dir) / REFERENCE).exists():
        raise SystemExit(f"merge: {adapter_dir} has no {REFERENCE} (the end-of-training logits the merge is checked "
                         "against); rerun train (dvc repro train)")
    training = load_reference_logits(adapter_dir)
    if method == "full":
        model = AutoModelForCausalLM.from_pretrained(adapter_dir, **placement.load_kwargs()).eval()
    else:
        model = device.load_adapter(base(), adapter_dir).eval()
    fresh = [(ids, logits(model, ids)) for ids, _ in training]  # the trained model as loaded from disk
    if method in ("lora", "qlora"):
        model = model.merge_and_unload().eval()
    elif method == "prompt_tuning":
        log.info("prompt_tuning: nothing to merge (the virtual tokens are inputs, not weights); saving the base "
                 "with the adapter in %s/, and quantize will skip", PROMPT_ADAPTER)
    checks = {"max_logit_diff_vs_adapter": max_logit_difference(model, fresh),
              "max_logit_diff_vs_training": max_logit_difference(model, training)}
    scale = max(expected.float().abs().max().item() for _, expected in training)
    params = {"max_logit_diff_vs_adapter": (f"merge.rtol.{dtype}", rtol),
              "max_logit_diff_vs_training": ("merge.qlora_reference_rtol", reference_rtol) if reference_rtol
              else (f"merge.rtol.{dtype}", rtol)}
    log.info("%s logits vs adapter model: %.3g, vs end of training: %.3g (limits %s x max |logit| %.3g)", dtype,
             checks["max_logit_diff_vs_adapter"], checks["max_logit_diff_vs_training"],
             {name: f"{key}={value:g}" for name, (key, value) in params.items()}, scale)
    for name, difference in checks.items():
        key, value = params[name]
        if not difference <= value * scale:
            raise SystemExit(f"merge: the {method} model's logits differ by {difference:.3g} > {key}={value:g} x max "
                             f"|logit| {scale:.3g} = {value * scale:.3g} ({name}); the adapter was not trained on this "
                             f"base or is stale (rerun train), or the tolerance is too tight for {dtype}")
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    standalone = model.get_base_model() if method == "prompt_tuning" else model
    fix_generation_config(standalone, tokenizer)
    standalone.save_pretrained(out_dir, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out_dir)
    if (Path(base_dir) / "tokenizer.model").exists():  # transformers 5 never writes it; llama.cpp's Phi-3 converter reads it
        shutil.copy(Path(base_dir) / "tokenizer.model", out_dir / "tokenizer.model")
    if method == "prompt_tuning":
        model.save_pretrained(out_dir / PROMPT_ADAPTER)
        provenance.name_base_in(out_dir / PROMPT_ADAPTER, base_dir)  # peft's card names the folder the base came from
    shards = sorted(path.name for path in out_dir.glob("*.safetensors"))
    write_json(out_dir / METHOD_FILE, {**info, "merge_dtype": dtype})
    return {**checks, "max_abs_logit": round(scale, 4), "method": method,
            "parameters": sum(p.numel() for p in standalone.parameters()), "shards": len(shards),
            "size_bytes": sum((out_dir / name).stat().st_size for name in shards), **device.memory_metrics(placement)}


def main() -> None:
    params = setup("merge", {"merge": Merge})
    offline_by_default()
    import torch

    torch.set_num_threads(params.threads)
    adapter = require_complete(ADAPTER)
    info = training_method(adapter)
    cfg = params.merge
    placement = device.resolve(params.device, cfg.dtype)  # the saved dtype is merge.dtype's, whatever `dtype` says
    with atomic_dir(OUT) as tmp:
        report = merge(require_complete(BASE), adapter, cfg.dtype, getattr(cfg.rtol, cfg.dtype), tmp, cfg.max_shard_size,
                       reference_rtol=cfg.qlora_reference_rtol if info["method"] == "qlora" else None,
                       where=placement.device)
        if (adapter / "format.json").exists():
            shutil.copy(adapter / "format.json", tmp / "format.json")
    write_metrics(METRICS, {**report, "kernels": check_kernels(params.kernels)})
    log.info("merge done: %s in %s, max logit diff vs adapter %.3g (metrics/merge.json)", report["method"], report["dtype"],
             report["max_logit_diff_vs_adapter"])


if __name__ == "__main__":
    main()

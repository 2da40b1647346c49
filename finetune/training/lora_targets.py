"""lora_targets: what `train.lora.target_modules` presets mean for each model family.

Module names differ by family: Llama, Qwen2, Mistral and Gemma name their projections q_proj, k_proj,
v_proj, o_proj (and gate_proj, up_proj, down_proj); Phi-3 fuses them into qkv_proj and gate_up_proj;
GPT-NeoX has query_key_value and dense. A preset resolves against the linear layers the loaded model
really has, and a preset that matches none fails at once naming what the model has.
"""
from __future__ import annotations

import json
from pathlib import Path

from finetune.runtime.files import write_json

# preset -> candidate names, first match per role wins (unfused names, then fused ones)
PRESETS = {
    "attention": [["q_proj", "qkv_proj", "query_key_value", "c_attn"], ["v_proj"]],
    "attention_all": [["q_proj", "qkv_proj", "query_key_value", "c_attn"], ["k_proj"], ["v_proj"],
                      ["o_proj", "dense", "c_proj"]],
}


def linear_names(model) -> set[str]:
    import torch

    return {name.split(".")[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def resolve(preset, model):
    """peft `target_modules` for `preset` (a name from PRESETS, "all-linear", or an explicit list) on `model`."""
    if isinstance(preset, (list, tuple)):
        names = linear_names(model)
        missing = [name for name in preset if name not in names]
        if missing:
            raise SystemExit(f"train.lora.target_modules: {missing} are not linear layers of this model; "
                             f"it has {sorted(names)}")
        return list(preset)
    if preset == "all-linear":
        return "all-linear"
    names = linear_names(model)
    chosen = []
    for candidates in PRESETS[preset]:
        found = next((name for name in candidates if name in names), None)
        if found and found not in chosen:
            chosen.append(found)
    if not chosen:
        raise SystemExit(f"train.lora.target_modules={preset}: none of {PRESETS[preset]} is a linear layer of this "
                         f"model; it has {sorted(names)}: list the ones to adapt")
    return chosen


def sort_in(adapter_dir: Path | str) -> None:
    """peft writes adapter_config.json's `target_modules` from a set, in an order that changes with Python's
    per-process string hashing: sorted, the same training gives byte-identical adapters and checkpoints (and DVC
    stops at them). Called on the adapter and on every checkpoint."""
    config_path = Path(adapter_dir) / "adapter_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if isinstance(config.get("target_modules"), list):
            write_json(config_path, {**config, "target_modules": sorted(config["target_modules"])})

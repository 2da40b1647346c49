"""merge: fold the LoRA adapter into the base (`merge_and_unload`) and save a standalone model.

The merged model is checked in the stage: its logits on held-out prompts must match the
adapter model's within `merge.atol`, or the stage fails and nothing is written.
"""
from __future__ import annotations

import json
import logging

from common import ROOT, atomic_dir, offline_by_default, read_jsonl, require_complete, setup, write_json

log = logging.getLogger("finetune.merge")

BASE = ROOT / "models" / "base"
ADAPTER = ROOT / "models" / "adapter"
DATA = ROOT / "data" / "formatted"
OUT = ROOT / "models" / "merged"
METRICS = ROOT / "metrics" / "merge.json"


def max_logit_difference(model_a, model_b, prompts: list[list[int]]) -> float:
    import torch

    worst = 0.0
    with torch.no_grad():
        for ids in prompts:
            batch = torch.tensor([ids])
            worst = max(worst, (model_a(input_ids=batch).logits.float() - model_b(input_ids=batch).logits.float())
                        .abs().max().item())
    return worst


def merge(base_dir, adapter_dir, prompts: list[list[int]], dtype: str, atol: float, out_dir) -> dict:
    """Pure core: merge, verify against the adapter model, save to out_dir."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    adapter_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                              adapter_dir).eval()
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                       adapter_dir).merge_and_unload().to(torch_dtype).eval()
    difference = max_logit_difference(adapter_model, merged, prompts)
    log.info("merged vs adapter logits: max |diff| = %.3g (tolerance %.3g, dtype %s)", difference, atol, dtype)
    if not difference <= atol:
        raise SystemExit(f"merge: merged model's logits differ from the adapter model's by {difference:.3g} "
                         f"> merge.atol={atol}; the adapter does not belong to this base, or the dtype is too coarse")
    merged.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(out_dir)
    return {"max_logit_diff": difference, "dtype": dtype, "parameters": merged.num_parameters()}


def main() -> None:
    params = setup("merge")
    offline_by_default()
    import torch

    torch.set_num_threads(params.threads)
    prompts = [row["input_ids"] for row in read_jsonl(DATA / "test.jsonl")[:8]]
    with atomic_dir(OUT) as tmp:
        report = merge(require_complete(BASE), require_complete(ADAPTER), prompts, params.merge.dtype,
                       params.merge.atol, tmp)
        (tmp / "format.json").write_text((ADAPTER / "format.json").read_text())
        size = sum(path.stat().st_size for path in tmp.glob("*.safetensors"))
    report["size_bytes"] = size
    write_json(METRICS, report)
    log.info("merge: %s", json.dumps(report))


if __name__ == "__main__":
    main()

"""merge: fold the LoRA adapter into the base (`merge_and_unload`) and save a standalone model.

Verified in the stage, before anything is written: the merged model's logits must match
(a) the adapter model loaded from disk and (b) the logits the trained model produced at
the end of training (`reference_logits.safetensors`), within `merge.atol`. (b) catches an
adapter merged into the wrong base, or a stale adapter, which (a) alone cannot see.
"""
from __future__ import annotations

import json
import logging

from common import ROOT, atomic_dir, load_reference_logits, offline_by_default, require_complete, setup, write_json

log = logging.getLogger("finetune.merge")

BASE = ROOT / "models" / "base"
ADAPTER = ROOT / "models" / "adapter"
OUT = ROOT / "models" / "merged"
METRICS = ROOT / "metrics" / "merge.json"


def max_logit_difference(model, references) -> float:
    import torch

    worst = 0.0
    with torch.no_grad():
        for ids, expected in references:
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
            worst = max(worst, (logits - expected).abs().max().item())
    return worst


def merge(base_dir, adapter_dir, dtype: str, atol: float, out_dir) -> dict:
    """Pure core: merge, verify, save the standalone model to out_dir."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def adapter_model():
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        return PeftModel.from_pretrained(base, adapter_dir).eval()

    trained = load_reference_logits(adapter_dir)
    with torch.no_grad():
        reloaded = [(ids, adapter_model()(input_ids=torch.tensor([ids])).logits[0].float()) for ids, _ in trained]
    merged = adapter_model().merge_and_unload().to(getattr(torch, dtype)).eval()
    checks = {"max_logit_diff_vs_adapter": max_logit_difference(merged, reloaded),
              "max_logit_diff_vs_training": max_logit_difference(merged, trained)}
    log.info("merged logits vs adapter model: %(max_logit_diff_vs_adapter).3g, vs end of training: "
             "%(max_logit_diff_vs_training).3g", checks)
    for name, difference in checks.items():
        if not difference <= atol:
            raise SystemExit(f"merge: merged model's logits differ by {difference:.3g} > merge.atol={atol} ({name}); "
                             "the adapter was not trained on this base, or merge.dtype is too coarse for the tolerance")
    merged.generation_config.pad_token_id = merged.config.pad_token_id
    merged.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(out_dir)
    return {**checks, "dtype": dtype, "parameters": merged.num_parameters()}


def main() -> None:
    params = setup("merge")
    offline_by_default()
    import torch

    torch.set_num_threads(params.threads)
    with atomic_dir(OUT) as tmp:
        report = merge(require_complete(BASE), require_complete(ADAPTER), params.merge.dtype, params.merge.atol, tmp)
        (tmp / "format.json").write_text((ADAPTER / "format.json").read_text())
        report["size_bytes"] = sum(path.stat().st_size for path in tmp.glob("*.safetensors"))
    write_json(METRICS, report)
    log.info("merge: %s", json.dumps(report))


if __name__ == "__main__":
    main()

"""Logits of the trained model on a few held-out prompts, saved beside the adapter by train, so that
every later form of the model (merged, quantized) can be checked against them."""
from __future__ import annotations

from pathlib import Path

REFERENCE = "reference_logits.safetensors"
REFERENCE_PROMPTS, REFERENCE_TOKENS = 4, 64  # the logits of 4 held-out prompts of at most 64 tokens


def reference_prompts(rows: list[dict]) -> list[list[int]]:
    return [row["input_ids"][:REFERENCE_TOKENS] for row in rows[:REFERENCE_PROMPTS]]


def save_reference_logits(model, prompts: list[list[int]], folder: Path) -> None:
    import torch
    from safetensors.torch import save_file

    Path(folder).mkdir(parents=True, exist_ok=True)
    tensors = {}
    with torch.no_grad():
        for index, ids in enumerate(prompts):
            tensors[f"input_ids.{index}"] = torch.tensor(ids)
            logits = model(input_ids=torch.tensor([ids], device=getattr(model, "device", "cpu"))).logits
            tensors[f"logits.{index}"] = logits[0].float().cpu().contiguous()
    save_file(tensors, str(Path(folder) / REFERENCE))


def load_reference_logits(folder: Path) -> list[tuple[list[int], "object"]]:
    from safetensors.torch import load_file

    tensors = load_file(str(Path(folder) / REFERENCE))
    count = sum(name.startswith("input_ids.") for name in tensors)
    return [(tensors[f"input_ids.{i}"].tolist(), tensors[f"logits.{i}"]) for i in range(count)]

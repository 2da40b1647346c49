"""The trainer, LoRA target resolution, the memory plan and the reference logits every later model is checked against."""

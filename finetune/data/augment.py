"""Training-data augmentation for format (off unless `format.augment.enabled`).

Offline: each variant rewrites the first user turn with one of `instruction_templates` and may
swap the system prompt for one of `system_prompts`. With `augment.model` set, a generator model
paraphrases the instruction first (transformers `generate`, seeded). Choices come from a
random.Random seeded per row, so the same params give the same data.
"""
from __future__ import annotations

import logging

log = logging.getLogger("finetune.augment")

PARAPHRASE = ("Rewrite the following request in different words. Keep its meaning and every detail. "
              "Reply with the rewritten request only.\n\n{text}")


def variants(record: dict, cfg, rng, paraphraser=None) -> list[dict]:
    """`cfg.copies` augmented versions of a chat record (the original is not among them)."""
    messages = record["messages"]
    first_user = next((i for i, message in enumerate(messages) if message["role"] == "user"), None)
    if first_user is None:
        return []
    instruction = messages[first_user]["content"]
    rewritten = paraphraser([instruction] * cfg.copies) if paraphraser else [instruction] * cfg.copies
    out = []
    for copy, text in enumerate(rewritten, start=1):
        template = rng.choice(cfg.instruction_templates)
        system = rng.choice(cfg.system_prompts)
        new = [dict(message) for message in messages]
        new[first_user]["content"] = template.replace("{instruction}", text)
        if system is not None:
            new = [message for message in new if message["role"] != "system"]
            new.insert(0, {"role": "system", "content": system})
        out.append({**record, "id": f"{record['id']}#aug{copy}", "messages": new})
    return out


class Paraphraser:
    """A causal LM that paraphrases instructions; an empty or unusable output keeps the original."""

    def __init__(self, cfg, seed: int, threads: int = 1):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.cfg, self.seed = cfg, seed
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:  # generation only: padding is masked out by the attention mask
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32).eval()
        self.fallbacks = 0

    def prompt(self, text: str) -> str:
        request = PARAPHRASE.format(text=text)
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": request}], tokenize=False,
                                                      add_generation_prompt=True)
        return f"{request}\n\nRewritten request:"

    def __call__(self, texts: list[str]) -> list[str]:
        import torch

        torch.manual_seed(self.seed)
        encoded = self.tokenizer([self.prompt(text) for text in texts], return_tensors="pt", padding=True,
                                 add_special_tokens=False)
        sample = self.cfg.temperature > 0
        with torch.no_grad():
            generated = self.model.generate(**encoded, max_new_tokens=self.cfg.max_new_tokens, do_sample=sample,
                                            temperature=self.cfg.temperature if sample else None, top_p=None,
                                            top_k=None, pad_token_id=self.tokenizer.pad_token_id)
        outputs = self.tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        results = []
        for original, output in zip(texts, outputs):
            output = output.strip()
            self.fallbacks += not output
            results.append(output or original)
        return results

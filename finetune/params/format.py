"""`format`: templates, special tokens, truncation and augmentation."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator

from finetune.params.core import Float, Strict


class Augment(Strict):
    enabled: bool
    copies: int = Field(ge=1, le=10)  # extra variants per training row
    instruction_templates: list[str]
    system_prompts: list[Optional[str]]  # None: keep the row's own system turn (or none)
    model: Optional[str]  # generator (hub id or local folder) that paraphrases the instruction
    max_new_tokens: int = Field(gt=0)
    temperature: Float = Field(ge=0)  # 0: greedy

    @field_validator("instruction_templates")
    @classmethod
    def _has_slot(cls, value):
        if not value or any("{instruction}" not in template for template in value):
            raise ValueError("every template must contain {instruction}")
        return value


class Format(Strict):
    template: str  # tokenizer | chatml | alpaca | templates/<name>.jinja
    system_prompt: Optional[str]
    max_seq_len: int = Field(gt=8)
    overflow: Literal["truncate", "drop"]  # what happens to a row longer than max_seq_len
    train_on_prompt: bool
    pad_token: Optional[str]  # null: the tokenizer's own, or a non-EOS one chosen (see README)
    augment: Augment

    @field_validator("template")
    @classmethod
    def _known_template(cls, value):
        if value in ("tokenizer", "chatml", "alpaca"):
            return value
        if value.startswith("templates/") and value.endswith(".jinja") and ".." not in value:
            return value
        raise ValueError("must be tokenizer, chatml, alpaca, or a Jinja file templates/<name>.jinja "
                         "(the templates/ folder is a dvc.yaml dep of format)")


SECTION = Format

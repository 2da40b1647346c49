"""`quantize`: which deployable formats, their settings, and the quality each must keep."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from finetune.params.core import Float, Strict

QuantFormat = Literal["gguf_f16", "gguf_q8_0", "gguf_q4_0", "gguf_q4_k_m", "gptq", "awq", "bnb_int8"]


class Gptq(Strict):
    bits: Literal[2, 3, 4, 8]
    group_size: int = Field(ge=-1)  # -1: one group per row
    desc_act: bool
    calibration_rows: int = Field(gt=0)  # sampled from the training split, saved beside the model
    calibration_seed: int


class Awq(Strict):
    bits: Literal[4]  # the AWQ GEMM checkpoint transformers and vLLM load is 4-bit only
    group_size: int = Field(ge=-1)  # -1: one group per row
    calibration_rows: int = Field(gt=0)  # sampled from the training split, saved beside the model
    calibration_seed: int


class QualityCheck(Strict):
    """The quantize stage fails when an artifact is past these, measured against the merged model."""
    max_perplexity_drop_percent: Float = Field(gt=0)
    min_top1_agreement: Float = Field(ge=0, le=1)  # same argmax as the merged model, every test-sequence position


class Quantize(Strict):
    formats: list[QuantFormat] = Field(min_length=1)
    gptq: Gptq
    awq: Awq
    speed_new_tokens: int = Field(gt=0)  # tokens/s: greedy decode of this many tokens from a few test prompts
    checks: dict[QuantFormat, QualityCheck]

    @field_validator("formats")
    @classmethod
    def _unique(cls, value):
        if len(set(value)) != len(value):
            raise ValueError("lists a format twice")
        return value

    @model_validator(mode="after")
    def _every_format_checked(self):
        missing = [name for name in self.formats if name not in self.checks]
        if missing:
            raise ValueError(f"formats {missing} have no quality check: add quantize.checks.<format> "
                             "{max_perplexity_drop_percent, min_top1_agreement}")
        return self


SECTION = Quantize

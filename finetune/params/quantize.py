"""`quantize`: which deployable formats, their settings, and the quality each must keep."""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import Field, PlainValidator, field_validator, model_validator

from finetune.params.core import Float, Seed, Strict

QuantFormat = Literal["gguf_f16", "gguf_q8_0", "gguf_q4_0", "gguf_q4_k_m", "gptq", "awq", "bnb_int8"]


def _group_size(value):
    if value == "auto" or (type(value) is int and (value == -1 or value > 0)):
        return value
    raise ValueError("must be auto, -1 (one group per row) or a group size > 0")


# auto: the largest size the kernels take that divides every quantized layer's input width (finetune/export/gptq.py)
GroupSize = Annotated[Union[Literal["auto"], int], PlainValidator(_group_size)]


class Gptq(Strict):
    bits: Literal[2, 3, 4, 8]
    group_size: GroupSize  # -1: one group per row; auto: see GroupSize
    desc_act: bool
    calibration_rows: int = Field(gt=0)  # sampled from the training split, saved beside the model
    calibration_seed: Seed


class Awq(Strict):
    bits: Literal[4]  # the AWQ GEMM checkpoint transformers and vLLM load is 4-bit only
    group_size: GroupSize  # -1: one group per row; auto: see GroupSize
    calibration_rows: int = Field(gt=0)  # sampled from the training split, saved beside the model
    calibration_seed: Seed


class QualityCheck(Strict):
    """The quantize stage fails when an artifact is past these, measured against the merged model on the same rows."""
    max_perplexity_drop_percent: Float = Field(gt=0)  # perplexity increase on the test answers, in percent
    min_top1_agreement: Float = Field(ge=0, le=1)  # same argmax as the merged model where answer tokens are predicted


class Quantize(Strict):
    formats: list[QuantFormat] = Field(min_length=1)
    gptq: Gptq
    awq: Awq
    max_eval_rows: Optional[int] = Field(gt=0)  # each artifact is scored on this many test rows, evenly spaced; null: all
    speed_new_tokens: int = Field(gt=0)  # tokens/s: greedy decode of this many tokens from a few test prompts
    # the task metric (accuracy, exact match, pass@1) may fall by at most this many binomial standard errors of the
    # merged model's score on the rows scored: a smaller change is indistinguishable from the test split's noise
    max_task_drop_standard_errors: Float = Field(gt=0)
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

"""`evaluate`: the task metrics, their generation settings and the forgetting check."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from finetune.params.core import Float, Strict


class ClassificationEval(Strict):
    scoring: Literal["generate", "constrained", "likelihood"]  # parse the generated label; generate only label names
    # (greedy decoding restricted to the labels' tokens); or rank every label by its likelihood (one pass per label)
    labels: list[str]  # the classes; empty: every distinct reference of the test split


class CodingEval(Strict):
    prompting: Literal["chat", "completion"]  # the templated chat turn, or the code prompt continued as text
    num_samples: int = Field(gt=0)  # programs per problem (n of pass@k); 1 = greedy, more = sampled
    k: list[int] = Field(min_length=1)  # pass@k reported for each k <= num_samples
    temperature: Float = Field(gt=0)
    top_p: Float = Field(gt=0, le=1)
    timeout_seconds: Float = Field(gt=0)  # per program, wall clock
    memory_mb: int = Field(ge=64)  # address-space limit per program
    general_problems: Optional[int] = Field(gt=0)  # per coding task of evaluate.general.tasks; null = all
    general_max_new_tokens: int = Field(gt=0)  # generation length for those tasks (greedy, pass@1)

    @model_validator(mode="after")
    def _k_fits(self):
        if any(k <= 0 or k > self.num_samples for k in self.k):
            raise ValueError(f"every k must be in 1..num_samples ({self.num_samples}), got {self.k}")
        return self


class GeneralEval(Strict):
    """The forgetting check: general scores before and after fine-tuning, each drop with a paired 95% interval."""
    tasks: list[str]  # lm-eval tasks: data/general/*.yaml (offline), or any harness task (network)
    limit: Optional[int] = Field(gt=0)  # documents per task (spread over a wheel benchmark's file); null = all
    max_drop: Float = Field(ge=0)  # worst allowed fall of a task's reported score at its point estimate
    on_drop: Literal["warn", "fail"]  # what a drop past max_drop does (the verdict also says if it is significant)


class Evaluate(Strict):
    task: Literal["classification", "generation", "qa", "coding"]
    max_new_tokens: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    num_examples: int = Field(ge=0)  # predictions saved for humans
    classification: ClassificationEval
    coding: CodingEval
    general: GeneralEval


SECTION = Evaluate

"""`dedup_filter`: duplicate removal and quality filters."""
from __future__ import annotations

from typing import Optional

from pydantic import Field, field_validator

from finetune.params.core import Float, Strict


class NearDedup(Strict):
    enabled: bool
    threshold: Float = Field(gt=0, le=1)
    num_perm: int = Field(ge=16, le=1024)
    shingle_size: int = Field(gt=0)  # words per shingle


class Language(Strict):
    enabled: bool
    allowed: list[str] = Field(min_length=1)  # ISO 639-1 codes known to py3langid
    min_confidence: Float = Field(ge=0, le=1)  # below it a row is kept: short texts are ambiguous


class Toxicity(Strict):
    enabled: bool
    word_list: Optional[str]  # one word or phrase a line; under data/filters/
    max_matches: int = Field(ge=0)  # a row with more listed words than this is removed
    model: Optional[str]  # a text-classification model (hub id or local folder) scored on top
    labels: list[str]  # the model's labels that mean toxic
    threshold: Float = Field(gt=0, le=1)

    @field_validator("word_list")
    @classmethod
    def _under_filters(cls, value):
        if value is not None and not (value.startswith("data/filters/") and ".." not in value):
            raise ValueError("must be a file under data/filters/ (a dvc.yaml dep of dedup_filter)")
        return value


class DedupFilter(Strict):
    exact: bool
    near: NearDedup
    min_chars: int = Field(ge=0)
    max_chars: Optional[int] = Field(gt=0)  # null: no upper bound
    min_tokens: int = Field(ge=0)  # counted with the base tokenizer
    max_tokens: Optional[int] = Field(gt=0)
    language: Language
    toxicity: Toxicity
    histogram_bin_tokens: int = Field(gt=0)  # bucket width of metrics/data_lengths.csv

    @field_validator("max_chars", "max_tokens")
    @classmethod
    def _bounds_in_order(cls, value, info):
        low = info.field_name.replace("max_", "min_")
        if value is not None and info.data.get(low, 0) > value:
            raise ValueError(f"must not be below {low} ({info.data[low]})")
        return value


SECTION = DedupFilter

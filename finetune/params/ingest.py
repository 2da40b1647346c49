"""`ingest`: where the task data comes from and how it is split."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from finetune.params.core import Float, Strict


class Source(Strict):
    """One entry of `ingest.sources`. A list item cannot carry its defaults in params.yaml, so the
    optional per-source fields default here (documented in README "Params reference")."""

    path: Optional[str] = None  # local file, relative to the repo root (under data/raw/ so that DVC tracks it)
    hub: Optional[str] = None  # Hugging Face dataset id (needs network)
    split: str = "train"
    format: Literal["auto", "alpaca", "sharegpt", "messages", "text", "classification"] = "auto"
    columns: dict[str, str] = {}  # user column -> our field name
    max_rows: Optional[int] = Field(None, gt=0)  # read at most this many good rows
    weight: Float = Field(1.0, gt=0, le=100)  # training-set sampling weight (format applies it, after dedup)

    @model_validator(mode="after")
    def _one_location(self):
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of `path` (a local file) or `hub` (a dataset id)")
        return self


class Ingest(Strict):
    sources: list[Source] = Field(min_length=1)
    eval_fraction: Float = Field(ge=0, lt=0.5)
    test_fraction: Float = Field(gt=0, lt=0.5)
    max_eval_rows: Optional[int] = Field(gt=0)  # cap: the rest of the eval share goes to train
    max_test_rows: Optional[int] = Field(gt=0)
    max_bad_fraction: Float = Field(ge=0, le=1)


SECTION = Ingest

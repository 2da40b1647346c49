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
    format: Literal["auto", "alpaca", "sharegpt", "messages", "text", "classification", "humaneval", "mbpp"] = "auto"
    columns: dict[str, str] = {}  # user column -> our field name
    max_rows: Optional[int] = Field(None, gt=0)  # read at most this many good rows
    weight: Float = Field(1.0, gt=0, le=100)  # training-set sampling weight (format applies it, after dedup)
    fixed_split: Optional[Literal["train", "eval", "test"]] = None  # every row to this split (a benchmark: test)

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

    @model_validator(mode="after")
    def _caps_keep_fixed_rows(self):
        for index, source in enumerate(self.sources):
            cap = {"eval": self.max_eval_rows, "test": self.max_test_rows}.get(source.fixed_split)
            if cap is not None:
                name = f"max_{source.fixed_split}_rows"
                raise ValueError(f"sources[{index}].fixed_split is {source.fixed_split}, but {name} ({cap}) would move "
                                 f"some of its rows to train; set {name}: null, or max_rows on the source for a subset")
        return self


SECTION = Ingest

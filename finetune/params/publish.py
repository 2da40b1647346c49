"""`publish`: what the model card says beyond what the artifacts record."""
from __future__ import annotations

from typing import Optional

from pydantic import Field

from finetune.params.core import Strict


class Publish(Strict):
    license: Optional[str] = Field(min_length=1)  # the Hub's license id (apache-2.0, mit, llama3, other, ...); null: unknown
    name: Optional[str] = Field(min_length=1)  # the model's name on the card; null: "<base>-<method>-finetune"


SECTION = Publish

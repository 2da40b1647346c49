"""`merge`: the dtype of the deployable model and how close it must stay to the adapter model."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from finetune.params.core import Float, Strict


class MergeTolerance(Strict):
    """Max |logit difference| of the merged model vs the adapter model, for each merge.dtype."""
    float32: Float = Field(gt=0)
    float16: Float = Field(gt=0)
    bfloat16: Float = Field(gt=0)


class Merge(Strict):
    dtype: Literal["float32", "float16", "bfloat16"]
    atol: MergeTolerance
    # QLoRA: the end-of-training logits came from bitsandbytes' 4-bit kernels, not exact fp32 math (measured on the
    # default task: 0.06 merged into the de-quantized base; 1.3 into the original weights, 1.9 with the wrong 4-bit type)
    qlora_reference_atol: Float = Field(gt=0)
    max_shard_size: str = Field(pattern=r"^\d+(\.\d+)?[KMG]i?B$")  # safetensors shards past this size


SECTION = Merge

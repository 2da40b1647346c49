"""`merge`: the dtype of the deployable model and how close it must stay to the adapter model."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from finetune.params.core import Float, Strict


class MergeTolerance(Strict):
    """Max |logit difference| of the merged model vs the adapter model for each merge.dtype, as a fraction of the
    largest |logit| of the end-of-training logits: rounding error grows with the logits' magnitude and the depth,
    so one absolute number cannot serve a 4-layer toy and a 30-layer model (README "Merge")."""
    float32: Float = Field(gt=0, lt=1)
    float16: Float = Field(gt=0, lt=1)
    bfloat16: Float = Field(gt=0, lt=1)


class Merge(Strict):
    dtype: Literal["float32", "float16", "bfloat16"]
    rtol: MergeTolerance
    # QLoRA: the end-of-training logits came from bitsandbytes' 4-bit kernels, not exact fp32 math (measured on the
    # default task, max |logit| 10.7: 0.0056 of it merged into the de-quantized base; 0.12 into the original
    # weights, 0.18 with the wrong 4-bit type)
    qlora_reference_rtol: Float = Field(gt=0, lt=1)
    max_shard_size: str = Field(pattern=r"^\d+(\.\d+)?[KMG]i?B$")  # safetensors shards past this size


SECTION = Merge

"""`train`: the method, its adapter and the optimisation knobs."""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, model_validator

from finetune.params.core import Float, Strict


class Lora(Strict):
    """Used by `method: lora` and `method: qlora`."""

    r: int = Field(gt=0)
    alpha: Float = Field(gt=0)
    dropout: Float = Field(ge=0, lt=1)
    target_modules: Union[Literal["attention", "attention_all", "all-linear"], list[str]]
    bias: Literal["none", "all", "lora_only"]
    use_rslora: bool  # scale by alpha/sqrt(r) instead of alpha/r
    use_dora: bool  # weight-decomposed LoRA (peft)


class QLora(Strict):
    """The 4-bit base of `method: qlora` (bitsandbytes); the adapter itself is `train.lora`."""

    quant_type: Literal["nf4", "fp4"]
    double_quant: bool
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"]  # auto: the run's dtype (device.py)


class PromptTuning(Strict):
    num_virtual_tokens: int = Field(gt=0)
    init_text: Optional[str] = Field(min_length=1)  # null: random init


class Train(Strict):
    method: Literal["full", "lora", "qlora", "prompt_tuning"]
    learning_rate: Float = Field(gt=0, le=1)
    num_epochs: Float = Field(gt=0)
    max_steps: int = Field(ge=-1)  # -1: run num_epochs
    batch_size: int = Field(gt=0)  # per device; with packing: packed rows per device
    gradient_accumulation_steps: int = Field(gt=0)
    scheduler: Literal["cosine", "linear", "constant_with_warmup", "polynomial"]
    warmup_ratio: Float = Field(ge=0, lt=1)
    weight_decay: Float = Field(ge=0)
    max_grad_norm: Float = Field(gt=0)
    optimizer: Literal["adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit"]
    bf16: bool
    fp16: bool  # needs a CUDA GPU
    gradient_checkpointing: bool
    group_by_length: bool  # batches of similar length: little padding, no cross-example attention
    packing: bool  # several examples per row, each attending only to itself (position ids)
    packing_length: int = Field(gt=8)  # tokens per packed row
    logging_steps: int = Field(gt=0)
    eval_steps: int = Field(ge=0)  # 0: eval loss only at the end
    checkpoint_steps: int = Field(ge=0)  # 0: no checkpoints (an interrupted run starts over)
    keep_checkpoints: int = Field(gt=0)
    num_processes: int = Field(gt=0)  # > 1: several processes through `accelerate launch`, with `distributed`
    distributed: Literal["ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3"]  # configs/accelerate/<name>.yaml
    threads: Optional[int] = Field(gt=0)  # torch threads per process; null: the top-level `threads`
    lora: Lora
    qlora: QLora
    prompt_tuning: PromptTuning

    @model_validator(mode="after")
    def _compatible(self):
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are both true; choose at most one mixed precision")
        if self.packing and self.method == "prompt_tuning":
            raise ValueError("packing needs position ids, which peft prompt tuning ignores; set packing: false")
        # bitsandbytes' 8-bit optimizer state is neither sharded nor gathered by FSDP (bitsandbytes issue #89;
        # peft's FSDP guide: paged_adamw_8bit fails when saving a checkpoint)
        if self.num_processes > 1 and self.distributed == "fsdp2" and self.optimizer != "adamw_torch":
            raise ValueError(f"optimizer {self.optimizer} (bitsandbytes 8-bit state) does not work with distributed: "
                             "fsdp2; use optimizer: adamw_torch (FSDP shards its state), or distributed: ddp")
        return self


SECTION = Train

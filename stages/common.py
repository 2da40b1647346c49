"""Shared helpers for every stage: the params schema, atomic writes, logging, seeding.

Kept free of heavy imports so that `params.yaml` is validated in well under a second,
before any model or dataset is touched.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ROOT = Path(__file__).resolve().parents[1]
PARAMS_FILE = ROOT / "params.yaml"
COMPLETE = ".complete"  # marker written last inside every output directory

log = logging.getLogger("finetune")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


# --------------------------------------------------------------------------- schema
class Builtin(Strict):
    """The tiny Llama the project builds itself when `model.base: builtin`."""

    seed: int = 0  # its own seed, so a sweep over the training seed does not rebuild the base
    vocab_size: int = Field(2048, ge=256, le=65536)
    hidden_size: int = Field(128, gt=0, multiple_of=64)  # bitsandbytes CPU 4-bit kernels want x64
    intermediate_size: int = Field(384, gt=0, multiple_of=64)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    max_position_embeddings: int = Field(512, gt=0)
    pretrain_steps: int = Field(300, ge=0)
    pretrain_batch_size: int = Field(8, gt=0)
    pretrain_block_size: int = Field(256, gt=8)
    pretrain_learning_rate: float = Field(3e-3, gt=0)

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        return self


class ModelParams(Strict):
    base: str = Field("builtin", min_length=1)  # "builtin", a local folder, or a Hugging Face id
    revision: Optional[str] = None  # pin for a hub id: branch, tag or commit sha
    builtin: Builtin = Builtin()


class Source(Strict):
    path: Optional[str] = None  # local file, relative to the repo root (under data/raw/ so that DVC tracks it)
    hub: Optional[str] = None  # Hugging Face dataset id (needs network)
    split: str = "train"
    format: Literal["auto", "alpaca", "sharegpt", "messages", "text", "classification"] = "auto"
    columns: dict[str, str] = {}  # user column -> our field name
    max_rows: Optional[int] = Field(None, gt=0)  # read at most this many good rows
    weight: float = Field(1.0, gt=0, le=100)  # training-set sampling weight (format applies it, after dedup)

    @model_validator(mode="after")
    def _one_location(self):
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of `path` (a local file) or `hub` (a dataset id)")
        return self


class Ingest(Strict):
    sources: list[Source] = Field(min_length=1)
    eval_fraction: float = Field(0.1, ge=0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0, lt=0.5)
    max_eval_rows: Optional[int] = Field(None, gt=0)  # cap: the rest of the eval share goes to train
    max_test_rows: Optional[int] = Field(None, gt=0)
    max_bad_fraction: float = Field(0.05, ge=0, le=1)


class NearDedup(Strict):
    enabled: bool = True
    threshold: float = Field(0.8, gt=0, le=1)
    num_perm: int = Field(128, ge=16, le=1024)
    shingle_size: int = Field(3, gt=0)  # words per shingle


class Language(Strict):
    enabled: bool = True
    allowed: list[str] = Field(["en"], min_length=1)  # ISO 639-1 codes known to py3langid
    min_confidence: float = Field(0.5, ge=0, le=1)  # below it a row is kept: short texts are ambiguous


class Toxicity(Strict):
    enabled: bool = True
    word_list: Optional[str] = "data/filters/toxic_words.txt"  # one word or phrase a line; under data/filters/
    max_matches: int = Field(0, ge=0)  # a row with more listed words than this is removed
    model: Optional[str] = None  # a text-classification model (hub id or local folder) scored on top
    labels: list[str] = ["toxic"]  # the model's labels that mean toxic
    threshold: float = Field(0.5, gt=0, le=1)

    @field_validator("word_list")
    @classmethod
    def _under_filters(cls, value):
        if value is not None and not (value.startswith("data/filters/") and ".." not in value):
            raise ValueError("must be a file under data/filters/ (a dvc.yaml dep of dedup_filter)")
        return value


class DedupFilter(Strict):
    exact: bool = True
    near: NearDedup = NearDedup()
    min_chars: int = Field(1, ge=0)
    max_chars: Optional[int] = Field(4000, gt=0)  # null: no upper bound
    min_tokens: int = Field(0, ge=0)  # counted with the base tokenizer
    max_tokens: Optional[int] = Field(None, gt=0)
    language: Language = Language()
    toxicity: Toxicity = Toxicity()
    histogram_bin_tokens: int = Field(8, gt=0)  # bucket width of metrics/data_lengths.csv

    @field_validator("max_chars", "max_tokens")
    @classmethod
    def _bounds_in_order(cls, value, info):
        low = info.field_name.replace("max_", "min_")
        if value is not None and info.data.get(low, 0) > value:
            raise ValueError(f"must not be below {low} ({info.data[low]})")
        return value


class Augment(Strict):
    enabled: bool = False
    copies: int = Field(1, ge=1, le=10)  # extra variants per training row
    instruction_templates: list[str] = ["{instruction}", "Task: {instruction}", "{instruction}\n\nAnswer briefly.",
                                        "Please help with the following.\n\n{instruction}"]
    system_prompts: list[Optional[str]] = [None]  # None: keep the row's own system turn (or none)
    model: Optional[str] = None  # generator (hub id or local folder) that paraphrases the instruction
    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(0.7, ge=0)  # 0: greedy

    @field_validator("instruction_templates")
    @classmethod
    def _has_slot(cls, value):
        if not value or any("{instruction}" not in template for template in value):
            raise ValueError("every template must contain {instruction}")
        return value


class Format(Strict):
    template: str = "tokenizer"  # tokenizer | chatml | alpaca | templates/<name>.jinja
    system_prompt: Optional[str] = None
    max_seq_len: int = Field(256, gt=8)
    overflow: Literal["truncate", "drop"] = "truncate"  # what happens to a row longer than max_seq_len
    train_on_prompt: bool = False
    pad_token: Optional[str] = None  # null: the tokenizer's own, or a non-EOS one chosen (see README)
    augment: Augment = Augment()

    @field_validator("template")
    @classmethod
    def _known_template(cls, value):
        if value in ("tokenizer", "chatml", "alpaca"):
            return value
        if value.startswith("templates/") and value.endswith(".jinja") and ".." not in value:
            return value
        raise ValueError("must be tokenizer, chatml, alpaca, or a Jinja file templates/<name>.jinja "
                         "(the templates/ folder is a dvc.yaml dep of format)")


class Lora(Strict):
    """Used by `method: lora` and `method: qlora`."""

    r: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Union[Literal["attention", "attention_all", "all-linear"], list[str]] = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False  # scale by alpha/sqrt(r) instead of alpha/r
    use_dora: bool = False  # weight-decomposed LoRA (peft)

    @field_validator("alpha", mode="before")
    @classmethod
    def _int_is_float(cls, value):
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


class QLora(Strict):
    """The 4-bit base of `method: qlora` (bitsandbytes); the adapter itself is `train.lora`."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class PromptTuning(Strict):
    num_virtual_tokens: int = Field(16, gt=0)
    init_text: Optional[str] = Field(None, min_length=1)  # null: random init


class Train(Strict):
    method: Literal["full", "lora", "qlora", "prompt_tuning"] = "lora"
    learning_rate: float = Field(3e-3, gt=0, le=1)
    num_epochs: float = Field(3, gt=0)
    max_steps: int = Field(-1, ge=-1)  # -1: run num_epochs
    batch_size: int = Field(16, gt=0)  # per device; with packing: packed rows per device
    gradient_accumulation_steps: int = Field(1, gt=0)
    scheduler: Literal["cosine", "linear", "constant_with_warmup", "polynomial"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    optimizer: Literal["adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit"] = "adamw_torch"
    bf16: bool = False
    fp16: bool = False  # needs a CUDA GPU
    gradient_checkpointing: bool = False
    group_by_length: bool = True  # batches of similar length: little padding, no cross-example attention
    packing: bool = False  # several examples per row, each attending only to itself (position ids)
    packing_length: int = Field(512, gt=8)  # tokens per packed row
    logging_steps: int = Field(10, gt=0)
    eval_steps: int = Field(0, ge=0)  # 0: eval loss only at the end
    checkpoint_steps: int = Field(50, ge=0)  # 0: no checkpoints (an interrupted run starts over)
    keep_checkpoints: int = Field(2, gt=0)
    num_processes: int = Field(1, gt=0)  # > 1: data parallel through `accelerate launch` (DDP)
    threads: Optional[int] = Field(None, gt=0)  # torch threads per process; null: the top-level `threads`
    lora: Lora = Lora()
    qlora: QLora = QLora()
    prompt_tuning: PromptTuning = PromptTuning()

    @field_validator("learning_rate", "num_epochs", "warmup_ratio", "weight_decay", "max_grad_norm", mode="before")
    @classmethod
    def _int_is_float(cls, value):
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _compatible(self):
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are both true; choose at most one mixed precision")
        if self.packing and self.method == "prompt_tuning":
            raise ValueError("packing needs position ids, which peft prompt tuning ignores; set packing: false")
        return self


class ClassificationEval(Strict):
    scoring: Literal["generate", "likelihood"] = "generate"  # parse the generated label, or rank labels by likelihood
    labels: list[str] = []  # the classes; empty: every distinct reference of the test split


class CodingEval(Strict):
    num_samples: int = Field(1, gt=0)  # programs per problem (n of pass@k); 1 = greedy, more = sampled
    k: list[int] = Field([1], min_length=1)  # pass@k reported for each k <= num_samples
    temperature: float = Field(0.8, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    timeout_seconds: float = Field(5.0, gt=0)  # per program, wall clock
    memory_mb: int = Field(512, ge=64)  # address-space limit per program

    @field_validator("temperature", "top_p", "timeout_seconds", mode="before")
    @classmethod
    def _int_is_float(cls, value):
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _k_fits(self):
        if any(k <= 0 or k > self.num_samples for k in self.k):
            raise ValueError(f"every k must be in 1..num_samples ({self.num_samples}), got {self.k}")
        return self


class GeneralEval(Strict):
    tasks: list[str] = ["general_knowledge"]  # lm-eval tasks: data/general/*.yaml, or any harness task (network)
    limit: Optional[int] = Field(None, gt=0)  # documents per task; null = all
    max_drop: float = Field(0.05, ge=0)  # worst allowed fall of a general score after fine-tuning
    on_drop: Literal["warn", "fail"] = "warn"

    @field_validator("max_drop", mode="before")
    @classmethod
    def _int_is_float(cls, value):
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


class Evaluate(Strict):
    task: Literal["classification", "generation", "qa", "coding"] = "classification"
    max_new_tokens: int = Field(8, gt=0)
    batch_size: int = Field(32, gt=0)
    num_examples: int = Field(8, ge=0)  # predictions saved for humans
    classification: ClassificationEval = ClassificationEval()
    coding: CodingEval = CodingEval()
    general: GeneralEval = GeneralEval()


def _floats(value):  # YAML writes 1 for 1.0; strict floats would refuse it
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


class MergeTolerance(Strict):
    """Max |logit difference| of the merged model vs the adapter model, for each merge.dtype."""
    float32: float = Field(1e-4, gt=0)
    float16: float = Field(0.05, gt=0)
    bfloat16: float = Field(0.5, gt=0)

    @field_validator("float32", "float16", "bfloat16", mode="before")
    @classmethod
    def _int_is_float(cls, value):
        return _floats(value)


class Merge(Strict):
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    atol: MergeTolerance = MergeTolerance()
    # QLoRA: the end-of-training logits came from bitsandbytes' 4-bit kernels, not exact fp32 math (measured on the
    # default task: 0.06 merged into the de-quantized base; 1.3 into the original weights, 1.9 with the wrong 4-bit type)
    qlora_reference_atol: float = Field(0.25, gt=0)
    max_shard_size: str = Field("2GB", pattern=r"^\d+(\.\d+)?[KMG]i?B$")  # safetensors shards past this size

    @field_validator("qlora_reference_atol", mode="before")
    @classmethod
    def _int_is_float(cls, value):
        return _floats(value)


QuantFormat = Literal["gguf_f16", "gguf_q8_0", "gguf_q4_0", "gguf_q4_k_m", "gptq", "bnb_int8"]


class Gptq(Strict):
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = Field(128, ge=-1)  # -1: one group per row
    desc_act: bool = False
    calibration_rows: int = Field(128, gt=0)  # sampled from the training split, saved beside the model
    calibration_seed: int = 0


class QualityCheck(Strict):
    """The quantize stage fails when an artifact is past these, measured against the merged model."""
    max_perplexity_drop_percent: float = Field(gt=0)
    min_top1_agreement: float = Field(ge=0, le=1)  # same argmax as the merged model, every test-sequence position

    @field_validator("max_perplexity_drop_percent", "min_top1_agreement", mode="before")
    @classmethod
    def _int_is_float(cls, value):
        return _floats(value)


QUALITY_CHECKS = {"gguf_f16": (0.01, 0.999), "gguf_q8_0": (0.2, 0.97), "gguf_q4_0": (3.0, 0.9), "gguf_q4_k_m": (3.0, 0.9),
                  "gptq": (3.0, 0.9), "bnb_int8": (0.2, 0.99)}


class Quantize(Strict):
    formats: list[QuantFormat] = Field(["gguf_q8_0", "gguf_q4_k_m", "gptq"], min_length=1)
    gptq: Gptq = Gptq()
    speed_new_tokens: int = Field(32, gt=0)  # tokens/s: greedy decode of this many tokens from a few test prompts
    checks: dict[QuantFormat, QualityCheck] = {name: QualityCheck(max_perplexity_drop_percent=drop, min_top1_agreement=agree)
                                               for name, (drop, agree) in QUALITY_CHECKS.items()}

    @field_validator("formats")
    @classmethod
    def _unique(cls, value):
        if len(set(value)) != len(value):
            raise ValueError("lists a format twice")
        return value

    @model_validator(mode="after")
    def _default_checks(self):  # a format left out of `checks` keeps its default thresholds
        for name, (drop, agree) in QUALITY_CHECKS.items():
            self.checks.setdefault(name, QualityCheck(max_perplexity_drop_percent=drop, min_top1_agreement=agree))
        return self


class Params(Strict):
    seed: int = 42
    threads: int = Field(1, gt=0)  # torch threads: one is often fastest on a shared 2-core box
    model: ModelParams = ModelParams()
    ingest: Ingest
    dedup_filter: DedupFilter = DedupFilter()
    format: Format = Format()
    train: Train = Train()
    evaluate: Evaluate = Evaluate()
    merge: Merge = Merge()
    quantize: Quantize = Quantize()


class ParamsError(ValueError):
    pass


def _describe(error) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key (check its spelling; see the params reference in README.md)"
    if error["type"] == "missing":
        return f"{where}: required key is missing"
    return f"{where}: {message}, got {error.get('input')!r}"


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; every problem is reported at once, by key path."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = "\n".join(f"  - {_describe(error)}" for error in exc.errors())
        raise ParamsError(f"{path} has {exc.error_count()} problem(s):\n{problems}") from None


# --------------------------------------------------------------------------- runtime
def setup(stage: str, params_path: Path | str = PARAMS_FILE) -> Params:
    """Logging, validated params, logged once; every stage starts here."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [%(name)s] %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    try:
        params = load_params(params_path)
    except ParamsError as exc:
        log.error("%s", exc)
        raise SystemExit(2) from None
    log.info("stage %s, params: %s", stage, json.dumps(params.model_dump(), sort_keys=True))
    return params


def seed_everything(seed: int, threads: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def offline_by_default() -> None:
    """The default pipeline never touches the network; a hub id in params opts in."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --------------------------------------------------------------------------- atomic outputs
def write_text(path: Path | str, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path | str, data) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_jsonl(path: Path | str, rows) -> None:
    write_text(path, "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows))


def read_jsonl(path: Path | str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@contextlib.contextmanager
def atomic_dir(path: Path | str):
    """Yield a temp directory beside `path`; on success it gets a completeness marker and
    replaces `path` in one rename, so a crash never leaves a half-written model behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        (tmp / COMPLETE).write_text("ok\n")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def require_complete(path: Path | str) -> Path:
    """A model directory is only used if the stage that wrote it finished."""
    path = Path(path)
    if not (path / COMPLETE).exists():
        raise SystemExit(f"{path} is missing or incomplete (no {COMPLETE} marker): rerun the stage that writes it (dvc repro)")
    return path


# --------------------------------------------------------------------------- reference logits
REFERENCE = "reference_logits.safetensors"


def save_reference_logits(model, prompts: list[list[int]], folder: Path) -> None:
    """Logits of the trained model on a few held-out prompts, saved beside the adapter so that
    every later form of the model (merged, quantized) can be checked against them."""
    import torch
    from safetensors.torch import save_file

    Path(folder).mkdir(parents=True, exist_ok=True)

    tensors = {}
    with torch.no_grad():
        for index, ids in enumerate(prompts):
            tensors[f"input_ids.{index}"] = torch.tensor(ids)
            tensors[f"logits.{index}"] = model(input_ids=torch.tensor([ids])).logits[0].float().contiguous()
    save_file(tensors, str(Path(folder) / REFERENCE))


def load_reference_logits(folder: Path) -> list[tuple[list[int], "object"]]:
    from safetensors.torch import load_file

    tensors = load_file(str(Path(folder) / REFERENCE))
    count = sum(name.startswith("input_ids.") for name in tensors)
    return [(tensors[f"input_ids.{i}"].tolist(), tensors[f"logits.{i}"]) for i in range(count)]


if __name__ == "__main__":  # `python stages/common.py`: the check_params stage
    setup("check_params")

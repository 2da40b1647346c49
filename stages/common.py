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
    path: Optional[str] = None
    hub: Optional[str] = None
    split: str = "train"
    format: Literal["auto", "alpaca", "sharegpt", "messages", "text"] = "auto"
    columns: dict[str, str] = {}  # user column -> our field name
    max_rows: Optional[int] = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_location(self):
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of `path` (a local file) or `hub` (a dataset id)")
        return self


class Ingest(Strict):
    sources: list[Source] = Field(min_length=1)
    eval_fraction: float = Field(0.1, ge=0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0, lt=0.5)
    max_bad_fraction: float = Field(0.05, ge=0, le=1)


class NearDedup(Strict):
    enabled: bool = True
    threshold: float = Field(0.8, gt=0, le=1)
    num_perm: int = Field(128, ge=16, le=1024)
    shingle_size: int = Field(3, gt=0)  # words per shingle


class DedupFilter(Strict):
    exact: bool = True
    near: NearDedup = NearDedup()
    min_chars: int = Field(1, ge=0)
    max_chars: int = Field(4000, gt=0)


class Format(Strict):
    template: Literal["tokenizer", "chatml", "alpaca"] = "tokenizer"
    system_prompt: Optional[str] = None
    max_seq_len: int = Field(256, gt=8)
    train_on_prompt: bool = False


class Lora(Strict):
    r: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Union[Literal["attention", "attention_all", "all-linear"], list[str]] = "all-linear"

    @field_validator("alpha", mode="before")
    @classmethod
    def _int_is_float(cls, value):
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


class Train(Strict):
    method: Literal["lora"] = "lora"
    learning_rate: float = Field(2e-3, gt=0, le=1)
    num_epochs: float = Field(3, gt=0)
    max_steps: int = Field(-1, ge=-1)  # -1: run num_epochs
    batch_size: int = Field(16, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    scheduler: Literal["cosine", "linear", "constant_with_warmup", "polynomial"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    logging_steps: int = Field(10, gt=0)
    lora: Lora = Lora()

    @field_validator("learning_rate", "num_epochs", "warmup_ratio", "weight_decay", "max_grad_norm", mode="before")
    @classmethod
    def _int_is_float(cls, value):
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


class Evaluate(Strict):
    task: Literal["classification"] = "classification"
    max_new_tokens: int = Field(8, gt=0)
    batch_size: int = Field(32, gt=0)
    num_examples: int = Field(8, ge=0)  # predictions saved for humans


class Merge(Strict):
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    atol: float = Field(1e-4, gt=0)


class Quantize(Strict):
    formats: list[Literal["gguf_f16", "gguf_q8_0", "gguf_q4_k_m"]] = Field(["gguf_q8_0"], min_length=1)


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

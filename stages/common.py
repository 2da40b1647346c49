"""Shared helpers for every stage: start-up (logging, the stage's own params), atomic writes, seeding.

Kept free of heavy imports so that `params.yaml` is validated in well under a second,
before any model or dataset is touched. The params schema lives in `schema/`, one module a section.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import random
import re
import shutil
import sys
import tempfile
from pathlib import Path

from schema.core import PARAMS_FILE, ROOT, ParamsError, read_yaml, tracked, validate  # noqa: F401

COMPLETE = ".complete"  # marker written last inside every output directory

log = logging.getLogger("finetune")

# The float code paths of torch on x86-64, pinned to what every AVX2 CPU has, so that the same params, data
# and seed give bit-identical metrics on any such machine, whatever its vendor or vector width: ATen's
# vectorised kernels (softmax, norms, reductions) at AVX2 rather than AVX-512 where the CPU has it, MKL's
# GEMM in conditional numerical reproducibility mode on its AVX2 branch (Intel otherwise picks its kernel
# by CPU), oneDNN (bf16 paths) at AVX2. Set before torch is imported (every stage imports this module
# first); a value already in the environment wins; FINETUNE_CPU_PINS=0 turns them off (README "Determinism").
CPU_PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def pin_cpu_code_paths() -> None:
    if os.environ.get("FINETUNE_CPU_PINS", "1") != "0" and platform.machine().lower() in ("x86_64", "amd64"):
        for name, value in CPU_PINS.items():
            os.environ.setdefault(name, value)


pin_cpu_code_paths()


# --------------------------------------------------------------------------- quiet output
# A stage prints one start line, its own progress and one summary line; FINETUNE_VERBOSE=1 (`FINETUNE_VERBOSE=1
# dvc repro`) brings back everything below. What is silenced is what no user of this project can act on,
# each with the reason:
VERBOSE = os.environ.get("FINETUNE_VERBOSE", "0") not in ("", "0")
NOISE = [  # (logger, text the message contains): why it is not actionable
    # we set TORCHAO_FORCE_SKIP_LOADING_SO_FILES ourselves, below
    ("torchao", "TORCHAO_FORCE_SKIP_LOADING_SO_FILES"),
    # Triton kernels are CUDA-only: on a CPU there is nothing to install
    ("torchao.kernel.intmm", "Detected no triton"),
    # torchao 0.18 (the version GPTQModel 7.6 requires) registers enums the way torch 2.13 deprecates
    ("torch.utils._pytree", "is an Enum subclass"),
    # bitsandbytes offers optional CPU 4-bit kernels from the Hub, which this offline pipeline never fetches
    ("bitsandbytes.backends.cpu.ops", "kernels-community"),
    # lm-eval is handed our already-loaded model on purpose (evaluation.py)
    ("lm_eval.models.huggingface", "already-initialized model"),
    ("lm_eval.models.huggingface", "`pretrained` model kwarg is not of type `str`"),
    # a GPTQ model loaded back through GPTQModel has no loss_type; we compute our own losses
    ("transformers.modeling_utils", "was set in the config but it is unrecognized"),
]
QUIET_LOGGERS = {  # logger: the lowest level still shown
    "lm_eval": logging.WARNING,  # task set-up chatter
    "logbar": logging.ERROR,  # GPTQModel's banner, environment notes and "GIL is enabled" advice
    # llama.cpp's loader dump and per-tensor quantize lines; the quantize stage reports K-quant fallbacks itself
    "llama-cpp-python": logging.ERROR,
}
WARNINGS = [  # (category, message start): Python warnings raised inside libraries about their own calls
    (FutureWarning, "`is_gradient_checkpointing` is deprecated"),  # peft calls transformers' old name
]


class _Noise(logging.Filter):
    def __init__(self, texts: list[str]):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.texts)


def quiet_libraries() -> None:
    """Runs before torch is imported. torchao's two compiled libraries (`_C_mxfp8`, `_C_cutlass_90a`) are
    CUDA kernels: with a CPU-only torch they cannot load and each import logged the failure; torchao's own
    switch skips them. On a CUDA build of torch nothing changes."""
    import importlib.util
    import warnings

    spec = importlib.util.find_spec("torch")
    torch_lib = Path(spec.origin).parent / "lib" if spec and spec.origin else None
    if torch_lib and torch_lib.is_dir() and not any(torch_lib.glob("libtorch_cuda*")):
        os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    if VERBOSE:
        return
    by_logger: dict[str, list[str]] = {}
    for name, text in NOISE:
        by_logger.setdefault(name, []).append(text)
    for name, texts in by_logger.items():
        logging.getLogger(name).addFilter(_Noise(texts))
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for category, start in WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(start), category=category)
    if not sys.stderr.isatty():  # logs and CI: no per-file bars (loading weights, downloads); long steps'
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # bars print at start, every 30 s, at the end
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_MININTERVAL", "30")


quiet_libraries()


def quiet_gptqmodel() -> None:
    """GPTQModel's logger (logbar) sets itself to INFO when first created and prints a banner and environment
    notes on import; created here first at ERROR, it stays there. Call before anything imports gptqmodel."""
    if not VERBOSE:
        with contextlib.suppress(ImportError):
            from logbar import LogBar

            LogBar.shared().setLevel(logging.ERROR)


# --------------------------------------------------------------------------- runtime
class _Format(logging.Formatter):
    """`12:00:00 [train] message`: our loggers by stage name, others by theirs; the level only from WARNING up."""

    def format(self, record: logging.LogRecord) -> str:
        name = record.name.removeprefix("finetune.")
        level = f"{record.levelname} " if record.levelno >= logging.WARNING else ""
        return f"{self.formatTime(record, '%H:%M:%S')} {level}[{name}] {record.getMessage()}" + (
            f"\n{self.formatException(record.exc_info)}" if record.exc_info else "")


def configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format())
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def setup(stage: str, sections: dict[str, type], params_path: Path | str = PARAMS_FILE):
    """Every stage starts here: logging, then `seed`, `threads` and the stage's own sections of params.yaml,
    validated and logged once. The result records which keys the stage reads (see schema.core.Tracked)."""
    configure_logging()
    try:
        params = validate(read_yaml(params_path), sections)
    except ParamsError as exc:
        log.error("%s", exc)
        raise SystemExit(2) from None
    shown = params.model_dump()
    if not VERBOSE:
        shown = declared_params(shown, stage)
    logging.getLogger(f"finetune.{stage}").info("params: %s", json.dumps(shown, sort_keys=True, separators=(",", ":")))
    return tracked(params, stage)


def declared_params(params: dict, stage: str, dvc_yaml: Path = ROOT / "dvc.yaml") -> dict:
    """The part of `params` that dvc.yaml lists for `stage` (what reruns it), else all of it."""
    import yaml

    try:
        keys = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"][stage]["params"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return params
    shown: dict = {}
    for key in keys:
        if not isinstance(key, str):
            return params
        value, target, parts = params, shown, key.split(".")
        for part in parts:
            if not isinstance(value, dict) or part not in value:
                break
            value = value[part]
        else:
            for part in parts[:-1]:
                target = target.setdefault(part, {})
            target[parts[-1]] = value
    return shown


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

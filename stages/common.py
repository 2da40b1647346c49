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


# --------------------------------------------------------------------------- runtime
def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [%(name)s] %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)


def setup(stage: str, sections: dict[str, type], params_path: Path | str = PARAMS_FILE):
    """Every stage starts here: logging, then `seed`, `threads` and the stage's own sections of params.yaml,
    validated and logged once. The result records which keys the stage reads (see schema.core.Tracked)."""
    configure_logging()
    try:
        params = validate(read_yaml(params_path), sections)
    except ParamsError as exc:
        log.error("%s", exc)
        raise SystemExit(2) from None
    log.info("stage %s, params: %s", stage, json.dumps(params.model_dump(), sort_keys=True))
    return tracked(params, stage)


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

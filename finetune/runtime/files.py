"""Atomic outputs: a file is written to a temp path and renamed; a directory gets a completeness marker
written last and replaces the old one in one rename (DVC deletes outputs before a stage runs and leaves
partial files after a crash)."""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import tempfile
from pathlib import Path

COMPLETE = ".complete"  # marker written last inside every output directory


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


# How fast and how big a run was: measurements of the machine and its load, not of the model. A stage's
# metrics file keeps the model's numbers; these go to metrics/timings/ and metrics/memory/ under the same
# name, so that an experiment that does not touch the model shows no quality column changed in `dvc exp
# show` or `dvc metrics diff` (scripts/check_metrics.py skips the same keys).
TIMING_KEYS = ("*seconds*", "*per_second*", "*mfu*")
MEMORY_KEYS = ("*memory*",)


def split_measured(metrics: dict, patterns: tuple[str, ...], prefix: str = "") -> tuple[dict, dict]:
    """(the rest, the leaves whose dotted path matches one of `patterns`), nesting kept in both."""
    rest, measured = {}, {}
    for key, value in metrics.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            inner_rest, inner_measured = split_measured(value, patterns, f"{path}.")
            if inner_rest or not inner_measured:
                rest[key] = inner_rest
            if inner_measured:
                measured[key] = inner_measured
        elif any(fnmatch.fnmatch(path, pattern) for pattern in patterns):
            measured[key] = value
        else:
            rest[key] = value
    return rest, measured


def write_metrics(path: Path | str, metrics: dict) -> dict:
    """Write a stage's metrics file, its timings and memory figures split off into timings/<name> and
    memory/<name> beside it (each always written, `{}` when the stage measured none). Returns what stayed."""
    path = Path(path)
    model, timings = split_measured(metrics, TIMING_KEYS)
    model, memory = split_measured(model, MEMORY_KEYS)
    write_json(path.parent / "timings" / path.name, timings)
    write_json(path.parent / "memory" / path.name, memory)
    write_json(path, model)
    return model


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

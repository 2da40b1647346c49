"""Every stage starts here: logging in one format, then the stage's own sections of params.yaml, validated and
logged once."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import yaml

from finetune import ROOT
from finetune.params.core import PARAMS_FILE, ParamsError, read_yaml, tracked, validate
from finetune.runtime.env import VERBOSE

log = logging.getLogger("finetune")


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
    validated and logged once. The result records which keys the stage reads (see finetune.params.core.Tracked)."""
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



"""What every section shares: the strict base model, loading and validating params.yaml, the record
of which keys a stage reads (checked against dvc.yaml by tests/test_dvc_yaml.py)."""
from __future__ import annotations

import atexit
import copy
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model

from finetune import ROOT

PARAMS_FILE = ROOT / "params.yaml"
TRACE_ENV = "FINETUNE_PARAMS_TRACE"  # a folder: each stage writes the params keys it read there


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _int_to_float(value):  # YAML writes 1 for 1.0; strict floats would refuse it
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


Float = Annotated[float, BeforeValidator(_int_to_float)]


def _threads(value):  # `auto`: every core this process may run on; a number keeps results exact across machines
    if value == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("must be a number of threads or auto (every core)")
    return value


Threads = Annotated[int, BeforeValidator(_threads), Field(gt=0)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]  # NumPy's seeds: a negative one would fail mid-stage


class ParamsError(ValueError):
    pass


def _describe(error) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key (check its spelling; see the params reference in README.md)"
    if error["type"] == "missing":
        return f"{where}: required key is missing (params.yaml holds every value; see README.md)"
    return f"{where}: {message}, got {error.get('input')!r}"


def read_yaml(path: Path | str = PARAMS_FILE) -> dict:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: must be a mapping of sections, got {type(raw).__name__}")
    return raw


def validate(raw: dict, sections: dict[str, type], where: str = "params.yaml", extra: str = "ignore"):
    """Validate the top-level knobs and the given sections; every problem is reported at once, by key path.
    `extra="forbid"` (check_params) also refuses unknown top-level keys."""
    fields: dict[str, Any] = {"seed": (Seed, ...), "threads": (Threads, ...),
                              "device": (Literal["auto", "cpu", "cuda"], ...),  # see finetune/runtime/device.py
                              "dtype": (Literal["auto", "float32", "bfloat16", "float16"], ...),
                              "kernels": (Literal["reproducible", "native"], ...)}  # finetune/runtime/env.py
    fields.update({name: (schema, ...) for name, schema in sections.items()})
    model = create_model("Params", __config__=ConfigDict(extra=extra, strict=True, frozen=True), **fields)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "\n".join(f"  - {_describe(error)}" for error in exc.errors())
        raise ParamsError(f"{where} has {exc.error_count()} problem(s):\n{problems}") from None


def section(dotted: str, path: Path | str = PARAMS_FILE, **overrides):
    """One validated section of params.yaml (`"train"`, `"model.builtin"`) with nested overrides merged in:
    how tests and benchmarks build a config without restating any value."""
    from importlib import import_module

    keys = dotted.split(".")
    raw, schema = read_yaml(path), import_module(f"finetune.params.{keys[0]}").SECTION
    for depth, key in enumerate(keys):
        raw = raw[key]
        if depth:
            schema = schema.model_fields[key].annotation
    return schema.model_validate(merge(raw, overrides))


def merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def apply_overrides(params: dict, overrides: Iterable[str] | Mapping[str, Any]) -> dict:
    """`params` with dotted keys set, as `dvc exp run -S` does: `["train.lora.r=32", ...]` (each value read as
    YAML) or `{"train.lora.r": 32, ...}`. A value replaces what was there (a mapping too); a key that is not there
    is added, so validation names it. Returns a new dict; `params` is left as it was."""
    items = overrides.items() if isinstance(overrides, Mapping) else map(parse_override, overrides)
    result = copy.deepcopy(params)
    for dotted, value in items:
        *parents, leaf = dotted.split(".")
        node = result
        for depth, key in enumerate(parents):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ParamsError(f"override {dotted}: {'.'.join(parents[:depth + 1])} holds a value ({node!r}), "
                                  "not a section; set that key itself")
        node[leaf] = value
    return result


def parse_override(item: str) -> tuple[str, Any]:
    """`"train.lora.r=32"` -> `("train.lora.r", 32)`."""
    key, equals, value = item.partition("=")
    if not equals or "" in key.split(".") or key != key.strip():
        raise ParamsError(f"override {item!r}: expected dotted.key=value, e.g. train.lora.r=32")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ParamsError(f"override {item!r}: the value is not valid YAML ({exc}); quote it") from None


# --------------------------------------------------------------------------- which keys a stage reads
class Tracked:
    """A read-only view of validated params that records the key path of every value read. A stage's
    dvc.yaml `params:` must cover exactly these (tests/test_dvc_yaml.py runs every stage with a trace)."""

    __slots__ = ("_value", "_path", "_reads")

    def __init__(self, value, path: str, reads: set):
        object.__setattr__(self, "_value", value)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_reads", reads)

    def _child(self, key: str, value):
        path = f"{self._path}.{key}" if self._path else key
        if isinstance(value, BaseModel) or (isinstance(value, dict) and value
                                            and all(isinstance(item, BaseModel) for item in value.values())):
            return Tracked(value, path, self._reads)
        self._reads.add(path)
        return value

    def __getattr__(self, name: str):
        value = getattr(self._value, name)
        if isinstance(self._value, BaseModel) and name in type(self._value).model_fields:
            return self._child(name, value)
        if name in ("model_dump", "items", "values", "keys"):  # reads the whole subtree
            self._reads.add(self._path)
        return value

    def __getitem__(self, key):
        return self._child(str(key), self._value[key])

    def __contains__(self, key) -> bool:
        return key in self._value

    def __setattr__(self, name, value):
        raise AttributeError("params are read-only")

    def __repr__(self) -> str:
        return f"Tracked({self._path or 'params'}: {self._value!r})"


def tracked(params, stage: str):
    """Wrap validated params; with FINETUNE_PARAMS_TRACE set, write what was read when the process ends."""
    reads: set[str] = set()
    folder = os.environ.get(TRACE_ENV)
    if folder:
        def write():
            path = Path(folder) / f"{stage}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            before = set(json.loads(path.read_text())) if path.exists() else set()  # several processes (DDP)
            path.write_text(json.dumps(sorted(before | reads)))
        atexit.register(write)
    return Tracked(params, "", reads)

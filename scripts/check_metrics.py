"""Does a rerun reproduce the committed metrics? Compare two sets of metrics files with a tolerance.

    python scripts/check_metrics.py metrics --rev HEAD   # the workspace's metrics/ vs the committed ones, exactly
    python scripts/check_metrics.py expected/ actual/    # two folders
    python scripts/check_metrics.py metrics --rev HEAD --tolerance   # a path that is not bit-stable (GPU, ARM)

Every *.json (nested keys flattened to dotted paths, list items by index), *.csv and *.tsv (DVCLive's
curves; row index and column) file is compared. Numbers agree when |actual - expected| <= atol + rtol * |expected|
(numpy.isclose's rule); strings, booleans and nulls must be equal. Measurements of the machine
rather than of the model (keys with `seconds`, `per_second`, `memory` or `mfu` in them: the stages write them to
metrics/timings/ and metrics/memory/) vary run to run and are skipped, as are the human-readable example
predictions (metrics/examples.json): a
prediction that flips on another CPU already shows in the task metrics. Exit 0 when everything agrees; 1 with one line per difference otherwise.

The default is exact: with torch's CPU float paths pinned (finetune/runtime/env.py CPU_PINS) and llama.cpp
built for one instruction set, any x86-64 CPU with AVX2 reproduces the committed numbers to the bit.
`--tolerance` (rtol 1e-3, atol 1e-4) is for a path that cannot be made bit-stable (a GPU, another
architecture): loose enough for float noise in losses and perplexities, tight enough that one flipped
test prediction fails it (it moves accuracy by 1/154 = 0.0065 on the default task, per-class scores more).

Metrics record the `kernels` mode that made them (params.yaml). When the two sets were made in different modes
(`native` against the committed `reproducible`), the comparison is not about bits but about whether the model is
the same one: KERNELS_TOLERANCE applies, stated below, and the mode keys themselves are not compared.
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import json
import math
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's package
from finetune.runtime.files import MEMORY_KEYS, TIMING_KEYS  # noqa: E402  (the stages' own split rule)

SUFFIXES = (".json", ".csv", ".tsv")  # .tsv: DVCLive's training curves
SKIP = [*TIMING_KEYS, *MEMORY_KEYS, "*framework*", "examples.json:*"]  # framework: measured RSS


def flatten(value, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": [1, 2]}} -> {"a.b[0]": 1, "a.b[1]": 2}"""
    if isinstance(value, dict):
        items = {}
        for key, inner in value.items():
            items.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return items
    if isinstance(value, list):
        items = {}
        for index, inner in enumerate(value):
            items.update(flatten(inner, f"{prefix}[{index}]"))
        return items
    return {prefix: value}


def parse(name: str, text: str) -> dict[str, object]:
    if name.endswith(".json"):
        return flatten(json.loads(text))
    rows = list(csv.DictReader(io.StringIO(text), delimiter="\t" if name.endswith(".tsv") else ","))
    return {f"[{index}].{column}": _number(cell) for index, row in enumerate(rows) for column, cell in row.items()}


def _number(cell: str):
    try:
        return float(cell)
    except (TypeError, ValueError):
        return cell


def read_folder(folder: Path) -> dict[str, str]:
    return {path.relative_to(folder).as_posix(): path.read_text(encoding="utf-8")
            for path in sorted(folder.rglob("*")) if path.suffix in SUFFIXES and path.is_file()}


def read_revision(folder: str, rev: str, cwd: Path | None = None) -> dict[str, str]:
    """The metrics files as committed at `rev` (git show), keyed by their path inside `folder`."""
    listed = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "--", folder], cwd=cwd,
                            capture_output=True, text=True)
    if listed.returncode:
        raise SystemExit(f"git ls-tree {rev} -- {folder} failed: {listed.stderr.strip()}")
    prefix = folder.rstrip("/") + "/"
    files = {}
    for path in listed.stdout.split():
        if path.endswith(SUFFIXES):
            shown = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=cwd, capture_output=True, text=True, check=True)
            files[path.removeprefix(prefix)] = shown.stdout
    return files


def agree(expected, actual, rtol: float, atol: float) -> bool:
    numbers = (int, float)
    if isinstance(expected, numbers) and isinstance(actual, numbers) and not isinstance(expected, bool) \
            and not isinstance(actual, bool):
        if math.isnan(expected) or math.isnan(actual):
            return math.isnan(expected) and math.isnan(actual)
        return abs(actual - expected) <= atol + rtol * abs(expected)
    return expected == actual


TOLERANCE = {"rtol": 1e-3, "atol": 1e-4}
# reproducible against native kernels: the same run diverges slowly (another summation order in every GEMM, step
# after step), so losses, perplexities and logit differences move in their third or fourth digit and a
# near-tie test prediction may flip. Measured (README "Determinism"): see KERNELS_TOLERANCE_MEASURED there.
KERNELS_TOLERANCE = {"rtol": 0.02, "atol": 0.02}


def kernels_of(files: dict[str, str]) -> str | None:
    """The `kernels` mode a metrics set records (train.json or eval.json), None when it records none."""
    for name in ("train.json", "eval.json", "quantize.json", "merge.json"):
        if name in files:
            value = json.loads(files[name]).get("kernels")
            if value:
                return value
    return None


def compare(expected: dict[str, str], actual: dict[str, str], rtol: float = 0.0, atol: float = 0.0,
            skip: list[str] = SKIP) -> list[str]:
    """Every difference between two {file name: text} sets, one readable line each."""
    problems = []
    for name in sorted(set(expected) | set(actual)):
        if name not in actual or name not in expected:
            problems.append(f"{name}: only in the {'expected' if name in expected else 'actual'} metrics")
            continue
        want, got = parse(name, expected[name]), parse(name, actual[name])
        for key in sorted(set(want) | set(got)):
            if any(fnmatch.fnmatch(key, pattern) or fnmatch.fnmatch(f"{name}:{key}", pattern) for pattern in skip):
                continue
            if key not in got or key not in want:
                problems.append(f"{name}: {key} only in the {'expected' if key in want else 'actual'} metrics")
            elif not agree(want[key], got[key], rtol, atol):
                problems.append(f"{name}: {key} expected {want[key]!r}, got {got[key]!r}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("expected", help="folder of expected metrics, or with --rev the folder path in git")
    parser.add_argument("actual", nargs="?", help="folder of metrics to check (default: `expected` in the workspace)")
    parser.add_argument("--rev", help="take the expected files from this git revision (e.g. HEAD)")
    parser.add_argument("--tolerance", action="store_true",
                        help=f"rtol {TOLERANCE['rtol']:g}, atol {TOLERANCE['atol']:g}: for a GPU or another architecture")
    parser.add_argument("--rtol", type=float, help="override the relative tolerance")
    parser.add_argument("--atol", type=float, help="override the absolute tolerance")
    parser.add_argument("--exact", action="store_true", help="rtol = atol = 0 (the default)")
    parser.add_argument("--skip", action="append", default=[], help="extra key pattern to skip (fnmatch), repeatable")
    args = parser.parse_args(argv)
    rtol, atol = (TOLERANCE["rtol"], TOLERANCE["atol"]) if args.tolerance and not args.exact else (0.0, 0.0)
    rtol, atol = args.rtol if args.rtol is not None else rtol, args.atol if args.atol is not None else atol
    expected = read_revision(args.expected, args.rev) if args.rev else read_folder(Path(args.expected))
    actual = read_folder(Path(args.actual or args.expected))
    if not expected:
        raise SystemExit(f"no *.json or *.csv metrics found in {args.expected}" + (f" at {args.rev}" if args.rev else ""))
    skip = SKIP + args.skip
    modes = kernels_of(expected), kernels_of(actual)
    if modes[0] != modes[1] and None not in modes and args.rtol is None and args.atol is None and not args.exact:
        rtol, atol = max(rtol, KERNELS_TOLERANCE["rtol"]), max(atol, KERNELS_TOLERANCE["atol"])
        skip = skip + ["*kernels*"]
        print(f"kernels: expected {modes[0]}, actual {modes[1]}: comparing across modes (rtol {rtol:g}, atol {atol:g})")
    problems = compare(expected, actual, rtol, atol, skip)
    where = f"{args.expected} at {args.rev}" if args.rev else args.expected
    if problems:
        print(f"{len(problems)} difference(s) between {where} and {args.actual or args.expected} "
              f"(rtol {rtol:g}, atol {atol:g}):")
        print("\n".join(f"  - {line}" for line in problems))
        return 1
    print(f"{len(actual)} metrics file(s) reproduce {where} (rtol {rtol:g}, atol {atol:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

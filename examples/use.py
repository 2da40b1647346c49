"""Switch this checkout to one of the examples:  python examples/use.py <task> && dvc repro

<task> is classification, generation, qa or coding. Copies examples/<task>/data.jsonl to
data/raw/example_<task>.jsonl (where the ingest stage's data lives) and rewrites params.yaml as the
current params.yaml with examples/<task>/params.yaml merged over it (mappings merge key by key,
anything else is replaced), then validates the result; an invalid result is not written.
Use it in a scratch clone or branch: it rewrites params.yaml without its comments
(`git checkout params.yaml && rm data/raw/example_*.jsonl` undoes it).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TASKS = sorted(path.parent.name for path in (ROOT / "examples").glob("*/params.yaml"))


def use(task: str, root: Path = ROOT) -> dict:
    """Apply the example to the checkout at `root`; returns the new params (validated)."""
    from finetune.params.sections import load_params
    from finetune.params.core import ParamsError, merge

    if task not in TASKS:
        raise SystemExit(f"unknown example {task!r}; choose one of {', '.join(TASKS)}")
    example = ROOT / "examples" / task
    params = merge(yaml.safe_load((root / "params.yaml").read_text()), yaml.safe_load((example / "params.yaml").read_text()))
    candidate = root / "params.example.yaml"
    candidate.write_text(f"# examples/{task}/params.yaml merged over the previous params.yaml by examples/use.py\n"
                         + yaml.safe_dump(params, sort_keys=False))
    try:
        load_params(candidate)
    except ParamsError as exc:
        candidate.unlink()
        raise SystemExit(f"examples/{task}/params.yaml does not fit this params.yaml:\n{exc}") from None
    (root / "data" / "raw").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(example / "data.jsonl", root / "data" / "raw" / f"example_{task}.jsonl")
    candidate.replace(root / "params.yaml")
    return params


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    use(sys.argv[1])
    print(f"params.yaml now runs examples/{sys.argv[1]}; next: dvc repro")

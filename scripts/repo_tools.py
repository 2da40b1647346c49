"""Running commands in a copy of this repo: shared by tests/ (through conftest), scripts/ and benchmarks/.

- `tracked_copy(folder)`: the working tree as git sees it (tracked and untracked, not ignored): a fresh clone.
- `sh(repo, "dvc", "repro")`: a command (dvc, git) in `repo` with this venv first on PATH; fails with its output.
- `ran(output)`: the stages a `dvc repro` / `dvc exp run` really ran, from its output.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = str(Path(sys.executable).parent)
# git needs an identity to commit, and CI machines and fresh containers have none
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "finetune", "GIT_AUTHOR_EMAIL": "finetune@localhost",
                "GIT_COMMITTER_NAME": "finetune", "GIT_COMMITTER_EMAIL": "finetune@localhost"}


class CommandFailed(RuntimeError):
    pass


def tracked_copy(destination: Path) -> Path:
    """A copy of the working tree as git sees it (tracked + untracked, not ignored): a fresh clone."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def sh(repo, *args, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command in `repo` with this venv first on PATH, one torch thread and a git identity; with `check`,
    a non-zero exit raises CommandFailed carrying the command's output."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1",
           **GIT_IDENTITY, **(env or {})}
    result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise CommandFailed(f"{' '.join(map(str, args))} failed in {repo} (exit {result.returncode}):\n"
                            f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def ran(output: str) -> set[str]:
    """The stages `dvc repro` / `dvc exp run` really ran, from their output."""
    return set(re.findall(r"Running stage '([\w:]+)'", output))

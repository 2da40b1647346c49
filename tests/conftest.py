import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
import finetune  # noqa: F401  (pins torch's CPU float paths before torch is imported)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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


def repo_on_tiny_base(destination: Path, tiny_base: Path, edit_params=None) -> Path:
    """A tracked copy (git-initialised on main) whose base stage output is `tiny_base`, recorded with `dvc commit`
    so DVC takes it for a built one; `edit_params(params)` changes params.yaml first."""
    import yaml

    repo = tracked_copy(destination)
    shutil.rmtree(repo / "models", ignore_errors=True)
    shutil.copytree(tiny_base, repo / "models" / "base")
    (repo / "models" / "base" / ".complete").write_text("ok\n")
    if edit_params:
        params = yaml.safe_load((repo / "params.yaml").read_text())
        edit_params(params)
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(repo, "git", "init", "-q", "-b", "main")
    sh(repo, "dvc", "commit", "-f", "base")
    return repo


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A tiny built-in base (briefly pretrained) shared by the unit tests."""
    import torch

    from stages import base
    from finetune.params.core import section

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("base")
    cfg = section("model.builtin", pretrain_steps=20, num_layers=2)
    base.build_builtin(cfg, out)
    return out


BIN = str(Path(sys.executable).parent)


def sh(repo, *args, check=True, env=None):
    """Run a command (dvc, git) in `repo` with this venv first on PATH; fail with its output."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           **(env or {})}
    result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def ran(output: str) -> set[str]:
    """The stages `dvc repro` / `dvc exp run` really ran, from their output."""
    return set(re.findall(r"Running stage '([\w:]+)'", output))

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # repo_tools, and the scripts tests drive (family_models, check_metrics, ...)
import finetune  # noqa: E402,F401  (pins torch's CPU float paths before torch is imported)
from repo_tools import BIN, ran, sh, tracked_copy  # noqa: E402,F401  (tests import them from here too)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# The end-to-end tests' data and scale: the generated support tickets (their planted duplicates, bad rows and toxic
# words are what the data stages' tests count) and the tiny base's own 120-question forgetting check, not the shipped
# Banking77 default and its real benchmarks, which the tiny model cannot learn in a test's time
TEST_SCALE = {
    "ingest": {"sources": [{"path": "data/raw/support_tickets.jsonl", "format": "alpaca"}], "max_eval_rows": 48},
    "format": {"system_prompt": "You route customer support tickets to the right team."},
    "train": {"max_steps": 28},
    "evaluate": {"max_new_tokens": 8, "classification": {"scoring": "generate"},
                 "general": {"tasks": ["general_knowledge"], "limit": None}},
}


def at_test_scale(params: dict) -> dict:
    import copy

    from finetune.params.core import merge

    return merge(params, copy.deepcopy(TEST_SCALE))  # a test that edits its params must not edit the next one's


def repo_on_tiny_base(destination: Path, tiny_base: Path, edit_params=None) -> Path:
    """A tracked copy (git-initialised on main) whose base stage output is `tiny_base`, recorded with `dvc commit`
    so DVC takes it for a built one; `edit_params(params)` changes params.yaml first."""
    import yaml

    repo = tracked_copy(destination)
    shutil.rmtree(repo / "models", ignore_errors=True)
    shutil.copytree(tiny_base, repo / "models" / "base")
    (repo / "models" / "base" / ".complete").write_text("ok\n")
    (repo / "metrics" / "timings").mkdir(parents=True, exist_ok=True)
    (repo / "metrics" / "timings" / "base.json").write_text("{}\n")  # the base stage's other output
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params = at_test_scale(params)
    params["model"]["base"], params["threads"] = "builtin", 1  # the tests' scale, whatever the shipped default
    if edit_params:
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

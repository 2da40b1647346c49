"""End to end: the real `dvc` drives the real stages on a fresh copy of the repo.

Small knobs (a 2-layer base, a few steps) keep it to a few minutes on 2 cores; the code path is
the default one. Checks: every artifact appears, a second `dvc repro` is a no-op, an
experiment on a train param reruns train and what follows only, and a broken params.yaml
fails in the params check, names the key, and loses nothing (timings live in benchmarks/).
"""
import json
import re

import pytest
import yaml

from conftest import at_test_scale
from repo_tools import ran, sh, tracked_copy

pytestmark = pytest.mark.e2e
UPSTREAM = ["check_params", "base", "ingest", "dedup_filter", "format"]
DOWNSTREAM = ["train", "evaluate", "merge", "quantize", "publish", "headline"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tracked_copy(tmp_path_factory.mktemp("repo"))
    params = at_test_scale(yaml.safe_load((repo / "params.yaml").read_text()))
    params["model"]["base"], params["threads"] = "builtin", 1  # the tests' scale, whatever the shipped default
    params["model"]["builtin"].update(num_layers=2, pretrain_steps=40)
    params["train"].update(max_steps=40, logging_steps=5)
    params["quantize"]["formats"] = ["gguf_q8_0"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        sh(repo, *command)
    first = sh(repo, "dvc", "repro")
    assert ran(first.stdout) >= set(UPSTREAM + DOWNSTREAM + ["evaluate_base"]), first.stdout
    (repo.parent / "first_repro.log").write_text(first.stdout + first.stderr)
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "run")
    return repo


def test_full_run_writes_every_artifact(repo):
    for folder in ["models/base", "models/adapter", "models/merged", "models/quantized", "models/release"]:
        assert (repo / folder / ".complete").exists(), folder
    assert (repo / "models/quantized/model-q8_0.gguf").stat().st_size > 100_000
    data = json.loads((repo / "metrics/data.json").read_text())
    assert data["rows_in"] == data["rows_kept"] + data["rejected"] + sum(data["removed"].values())
    assert data["rejected"] == 20
    train = json.loads((repo / "metrics/train.json").read_text())
    assert train["steps"] == 40 and 0 < train["trainable_params"] < train["total_params"]
    # how fast and how big the run was sits beside the model's numbers, not among them (no noisy column changes)
    timings, memory = (json.loads((repo / f"metrics/{kind}/train.json").read_text()) for kind in ("timings", "memory"))
    assert timings["tokens_per_second"] > 0 and memory["peak_memory_mb"] > 0 and memory["plan"]["framework_memory_mb"] > 0
    assert not {"tokens_per_second", "train_seconds", "peak_memory_mb", "mfu"} & set(train)
    assert "framework_memory_mb" not in train["plan"]
    assert json.loads((repo / "metrics/timings/quantize.json").read_text())["gguf_q8_0.tokens_per_second"] > 0
    evaluation = json.loads((repo / "metrics/eval.json").read_text())
    assert evaluation["perplexity"] < evaluation["base.perplexity"]
    quantized = json.loads((repo / "metrics/quantize.json").read_text())
    assert quantized["gguf_q8_0.size_ratio"] < 0.5 and abs(quantized["gguf_q8_0.perplexity_drop_percent"]) < 2


def test_output_is_short_and_free_of_library_noise(repo):
    """What `make run` prints: a start line, progress and a summary per stage; no import warnings, no
    llama.cpp loader dump, no per-tensor lines (FINETUNE_VERBOSE=1 brings them back)."""
    output = (repo.parent / "first_repro.log").read_text()
    assert len(output.encode()) < 15_000, f"{len(output.encode())} bytes:\n{output}"
    for noise in ("torchao", "_pytree", "Failed to load", "llama_model_loader", "FutureWarning", "Loading weights",
                  "kernels-community", "Passed an already-initialized model"):
        assert noise not in output, noise
    for stage in UPSTREAM + DOWNSTREAM:
        assert f"Running stage '{stage}'" in output


def test_second_repro_is_a_no_op(repo):
    result = sh(repo, "dvc", "repro")
    assert ran(result.stdout) == set() and "up to date" in result.stdout


def test_experiment_reruns_only_what_the_param_touches(repo):
    result = sh(repo, "dvc", "exp", "run", "--set-param", "train.lora.r=4")
    assert ran(result.stdout) == set(DOWNSTREAM) | {"check_params"}, result.stdout
    table = sh(repo, "dvc", "exp", "show", "--no-pager", "--md").stdout
    assert "train.lora.r" in table or "lora.r" in table
    assert table.count("workspace") == 1 and len(re.findall(r"\| +[a-z]+-[a-z]+ ", table)) >= 1, table


@pytest.mark.parametrize("edit, key", [
    (lambda p: p["train"].update(lorra={"r": 8}), "train.lorra: unknown key"),
    (lambda p: p["train"]["lora"].update(r=0), "train.lora.r: Input should be greater than 0, got 0"),
    (lambda p: p["train"].update(learning_rate="fast"), "train.learning_rate"),
])
def test_broken_params_fail_fast_and_lose_nothing(repo, edit, key):
    sh(repo, "git", "checkout", "-q", "--", ".")
    sh(repo, "dvc", "checkout", "-q")
    original = (repo / "params.yaml").read_text()
    adapter = (repo / "models/adapter/adapter_model.safetensors").read_bytes()
    params = yaml.safe_load(original)
    edit(params)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = sh(repo, "dvc", "repro", check=False)
    assert result.returncode != 0 and key in result.stdout + result.stderr
    (repo / "params.yaml").write_text(original)
    restored = sh(repo, "dvc", "repro")
    assert "train" not in ran(restored.stdout)  # outputs come back from the cache, no retraining
    assert (repo / "models/adapter/adapter_model.safetensors").read_bytes() == adapter

"""DVCLive in the train stage, under the real `dvc` on a fresh copy of the repo.

While `dvc exp run` trains, `dvc exp show` (it does not wait for the run's lock) shows the running
experiment's step and loss: DVCLive rewrites metrics/train_live/metrics.json at every logged step.
Afterwards `dvc plots show` renders every curve, and DVCLive has written no dvc.yaml, report or
params file and saved no experiment of its own.
"""
import json
import os
import subprocess

import pytest

from conftest import repo_on_tiny_base
from repo_tools import BIN, sh
from finetune.training.trainer import PLOT_KEYS

pytestmark = pytest.mark.e2e  # a real `dvc exp run` followed while it trains

STEPS = 60
TRAIN = {"max_steps": STEPS, "logging_steps": 1, "batch_size": 4, "checkpoint_steps": 0, "eval_steps": 20}
LIVE = "metrics/train_live/metrics.json"
CURVES = "metrics/train_live/plots/metrics/live"


def small_repo(path, tiny_base):
    """A committed copy whose data stages ran on a little data, the tiny base recorded as the base stage's."""
    repo = repo_on_tiny_base(path, tiny_base, lambda params: params["ingest"].update(test_fraction=0.02,
                                                                                     max_eval_rows=16))
    sh(repo, "dvc", "repro", "format")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "data")
    return repo


def running_experiment(shown: list[dict]) -> dict | None:
    """The live metrics of the experiment `dvc exp show --json` reports as running, if any."""
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            if (experiment.get("executor") or {}).get("state") == "running":
                # while the run starts, dvc lists it with no data yet
                metrics = (experiment["revs"][0].get("data") or {}).get("metrics") or {}
                return (metrics.get(LIVE) or {}).get("data")
    return None


def test_exp_show_follows_a_running_training_and_plots_show_every_curve(tmp_path, tiny_base):
    repo = small_repo(tmp_path, tiny_base)
    dvc_yaml = (repo / "dvc.yaml").read_text()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen(["dvc", "exp", "run", "train", *[f"-Strain.{key}={value}" for key, value in TRAIN.items()]],
                           cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []  # (step, loss) dvc exp show reported while the run was still going after it answered
    try:
        while run.poll() is None:
            shown = sh(repo, "dvc", "exp", "show", "--json", check=False)
            live = running_experiment(json.loads(shown.stdout)) if shown.returncode == 0 else None
            assert shown.returncode == 0 or run.poll() is not None, shown.stderr[-2000:]  # no lock wait, no error
            if live and run.poll() is None:
                seen.append((live.get("step"), live.get("live", {}).get("loss")))
    finally:
        output = run.communicate(timeout=300)[0]
    assert run.returncode == 0, output[-4000:]
    midway = [(step, loss) for step, loss in seen if 0 < step < STEPS]
    assert midway and all(isinstance(loss, float) for _, loss in midway), (seen, output[-2000:])
    assert f"step {STEPS}/{STEPS}  loss" in output  # the stage's own line per logging step

    final = json.loads((repo / LIVE).read_text())
    assert final["step"] == STEPS and set(PLOT_KEYS) <= set(final["live"])
    shown = json.loads(sh(repo, "dvc", "plots", "show", "--json").stdout)
    assert not shown.get("errors"), shown["errors"]
    for key in PLOT_KEYS:
        [plot] = shown["data"][f"{CURVES}/{key}.tsv"]
        values = plot["content"]["data"]["values"]  # the .tsv cells, as strings
        assert {"step", key} <= set(values[0]) and int(values[-1]["step"]) == STEPS, key
        assert len(values) == (STEPS if key != "eval_loss" else STEPS // 20 + 1), key  # + the final evaluation
    # DVCLive left the pipeline alone: dvc.yaml as declared, no dvc.yaml/report/params of its own, one experiment
    assert (repo / "dvc.yaml").read_text() == dvc_yaml
    assert sorted(path.name for path in (repo / "metrics" / "train_live").iterdir()) == ["metrics.json", "plots"]
    experiments = sh(repo, "git", "for-each-ref", "--format=%(refname)", "refs/exps").stdout.split()
    assert len([ref for ref in experiments if not ref.startswith("refs/exps/exec/")]) == 1, experiments

"""Every example under examples/<task>/ runs end to end: `examples/use.py <task>` applies it to a fresh
copy of the repo, then the real stage scripts (ingest, dedup_filter, format, train, evaluate base,
evaluate) run on the tiny base with tiny knobs, in one Python process so imports are paid once."""
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from finetune.params.sections import load_params
from conftest import ROOT
from repo_tools import tracked_copy

TASKS = ["classification", "generation", "qa", "coding"]
TASK_KEYS = {"classification": {"task.accuracy", "task.macro_f1", "task.unparseable"},
             "generation": {"task.bleu", "task.rouge1", "task.rouge2", "task.rougeL", "task.meteor"},
             "qa": {"task.exact_match", "task.f1"},
             "coding": {"task.pass@1", "task.pass@4", "task.syntax_valid_rate", "task.test_pass_rate"}}
STAGES = [("ingest", []), ("dedup_filter", []), ("format", []), ("train", []), ("evaluate", ["base"]), ("evaluate", [])]
RUNNER = """
import runpy, shutil, sys, yaml
sys.path.insert(0, "examples")
import use
for task in sys.argv[1:]:
    use.use(task)
    params = yaml.safe_load(open("params.yaml"))
    params["ingest"].update(max_eval_rows=4, max_test_rows=8)
    params["train"].update(max_steps=2, batch_size=4, logging_steps=1)
    params["evaluate"]["general"]["tasks"] = []
    open("params.yaml", "w").write(yaml.safe_dump(params, sort_keys=False))
    for stage, args in %r:
        sys.argv = ["stages/%%s.py" %% stage, *args]
        runpy.run_module("stages." + stage, run_name="__main__")
    shutil.copytree("metrics", "results/" + task)
""" % (STAGES,)


def load_module(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_data_is_what_the_generator_writes():
    make_data = load_module(ROOT / "examples" / "make_data.py")
    for offset, task in enumerate(TASKS):
        rows = getattr(make_data, task)(random.Random(make_data.SEED + offset))
        written = [json.loads(line) for line in (ROOT / "examples" / task / "data.jsonl").read_text().splitlines()]
        assert written == rows, f"examples/{task}/data.jsonl is stale: run python examples/make_data.py"


def test_every_example_params_file_fits_the_shipped_params(tmp_path):
    use = load_module(ROOT / "examples" / "use.py")
    assert use.TASKS == sorted(TASKS)
    for task in TASKS:
        (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
        use.use(task, root=tmp_path)
        params = load_params(tmp_path / "params.yaml")
        assert params.evaluate.task == task
        assert [source.path for source in params.ingest.sources] == [f"data/raw/example_{task}.jsonl"]
        assert (tmp_path / "data/raw" / f"example_{task}.jsonl").read_bytes() == (ROOT / "examples" / task / "data.jsonl").read_bytes()
    with pytest.raises(SystemExit, match="unknown example"):
        use.use("poetry", root=tmp_path)


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_base):
    repo = tracked_copy(tmp_path_factory.mktemp("examples"))
    shutil.rmtree(repo / "models" / "base", ignore_errors=True)
    shutil.copytree(tiny_base, repo / "models" / "base")
    (repo / "models" / "base" / ".complete").write_text("ok\n")
    (repo / "run_examples.py").write_text(RUNNER)
    result = subprocess.run([sys.executable, "run_examples.py", *TASKS], cwd=repo, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                 "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-5000:]
    return repo / "results"


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.e2e
def test_example_runs_end_to_end(results, task):
    report = json.loads((results / task / "eval.json").read_text())
    for key in TASK_KEYS[task] | {"perplexity"}:
        assert key in report and f"base.{key}" in report and f"delta.{key}" in report, key
    rows = report["test_rows"]
    assert 4 <= rows <= 8  # ingest.max_test_rows=8, less what dedup_filter removed
    examples = json.loads((results / task / "examples.json").read_text())
    assert len(examples) == rows and all(example["reference"] for example in examples)
    confusion = (results / task / "confusion.csv").read_text().splitlines()
    assert confusion[0] == "actual,predicted" and len(confusion) == (rows + 1 if task == "classification" else 1)
    if task == "classification":  # likelihood scoring always names a label
        assert report["task.unparseable"] == 0 and report["base.task.unparseable"] == 0

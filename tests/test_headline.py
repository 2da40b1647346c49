"""stages/headline.py: the dozen numbers of a run, first in `dvc exp show`, readable at 120 columns.

The core is checked on the committed metrics files and on small hand-made ones per task type; the stage runs
for real through `dvc repro` in a copy of the repo, and the real `dvc exp show` prints its table there.
"""
import json
import re

import pytest

from conftest import ROOT
from repo_tools import sh, tracked_copy
from stages.headline import headline

COMMITTED = {name: json.loads((ROOT / "metrics" / f"{name}.json").read_text())
             for name in ("eval", "train", "quantize")}
COMMITTED["train_timings"] = json.loads((ROOT / "metrics" / "timings" / "train.json").read_text())
SHOW = ["dvc", "exp", "show", "--no-pager", "--drop", "[^A-Z]"]  # the README's command: the headline alone


def small(task_metrics: dict, **evaluation) -> dict:
    return {"eval": {**task_metrics, **evaluation}, "train": {"train_loss": 0.5, "eval_loss": None}, "train_timings": {},
            "quantize": {"gguf_q8_0.size_ratio": 0.27, "gguf_q8_0.perplexity": 1.2}}


def test_the_committed_metrics_make_the_headline_in_reading_order():
    numbers = headline(COMMITTED, "classification")
    evaluation, train, quantize = COMMITTED["eval"], COMMITTED["train"], COMMITTED["quantize"]
    assert list(numbers)[:5] == ["Accuracy", "Base accuracy", "Forgetting", "Perplexity", "Base perplexity"]
    assert numbers["Accuracy"] == evaluation["task.accuracy"]
    assert numbers["Base accuracy"] == evaluation["base.task.accuracy"]
    assert numbers["Forgetting"] == evaluation["general.worst_drop"] and numbers["Test rows"] == evaluation["test_rows"]
    assert numbers["Train tokens_per_second"] == COMMITTED["train_timings"]["tokens_per_second"]
    assert "tokens_per_second" not in train  # a timing: in metrics/timings/train.json, not among the model's numbers
    assert numbers["Trainable params"] == train["trainable_params"]
    for fmt in sorted({key.split(".")[0] for key in quantize if key.endswith(".size_ratio")} - {"merged"}):
        assert numbers[f"{fmt.upper()} size ratio"] == quantize[f"{fmt}.size_ratio"]
        assert numbers[f"{fmt.upper()} accuracy change"] == quantize[f"{fmt}.delta.task.accuracy"]
    assert 10 <= len(numbers) <= 16
    # a capital first letter: no other column of `dvc exp show` has one (metrics, params and deps are lower case)
    assert all(name[0].isupper() for name in numbers), list(numbers)


def test_the_committed_headline_is_what_the_stage_makes_of_the_committed_metrics():
    """metrics/headline.json as committed, key order included: it is regenerated whenever its inputs are."""
    task = re.search(r"^\s*task:\s*(\w+)", (ROOT / "params.yaml").read_text(), re.MULTILINE).group(1)
    committed = json.loads((ROOT / "metrics" / "headline.json").read_text())
    expected = headline(COMMITTED, task)
    assert list(committed.items()) == list(expected.items())


@pytest.mark.parametrize("task, task_metrics, main, title, base", [
    ("generation", {"task.bleu": 31.0, "task.rougeL": 0.52, "base.task.rougeL": 0.2}, "rougeL", "ROUGE-L", "ROUGE-L"),
    ("qa", {"task.exact_match": 0.4, "task.f1": 0.61, "base.task.f1": 0.3}, "f1", "F1", "F1"),
    ("coding", {"task.pass@5": 0.7, "task.pass@1": 0.42, "base.task.pass@1": 0.1}, "pass@1", "Pass@1", "pass@1"),
])
def test_each_task_leads_with_its_main_metric(task, task_metrics, main, title, base):
    numbers = headline(small(task_metrics), task)
    assert list(numbers)[:2] == [title, f"Base {base}"]
    assert numbers[title] == task_metrics[f"task.{main}"]
    assert numbers[f"Base {base}"] == task_metrics[f"base.task.{main}"]
    # what the run does not have is left out: no general tasks, no eval split, no main-metric delta in quantize.json
    assert "Forgetting" not in numbers and "Eval loss" not in numbers and f"GGUF_Q8_0 {base} change" not in numbers
    assert numbers["GGUF_Q8_0 size ratio"] == 0.27


def test_eval_metrics_of_another_task_are_refused_naming_the_key_and_the_fix():
    with pytest.raises(SystemExit, match=r"no task\.rougeL.*evaluate\.task=generation.*dvc repro"):
        headline(small({"task.accuracy": 0.9}), "generation")


@pytest.fixture(scope="module")
def copy(tmp_path_factory):
    """The repo as git sees it, committed as `main`, with the headline stage reproduced by the real dvc."""
    repo = tracked_copy(tmp_path_factory.mktemp("headline"))
    (repo / "metrics" / "headline.json").unlink(missing_ok=True)
    sh(repo, "git", "init", "-q", "-b", "main")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "copy")
    ran = sh(repo, "dvc", "repro", "--single-item", "headline")
    assert "Running stage 'headline'" in ran.stdout, ran.stdout
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "headline")
    return repo


def test_dvc_repro_writes_the_headline_in_column_order(copy):
    text = (copy / "metrics" / "headline.json").read_text()
    task = re.search(r"^\s*task:\s*(\w+)", (copy / "params.yaml").read_text(), re.MULTILINE).group(1)
    assert list(json.loads(text)) == list(headline(COMMITTED, task)), text  # not sorted: DVC keeps the file's order
    csv_header = sh(copy, "dvc", "exp", "show", "--csv").stdout.splitlines()[0].split(",")
    assert csv_header[5:8] == ["Accuracy", "Base accuracy", "Forgetting"], csv_header[:10]  # first, before any file


def test_exp_show_at_120_columns_shows_the_task_metric_its_base_and_forgetting_in_full(copy):
    table = sh(copy, *SHOW, "--rev", "main", env={"COLUMNS": "120"}).stdout
    lines = [line for line in table.splitlines() if line.strip() and not line.strip().startswith("─")]
    cells = [re.split(r"\s{2,}", line.strip()) for line in lines]
    assert cells[0][:5] == ["Experiment", "Created", "Accuracy", "Base accuracy", "Forgetting"], table
    committed = json.loads((copy / "metrics" / "headline.json").read_text())
    for row in cells[1:]:
        assert row[0] in ("workspace", "main"), table
        shown = [float(value) for value in row[2:5]]  # after Experiment and Created ("-" in the workspace row)
        assert shown == pytest.approx([committed[name] for name in ("Accuracy", "Base accuracy", "Forgetting")],
                                      abs=1e-4), table
    assert len(cells) == 3 and max(len(line) for line in table.splitlines()) <= 120, table

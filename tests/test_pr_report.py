"""scripts/pr_report.py on a real git + DVC repository: `main` and a branch that changes a param.

The repo has one trivial stage (stdlib only, no model) that turns its params into metrics, a loss
curve and example predictions, so the report is built from the real `dvc params diff`,
`dvc metrics diff` and `dvc plots diff` exactly as the pull-request workflow builds it.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = str(Path(sys.executable).parent)
sys.path.insert(0, str(ROOT / "scripts"))

import pr_report  # noqa: E402

STEP = '''
import json, yaml
from pathlib import Path
params = yaml.safe_load(open("params.yaml"))["train"]
Path("metrics").mkdir(exist_ok=True)
accuracy = round(min(1.0, params["lr"] * 4), 4)
json.dump({"accuracy": accuracy, "loss": round(1 - accuracy, 4), "steps": params["steps"]},
          open("metrics/score.json", "w"), indent=1)
with open("metrics/curve.csv", "w") as f:
    f.write("step,loss\\n" + "".join(f"{s},{1 / (s * params['lr'] + 1):.4f}\\n" for s in range(1, params["steps"] + 1)))
labels = ["billing", "shipping", "account"]
examples = [{"input": f"<|im_start|>user\\nTicket {i}: refund | please<|im_end|>", "reference": labels[i % 3],
             "base": "mammal", "finetuned": labels[i % 3] if i < accuracy * 6 else "other"} for i in range(6)]
json.dump(examples, open("metrics/examples.json", "w"), indent=1)
Path("model.bin").write_text(str(params))
'''

DVC_YAML = {"stages": {"train": {
    "cmd": "python step.py", "deps": ["step.py"], "params": ["train"], "outs": ["model.bin"],
    "metrics": [{"metrics/score.json": {"cache": False}}],
    "plots": [{"metrics/curve.csv": {"cache": False, "x": "step", "y": "loss"}}],
}}}
DVC_YAML["stages"]["train"]["outs"].append({"metrics/examples.json": {"cache": False}})


def sh(repo, *args):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def set_params(repo, lr, steps=5):
    (repo / "params.yaml").write_text(yaml.safe_dump({"train": {"lr": lr, "steps": steps}}))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """`main` with lr 0.1, then branch `feature` with lr 0.2: both reproduced and committed."""
    repo = tmp_path_factory.mktemp("pr")
    sh(repo, "git", "init", "-q", "-b", "main")
    sh(repo, "dvc", "init", "-q")
    (repo / "step.py").write_text(STEP)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    set_params(repo, 0.1)
    sh(repo, "dvc", "repro", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "baseline")
    sh(repo, "git", "checkout", "-qb", "feature")
    set_params(repo, 0.2)
    sh(repo, "dvc", "repro", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "higher learning rate")
    return repo


def test_report_shows_the_changed_param_the_metric_deltas_and_changed_predictions(repo, tmp_path):
    report = pr_report.build_report(repo, "main", plots_dir=tmp_path / "plots", plots_url="https://ci/run/1")
    assert report.startswith(pr_report.MARKER)
    params, metrics = report.split("### Metrics")[0], report.split("### Metrics")[1].split("###")[0]
    assert "train.lr" in params and "0.1" in params and "0.2" in params and "train.steps" not in params
    # dvc metrics diff --md: path, metric, main's value, the workspace's, the change
    assert "metrics/score.json" in metrics
    assert "| accuracy" in metrics and "0.4" in metrics and "0.8" in metrics
    accuracy_row = next(line for line in metrics.splitlines() if "| accuracy" in line)
    loss_row = next(line for line in metrics.splitlines() if "| loss" in line)
    assert "0.4" in accuracy_row.split("|")[-2] and "-0.4" in loss_row.split("|")[-2]
    assert "steps" not in metrics  # unchanged metrics are left out
    # examples 3 and 4 were wrong at lr 0.1 and are right at lr 0.2; the others did not change
    predictions = report.split("### Example predictions")[1].split("###")[0]
    table = [line for line in predictions.splitlines() if line.startswith("| Ticket")]
    assert len(table) == 2, predictions
    assert "Ticket 3: refund \\| please" in table[0] and "| other | billing ✅ |" in table[0]
    assert "<|im_start|>" not in predictions and "6 examples compared" in predictions
    assert "[the plots diff](https://ci/run/1)" in report
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "metrics/curve.csv" in html and "main" in html and "workspace" in html


def test_report_on_an_unchanged_branch_says_so(repo, tmp_path):
    report = pr_report.build_report(repo, "HEAD")
    assert "No params changed." in report and "No metric changed." in report
    assert "No fine-tuned prediction changed (6 examples compared)." in report
    assert "### Plots" not in report  # only when asked for


def test_cli_writes_the_comment_file_with_the_reproduce_check(repo, tmp_path):
    check = tmp_path / "reproduce.txt"
    check.write_text("3 metrics file(s) reproduce metrics at HEAD (rtol 0.01, atol 0.01)\n")
    out = tmp_path / "report.md"
    sh(repo, sys.executable, str(ROOT / "scripts" / "pr_report.py"), "--base", "main", "--head", "abc1234",
       "--reproduce", str(check), "--examples", "1", "--output", str(out))
    report = out.read_text()
    assert "`main` → `abc1234`" in report and "train.lr" in report
    assert "(1 shown, 6 examples compared;" in report
    assert "3 metrics file(s) reproduce" in report.split("### Do the committed metrics reproduce?")[1]


def test_a_bad_base_revision_fails_naming_the_command(repo):
    with pytest.raises(SystemExit, match="dvc params diff no-such-branch"):
        pr_report.build_report(repo, "no-such-branch")


def test_check_metrics_against_git_revision(repo):
    """scripts/check_metrics.py --rev: the committed metrics of `feature` reproduce; `main`'s do not."""
    script = str(ROOT / "scripts" / "check_metrics.py")
    ok = subprocess.run([sys.executable, script, "metrics", "--rev", "HEAD", "--exact"], cwd=repo,
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "3 metrics file(s) reproduce metrics at HEAD" in ok.stdout, ok.stdout + ok.stderr
    bad = subprocess.run([sys.executable, script, "metrics", "--rev", "main"], cwd=repo, capture_output=True, text=True)
    assert bad.returncode == 1
    assert "score.json: accuracy expected 0.4, got 0.8" in bad.stdout and "examples.json" not in bad.stdout
    assert json.loads((repo / "metrics/score.json").read_text())["accuracy"] == 0.8


def test_an_input_the_base_does_not_have_counts_as_changed():
    before = [{"input": "a", "reference": "x", "base": "m", "finetuned": "x"}]
    after = before + [{"input": "<b>", "reference": "z", "base": "m", "finetuned": "y"}]
    rows, compared = pr_report.changed_examples(before, after, limit=5)
    assert compared == 1 and rows == ["| &lt;b&gt; | z | m | — | y ❌ |"]
    assert pr_report.changed_examples(None, after, limit=1) == (["| a | x | m | — | x ✅ |"], 0)

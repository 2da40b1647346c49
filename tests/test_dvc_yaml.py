"""dvc.yaml tells the truth: what each stage script reads and writes is declared.

Static check over the stage sources: every `params.<section>` a stage touches is in its
`params`, every repo path it names (`ROOT / "a" / "b"`) lies under one of its deps or outs,
and every local module it imports (transitively) is a dep, so editing it reruns the stage.
"""
import re

import yaml

from conftest import ROOT

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
# `evaluate.py base` runs the same script in its baseline mode, which never touches these
MODE_ONLY = {"evaluate_base": {"models/adapter", "metrics/eval.json", "metrics/examples.json", "metrics/confusion.csv"},
             "evaluate": {"metrics/confusion_base.csv"}}
LOCAL = {path.stem for path in (ROOT / "stages").glob("*.py")}


def names(entries):
    return [next(iter(entry)) if isinstance(entry, dict) else entry for entry in entries or []]


def local_imports(module, seen=None):
    seen = seen if seen is not None else set()
    source = (ROOT / "stages" / f"{module}.py").read_text()
    for name in re.findall(r"^\s*(?:from|import) (\w+)", source, re.MULTILINE):
        if name in LOCAL and name not in seen:
            seen.add(name)
            local_imports(name, seen)
    return seen


def script(stage):
    match = re.match(r"python stages/(\w+)\.py", stage["cmd"])
    assert match, stage["cmd"]
    return match.group(1)


def test_every_stage_declares_its_code_params_and_paths():
    problems = []
    for name, stage in STAGES.items():
        module = script(stage)
        source = (ROOT / "stages" / f"{module}.py").read_text()
        deps = names(stage.get("deps"))
        outs = names(stage.get("outs")) + names(stage.get("metrics")) + names(stage.get("plots"))
        for needed in {module} | local_imports(module):
            if f"stages/{needed}.py" not in deps:
                problems.append(f"{name}: stages/{needed}.py is used but not a dep")
        if name == "check_params":
            continue
        declared = {param.split(".")[0] for param in names(stage.get("params"))}
        for section in set(re.findall(r"\bparams\.([a-z_]+)", source)):
            if section not in declared:
                problems.append(f"{name}: reads params.{section} but does not declare it")
        for chain in re.findall(r"ROOT((?:\s*/\s*\"[^\"]+\")+)", source):
            path = "/".join(re.findall(r"\"([^\"]+)\"", chain))
            if path in MODE_ONLY.get(name, ()):
                continue
            if not any(path == item or path.startswith(item.rstrip("/") + "/") for item in deps + outs):
                problems.append(f"{name}: uses {path} but it is neither a dep nor an out")
    assert not problems, "\n".join(problems)


def test_params_sections_exist_and_outputs_have_one_owner():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    owners = {}
    for name, stage in STAGES.items():
        for param in names(stage.get("params")):
            assert param.split(".")[0] in params, f"{name}: declares unknown param {param}"
        for out in names(stage.get("outs")) + names(stage.get("metrics")) + names(stage.get("plots")):
            assert out not in owners, f"{out} written by both {owners[out]} and {name}"
            owners[out] = name

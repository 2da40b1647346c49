"""evaluate: metric functions against hand-computed values, the model passes against the model's own
loss, every task type through `evaluate_model` on a tiny real model, the lm-eval forgetting check,
and the stage itself (base, then fine-tuned) writing side-by-side metrics."""
import csv
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from finetune.data import IGNORE
from stages import evaluate as evaluation
from stages import format as fmt
from finetune.evaluation import scoring
from finetune.evaluation import task_metrics as tm
from finetune.params.core import section
from conftest import ROOT
from repo_tools import tracked_copy
from finetune.evaluation.sandbox import Outcome


# --------------------------------------------------------------------------- metric functions
def test_classification_metrics_match_hand_computed_values():
    references = ["a", "a", "b", "b", "c"]
    predictions = ["a", "b", "b", None, "c"]
    metrics = tm.classification_metrics(predictions, references)
    # per class: a P=1 R=1/2 F1=2/3; b P=1/2 R=1/2 F1=1/2; c P=R=F1=1; supports 2, 2, 1
    assert metrics == pytest.approx({"accuracy": 0.6, "macro_f1": (2 / 3 + 0.5 + 1) / 3,
                                     "weighted_f1": (2 * 2 / 3 + 2 * 0.5 + 1) / 5, "precision": 2.5 / 3,
                                     "recall": 2 / 3, "unparseable": 1})
    report = tm.per_class_report(predictions, references)
    assert report["a"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert report["b"]["f1"] == pytest.approx(0.5) and report["c"]["support"] == 1


@pytest.mark.parametrize("output, expected", [
    ("billing", "billing"), ("Billing.", "billing"), ("  SHIPPING\n", "shipping"), ("Queue: returns!", "returns"),
    ("shipping or billing", "shipping"), ("technical support", "technical support"), ("it's technical", "technical"),
    ("Technical-Support", "technical support"), ("unbilling", None), ("", None), ("mammal", None),
])
def test_parse_label_finds_the_first_whole_label(output, expected):
    labels = ["billing", "shipping", "returns", "technical", "technical support"]
    assert tm.parse_label(output, labels) == expected


def test_generation_metrics_match_hand_computed_values():
    same = tm.generation_metrics(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same["bleu"] == pytest.approx(100) and same["rouge1"] == same["rouge2"] == same["rougeL"] == 1
    assert same["meteor"] == pytest.approx(1 - 0.5 * (1 / 6) ** 3, abs=1e-6)  # one chunk of 6 matches
    short = tm.generation_metrics(["the cat sat"], ["the cat sat on a mat"])
    assert short["rouge1"] == pytest.approx(2 / 3) and short["rougeL"] == pytest.approx(2 / 3)
    assert short["rouge2"] == pytest.approx(2 * 1 * 0.4 / 1.4)  # 2 of 2 bigrams found, 2 of 5 recalled
    fmean = 1 * 0.5 / (0.9 * 1 + 0.1 * 0.5)  # METEOR: P=1, R=1/2, alpha=0.9; one chunk of 3 matches
    assert short["meteor"] == pytest.approx(fmean * (1 - 0.5 * (1 / 3) ** 3), abs=1e-6)
    assert tm.generation_metrics(["cats"], ["cat"])["meteor"] > 0  # Porter stems match offline
    assert tm.generation_metrics(["xyz qqq"], ["the cat sat"]) == pytest.approx(
        {"bleu": 0, "rouge1": 0, "rouge2": 0, "rougeL": 0, "meteor": 0})


def test_qa_metrics_use_squad_normalisation():
    assert tm.normalise_answer("The  Eiffel Tower!") == "eiffel tower"
    metrics = tm.qa_metrics(["The Eiffel Tower!", "Paris, France", "no"], ["eiffel tower", "Paris", "yes"])
    assert metrics["exact_match"] == pytest.approx(1 / 3)
    assert metrics["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)  # Paris, France: P=1/2 R=1


def test_pass_at_k_is_the_unbiased_estimator():
    assert tm.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert tm.pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))  # 0.7
    assert tm.pass_at_k(5, 0, 3) == 0 and tm.pass_at_k(5, 4, 2) == 1 and tm.pass_at_k(1, 1, 1) == 1


def test_coding_metrics_from_sandbox_outcomes():
    passing = Outcome("finished", True, [True, True])
    half = Outcome("finished", True, [True, False])
    broken = Outcome("finished", False, [False, False])
    slow = Outcome("timeout", True, [True, False])
    metrics = tm.coding_metrics([[passing, half], [broken, slow]], [1, 2])
    assert metrics == pytest.approx({"pass@1": 0.25, "pass@2": 0.5, "syntax_valid_rate": 0.75,
                                     "test_pass_rate": 4 / 8, "timeouts": 1,
                                     "suspicious": 0, "unverified_tests": 0})


def test_code_and_tests_are_extracted_from_answers_and_prompts():
    assert tm.extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1\n"
    assert tm.extract_code("def f():\n    return 1") == "def f():\n    return 1"
    prompt = "<|im_start|>user\nWrite f.\nYour code should pass these tests:\nassert f() == 1\n  assert f() != 2<|im_end|>\n"
    assert tm.extract_tests(prompt, ["<|im_end|>", "<|im_start|>"]) == ["assert f() == 1", "assert f() != 2"]


# --------------------------------------------------------------------------- the model passes
@pytest.fixture(scope="module")
def tiny(tiny_base):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(tiny_base).eval(), AutoTokenizer.from_pretrained(tiny_base)


def rows_for(tokenizer, pairs):
    """Rows as the format stage writes them: chat template, loss on the answer tokens only."""
    records = [{"id": f"t:{index}", "messages": [{"role": "user", "content": question},
                                                  {"role": "assistant", "content": answer}]}
               for index, (question, answer) in enumerate(pairs)]
    return fmt.formatted_rows(tokenizer, records, section("format", system_prompt=None))  # the tiny base's rows: no system turn


def summed_logprob(model, row):
    import torch

    with torch.no_grad():
        loss = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss.item()
    count = sum(label != IGNORE for label in row["labels"][1:])
    return -loss * count, count


def test_perplexity_and_label_likelihood_agree_with_the_models_own_loss(tiny):
    model, tokenizer = tiny
    questions = ["Is the sky blue?", "Name a colour of grass.", "Which queue handles refunds for broken items?"]
    rows = rows_for(tokenizer, zip(questions, ["yes", "green", "returns"]))
    scored = [summed_logprob(model, row) for row in rows]
    expected = math.exp(-sum(logprob for logprob, _ in scored) / sum(count for _, count in scored))
    assert scoring.perplexity(model, rows, batch_size=2) == pytest.approx(expected, rel=1e-4)
    choices = ["yes", "green", "returns", "no"]
    picked = scoring.label_likelihood(model, tokenizer, rows, choices, batch_size=3)
    for question, choice in zip(questions, picked):
        scores = {candidate: summed_logprob(model, rows_for(tokenizer, [(question, candidate)])[0])[0] for candidate in choices}
        assert choice == max(scores, key=scores.get)


def test_constrained_decoding_answers_only_with_a_label_and_picks_the_greedy_one_among_them(tiny):
    """`classification.scoring: constrained`: each step may only continue a label's tokens; the answer is a whole
    label, and the one greedy decoding reaches when every other token is ruled out (checked by hand, step by step)."""
    import torch

    model, tokenizer = tiny
    questions = ["Is the sky blue?", "Name a colour of grass.", "Which queue handles refunds for broken items?"]
    choices = ["yes", "green", "returns", "no refunds here"]
    rows = rows_for(tokenizer, zip(questions, ["yes", "green", "returns"]))
    allowed = scoring.label_prefixes(tokenizer, rows, choices)
    free = scoring.generate(model, tokenizer, [row["prompt"] for row in rows], 12, batch_size=2)
    answers = scoring.generate(model, tokenizer, [row["prompt"] for row in rows], 12, batch_size=2, allowed=allowed)
    assert all(answer in choices for answer in answers), answers
    assert not all(answer in choices for answer in free)  # the untrained tiny model does not answer with labels
    stops = scoring.stop_ids(model, tokenizer)
    for row, answer in zip(rows, answers):
        ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        new: list[int] = []
        while True:  # greedy over the allowed tokens only, one forward pass a step
            options = allowed.get(tuple(new), stops)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids + new])).logits[0, -1]
            token = max(options, key=lambda option: logits[option].item())
            if token in stops:
                break
            new.append(token)
        assert tokenizer.decode(new, skip_special_tokens=True).strip() == answer


def full_logits_reference(model, row, virtual=0):
    """What scoring computed before it kept logits only where needed: every position, one row, then pick."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, virtual:]
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(row["labels"][1:]), ignore_index=IGNORE, reduction="sum")
    return -nll.item(), logits.argmax(-1).tolist()


@pytest.mark.parametrize("method", ["base", "prompt_tuning"])
def test_scoring_keeps_only_the_logits_it_needs_within_the_budget(tiny, tiny_base, method):
    """A budget of two logits a pass: one row at a time, its answer positions in chunks of two; the numbers
    are those of the whole-vocabulary-everywhere computation, and no pass returns more than the budget."""
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model, tokenizer = tiny
    virtual = 0
    if method == "prompt_tuning":  # peft prepends virtual tokens: their logits come first
        virtual = 3
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base),
                               PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual)).eval()
    rows = rows_for(tokenizer, [("Is the sky blue?", "yes it is"), ("Which queue handles a double charge?", "billing"),
                                ("Name a colour of grass, please, in one word.", "green"), ("Hi", "hello there")])
    sequences = [(row["input_ids"], row["labels"]) for row in rows]
    expected = [full_logits_reference(model, row, virtual) for row in rows]
    vocab = scoring.vocab_size(model)
    budget = 2 * vocab * scoring.NLL_BYTES_PER_LOGIT
    shapes = []
    hook = model.register_forward_hook(lambda module, inputs, output: shapes.append(tuple(output.logits.shape)))
    try:
        bounded = scoring.sequence_logprobs(model, sequences, batch_size=4, budget=budget)
    finally:
        hook.remove()
    assert shapes and all(rows_ * positions * vocab * scoring.NLL_BYTES_PER_LOGIT <= budget for rows_, positions, _ in shapes)
    assert any(positions == 2 for _, positions, _ in shapes)  # a row's answer did not fit one pass
    unbounded = scoring.sequence_logprobs(model, sequences, batch_size=4)
    for (logprob, count), (free, free_count), (reference, _), row in zip(bounded, unbounded, expected, rows):
        assert count == free_count == sum(label != IGNORE for label in row["labels"][1:])
        assert logprob == pytest.approx(reference, rel=1e-5) and logprob == pytest.approx(free, rel=1e-6)
    ids = [row["input_ids"] for row in rows]
    argmax = scoring.argmax_tokens(model, ids, 4, budget=5 * vocab * scoring.ARGMAX_BYTES_PER_LOGIT)
    assert argmax == scoring.argmax_tokens(model, ids, 4) == [tokens for _, tokens in expected]


class EveryPosition:
    """Like llamacpp.LlamaCppLM: a callable that returns every position's logits, knows no `logits_to_keep`
    and shows no vocabulary size."""

    def __init__(self, model):
        self.model, self.shapes = model, []

    def __call__(self, input_ids, attention_mask=None, **_):
        output = self.model(input_ids=input_ids, attention_mask=attention_mask)
        self.shapes.append(tuple(output.logits.shape))
        return output


def test_a_model_that_returns_every_position_is_batched_by_width(tiny):
    model, tokenizer = tiny
    wrapped = EveryPosition(model)
    rows = rows_for(tokenizer, [("Is the sky blue?", "yes"), ("Name a colour of grass.", "green"), ("Hi", "hello")])
    width = max(len(row["input_ids"]) for row in rows)
    budget = 2 * width * scoring.vocab_size(model) * scoring.NLL_BYTES_PER_LOGIT  # two rows' every position
    assert not scoring.keeps_logits(wrapped)
    sequences = [(row["input_ids"], row["labels"]) for row in rows]
    scored = scoring.sequence_logprobs(wrapped, sequences, 8, budget=budget)
    probe, *passes = wrapped.shapes  # the vocabulary size, from a one-token pass
    assert probe[:2] == (1, 1) and [rows_ for rows_, _, _ in passes] == [2, 1]
    for (logprob, count), (expected, expected_count) in zip(scored, scoring.sequence_logprobs(model, sequences, 8)):
        assert count == expected_count and logprob == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("task, extra, keys", [
    ("classification", {}, {"task.accuracy", "task.macro_f1", "task.weighted_f1", "task.precision", "task.recall",
                            "task.unparseable"}),
    ("classification", {"classification": {"scoring": "likelihood"}}, {"task.accuracy", "task.unparseable"}),
    ("generation", {}, {"task.bleu", "task.rouge1", "task.rouge2", "task.rougeL", "task.meteor"}),
    ("qa", {}, {"task.exact_match", "task.f1"}),
    ("coding", {"coding": {"num_samples": 2, "k": [1, 2], "timeout_seconds": 2}},
     {"task.pass@1", "task.pass@2", "task.syntax_valid_rate", "task.test_pass_rate", "task.timeouts"}),
])
def test_every_task_type_runs_through_the_shared_core(tiny, task, extra, keys):
    model, tokenizer = tiny
    pairs = {"classification": [("Route: my card was charged twice", "billing"), ("Route: parcel is late", "shipping"),
                                ("Route: app crashes", "technical")],
             "generation": [("Describe: Oslo, sunny", "Oslo is sunny."), ("Describe: Lima, rainy", "Lima is rainy.")],
             "qa": [("Text: Ana bought 3 mugs. Question: How many mugs?", "3"), ("Text: Ben lives in Rome. Question: Where?", "Rome")],
             "coding": [("Write add(a, b).\nYour code should pass these tests:\nassert add(1, 2) == 3", "def add(a, b):\n    return a + b"),
                        ("Write neg(x).\nassert neg(1) == -1", "def neg(x):\n    return -x")]}[task]
    cfg = section("evaluate", task=task, max_new_tokens=6, batch_size=2, general={"tasks": []}, **extra)
    metrics, outputs = scoring.evaluate_model(model, tokenizer, rows_for(tokenizer, pairs), cfg)
    assert keys <= set(metrics) and len(outputs) == len(pairs)
    assert all(isinstance(value, (int, float)) and math.isfinite(value) for value in metrics.values())
    assert 1 < metrics["perplexity"] < 1e6
    if task == "classification" and not extra:
        assert scoring.evaluate_model(model, tokenizer, rows_for(tokenizer, pairs), cfg) == (metrics, outputs)


def test_reference_programs_pass_through_the_coding_path(tiny):
    _, tokenizer = tiny
    rows = rows_for(tokenizer, [("Write add(a, b).\nassert add(1, 2) == 3\nassert add(0, 0) == 0", "x"),
                                ("Write neg(x).\nassert neg(1) == -1", "x")])
    texts = ["```python\ndef add(a, b):\n    return a + b\n```", "def add(a, b):\n    return a - b",
             "def neg(x):\n    return -x", "def neg(x):\n    return -x"]
    metrics = scoring.score_programs(texts, rows, tokenizer, section("evaluate.coding", num_samples=2, k=[1, 2], timeout_seconds=5))
    assert metrics == pytest.approx({"pass@1": (0.5 + 1) / 2, "pass@2": 1.0, "syntax_valid_rate": 1.0,
                                     "test_pass_rate": (2 + 1 + 1 + 1) / 6, "timeouts": 0,
                                     "suspicious": 0, "unverified_tests": 0})


def test_coding_rows_without_tests_are_refused(tiny):
    model, tokenizer = tiny
    rows = rows_for(tokenizer, [("Write add(a, b).", "def add(a, b):\n    return a + b")])
    with pytest.raises(SystemExit, match="no `assert` line"):
        scoring.evaluate_model(model, tokenizer, rows, section("evaluate", task="coding", general={"tasks": []}))


def test_batched_generation_gives_the_answers_of_one_at_a_time(tiny):
    model, tokenizer = tiny
    prompts = [row["prompt"] for row in rows_for(tokenizer, [("Hi", "x"), ("A much longer question about the sea", "y"),
                                                             ("What is two plus two?", "z")])]
    assert scoring.generate(model, tokenizer, prompts, 5, batch_size=3) == scoring.generate(model, tokenizer, prompts, 5, 1)


# --------------------------------------------------------------------------- forgetting check
def test_general_scores_through_lm_eval_offline_and_the_drop_verdict(tiny):
    model, tokenizer = tiny
    general = section("evaluate.general", limit=8, tasks=["general_knowledge"])  # the tiny base's own; real ones:
    scores, lower = evaluation.general_scores(model, tokenizer, general, batch_size=8)  # test_general_benchmarks.py
    assert set(scores) == {"general.general_knowledge.acc"} and 0 <= scores["general.general_knowledge.acc"] <= 1
    assert lower == set() and "general_knowledge" in evaluation.local_tasks()
    drops = evaluation.forgetting({"general.t.acc": 0.50, "general.t.ppl": 12.0}, {"general.t.acc": 0.60, "general.t.ppl": 10.0},
                                lower={"general.t.ppl"})
    assert drops == pytest.approx({"general.t.acc": 0.1, "general.t.ppl": 2.0})
    assert evaluation.drop_verdict({"general.t.acc": 0.04}, section("evaluate.general", max_drop=0.05)) is None
    assert "general.t.acc" in evaluation.drop_verdict({"general.t.acc": 0.1}, section("evaluate.general", max_drop=0.05))


# --------------------------------------------------------------------------- the stage
def test_dvc_declares_what_each_evaluate_mode_needs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    base = stages["evaluate_base"]["params"]
    assert "evaluate" not in base and "evaluate.num_examples" not in base  # presentation knobs do not rerun the base
    assert {"evaluate.task", "evaluate.max_new_tokens", "evaluate.general.tasks"} <= set(base)
    plots = {next(iter(item)): item[next(iter(item))] for name in ("evaluate", "evaluate_base")
             for item in stages[name]["plots"]}
    assert all(spec["template"] == "confusion" for spec in plots.values()) and len(plots) == 2


def run_stage(repo, *args, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-m", "stages.evaluate", *args], cwd=repo, env=env, capture_output=True, text=True)
    if check and result.returncode:
        raise AssertionError(result.stderr[-4000:])
    return result


@pytest.fixture(scope="module")
def stage_repo(tmp_path_factory, tiny_base, tiny):
    """A copy of the repo with a tiny base, a random LoRA adapter and 12 formatted test rows."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    repo = tracked_copy(tmp_path_factory.mktemp("evalrepo"))
    shutil.copytree(tiny_base, repo / "models" / "base")
    (repo / "models" / "base" / ".complete").write_text("ok\n")
    _, tokenizer = tiny
    records = [json.loads(line) for line in (ROOT / "data/raw/support_tickets.jsonl").read_bytes().decode("utf-8", "replace").splitlines()[:40]
               if line.startswith("{") and line.endswith("}")]
    pairs = [(f"{row['instruction']}\n\n{row['input']}", row["output"]) for row in records
             if isinstance(row.get("output"), str) and isinstance(row.get("instruction"), str)][:12]
    fingerprint = "f" * 16  # what format would have written; evaluate compares it with the adapter's
    formatted = repo / "data" / "formatted"
    formatted.mkdir(parents=True, exist_ok=True)
    (formatted / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows_for(tokenizer, pairs)))
    (formatted / "format.json").write_text(json.dumps({"fingerprint": fingerprint}))
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = repo / "models" / "adapter"
    model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    (adapter / "format.json").write_text(json.dumps({"fingerprint": fingerprint}))
    (adapter / ".complete").write_text("ok\n")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluate"].update(max_new_tokens=4, num_examples=3, general={**params["evaluate"]["general"], "tasks": ["general_knowledge"], "limit": 10})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_stage(repo, "base")
    run_stage(repo)
    return repo


def test_stage_writes_base_and_fine_tuned_side_by_side(stage_repo):
    report = json.loads((stage_repo / "metrics/eval.json").read_text())
    for key in ("task.accuracy", "task.macro_f1", "task.weighted_f1", "perplexity", "general.general_knowledge.acc"):
        assert report[f"delta.{key}"] == pytest.approx(report[key] - report[f"base.{key}"], abs=2e-5), key
    assert report["test_rows"] == 12 and "general.worst_drop" in report
    assert any(key.startswith("task.class.") and key.endswith(".f1") for key in report)
    with open(stage_repo / "metrics/confusion.csv") as handle:
        confusion = list(csv.DictReader(handle))
    assert len(confusion) == 12 and set(confusion[0]) == {"actual", "predicted"}
    examples = json.loads((stage_repo / "metrics/examples.json").read_text())
    assert len(examples) == 3 and set(examples[0]) == {"input", "reference", "base", "finetuned"}
    base = json.loads((stage_repo / "metrics/eval_base.json").read_text())
    assert (base["settings"]["device"], base["settings"]["dtype"]) == ("cpu", "float32")  # params: device/dtype auto
    for stage in ("evaluate_base", "evaluate"):  # memory varies run to run: its own file, never in eval*.json
        memory = json.loads((stage_repo / "metrics" / "memory" / f"{stage}.json").read_text())
        assert memory["peak_memory_mb"] > 100 and memory["peak_gpu_memory_mb"] is None and memory["device"] == "cpu"
    assert not any("memory" in key for key in report) and not any("memory" in key for key in base["settings"])


def test_a_rerun_writes_the_same_eval_json_byte_for_byte(stage_repo):
    before = (stage_repo / "metrics/eval.json").read_bytes()
    run_stage(stage_repo)
    assert (stage_repo / "metrics/eval.json").read_bytes() == before


def test_stage_refuses_a_baseline_made_with_other_settings_or_another_template(stage_repo):
    params_path = stage_repo / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    params["evaluate"]["max_new_tokens"] = 5
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        result = run_stage(stage_repo, check=False)
        assert result.returncode != 0 and "dvc repro evaluate_base" in result.stderr
    finally:
        params_path.write_text(original)
    adapter_format = stage_repo / "models/adapter/format.json"
    saved = adapter_format.read_text()
    adapter_format.write_text(json.dumps({"fingerprint": "0000"}))
    try:
        result = run_stage(stage_repo, check=False)
        assert result.returncode != 0 and "template fingerprint 0000" in result.stderr
    finally:
        adapter_format.write_text(saved)

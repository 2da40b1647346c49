"""ingest, dedup_filter and format on small real files (and the real default data)."""
import json

import pandas as pd
import pytest

from finetune.data import IGNORE
from stages import dedup_filter
from stages import format as fmt
from stages import ingest
from finetune.params.sections import load_params
from finetune import ROOT
from finetune.params.core import ParamsError, section
from finetune.params.ingest import Source


def run_sources(tmp_path, sources, seed=1, **split):
    cfg = section("ingest", sources=sources, **{"eval_fraction": 0.1, "test_fraction": 0.1, **split})
    out = tmp_path / "ingested"
    out.mkdir(exist_ok=True)
    summary = ingest.ingest(cfg.sources, seed, cfg, out, tmp_path / "rejects.jsonl", root=tmp_path)
    splits = {name: [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
              for name in ingest.SPLITS}
    rejects = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    return splits, rejects, summary


def run_ingest(tmp_path, name, content, **source):
    (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return run_sources(tmp_path, [Source(path=name, **source)])


def all_records(splits):
    return sorted((record for name in ingest.SPLITS for record in splits[name]), key=lambda record: record["line"])


# --------------------------------------------------------------------------- ingest
def test_alpaca_jsonl_with_bom_crlf_blank_lines_and_every_reject_reason(tmp_path):
    good = {"instruction": "Say hi", "input": "", "output": "hi"}
    lines = [b"\xef\xbb\xbf" + json.dumps(good).encode(), b"", b"{not json", b"[1, 2]",
             json.dumps({"instruction": "x"}).encode(), json.dumps({"instruction": "x", "output": None}).encode(),
             json.dumps({"instruction": "x", "output": 3}).encode(), json.dumps({"instruction": " ", "output": "y"}).encode(),
             b'{"instruction": "caf\xe9", "output": "y"}', json.dumps({**good, "output": "hello"}).encode()]
    splits, rejects, summary = run_ingest(tmp_path, "a.jsonl", b"\r\n".join(lines) + b"\r\n", format="alpaca")
    records = all_records(splits)
    assert [record["line"] for record in records] == [1, 10]
    assert records[0]["messages"] == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    assert "weight" not in records[0]
    reasons = {reject["line"]: reject["reason"] for reject in rejects}
    assert reasons == {3: reasons[3], 4: "row must be an object, got list", 5: "missing field 'output'",
                       6: "field 'output' is null", 7: "field 'output' must be a string, got int",
                       8: "both 'instruction' and 'input' are empty", 9: "invalid UTF-8 at byte 20"}
    assert reasons[3].startswith("invalid JSON")
    assert all(reject["source"] == "a.jsonl" for reject in rejects)
    assert summary["sources"]["a.jsonl"] == {"rows_in": 9, "rejected": 7, "format": "alpaca", "weight": 1.0}
    assert summary["rows_in"] == 9 and summary["rejected"] == 7 and sum(summary["split_rows"].values()) == 2
    with pytest.raises(SystemExit, match=r"7 of 9 rows \(77.8%\).*max_bad_fraction=0.5 \(most from a.jsonl\)"):
        ingest.check_bad_fraction(summary, 0.5, "data/rejects.jsonl")
    ingest.check_bad_fraction(summary, 0.8, "data/rejects.jsonl")


def test_chat_shapes_and_auto_detection(tmp_path):
    sharegpt = [{"conversations": [{"from": "system", "value": "be nice"}, {"from": "human", "value": "hi"},
                                   {"from": "gpt", "value": "hello"}, {"from": "human", "value": "again"},
                                   {"from": "gpt", "value": "sure"}]},
                {"conversations": [{"from": "human", "value": "only a question"}]},
                {"conversations": [{"from": "robot", "value": "beep"}, {"from": "gpt", "value": "x"}]},
                {"conversations": []}, {"conversations": ["text"]}, 7]
    splits, rejects, summary = run_ingest(tmp_path, "s.json", json.dumps(sharegpt))
    assert summary["sources"]["s.json"]["format"] == "sharegpt"
    (record,) = all_records(splits)  # one conversation in, one record out
    assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert [r["reason"] for r in rejects] == ["conversation has no assistant turn", "conversations[0] has unknown role 'robot'",
                                             "field 'conversations' must be a non-empty list",
                                             "conversations[0] must be an object", "row must be an object, got int"]
    assert [r["line"] for r in rejects] == [2, 3, 4, 5, 6]

    messages = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    splits, rejects, summary = run_ingest(tmp_path, "m.jsonl", json.dumps(messages) + "\n" + json.dumps({"x": 1}) + "\n")
    assert summary["sources"]["m.jsonl"]["format"] == "messages"
    assert rejects == [{"source": "m.jsonl", "line": 2, "reason": "field 'messages' must be a non-empty list"}]


def test_classification_shape_becomes_a_question_and_its_label(tmp_path):
    rows = [{"text": "my card was charged twice", "label": "billing"}, {"text": "where is my parcel", "label": 3},
            {"text": "hello", "label": True}, {"text": "hello", "label": ""}, {"text": "", "label": "x"}, {"label": "y"}]
    splits, rejects, summary = run_ingest(tmp_path, "c.jsonl", "\n".join(json.dumps(row) for row in rows))
    assert summary["sources"]["c.jsonl"]["format"] == "classification"  # auto: text + label
    records = all_records(splits)
    assert records[0]["messages"] == [{"role": "user", "content": "my card was charged twice"},
                                      {"role": "assistant", "content": "billing"}]
    assert [record["label"] for record in records] == ["billing", "3"]
    assert [r["reason"] for r in rejects] == ["field 'label' must be a string, got bool", "field 'label' is empty",
                                             "field 'text' is empty", "missing field 'text'"]


def test_csv_parquet_text_column_mapping_and_row_caps(tmp_path):
    csv_bytes = ('\ufeffquestion,answer\r\nwhat?,this\r\n"multi\r\nline?",that\r\nwhy?,\r\nextra,field,here\r\n'
                 .encode() + b"caf\xe9,x\r\n" + b"ok?,fine\r\n")
    (tmp_path / "qa.csv").write_bytes(csv_bytes)
    splits, rejects, _ = run_sources(tmp_path, [Source(path="qa.csv", format="alpaca",
                                                       columns={"question": "instruction", "answer": "output"})])
    assert [record["messages"][0]["content"] for record in all_records(splits)] == ["what?", "multi\r\nline?", "ok?"]
    assert [record["line"] for record in all_records(splits)] == [2, 3, 8]
    assert [(r["line"], r["reason"]) for r in rejects] == [(5, "field 'output' is empty"),
                                                          (6, "row has 3 fields, the header has 2"), (7, "invalid UTF-8")]

    pd.DataFrame({"text": ["some plain text", "more text", "third"]}).to_parquet(tmp_path / "t.parquet")
    splits, rejects, summary = run_sources(tmp_path, [Source(path="t.parquet", max_rows=2, weight=2.5)])
    assert [record["text"] for record in all_records(splits)] == ["some plain text", "more text"] and not rejects
    assert all(record["weight"] == 2.5 for record in all_records(splits))
    assert summary["sources"]["t.parquet"]["format"] == "text"


def test_hub_reader_on_a_local_dataset_names_class_labels(tmp_path):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    (tmp_path / "hub").mkdir()
    datasets.Dataset.from_dict({"text": ["good movie", "bad movie"], "label": [1, 0]}, features=features
                               ).to_parquet(tmp_path / "hub" / "train.parquet")
    splits, rejects, summary = run_sources(tmp_path, [Source(hub=str(tmp_path / "hub"), split="train")])
    assert sorted(record["label"] for record in all_records(splits)) == ["neg", "pos"] and not rejects
    with pytest.raises(SystemExit, match="cannot load hub dataset .* split 'nope'"):
        run_sources(tmp_path, [Source(hub=str(tmp_path / "hub"), split="nope")])


def test_unreadable_sources_fail_at_once_naming_them(tmp_path):
    with pytest.raises(SystemExit, match="nope.jsonl does not exist"):
        run_sources(tmp_path, [Source(path="nope.jsonl")])
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(SystemExit, match="x.txt: unsupported file type '.txt'"):
        run_sources(tmp_path, [Source(path="x.txt")])
    (tmp_path / "bad.json").write_text('{"a": ')
    with pytest.raises(SystemExit, match="bad.json: not a readable JSON file"):
        run_sources(tmp_path, [Source(path="bad.json")])
    with pytest.raises(SystemExit, match=r"ingest.sources\[1\].path: /tmp/x.jsonl must be under data/raw/"):
        ingest.check_paths([Source(path="data/raw/a.jsonl"), Source(path="/tmp/x.jsonl")])


def test_split_is_seeded_stable_when_rows_are_appended_and_capped(tmp_path):
    rows = [json.dumps({"text": f"document number {i}"}) for i in range(400)]
    texts = lambda splits, name: {record["text"] for record in splits[name]}  # noqa: E731
    first = run_ingest(tmp_path, "t.jsonl", "\n".join(rows[:300]))[0]
    second = run_ingest(tmp_path, "t.jsonl", "\n".join(rows))[0]
    for name in ingest.SPLITS:
        assert texts(first, name) <= texts(second, name)  # no row moved to another split
    assert 15 <= len(first["test"]) <= 50
    other_seed = run_sources(tmp_path, [Source(path="t.jsonl")], seed=2)[0]
    assert texts(other_seed, "test") != texts(second, "test")

    capped, _, summary = run_sources(tmp_path, [Source(path="t.jsonl")], max_test_rows=10, max_eval_rows=5)
    assert len(capped["test"]) == 10 and len(capped["eval"]) == 5 and summary["split_rows"]["train"] == 385
    assert texts(capped, "test") < texts(second, "test") and texts(capped, "train") > texts(second, "train")


# --------------------------------------------------------------------------- dedup_filter
def chat(texts, split, answer="ok"):
    return [{"id": f"{split}:{i}", "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]}
            for i, text in enumerate(texts)]


def run_dedup(splits, cfg, tokenizer=None, root=ROOT, chunk_size=dedup_filter.CHUNK):
    kept = {name: [] for name in dedup_filter.SPLITS}
    result = dedup_filter.dedup_filter(splits, cfg, dedup_filter.Filters(cfg, tokenizer, root),
                                       lambda split, record: kept[split].append(record), chunk_size)
    return kept, {name: counts["removed"] for name, counts in result["splits"].items()}, result


@pytest.mark.parametrize("chunk_size", [2, 1000])  # across chunks (index search) and within one chunk
def test_dedup_exact_near_cross_split_and_accounting(chunk_size):
    sentence = "the quick brown fox jumps over the lazy dog near the river bank on a sunny afternoon today"
    splits = {
        "train": chat([sentence, sentence.upper() + "!!", "one" + sentence[3:], sentence.replace("sunny", "cold"),
                       "something else entirely here", "x"], "train"),
        "eval": chat(["Something else, entirely here.", "a genuinely new evaluation sentence about apples",
                      "the same test sentence about oranges and pears"], "eval"),
        "test": chat(["a" + sentence[3:], "a new test sentence about oranges and pears", "The same test sentence about oranges and pears!"], "test"),
    }
    cfg = section("dedup_filter", min_chars=5)
    kept, removed, result = run_dedup(splits, cfg, chunk_size=chunk_size)
    assert [r["id"] for r in kept["train"]] == ["train:0", "train:3", "train:4"]  # 3 words changed: kept
    assert removed["train"] == {"exact_duplicate": 1, "near_duplicate": 1, "too_short": 1}
    assert removed["eval"] == {"exact_duplicate_of_train": 1}
    assert removed["test"] == {"near_duplicate_of_train": 1, "exact_duplicate_of_eval": 1}
    report = dedup_filter.account(result["splits"], {"rows_in": 15, "rejected": 3})
    assert report["rows_in"] == report["rows_kept"] + report["rejected"] + sum(report["removed"].values())
    for counts in report["splits"].values():
        assert counts["rows_in"] == counts["rows_kept"] + sum(counts["removed"].values())
    with pytest.raises(SystemExit, match="accounting mismatch"):
        dedup_filter.account(result["splits"], {"rows_in": 16, "rejected": 3})

    off = section("dedup_filter", min_chars=5, exact=False, near={"enabled": False})
    assert len(run_dedup(splits, off)[0]["train"]) == 5


def test_each_quality_filter_and_turning_it_off(tmp_path, tiny_base):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    (tmp_path / "data" / "filters").mkdir(parents=True)
    (tmp_path / "data" / "filters" / "words.txt").write_text("# comment\nbadword\nvery rude phrase\n")
    english = "my parcel has not arrived yet and the tracking page shows no update since last week"
    rows = ["tiny", "x" * 60, "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 3,
            "Ich habe mein Passwort vergessen und kann mich nicht mehr anmelden, bitte helfen Sie mir.",
            english.replace("parcel", "BadWord!"), english.replace("the tracking page", "a very rude, phrase"),
            english]
    cfg = {"min_chars": 6, "max_chars": 50, "min_tokens": 0, "max_tokens": 80,
           "toxicity": {"word_list": "data/filters/words.txt"}}
    kept, removed, result = run_dedup({"train": chat(rows, "train", answer="")}, section("dedup_filter", **cfg), tokenizer, tmp_path)
    assert removed["train"] == {"too_short": 1, "too_long": 6}  # max_chars first: most rows are longer than 50
    cfg["max_chars"] = None
    kept, removed, result = run_dedup({"train": chat(rows, "train", answer="")}, section("dedup_filter", **cfg), tokenizer, tmp_path)
    assert removed["train"] == {"too_short": 1, "too_many_tokens": 1, "wrong_language": 1, "toxic": 2}
    assert [record["id"] for record in kept["train"]] == ["train:1", "train:6"]
    lengths = result["lengths"]
    assert sum(before for before, _ in lengths.values()) == 7 and sum(after for _, after in lengths.values()) == 2
    csv_lines = dedup_filter.histogram_csv(lengths, "tokens", 8).splitlines()
    assert csv_lines[:3] == ["tokens,before,after", "0,1,0", "8,0,0"] and csv_lines[-1] == "88,1,0"  # gaps as zeros

    cfg.update(min_tokens=25, max_tokens=None)
    assert run_dedup({"train": chat(rows, "train", answer="")}, section("dedup_filter", **cfg), tokenizer, tmp_path)[1]["train"] == {
        "too_short": 1, "too_few_tokens": 1, "wrong_language": 1, "toxic": 2}
    off = section("dedup_filter", min_chars=0, max_chars=None, language={"enabled": False}, toxicity={"enabled": False})
    assert len(run_dedup({"train": chat(rows, "train", answer="")}, off, tokenizer, tmp_path)[0]["train"]) == 7
    with pytest.raises(SystemExit, match="language.allowed: unknown language code"):
        dedup_filter.Filters(section("dedup_filter", language={"allowed": ["xx"]}))


def test_toxicity_classifier_path_with_a_tiny_local_model(tmp_path, tiny_base):
    """The real transformers pipeline on a tiny (random-head) classifier: which labels count is the param."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=2,
                                                               id2label={0: "neutral", 1: "toxic"})
    model.config.pad_token_id = AutoTokenizer.from_pretrained(tiny_base).pad_token_id
    model.save_pretrained(tmp_path / "clf")
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(tmp_path / "clf")
    rows = chat(["my parcel has not arrived yet", "the app crashes when I log in", "please refund my order"], "train")
    toxicity = {"word_list": None, "model": str(tmp_path / "clf")}
    removed = run_dedup({"train": rows}, section("dedup_filter", toxicity={**toxicity, "labels": ["neutral", "toxic"]}))[1]
    assert removed["train"] == {"toxic": 3}  # two labels cover the whole probability mass: one is >= 0.5
    assert run_dedup({"train": rows}, section("dedup_filter", toxicity={**toxicity, "labels": ["other"]}))[1]["train"] == {}


def test_accounting_on_the_generated_tickets_with_their_planted_duplicates(tmp_path, tiny_base):
    from transformers import AutoTokenizer

    from conftest import TEST_SCALE

    params = load_params()
    cfg = section("ingest", **TEST_SCALE["ingest"])
    out = tmp_path / "ingested"
    out.mkdir()
    summary = ingest.ingest(cfg.sources, params.seed, cfg, out, tmp_path / "rejects.jsonl")
    assert (summary["rows_in"], summary["rejected"]) == (1600, 20)
    splits = {name: dedup_filter.read_records(out / f"{name}.jsonl") for name in ingest.SPLITS}
    kept, removed, result = run_dedup(splits, params.dedup_filter, AutoTokenizer.from_pretrained(tiny_base))
    report = dedup_filter.account(result["splits"], summary)
    assert report["rows_in"] == report["rows_kept"] + report["rejected"] + sum(report["removed"].values()) == 1600
    exact = sum(count for reason, count in report["removed"].items() if reason.startswith("exact"))
    near = sum(count for reason, count in report["removed"].items() if reason.startswith("near"))
    assert (exact, near) == (40, 40)  # data/generate.py plants 40 of each
    assert not {"wrong_language", "toxic", "too_long"} & set(report["removed"])
    for name, counts in report["splits"].items():
        assert counts["rows_in"] == summary["split_rows"][name] == counts["rows_kept"] + sum(counts["removed"].values())
        assert counts["rows_kept"] == len(kept[name])


# --------------------------------------------------------------------------- format
@pytest.fixture()
def tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


TWO_TURNS = {"id": "r", "messages": [{"role": "user", "content": "What is the capital of France?"},
                                     {"role": "assistant", "content": "Paris"},
                                     {"role": "user", "content": "And of Spain?"},
                                     {"role": "assistant", "content": "Madrid"}]}


def trained_text(tokenizer, row):
    return tokenizer.decode([i for i, label in zip(row["input_ids"], row["labels"]) if label != IGNORE])


def test_format_masks_prompt_and_places_special_tokens(tokenizer):
    template = fmt.resolve_template("tokenizer", tokenizer)
    row = fmt.format_record(TWO_TURNS, tokenizer, template, None, train_on_prompt=False)
    ids = row["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert trained_text(tokenizer, row) == "Paris<|im_end|>\nMadrid<|im_end|>\n"  # both answers, each with EOS
    assert row["prompt"].endswith("And of Spain?<|im_end|>\n<|im_start|>assistant\n") and row["reference"] == "Madrid"
    everything = fmt.format_record(TWO_TURNS, tokenizer, template, None, train_on_prompt=True)
    assert everything["labels"] == everything["input_ids"] == ids

    rows, counts = fmt.format_split([TWO_TURNS], tokenizer, template, section("format", max_seq_len=12, system_prompt=None))
    assert (counts["truncated"], counts["dropped_no_target"], counts["rows_out"]) == (1, 1, 0)
    rows, counts = fmt.format_split([TWO_TURNS], tokenizer, template, section("format", max_seq_len=12, overflow="drop", system_prompt=None))
    assert (counts["dropped_too_long"], counts["truncated"], counts["rows_out"]) == (1, 0, 0)
    rows, counts = fmt.format_split([TWO_TURNS], tokenizer, template, section("format", max_seq_len=40, system_prompt=None))
    assert counts["truncated"] == 1 and len(rows[0]["input_ids"]) == 40 and trained_text(tokenizer, rows[0]).startswith("Paris")

    alpaca = fmt.format_record(TWO_TURNS, tokenizer, fmt.resolve_template("alpaca", tokenizer), "Be brief.", False)
    assert tokenizer.decode(alpaca["input_ids"]).startswith("<|bos|>Be brief.\n\n### Instruction:\nWhat is")
    assert trained_text(tokenizer, alpaca) == "Paris<|im_end|>\n\nMadrid<|im_end|>\n\n"
    assert fmt.fingerprint(template, tokenizer) != fmt.fingerprint(fmt.TEMPLATES["chatml"], tokenizer)

    text = fmt.format_record({"id": "t", "text": "plain words"}, tokenizer, template, None, False)
    assert text["labels"] == text["input_ids"] and text["input_ids"][-1] == tokenizer.eos_token_id


def test_custom_template_file(tokenizer, tmp_path):
    template = fmt.resolve_template("templates/plain.jinja", tokenizer)
    row = fmt.format_record(TWO_TURNS, tokenizer, template, None, False)
    assert tokenizer.decode(row["input_ids"]).startswith("<|bos|>User: What is the capital of France?\nAssistant: Paris")
    assert trained_text(tokenizer, row) == " Paris<|im_end|>\n Madrid<|im_end|>\n"
    assert row["prompt"].endswith("User: And of Spain?\nAssistant:")
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "bad.jinja").write_text(
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}[A]{% endif %}")
    with pytest.raises(SystemExit, match="does not render a conversation as a prefix"):
        fmt.format_record(TWO_TURNS, tokenizer, fmt.resolve_template("templates/bad.jinja", tokenizer, tmp_path), None, False)
    with pytest.raises(SystemExit, match="templates/none.jinja does not exist"):
        fmt.resolve_template("templates/none.jinja", tokenizer, tmp_path)


def test_pad_token_is_never_eos(tiny_base):
    from tokenizers import Tokenizer, models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    assert fmt.resolve_pad(tokenizer)["pad_token"] == "<|pad|>"  # its own
    tokenizer.pad_token = tokenizer.eos_token  # as many hub tokenizers ship
    pad = fmt.resolve_pad(tokenizer)
    assert pad == {"pad_token": "<|pad|>", "pad_token_id": 0, "pad_token_added": False, "vocab_size": 2048}
    with pytest.raises(SystemExit, match="format.pad_token: '<|im_end|>' is the EOS token"):
        fmt.resolve_pad(tokenizer, "<|im_end|>")

    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "</s>": 1}, unk_token=None)),
                                   eos_token="</s>")
    pad = fmt.resolve_pad(bare)
    assert pad == {"pad_token": "<|pad|>", "pad_token_id": 2, "pad_token_added": True, "vocab_size": 3}


def test_source_weights_and_augmentation_apply_to_training_rows_only(tokenizer):
    template = fmt.resolve_template("tokenizer", tokenizer)
    records = [{**TWO_TURNS, "id": f"r{i}", "weight": weight} for i, weight in enumerate([2.0] * 3 + [0.5] * 40)]
    rows, counts = fmt.format_split(records, tokenizer, template, section("format"), seed=1, training=True)
    assert counts["oversampled"] == 3 and 10 < counts["undersampled"] < 30
    assert counts["rows_out"] == 6 + 40 - counts["undersampled"]
    assert [row["id"] for row in rows[:2]] == ["r0", "r0#copy1"]
    again, _ = fmt.format_split(records, tokenizer, template, section("format"), seed=1, training=True)
    assert again == rows  # deterministic
    assert fmt.format_split(records, tokenizer, template, section("format"), seed=1)[1]["rows_out"] == 43  # eval/test: as is

    augment = {"enabled": True, "copies": 2, "instruction_templates": ["Task: {instruction}"],
               "system_prompts": ["You route tickets."]}
    rows, counts = fmt.format_split(records[:1], tokenizer, template, section("format", augment=augment), seed=1, training=True)
    assert counts["augmented"] == 2 and [row["id"] for row in rows] == ["r0", "r0#copy1", "r0#aug1", "r0#aug2"]
    assert tokenizer.decode(rows[2]["input_ids"]).startswith(
        "<|bos|><|im_start|>system\nYou route tickets.<|im_end|>\n<|im_start|>user\nTask: What is the capital")
    assert trained_text(tokenizer, rows[2]) == "Paris<|im_end|>\nMadrid<|im_end|>\n"


def test_paraphrase_augmentation_with_a_local_generator(tokenizer, tiny_base):
    from finetune.data.augment import Paraphraser

    cfg = section("format", augment={"enabled": True, "model": str(tiny_base), "max_new_tokens": 6, "temperature": 0.0,
                          "instruction_templates": ["{instruction}"]})
    paraphraser = Paraphraser(cfg.augment, seed=0)
    outputs = paraphraser(["Where is my parcel?", "Refund my order please."])
    assert len(outputs) == 2 and all(isinstance(output, str) and output for output in outputs)
    template = fmt.resolve_template("tokenizer", tokenizer)
    rows, counts = fmt.format_split([TWO_TURNS], tokenizer, template, cfg, seed=0, training=True, paraphraser=paraphraser)
    assert counts["augmented"] == 1 and rows[1]["id"] == "r#aug1"
    assert trained_text(tokenizer, rows[1]) == "Paris<|im_end|>\nMadrid<|im_end|>\n"


def test_bad_data_params_are_reported_by_key_path(tmp_path):
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["ingest"]["sources"][0]["format"] = "csv"
    params["dedup_filter"].update(min_chars=100, max_chars=50)
    params["dedup_filter"]["toxicity"]["word_list"] = "/etc/words"
    params["format"].update(template="my.jinja", overflow="wrap")
    params["format"]["augment"]["instruction_templates"] = ["no slot"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError) as error:
        load_params(tmp_path / "params.yaml")
    for expected in ["ingest.sources.0.format", "dedup_filter.max_chars: must not be below min_chars (100), got 50",
                     "dedup_filter.toxicity.word_list: must be a file under data/filters/",
                     "format.template: must be tokenizer, chatml, alpaca, or a Jinja file templates/<name>.jinja",
                     "format.overflow", "format.augment.instruction_templates: every template must contain {instruction}"]:
        assert expected in str(error.value)

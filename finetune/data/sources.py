"""Row readers for ingest: every supported file type and the Hugging Face Hub, one row at a time.

Each reader yields `(line_or_row_number, row)`, where a row that cannot even be parsed is a
`BadRow` carrying the reason, so ingest can reject it and go on. A source that cannot be read
at all (missing file, unknown type, unloadable dataset) stops the stage at once, naming it.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from finetune import ROOT


class BadRow(ValueError):
    pass


# --------------------------------------------------------------------------- reading
def read_rows(source, root: Path = ROOT):
    """Yield (line_or_row_number, object_or_BadRow) for one source, one row at a time."""
    if source.hub:
        yield from read_hub_rows(source)
        return
    path = Path(source.path) if Path(source.path).is_absolute() else root / source.path
    if not path.is_file():
        raise SystemExit(f"ingest.sources: {source.path} does not exist (path is relative to the repo root)")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from read_jsonl_rows(path)
    elif suffix == ".json":
        try:
            rows = json.loads(path.read_bytes().decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SystemExit(f"{source.path}: not a readable JSON file ({exc}); use JSON Lines for row-level recovery")
        if not isinstance(rows, list):
            raise SystemExit(f"{source.path}: a .json source must hold an array of rows")
        yield from enumerate(rows, start=1)
    elif suffix == ".csv":
        yield from read_csv_rows(path)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
            number = 0
            for batch in batches:
                for row in batch.to_pylist():
                    number += 1
                    yield number, row
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise SystemExit(f"{source.path}: cannot read Parquet ({exc})") from None
    else:
        raise SystemExit(f"{source.path}: unsupported file type {suffix!r}; use .jsonl, .json, .csv or .parquet")


def read_jsonl_rows(path: Path):
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, BadRow(f"invalid UTF-8 at byte {exc.start}")
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as exc:
                yield number, BadRow(f"invalid JSON: {exc.msg} at column {exc.colno}")


def read_csv_rows(path: Path):
    """Rows keyed by the header; the number is the line the row starts on (quoted fields may span lines)."""
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return
        line = reader.line_num + 1
        for values in reader:
            start, line = line, reader.line_num + 1
            if not any(value.strip() for value in values):
                continue
            if len(values) != len(header):
                yield start, BadRow(f"row has {len(values)} fields, the header has {len(header)}")
            elif any("\udc80" <= char <= "\udcff" for value in values for char in value):
                yield start, BadRow("invalid UTF-8")
            else:
                yield start, dict(zip(header, values))


def read_hub_rows(source):
    import datasets

    try:
        dataset = datasets.load_dataset(source.hub, split=source.split)
    except Exception as exc:  # offline, unknown id, unknown split: all fatal for this source
        raise SystemExit(f"ingest.sources: cannot load hub dataset {source.hub!r} split {source.split!r}: {exc}") from None
    class_labels = {name: feature for name, feature in dataset.features.items()
                    if isinstance(feature, datasets.ClassLabel)}
    for number, row in enumerate(dataset, start=1):
        for name, feature in class_labels.items():  # integer class ids become their names
            if isinstance(row.get(name), int) and row[name] >= 0:
                row[name] = feature.int2str(row[name])
        yield number, row

"""ingest: read every source in `ingest.sources`, normalise each row to one schema, split.

One record per input row: `{"id", "source", "line", "messages": [{"role", "content"}, ...]}`
for instruction and chat shapes, `{"id", "source", "line", "text"}` for plain text. Every
malformed row goes to `data/rejects.jsonl` with its source, line and reason. The split is a
hash of the row's content and the seed, so appending rows never moves existing ones.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from common import ROOT, atomic_dir, setup, write_json, write_jsonl

log = logging.getLogger("finetune.ingest")

OUT = ROOT / "data" / "ingested"
REJECTS = ROOT / "data" / "rejects.jsonl"
SPLITS = ("train", "eval", "test")
ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class BadRow(ValueError):
    pass


# --------------------------------------------------------------------------- reading
def read_rows(source, root: Path = ROOT):
    """Yield (line_or_row_number, object_or_BadRow) for one source."""
    if source.hub:
        import datasets

        for number, row in enumerate(datasets.load_dataset(source.hub, split=source.split), start=1):
            yield number, row
        return
    path = (root / source.path) if not Path(source.path).is_absolute() else Path(source.path)
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
    elif suffix in (".csv", ".parquet"):
        import pandas as pd

        try:
            frame = (pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig") if suffix == ".csv"
                     else pd.read_parquet(path))
        except Exception as exc:  # pandas raises many types; the file as a whole is unreadable
            raise SystemExit(f"{source.path}: cannot read ({exc})") from None
        first = 2 if suffix == ".csv" else 1  # a CSV's line 1 is its header
        for offset, row in enumerate(frame.to_dict(orient="records")):
            yield offset + first, row
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


# --------------------------------------------------------------------------- shapes
def detect_format(row: dict) -> str:
    if "conversations" in row:
        return "sharegpt"
    if "messages" in row:
        return "messages"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "text" in row:
        return "text"
    raise BadRow(f"cannot tell the shape from keys {sorted(row)}; set `format` on the source")


def text_field(row: dict, key: str, required: bool = True) -> str:
    if row.get(key) is None:
        if required:
            raise BadRow(f"missing field {key!r}" if key not in row else f"field {key!r} is null")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise BadRow(f"field {key!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise BadRow(f"field {key!r} is empty")
    return value


def normalise(row, shape: str) -> dict:
    """Map one raw row to `messages` or `text`; raise BadRow with the reason."""
    if not isinstance(row, dict):
        raise BadRow(f"row must be an object, got {type(row).__name__}")
    if shape == "text":
        return {"text": text_field(row, "text")}
    if shape == "alpaca":
        instruction, extra = text_field(row, "instruction", False), text_field(row, "input", False)
        prompt = "\n\n".join(part.strip() for part in (instruction, extra) if part.strip())
        if not prompt:
            raise BadRow("both 'instruction' and 'input' are empty")
        return {"messages": [{"role": "user", "content": prompt},
                             {"role": "assistant", "content": text_field(row, "output")}]}
    key, role_key, content_key = (("conversations", "from", "value") if shape == "sharegpt"
                                  else ("messages", "role", "content"))
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        raise BadRow(f"field {key!r} must be a non-empty list")
    messages = []
    for position, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRow(f"{key}[{position}] must be an object")
        role = ROLES.get(turn.get(role_key))
        if role is None:
            raise BadRow(f"{key}[{position}] has unknown role {turn.get(role_key)!r}")
        messages.append({"role": role, "content": text_field(turn, content_key)})
    if not any(message["role"] == "assistant" for message in messages):
        raise BadRow("conversation has no assistant turn")
    return {"messages": messages}


# --------------------------------------------------------------------------- split
def content_key(record: dict) -> str:
    return json.dumps(record.get("messages") or record.get("text"), ensure_ascii=False, sort_keys=True)


def assign_split(record: dict, seed: int, eval_fraction: float, test_fraction: float) -> str:
    digest = hashlib.sha256(f"{seed}\0{content_key(record)}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    if position < test_fraction:
        return "test"
    return "eval" if position < test_fraction + eval_fraction else "train"


def ingest(sources, seed: int, eval_fraction: float, test_fraction: float, root: Path = ROOT):
    """Pure core: returns ({split: records}, rejects, summary)."""
    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    rejects, summary = [], {}
    for source in sources:
        name = source.hub or source.path
        shape, taken, bad = source.format, 0, 0
        for number, row in read_rows(source, root):
            if source.max_rows is not None and taken >= source.max_rows:
                break
            try:
                if isinstance(row, BadRow):
                    raise row
                if isinstance(row, dict) and source.columns:
                    row = {source.columns.get(column, column): value for column, value in row.items()}
                if shape == "auto" and isinstance(row, dict):
                    shape = detect_format(row)
                    log.info("%s: format auto-detected as %s", name, shape)
                record = normalise(row, shape)
            except BadRow as exc:
                rejects.append({"source": name, "line": number, "reason": str(exc)})
                bad += 1
                continue
            taken += 1
            record = {"id": f"{name}:{number}", "source": name, "line": number, **record}
            splits[assign_split(record, seed, eval_fraction, test_fraction)].append(record)
        summary[name] = {"rows_in": taken + bad, "rejected": bad, "format": shape}
    return splits, rejects, summary


def main() -> None:
    params = setup("ingest")
    cfg = params.ingest
    splits, rejects, summary = ingest(cfg.sources, params.seed, cfg.eval_fraction, cfg.test_fraction)
    rows_in = sum(item["rows_in"] for item in summary.values())
    for item in rejects[:20]:
        log.warning("rejected %s line %s: %s", item["source"], item["line"], item["reason"])
    write_jsonl(REJECTS, rejects)
    bad_fraction = len(rejects) / max(rows_in, 1)
    if bad_fraction > cfg.max_bad_fraction:
        raise SystemExit(f"ingest: {len(rejects)} of {rows_in} rows ({bad_fraction:.1%}) are malformed, above "
                         f"ingest.max_bad_fraction={cfg.max_bad_fraction}; see {REJECTS.relative_to(ROOT)}")
    with atomic_dir(OUT) as tmp:
        for name, records in splits.items():
            write_jsonl(tmp / f"{name}.jsonl", records)
        write_json(tmp / "summary.json", {"rows_in": rows_in, "rejected": len(rejects), "sources": summary,
                                          "split_rows": {name: len(records) for name, records in splits.items()}})
    log.info("ingested %d rows (%d rejected): %s", rows_in, len(rejects),
             {name: len(records) for name, records in splits.items()})


if __name__ == "__main__":
    main()

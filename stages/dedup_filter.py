"""dedup_filter: exact and near-duplicate removal, then length filters, with full accounting.

Splits are processed train -> eval -> test against one shared index, so the first copy
seen is kept: a duplicate of a training row is removed from eval/test (no leakage), and
within a split the earliest row (file order) represents its cluster.
`metrics/data.json`: rows_in = rows_kept + rejected + sum(removed), overall and per split.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import unicodedata

from common import ROOT, atomic_dir, read_jsonl, setup, write_json, write_jsonl

log = logging.getLogger("finetune.dedup_filter")

IN = ROOT / "data" / "ingested"
OUT = ROOT / "data" / "clean"
METRICS = ROOT / "metrics" / "data.json"
SPLITS = ("train", "eval", "test")
PUNCTUATION = re.compile(r"[^\w\s]", re.UNICODE)


def record_text(record: dict) -> str:
    if "text" in record:
        return record["text"]
    return "\n".join(message["content"] for message in record["messages"])


def normalise(text: str) -> str:
    """Case, punctuation and whitespace differences do not make a row new."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(PUNCTUATION.sub(" ", text).split())


def shingles(text: str, size: int) -> set[bytes]:
    words = text.split()
    if len(words) <= size:
        return {" ".join(words).encode()}
    return {" ".join(words[i:i + size]).encode() for i in range(len(words) - size + 1)}


def dedup_filter(splits: dict[str, list[dict]], cfg) -> tuple[dict, dict]:
    """Pure core: returns ({split: kept records}, {split: {reason: count}})."""
    from datasketch import MinHash, MinHashLSH

    kept = {name: [] for name in splits}
    removed = {name: {} for name in splits}
    seen_exact: dict[str, str] = {}
    lsh = MinHashLSH(threshold=cfg.near.threshold, num_perm=cfg.near.num_perm) if cfg.near.enabled else None
    origin: dict[str, str] = {}
    signatures: dict = {}

    def drop(split: str, reason: str) -> None:
        removed[split][reason] = removed[split].get(reason, 0) + 1

    for split in SPLITS:
        records = splits.get(split, [])
        texts = [normalise(record_text(record)) for record in records]
        hashes = (MinHash.bulk([shingles(text, cfg.near.shingle_size) for text in texts], num_perm=cfg.near.num_perm)
                  if lsh is not None else [None] * len(records))
        for record, text, minhash in zip(records, texts, hashes):
            length = len(record_text(record))
            if length < cfg.min_chars:
                drop(split, "too_short")
                continue
            if length > cfg.max_chars:
                drop(split, "too_long")
                continue
            digest = hashlib.sha256(text.encode()).hexdigest()
            if cfg.exact and digest in seen_exact:
                cross = seen_exact[digest] != split
                drop(split, "exact_duplicate_of_train" if cross else "exact_duplicate")
                continue
            if lsh is not None:
                # LSH buckets are approximate: confirm each candidate's estimated Jaccard
                matches = [match for match in lsh.query(minhash) if minhash.jaccard(signatures[match]) >= cfg.near.threshold]
                if matches:
                    cross = any(origin[match] != split for match in matches)
                    drop(split, "near_duplicate_of_train" if cross else "near_duplicate")
                    continue
                lsh.insert(record["id"], minhash)
                origin[record["id"]], signatures[record["id"]] = split, minhash
            seen_exact[digest] = split
            kept[split].append(record)
    return kept, removed


def account(splits: dict, kept: dict, removed: dict, ingest_summary: dict) -> dict:
    per_split = {name: {"rows_in": len(splits[name]), "rows_kept": len(kept[name]), "removed": removed[name]}
                 for name in SPLITS}
    totals: dict[str, int] = {}
    for name in SPLITS:
        for reason, count in removed[name].items():
            totals[reason] = totals.get(reason, 0) + count
    report = {"rows_in": ingest_summary["rows_in"], "rejected": ingest_summary["rejected"],
              "rows_kept": sum(len(records) for records in kept.values()), "removed": totals, "splits": per_split}
    balance = report["rows_kept"] + report["rejected"] + sum(totals.values())
    if balance != report["rows_in"]:  # a bug here would silently lose rows: refuse to continue
        raise SystemExit(f"dedup_filter: accounting mismatch, rows_in={report['rows_in']} but kept+rejected+removed={balance}")
    return report


def main() -> None:
    params = setup("dedup_filter")
    splits = {name: read_jsonl(IN / f"{name}.jsonl") for name in SPLITS}
    kept, removed = dedup_filter(splits, params.dedup_filter)
    report = account(splits, kept, removed, json.loads((IN / "summary.json").read_text()))
    if not kept["train"]:
        raise SystemExit("dedup_filter: no training rows left; loosen dedup_filter params or add data")
    with atomic_dir(OUT) as tmp:
        for name in SPLITS:
            write_jsonl(tmp / f"{name}.jsonl", kept[name])
    write_json(METRICS, report)
    log.info("kept %d of %d rows; removed %s; rejected %d", report["rows_kept"], report["rows_in"],
             report["removed"], report["rejected"])


if __name__ == "__main__":
    main()

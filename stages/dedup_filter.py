"""dedup_filter: quality filters, then exact and near-duplicate removal, with full accounting.

Rows stream through in chunks. Each row meets, in order: the length bounds (characters, then
tokens of the base tokenizer), language identification (py3langid, offline), toxicity (a
shipped word list, and a text-classification model when one is configured), then dedup. Splits
are processed train -> eval -> test against one shared index of kept rows, so the first copy
is kept: a duplicate of a training row is removed from eval/test (`*_of_train`: no leakage), and
within a split the earliest row (file order) represents its cluster.
`metrics/data.json`: rows_in = rows_kept + rejected + sum(removed), overall and per split
(rejected rows never reach a split), and each source's counts and provenance from ingest (name,
license, citation, url; a wheel's pin). `metrics/data_lengths.csv`: token-length histogram of the
rows before and after this stage.
"""
from __future__ import annotations

import functools
import json
import logging
import re
import unicodedata
from pathlib import Path

from finetune import ROOT
from finetune.runtime.files import atomic_dir, require_complete, write_json, write_text
from finetune.runtime.stage import setup
from finetune.data.minhash import DedupIndex
from finetune.params.dedup_filter import DedupFilter

log = logging.getLogger("finetune.dedup_filter")

IN = ROOT / "data" / "ingested"
OUT = ROOT / "data" / "clean"
BASE = ROOT / "models" / "base"
METRICS = ROOT / "metrics" / "data.json"
LENGTHS = ROOT / "metrics" / "data_lengths.csv"
SPLITS = ("train", "eval", "test")
CHUNK = 8192  # rows in memory at once
PUNCTUATION = re.compile(r"[^\w\s]", re.UNICODE)


def record_text(record: dict) -> str:
    if "text" in record:
        return record["text"]
    return "\n".join(message["content"] for message in record["messages"])


def normalise(text: str) -> str:
    """Case, punctuation and whitespace differences do not make a row new."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(PUNCTUATION.sub(" ", text).split())


@functools.lru_cache(maxsize=1)
def language_identifier():
    """py3langid's bundled model (offline; ISO 639 codes), with probabilities normalised to [0, 1]."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


class Filters:
    """The quality filters of `dedup_filter`, loaded once; each is off when its params say so."""

    def __init__(self, cfg, tokenizer=None, root: Path = ROOT):
        self.cfg, self.tokenizer = cfg, tokenizer
        if tokenizer is None and (cfg.min_tokens or cfg.max_tokens):
            raise SystemExit("dedup_filter.min_tokens/max_tokens need the base tokenizer (models/base)")
        self.language = language_identifier() if cfg.language.enabled else None
        if self.language is not None:
            unknown = sorted(set(cfg.language.allowed) - set(self.language.labels))
            if unknown:
                raise SystemExit(f"dedup_filter.language.allowed: unknown language code(s) {unknown}; "
                                 f"py3langid knows {sorted(self.language.labels)}")
        self.words, self.phrases, self.classifier = set(), [], None
        if cfg.toxicity.enabled and cfg.toxicity.word_list:
            path = root / cfg.toxicity.word_list
            if not path.is_file():
                raise SystemExit(f"dedup_filter.toxicity.word_list: {cfg.toxicity.word_list} does not exist")
            entries = [normalise(line) for line in path.read_text(encoding="utf-8").splitlines()
                       if line.strip() and not line.lstrip().startswith("#")]
            self.words = {entry for entry in entries if " " not in entry}
            self.phrases = [f" {entry} " for entry in entries if " " in entry]
        if cfg.toxicity.enabled and cfg.toxicity.model:
            from transformers import pipeline

            self.classifier = pipeline("text-classification", model=cfg.toxicity.model, top_k=None, device="cpu")

    def token_counts(self, texts: list[str]) -> list[int] | None:
        if self.tokenizer is None:
            return None
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def length_reason(self, chars: int, tokens: int | None) -> str | None:
        cfg = self.cfg
        if chars < cfg.min_chars:
            return "too_short"
        if cfg.max_chars is not None and chars > cfg.max_chars:
            return "too_long"
        if tokens is not None and tokens < cfg.min_tokens:
            return "too_few_tokens"
        if tokens is not None and cfg.max_tokens is not None and tokens > cfg.max_tokens:
            return "too_many_tokens"
        return None

    def wrong_language(self, text: str) -> bool:
        language, confidence = self.language.classify(text)
        return language not in self.cfg.language.allowed and confidence >= self.cfg.language.min_confidence

    def toxic_matches(self, normalised: str) -> int:
        padded = f" {normalised} "
        return sum(word in self.words for word in normalised.split()) + sum(padded.count(p) for p in self.phrases)

    def toxic_by_model(self, texts: list[str]) -> list[bool]:
        cfg = self.cfg.toxicity
        wanted = {label.casefold() for label in cfg.labels}
        scores = self.classifier(texts, batch_size=16, truncation=True)
        return [any(item["label"].casefold() in wanted and item["score"] >= cfg.threshold for item in row)
                for row in scores]

    def reasons(self, texts: list[str], normalised: list[str], tokens: list[int] | None) -> list[str | None]:
        """The first quality filter each row fails, or None."""
        reasons = [self.length_reason(len(text), tokens[i] if tokens else None) for i, text in enumerate(texts)]
        for i, text in enumerate(texts):
            if reasons[i] is None and self.language is not None and self.wrong_language(text):
                reasons[i] = "wrong_language"
            elif reasons[i] is None and self.words and self.toxic_matches(normalised[i]) > self.cfg.toxicity.max_matches:
                reasons[i] = "toxic"
        if self.classifier is not None:
            pending = [i for i, reason in enumerate(reasons) if reason is None]
            for i, toxic in zip(pending, self.toxic_by_model([texts[i] for i in pending]) if pending else []):
                reasons[i] = "toxic" if toxic else None
        return reasons


def chunks(rows, size: int):
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def dedup_filter(splits: dict, cfg, filters: Filters, emit, chunk_size: int = CHUNK) -> dict:
    """Pure core: `splits` maps split -> iterable of records; every kept record goes to
    `emit(split, record)`. Returns {"splits": {split: counts}, "lengths": {bucket: [before, after]}}."""
    index = DedupIndex(cfg.near.threshold, cfg.near.num_perm, cfg.near.shingle_size, exact=cfg.exact,
                       near=cfg.near.enabled)
    width, lengths, report = cfg.histogram_bin_tokens, {}, {}
    for split in SPLITS:
        counts = report[split] = {"rows_in": 0, "rows_kept": 0, "removed": {}}
        for chunk in chunks(splits.get(split, ()), chunk_size):
            texts = [record_text(record) for record in chunk]
            normalised = [normalise(text) for text in texts]
            tokens = filters.token_counts(texts)
            sizes = tokens if tokens is not None else [len(text) for text in texts]
            reasons = filters.reasons(texts, normalised, tokens)
            pending = [i for i, reason in enumerate(reasons) if reason is None]
            for i, decision in zip(pending, index.check([normalised[i] for i in pending], split)):
                if decision is not None:
                    kind, origin = decision
                    reasons[i] = f"{kind}_duplicate" + ("" if origin == split else f"_of_{origin}")
            for record, reason, size in zip(chunk, reasons, sizes):
                bucket = lengths.setdefault(size // width * width, [0, 0])
                bucket[0] += 1
                counts["rows_in"] += 1
                if reason is None:
                    bucket[1] += 1
                    counts["rows_kept"] += 1
                    emit(split, record)
                else:
                    counts["removed"][reason] = counts["removed"].get(reason, 0) + 1
    return {"splits": report, "lengths": lengths}


def account(per_split: dict, ingest_summary: dict) -> dict:
    totals: dict[str, int] = {}
    for counts in per_split.values():
        for reason, count in counts["removed"].items():
            totals[reason] = totals.get(reason, 0) + count
    report = {"rows_in": ingest_summary["rows_in"], "rejected": ingest_summary["rejected"],
              "rows_kept": sum(counts["rows_kept"] for counts in per_split.values()),
              "removed": dict(sorted(totals.items())), "splits": per_split,
              "sources": ingest_summary.get("sources", {})}  # each source's counts and provenance, beside the numbers
    balance = report["rows_kept"] + report["rejected"] + sum(totals.values())
    problems = [f"rows_in={report['rows_in']} but kept+rejected+removed={balance}"] if balance != report["rows_in"] else []
    problems += [f"{name}: rows_in={counts['rows_in']} but kept+removed={counts['rows_kept'] + sum(counts['removed'].values())}"
                 for name, counts in per_split.items()
                 if counts["rows_in"] != counts["rows_kept"] + sum(counts["removed"].values())]
    if problems:  # a bug here would silently lose rows: refuse to continue
        raise SystemExit("dedup_filter: accounting mismatch, " + "; ".join(problems))
    return report


def histogram_csv(lengths: dict, unit: str, width: int) -> str:
    """One line per bucket from the shortest to the longest, empty ones included, for `dvc plots`."""
    buckets = range(min(lengths), max(lengths) + 1, width) if lengths else []
    return f"{unit},before,after\n" + "".join(f"{bucket},{lengths.get(bucket, [0, 0])[0]},{lengths.get(bucket, [0, 0])[1]}\n"
                                             for bucket in buckets)


def read_records(path: Path):
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def main() -> None:
    params = setup("dedup_filter", {"dedup_filter": DedupFilter})
    from transformers import AutoTokenizer

    filters = Filters(params.dedup_filter, AutoTokenizer.from_pretrained(require_complete(BASE)))
    with atomic_dir(OUT) as tmp:
        files = {name: open(tmp / f"{name}.jsonl", "w", encoding="utf-8") for name in SPLITS}
        try:
            result = dedup_filter({name: read_records(IN / f"{name}.jsonl") for name in SPLITS}, params.dedup_filter,
                                  filters, lambda split, record: files[split].write(
                                      json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n"))
        finally:
            for handle in files.values():
                handle.close()
        report = account(result["splits"], json.loads((IN / "summary.json").read_text()))
        if not report["splits"]["train"]["rows_kept"]:
            raise SystemExit("dedup_filter: no training rows left; loosen dedup_filter params or add data")
    write_json(METRICS, report)
    write_text(LENGTHS, histogram_csv(result["lengths"], "tokens", params.dedup_filter.histogram_bin_tokens))
    log.info("kept %d of %d rows; removed %s; rejected %d", report["rows_kept"], report["rows_in"],
             report["removed"], report["rejected"])


if __name__ == "__main__":
    main()

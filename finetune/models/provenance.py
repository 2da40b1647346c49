"""How artifacts name their base: by where it came from (`builtin`, a hub id, the original model of a GGUF, a local
folder's name), as `models/base/base.json` records it, never by the folder it sits in on this machine, so an
adapter or a merged model reads the same in every clone."""
from __future__ import annotations

import json
from pathlib import Path

from finetune.runtime.files import write_json, write_text

RECORD = "base.json"  # written by the base stage


def base_name(base_dir: Path | str) -> str:
    """The base's provenance name from its base.json; a folder without one (a model saved elsewhere) by its name."""
    record = Path(base_dir) / RECORD
    if record.is_file():
        info = json.loads(record.read_text(encoding="utf-8"))
        return info.get("name") or info["source"]
    return Path(base_dir).resolve().name


def name_base_in(adapter_dir: Path | str, base_dir: Path | str | None = None) -> str | None:
    """peft writes the folder the base was loaded from (a path on this machine) into adapter_config.json
    (`base_model_name_or_path`, and a prompt-tuning init's `tokenizer_name_or_path`) and README.md (`base_model`):
    each becomes `base_name(base_dir)`. `base_dir` defaults to the folder adapter_config.json names; with
    neither (no adapter here, or a base that was never saved), nothing changes."""
    config_path, card = Path(adapter_dir) / "adapter_config.json", Path(adapter_dir) / "README.md"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    base_dir = base_dir or config.get("base_model_name_or_path")
    if not base_dir:
        return None
    base_dir = Path(base_dir)
    name = base_name(base_dir)
    paths = {str(base_dir), str(base_dir.resolve()), config.get("base_model_name_or_path")} - {None, "", name}
    if config:
        write_json(config_path, {key: name if isinstance(value, str) and value in paths else value
                                 for key, value in config.items()})
    if card.is_file():
        text = card.read_text(encoding="utf-8")
        for path in sorted(paths, key=len, reverse=True):
            text = text.replace(path, name)
        write_text(card, text)
    return name

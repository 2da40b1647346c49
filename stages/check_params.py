"""check_params: validate the whole params.yaml in about a second, before any stage does work.

Its own DVC stage that reruns on every edit of params.yaml, so a typo anywhere (an unknown key,
a wrong type, an out-of-range value) fails `dvc repro` at once with every problem listed by key path.
"""
from __future__ import annotations

import logging

from common import configure_logging
from schema.core import PARAMS_FILE, ParamsError, read_yaml, validate
from schema.dedup_filter import DedupFilter
from schema.evaluate import Evaluate
from schema.format import Format
from schema.ingest import Ingest
from schema.merge import Merge
from schema.model import ModelParams
from schema.publish import Publish
from schema.quantize import Quantize
from schema.train import Train

SECTIONS = {"model": ModelParams, "ingest": Ingest, "dedup_filter": DedupFilter, "format": Format, "train": Train,
            "evaluate": Evaluate, "merge": Merge, "quantize": Quantize, "publish": Publish}
log = logging.getLogger("finetune.check_params")


def load_params(path=None):
    """Every section, and no unknown top-level key."""
    return validate(read_yaml(path or PARAMS_FILE), SECTIONS, where=str(path or "params.yaml"), extra="forbid")


def main(path=None) -> None:
    configure_logging()
    try:
        params = load_params(path)
    except ParamsError as exc:
        log.error("%s", exc)
        raise SystemExit(2) from None
    log.info("params.yaml is valid: %d sections", len(type(params).model_fields))


if __name__ == "__main__":
    main()

"""The whole params.yaml: every section, and no unknown top-level key."""
from __future__ import annotations

from finetune.params.core import PARAMS_FILE, read_yaml, validate
from finetune.params.dedup_filter import DedupFilter
from finetune.params.evaluate import Evaluate
from finetune.params.format import Format
from finetune.params.ingest import Ingest
from finetune.params.merge import Merge
from finetune.params.model import ModelParams
from finetune.params.publish import Publish
from finetune.params.quantize import Quantize
from finetune.params.train import Train

SECTIONS = {"model": ModelParams, "ingest": Ingest, "dedup_filter": DedupFilter, "format": Format, "train": Train,
            "evaluate": Evaluate, "merge": Merge, "quantize": Quantize, "publish": Publish}


def load_params(path=None):
    """Every section, and no unknown top-level key."""
    return validate(read_yaml(path or PARAMS_FILE), SECTIONS, where=str(path or "params.yaml"), extra="forbid")

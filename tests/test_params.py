"""params.yaml: one typed schema, every problem reported at once by key path, fast."""
import subprocess
import sys
import time

import pytest
import yaml

from common import Params, ParamsError, load_params
from conftest import ROOT


def test_shipped_params_validate():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert params.model.base == "builtin" and params.train.method == "lora"


def write(tmp_path, edit):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_every_problem_is_named_once(tmp_path):
    def edit(raw):
        raw["train"]["lora"]["r"] = 0
        raw["train"]["learning_rate"] = "fast"
        raw["train"]["lora_rank"] = 8
        raw["evaluate"]["max_new_tokens"] = -1
        raw["typo_section"] = {}

    with pytest.raises(ParamsError) as caught:
        load_params(write(tmp_path, edit))
    message = str(caught.value)
    assert "5 problem(s)" in message
    assert "train.lora.r: Input should be greater than 0, got 0" in message
    assert "train.learning_rate:" in message and "'fast'" in message
    assert "train.lora_rank: unknown key" in message
    assert "typo_section: unknown key" in message
    assert "evaluate.max_new_tokens:" in message


def test_cross_field_rules(tmp_path):
    def edit(raw):
        raw["model"]["builtin"]["num_heads"] = 3
        raw["ingest"]["sources"] = [{"path": "a.jsonl", "hub": "org/name"}]

    with pytest.raises(ParamsError) as caught:
        load_params(write(tmp_path, edit))
    assert "divisible by num_heads" in str(caught.value)
    assert "ingest.sources.0: give exactly one of `path`" in str(caught.value)


def test_check_stage_fails_fast_without_heavy_imports(tmp_path):
    path = write(tmp_path, lambda raw: raw["train"]["lora"].update(r=0))
    code = ("import sys, common\n"
            "try:\n    common.setup('check_params', sys.argv[1])\n"
            "finally:\n    assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    started = time.time()
    result = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT / "stages", capture_output=True, text=True)
    assert time.time() - started < 5
    assert result.returncode == 2, result.stderr
    assert "train.lora.r: Input should be greater than 0, got 0" in result.stderr
    assert "AssertionError" not in result.stderr

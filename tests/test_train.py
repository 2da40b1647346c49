"""train: every method really trains; batching is exact; a killed run resumes to the same result;
a non-finite loss stops the run and keeps the last good checkpoint; two processes train with DDP."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from finetune.data import IGNORE
from finetune.runtime import device
from stages import format as fmt
from stages import train
from finetune.training import trainer
from finetune.training.trainer import RunFiles, TrainData
from finetune.runtime.files import COMPLETE
from finetune.params.core import merge, section
from conftest import ROOT

TOPICS = {"billing": "I was charged twice for my last order", "shipping": "my parcel has not arrived after two weeks",
          "technical": "the app crashes every time I open settings", "account": "I cannot change the email on my profile"}


def make_rows(tokenizer, count: int, offset: int = 0) -> list[dict]:
    """Chat examples of varied length, formatted by the format stage (loss on the answer only)."""
    records = []
    for i in range(offset, offset + count):
        label, text = list(TOPICS.items())[i % len(TOPICS)]
        records.append({"id": f"t{i}", "messages": [
            {"role": "user", "content": f"Route this ticket: {text}{' please help' * (i % 6)} (#{i})"},
            {"role": "assistant", "content": label}]})
    return fmt.formatted_rows(tokenizer, records, section("format", system_prompt=None))  # the tiny base's rows: no system turn


@pytest.fixture(scope="module")
def data(tiny_base):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    return make_rows(tokenizer, 48), make_rows(tokenizer, 8, offset=1000)


def quick(**overrides):
    settings = dict(max_steps=6, batch_size=4, logging_steps=2, checkpoint_steps=0, learning_rate=5e-3)
    return section("train", **{**settings, **overrides})


def run_fit(tiny_base, data, tmp_path, cfg, callbacks=(), placement=None):
    torch.set_num_threads(1)
    run = RunFiles(checkpoint_dir=tmp_path / "checkpoints", live_dir=tmp_path / "live", fingerprint={"test": 1})
    return train.fit(tiny_base, TrainData(train=data[0], eval=data[1]), cfg, 42, run, callbacks=callbacks,
                     placement=placement)


# --------------------------------------------------------------------------- batching
def test_packing_keeps_every_example_once_within_capacity_with_its_own_positions():
    rows = [{"input_ids": list(range(n)), "labels": list(range(n))} for n in (5, 9, 3, 7, 2, 8, 4)]
    packed = trainer.pack(rows, capacity=12)
    assert all(len(row["input_ids"]) <= 12 for row in packed) and len(packed) == 4  # 38 tokens: 4 rows is optimal
    segments = []
    for row in packed:
        starts = [i for i, position in enumerate(row["position_ids"]) if position == 0] + [len(row["position_ids"])]
        segments += [row["position_ids"][a:b] for a, b in zip(starts, starts[1:])]
    assert sorted(segments) == sorted(list(range(n)) for n in (5, 9, 3, 7, 2, 8, 4))  # each example once, own positions
    assert all(row["labels"][i] == IGNORE for row in packed for i, p in enumerate(row["position_ids"]) if p == 0)
    with pytest.raises(SystemExit, match="packing_length"):
        trainer.pack(rows, capacity=6)


def test_length_grouped_order_is_a_seeded_permutation_of_similar_length_batches():
    lengths = [(i * 37) % 101 + 1 for i in range(200)]
    sampler = trainer.LengthGroupedSampler(lengths, batch_size=8, seed=3, group=True, megabatches=25)
    first = list(sampler)
    assert sorted(first) == list(range(200)) and list(sampler) == first  # deterministic for (seed, epoch)
    sampler.set_epoch(1)
    assert list(sampler) != first
    spread = [max(lengths[i] for i in first[s:s + 8]) - min(lengths[i] for i in first[s:s + 8]) for s in range(0, 200, 8)]
    assert sum(spread) / len(spread) < 5  # random batches of 8 from 1..101 spread ~70


def test_right_padding_without_mask_and_packing_give_each_example_its_own_logits(tiny_base, data):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    rows = data[0][:5]
    alone = [model(input_ids=torch.tensor([row["input_ids"]])).logits[0] for row in rows]
    with torch.no_grad():
        padded = model(input_ids=trainer.collate(rows, pad_id=0)["input_ids"]).logits
        batch = trainer.collate(trainer.pack(rows, capacity=400), pad_id=0)
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    for index, row in enumerate(rows):
        assert torch.allclose(padded[index, :len(row["input_ids"])], alone[index], atol=1e-4)
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    segments = [packed[0, a:b] for a, b in zip(starts, starts[1:])]
    for segment in segments:  # every packed example equals one of the examples run alone
        assert any(s.shape == a.shape and torch.allclose(s, a, atol=1e-4) for s, a in [(segment, x) for x in alone])


# --------------------------------------------------------------------------- methods and knobs
def changed(before: dict, model) -> float:
    after = {name: p.detach() for name, p in model.named_parameters()}
    return max((after[name] - value).abs().max().item() for name, value in before.items() if name in after)


@pytest.mark.parametrize("method", ["full", "lora", "qlora", "prompt_tuning"])
def test_every_method_trains_and_saves_what_merge_needs(tiny_base, data, tmp_path, method):
    cfg = quick(method=method)
    trainer, tokenizer, metrics = run_fit(tiny_base, data, tmp_path, cfg)
    assert metrics["method"] == method and metrics["steps"] == 6 and metrics["trainable_params"] > 0
    assert 0 < metrics["trainable_percent"] <= 100 and (metrics["trainable_percent"] == 100) == (method == "full")
    history = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert history[-1] < history[0]  # it learns, prompt tuning included (the base is pretrained)
    assert metrics["tokens_seen"] > 0 and metrics["tokens_per_second"] > 0 and metrics["eval_loss"] > 0
    out = tmp_path / "out"
    out.mkdir()
    train.save_trained(trainer, tokenizer, cfg, data[1], out)
    files = {path.name for path in out.iterdir()}
    weights = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    assert {weights, "reference_logits.safetensors", "train_method.json", "tokenizer.json"} <= files
    recorded = json.loads((out / "train_method.json").read_text())
    assert recorded["method"] == method and recorded["base"] == "models/base"
    if method == "qlora":
        assert recorded["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    reference = load_file(out / "reference_logits.safetensors")
    virtual = cfg.prompt_tuning.num_virtual_tokens if method == "prompt_tuning" else 0
    assert reference["logits.0"].shape[0] == reference["input_ids.0"].shape[0] + virtual


def test_scheduler_warmup_accumulation_and_the_other_knobs_reach_the_trainer(tiny_base, data, tmp_path):
    cfg = quick(scheduler="constant_with_warmup", warmup_ratio=0.5, gradient_accumulation_steps=2, logging_steps=1,
                optimizer="adamw_bnb_8bit", gradient_checkpointing=True, bf16=True, packing=True, packing_length=128,
                weight_decay=0.1, max_grad_norm=0.5)
    trainer, _, metrics = run_fit(tiny_base, data, tmp_path, cfg)
    args = trainer.args
    assert (args.optim, args.activation_checkpointing, args.bf16, args.weight_decay, args.max_grad_norm) == \
        ("adamw_bnb_8bit", True, True, 0.1, 0.5)
    rates = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert rates[0] < rates[2] and rates[3:] == [5e-3] * 3  # 3 warmup steps, then constant
    assert metrics["steps"] == 6 and metrics["padding_fraction"] < 0.2  # packed rows are nearly full
    assert (tmp_path / "live" / "plots" / "metrics" / "live" / "learning_rate.tsv").read_text().count("\n") == 7  # header + 6


def test_refuses_what_the_machine_cannot_do(tmp_path):
    with pytest.raises(SystemExit, match="fp16.*CUDA"):
        train.check_platform(quick(fp16=True), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 96, "intermediate_size": 256}))
    with pytest.raises(SystemExit, match="multiples of 64"):
        train.check_platform(quick(method="qlora"), tmp_path)


def test_platform_checks_follow_where_the_run_goes_not_what_is_installed(tmp_path, monkeypatch):
    """`device: cpu` on a GPU box trains on the CPU: fp16 and odd 4-bit sizes are refused there too; a run on
    the GPU is refused neither."""
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 96, "intermediate_size": 256}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on_cpu, on_gpu = device.Placement("cpu", "float32"), device.Placement("cuda", "bfloat16")
    with pytest.raises(SystemExit, match="fp16.*run is on the CPU"):
        train.check_platform(quick(fp16=True), tmp_path, on_cpu)
    with pytest.raises(SystemExit, match="multiples of 64"):
        train.check_platform(quick(method="qlora"), tmp_path, on_cpu)
    with pytest.raises(SystemExit, match="compute_dtype: float16"):
        train.check_platform(quick(method="qlora", qlora={"compute_dtype": "float16"}), tmp_path, on_cpu)
    train.check_platform(quick(fp16=True), tmp_path, on_gpu)
    train.check_platform(quick(method="qlora", qlora={"compute_dtype": "float16"}), tmp_path, on_gpu)
    # auto: the run's dtype, so bf16 compute on a bf16 GPU and fp32 on the CPU (bitsandbytes' CPU kernels take it)
    assert [device.qlora_compute_dtype("auto", where) for where in (on_cpu, on_gpu)] == ["float32", "bfloat16"]
    assert device.qlora_compute_dtype("float16", on_cpu) == "float16"


def test_frozen_bases_train_in_the_resolved_dtype_with_fp32_adapters_and_full_keeps_fp32(tiny_base, data, tmp_path):
    bf16 = device.Placement("cpu", "bfloat16")
    lora = train.build_model(tiny_base, quick(method="lora"), 0, bf16)
    assert {p.dtype for name, p in lora.named_parameters() if "lora_" in name} == {torch.float32}
    assert {p.dtype for name, p in lora.named_parameters() if "lora_" not in name} == {torch.bfloat16}
    assert {p.dtype for p in train.build_model(tiny_base, quick(method="full"), 0, bf16).parameters()} == {torch.float32}
    prompt = train.build_model(tiny_base, quick(method="prompt_tuning"), 0, bf16)
    assert {p.dtype for p in prompt.parameters() if p.requires_grad} == {torch.float32}
    qlora = train.build_model(tiny_base, quick(method="qlora", qlora={"compute_dtype": "bfloat16"}), 0, bf16)
    frozen = {p.dtype for name, p in qlora.named_parameters() if "lora_" not in name}
    assert frozen == {torch.uint8, torch.bfloat16}  # 4-bit layers; embeddings and norms not upcast to fp32
    assert all(not p.requires_grad for name, p in qlora.named_parameters() if "lora_" not in name)
    trained, _, metrics = run_fit(tiny_base, data, tmp_path, quick(method="lora", max_steps=3), placement=bf16)
    assert metrics["dtype"] == "bfloat16" and math.isfinite(metrics["train_loss"]) and metrics["steps"] == 3


def test_params_schema_names_every_bad_training_knob():
    with pytest.raises(Exception, match="bf16 and fp16"):
        section("train", bf16=True, fp16=True)
    with pytest.raises(Exception, match="packing"):
        section("train", method="prompt_tuning", packing=True)
    for bad in ({"method": "adapters"}, {"scheduler": "step"}, {"optimizer": "sgd"}, {"lora": {"bias": "some"}},
                {"qlora": {"quant_type": "int4"}}, {"num_processes": 0}):
        with pytest.raises(Exception):
            section("train", **bad)


# --------------------------------------------------------------------------- never waste a run
def test_non_finite_loss_stops_at_once_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_base, data, tmp_path):
    from transformers import TrainerCallback

    class PoisonAfterStep3(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 3:
                with torch.no_grad():
                    next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("inf"))

    with pytest.raises(trainer.NonFiniteError, match="at step 4"):
        run_fit(tiny_base, data, tmp_path, quick(checkpoint_steps=2), callbacks=[PoisonAfterStep3()])
    assert [path.name for path in trainer.complete_checkpoints(tmp_path / "checkpoints")] == ["checkpoint-2"]


def test_checkpoints_made_under_other_settings_or_half_written_are_not_resumed(tmp_path, tiny_base, data):
    folder = tmp_path / "checkpoints"
    (folder / "checkpoint-4").mkdir(parents=True)  # killed while saving: no marker
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2" / "finetune.json").write_text(json.dumps({"step": 2, "fingerprint": {"a": 1}}))
    assert train.prepare_checkpoints(folder, {"a": 1}) == folder / "checkpoint-2"
    assert not (folder / "checkpoint-4").exists()
    assert train.prepare_checkpoints(folder, {"a": 2}) is None and [path.name for path in folder.iterdir()] == ["run.json"]

    # a checkpoint at the run's last step is not gone on from (the Trainer would add a step): the one before it is
    for step in (2, 4):
        (folder / f"checkpoint-{step}").mkdir(exist_ok=True)
        (folder / f"checkpoint-{step}" / "finetune.json").write_text(json.dumps({"step": step, "fingerprint": {"a": 2}}))
        (folder / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 4}))
    assert train.prepare_checkpoints(folder, {"a": 2}) == folder / "checkpoint-2"
    shutil.rmtree(folder / "checkpoint-2")
    assert train.prepare_checkpoints(folder, {"a": 2}) is None and [path.name for path in folder.iterdir()] == ["run.json"]

    (tmp_path / "formatted").mkdir()
    for name in ("train.jsonl", "eval.jsonl"):
        (tmp_path / "formatted" / name).write_text("{}\n")
    fingerprint = lambda cfg: train.run_fingerprint(tiny_base, tmp_path / "formatted", cfg, 42)  # noqa: E731
    assert fingerprint(section("train")) == fingerprint(section("train", logging_steps=3, checkpoint_steps=7, threads=2))
    assert fingerprint(section("train")) != fingerprint(section("train", lora={"r": 4}))
    assert fingerprint(section("train")) != fingerprint(section("train", method="full"))
    assert fingerprint(section("train")) != train.run_fingerprint(tiny_base, tmp_path / "formatted", section("train"), 42,
                                                                  device.Placement("cpu", "bfloat16"))


def mini_repo(path, tiny_base, data, **train_params):
    """The real stage layout, small: stages/, finetune/, configs/, params.yaml, models/base, data/formatted."""
    for code in ("stages", "finetune"):
        shutil.copytree(ROOT / code, path / code, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "configs", path / "configs")
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()),
                   {"train": {"batch_size": 4, "logging_steps": 1, "learning_rate": 5e-3, **train_params}})
    (path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(tiny_base, path / "models" / "base")
    (path / "models" / "base" / COMPLETE).write_text("ok\n")
    (path / "data" / "formatted").mkdir(parents=True)
    for name, rows in zip(("train.jsonl", "eval.jsonl"), data):
        (path / "data" / "formatted" / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    (path / "data" / "formatted" / "format.json").write_text(json.dumps({"fingerprint": "test"}))
    return path


def stage(repo, hash_seed: str | None = None, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if hash_seed is not None:
        env["PYTHONHASHSEED"] = hash_seed
    return subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def finish(process, timeout=120) -> str:
    output = process.communicate(timeout=timeout)[0]
    assert process.returncode == 0, output[-3000:]
    return output


def test_a_rerun_after_a_finished_run_takes_no_extra_step_and_new_code_starts_fresh(tmp_path, tiny_base, data):
    repo = mini_repo(tmp_path / "again", tiny_base, data, max_steps=4, checkpoint_steps=2)
    finish(stage(repo))
    first = json.loads((repo / "metrics" / "train.json").read_text())
    output = finish(stage(repo))  # what `dvc repro` does when a dep of train changed but nothing in the fingerprint
    again = json.loads((repo / "metrics" / "train.json").read_text())
    assert "resuming from" in output and "checkpoint-2" in output, output[-2000:]
    assert first["steps"] == again["steps"] == 4 and again["resumed_from_step"] == 2
    assert again["tokens_seen"] == first["tokens_seen"] and abs(again["train_loss"] - first["train_loss"]) < 1e-5
    # the code changed: the checkpoints were made by other code, so the run starts over
    trainer_py = repo / "finetune" / "training" / "trainer.py"
    trainer_py.write_text(trainer_py.read_text() + "\n# an edit\n")
    output = finish(stage(repo))
    assert "made with other settings (code)" in output and "resuming" not in output, output[-2000:]
    assert json.loads((repo / "metrics" / "train.json").read_text())["resumed_from_step"] == 0


def test_two_runs_write_the_same_adapter_and_checkpoint_bytes_whatever_the_string_hashing(tmp_path, tiny_base, data):
    """peft keeps target_modules in a set, whose order follows Python's per-process string hashing; two runs of the
    same training (hash seeds 1 and 2 list all-linear's seven names in other orders) write the same bytes."""
    repos = [mini_repo(tmp_path / f"hash{seed}", tiny_base, data, max_steps=2, checkpoint_steps=2) for seed in "12"]
    for repo, seed in zip(repos, "12"):
        finish(stage(repo, hash_seed=seed))

    def files(repo):
        folders = [repo / "models" / "adapter", repo / "models" / "checkpoints"]
        return {path.relative_to(repo).as_posix(): path.read_bytes()
                for folder in folders for path in sorted(folder.rglob("*")) if path.is_file()}

    first, second = files(repos[0]), files(repos[1])
    assert "models/checkpoints/checkpoint-2/adapter_config.json" in first and first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []


def test_a_killed_run_resumes_to_the_same_adapter_and_metrics(tmp_path, tiny_base, data):
    settings = dict(max_steps=40, checkpoint_steps=5, eval_steps=10)
    whole = mini_repo(tmp_path / "whole", tiny_base, data, **settings)
    killed = mini_repo(tmp_path / "killed", tiny_base, data, **settings)
    uninterrupted = stage(whole)
    victim = stage(killed)
    checkpoints = killed / "models" / "checkpoints"
    deadline = time.time() + 120
    while not trainer.complete_checkpoints(checkpoints) and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert not (killed / "models" / "adapter").exists(), "the run finished before it could be killed"
    finish(uninterrupted)
    output = finish(stage(killed))
    assert "resuming from" in output

    expected, resumed = (json.loads((repo / "metrics" / "train.json").read_text()) for repo in (whole, killed))
    assert resumed["resumed_from_step"] >= 5 and expected["resumed_from_step"] == 0
    for key in ("steps", "tokens_seen", "trainable_params"):
        assert resumed[key] == expected[key], key
    for key in ("train_loss", "final_loss", "eval_loss"):
        assert abs(resumed[key] - expected[key]) < 1e-5, key
    weights = [load_file(repo / "models" / "adapter" / "adapter_model.safetensors") for repo in (whole, killed)]
    assert weights[0].keys() == weights[1].keys()
    assert max((weights[0][name] - weights[1][name]).abs().max().item() for name in weights[0]) < 1e-5
    # the resumed run replayed the checkpoint's log history into a fresh DVCLive folder: no duplicate steps
    curves = [repo / "metrics" / "train_live" / "plots" / "metrics" / "live" for repo in (whole, killed)]
    for curve in ("loss.tsv", "eval_loss.tsv", "learning_rate.tsv", "grad_norm.tsv"):
        assert (curves[0] / curve).read_text() == (curves[1] / curve).read_text(), curve
    live = [json.loads((repo / "metrics" / "train_live" / "metrics.json").read_text()) for repo in (whole, killed)]
    assert live[0]["step"] == live[1]["step"] == 40 and live[0]["live"]["loss"] == live[1]["live"]["loss"]


def test_two_processes_train_with_ddp_through_accelerate(tmp_path, tiny_base, data):
    repo = mini_repo(tmp_path / "ddp", tiny_base, data, max_steps=4, num_processes=2, checkpoint_steps=2)
    output = finish(stage(repo), timeout=180)
    metrics = json.loads((repo / "metrics" / "train.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["steps"] == 4, output[-2000:]
    assert (repo / "models" / "adapter" / COMPLETE).exists()
    assert json.loads((repo / "models" / "checkpoints" / "checkpoint-4" / "finetune.json").read_text())["step"] == 4


def test_gpu_check_dry_run_prints_the_table(tmp_path):
    """scripts/gpu_check.sh --dry-run: the GPU check's own code (train.fit for lora / qlora / full, evaluate,
    merge) on a tiny Qwen2 on the CPU, 3 steps each, and its table."""
    if not (ROOT / ".venv" / "llama.cpp" / "models" / "ggml-vocab-qwen2.gguf").exists():
        pytest.skip("the Qwen2 vocab file comes with `make install`")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    env.pop("OUT", None)
    result = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    header = next(line for line in result.stdout.splitlines() if line.startswith("run "))
    assert all(column in header for column in ("tokens/s", "MFU", "peak process RSS MiB", "plan MiB", "plan error"))
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    runs = {row["run"]: row for row in report["runs"]}
    assert report["dry_run"] and set(runs) == {"lora", "qlora", "full", "evaluate (lora)", "merge (lora, float32)"}
    assert all(runs[method]["steps"] == 3 and abs(runs[method]["plan_error_percent"]) < 25 for method in ("lora", "full"))
    assert "max logit diff" in runs["merge (lora, float32)"]["result"]

"""memory_plan: the estimate counts what peft and train count, what autograd really keeps, lands within
25% of the measured peak of real training runs, refuses what cannot fit naming the knobs that would, and
prints without training (the README table included)."""
import contextlib
import json
import random
import re
import sys

import pytest
import torch

from finetune.data import IGNORE
from finetune.runtime import device
from finetune.training import memory_plan
from finetune.training.trainer import RunFiles, TrainData
from stages import train
from conftest import ROOT
from finetune.params.core import section
from test_train import finish, make_rows, mini_repo, stage

sys.modules.setdefault("gptqmodel", None)  # as train does: peft would import it (~2 s) to look for GPTQ layers
CPU = device.Placement("cpu", "float32")


@pytest.fixture(scope="module")
def qwen2_tiny(tmp_path_factory):
    """A Qwen2-shaped model with the real Qwen2 tokenizer (151,936 entries), random weights."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import family_models

    try:
        return family_models.build("qwen2", tmp_path_factory.mktemp("qwen2"), "tiny")
    except SystemExit as exc:  # the vocab file comes with `make install`
        pytest.skip(str(exc))


def settings(method="lora", placement=CPU, **train):
    cfg = section("train", method=method, **train)
    return memory_plan.Settings.from_params(cfg, placement), cfg


# --------------------------------------------------------------------------- counts
@pytest.mark.parametrize("method, targets", [("lora", "all-linear"), ("lora", "attention"), ("full", None),
                                             ("prompt_tuning", None)])
def test_trainable_params_and_flops_equal_what_the_built_model_has(tiny_base, method, targets):
    s, cfg = settings(method, lora={"target_modules": targets or "all-linear"})
    shape = memory_plan.describe_base(tiny_base, targets)
    work = memory_plan.Workload(rows=2, sequence_length=16, trained_columns=4, tokens_per_step=32.0, reference_tokens=16)
    result = memory_plan.plan(shape, s, work, framework_mib=0)
    model = train.build_model(tiny_base, cfg, 0, CPU)
    counts = train.parameter_counts(model)
    assert result.trainable_params == counts["trainable_params"]
    assert result.flops_per_token == counts["flops_per_token"] and result.flops_per_step == 32 * counts["flops_per_token"]
    assert shape.total_params == sum(p.numel() for name, p in model.named_parameters()
                                     if "lora_" not in name and "prompt_encoder" not in name)


def test_four_bit_weights_are_half_a_byte_plus_absmax_and_the_head_stays():
    shape = memory_plan.describe(config_for(hidden=128, inter=384), "all-linear")
    work = memory_plan.Workload(2, 16, 4, 32.0, 16)
    qlora, _ = settings("qlora", device.Placement("cuda", "bfloat16"), qlora={"double_quant": False})
    components = {c.name: c.bytes for c in memory_plan.plan(shape, qlora, work, 0).components}
    quantized = sum(linear.in_features * linear.out_features for linear in shape.quantizable)
    assert components["weights_4bit"] == quantized * (0.5 + 4 / 64)
    assert components["weights"] == 2 * (shape.total_params - quantized)  # embeddings, norms, head in bf16
    assert all(linear.role != "head" for linear in shape.quantizable)
    assert any(linear.role == "head" for linear in shape.linears)


# --------------------------------------------------------------------------- what autograd keeps
def config_for(hidden=128, inter=320, layers=1, heads=4, kv=2, vocab=512):
    from transformers import AutoConfig

    return AutoConfig.for_model("qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                tie_word_embeddings=False)


def saved_bytes(layers: int, method: str, dtype, autocast: bool, targets, dropout: float, rows=2, length=32) -> int:
    """Bytes of every tensor autograd saves in one forward pass (parameters excluded), by storage."""
    from peft import LoraConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_for(layers=layers), dtype=dtype)
    if method == "full":
        model = model.float()
    else:
        model.requires_grad_(False)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=targets))
    elif method == "prompt_tuning":
        model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    model.train()
    owned = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, 512, (rows, length))
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), cast:
        model(input_ids=ids, use_cache=False, logits_to_keep=torch.tensor([length - 1]))
    return sum(kept.values())


@pytest.mark.parametrize("method, dtype, autocast, targets, dropout", [
    ("full", "float32", False, None, 0.0),
    ("full", "float32", True, None, 0.0),  # fp32 master weights under bf16 autocast
    ("lora", "float32", False, "all-linear", 0.05),
    ("lora", "float32", False, "all-linear", 0.0),
    ("lora", "bfloat16", False, "all-linear", 0.05),  # a bf16 base, fp32 adapters (what a GPU gets)
    ("lora", "bfloat16", False, ["q_proj", "v_proj"], 0.0),
    ("lora", "float32", True, "all-linear", 0.05),
    ("prompt_tuning", "float32", False, None, 0.0),
])
def test_activations_per_token_and_layer_are_what_autograd_keeps(method, dtype, autocast, targets, dropout):
    """Per decoder layer and token, the formula against the tensors a forward pass really saves: the
    difference of a 2-layer and a 1-layer model (embeddings and head cancel out) at two lengths (what is
    kept per layer, not per token, cancels out: autocast's weight copies)."""
    torch.set_num_threads(1)
    rows, virtual = 2, 4 if method == "prompt_tuning" else 0

    def layer_bytes(length):
        return saved_bytes(2, method, getattr(torch, dtype), autocast, targets, dropout, rows, length) \
            - saved_bytes(1, method, getattr(torch, dtype), autocast, targets, dropout, rows, length)

    measured = (layer_bytes(48) - layer_bytes(16)) / (rows * 32)
    s, _ = settings(method, device.Placement("cpu", dtype), bf16=autocast,
                    lora={"target_modules": targets or "all-linear", "dropout": dropout, "r": 8})
    shape = memory_plan.describe(config_for(), targets)
    assert memory_plan.activation_bytes_per_token_layer(shape, s, 48 + virtual) == pytest.approx(measured, rel=0.01)


# --------------------------------------------------------------------------- against real runs
def long_rows(tokenizer, count: int, seed: int) -> list[dict]:
    """Completion-style rows of 48-96 tokens whose last 24 are trained: logits and activations matter."""
    rng, rows = random.Random(seed), []
    for _ in range(count):
        ids = [rng.randrange(100, 2000) for _ in range(rng.randint(48, 96))]
        rows.append({"input_ids": ids, "labels": [IGNORE] * (len(ids) - 24) + ids[-24:]})
    return rows


def test_the_plan_lands_within_25_percent_of_the_measured_peak(tmp_path, tiny_base, qwen2_tiny):
    """Real runs of the train stage, each in its own process, at once: a small Qwen2 (152k vocabulary)
    with lora / full / qlora and the built-in Llama with lora; plan_peak_memory_mb against peak_memory_mb
    in metrics/memory/train.json (the stage's VmHWM, saving included)."""
    from transformers import AutoTokenizer

    processes = {}
    for family, method in (("qwen2", "lora"), ("qwen2", "full"), ("qwen2", "qlora"), ("llama", "lora")):
        base = qwen2_tiny if family == "qwen2" else tiny_base
        tokenizer = AutoTokenizer.from_pretrained(base)
        data = (long_rows(tokenizer, 32, 0), long_rows(tokenizer, 4, 1)) if family == "qwen2" else \
            (make_rows(tokenizer, 32), make_rows(tokenizer, 4, offset=1000))
        repo = mini_repo(tmp_path / f"{family}-{method}", base, data, method=method, max_steps=2, checkpoint_steps=0)
        processes[family, method] = (repo, stage(repo))
    table, problems = [], []
    for key, (repo, process) in processes.items():
        output = finish(process, timeout=300)
        metrics = json.loads((repo / "metrics" / "memory" / "train.json").read_text())
        plan, measured = metrics["plan_peak_memory_mb"], metrics["peak_memory_mb"]
        error = 100 * (plan - measured) / measured
        table.append(f"{key[0]:>6} {key[1]:<6} plan {plan:>6} MiB  measured {measured:>6} MiB  {error:+.1f}%")
        assert "memory plan: peak" in output and metrics["plan"]["framework_memory_mb"] > 0
        if abs(error) > 25:
            problems.append(table[-1])
    print("\n".join(table))
    assert not problems, "\n".join(table)


# --------------------------------------------------------------------------- refusing, and the command
def test_refuses_what_cannot_fit_naming_the_knobs_that_would():
    from transformers import AutoConfig

    shape = memory_plan.describe(AutoConfig.for_model(**memory_plan.PUBLIC_SHAPES["Llama-3-8B"]), "all-linear")
    work = memory_plan.Workload(rows=8, sequence_length=1024, trained_columns=256, tokens_per_step=8192.0,
                                reference_tokens=256)
    gpu = device.Placement("cuda", "bfloat16")
    full, _ = settings("full", gpu, bf16=True)
    result = memory_plan.plan(shape, full, work, memory_plan.CUDA_CONTEXT_MIB)
    assert result.peak_mib > 80 * 1024  # 8B params x (4 + 4 + 8) bytes alone are 120 GiB
    with pytest.raises(SystemExit) as refused:
        memory_plan.check_fits(result, shape, work, memory_plan.CUDA_CONTEXT_MIB, 80 * 1024, "H100 total")
    message = str(refused.value)
    assert "train.method: qlora" in message and "H100 total is 81,920 MiB" in message
    fitting = re.findall(r"\((\d[\d,]*) MiB\)", message)
    assert fitting and all(int(value.replace(",", "")) <= 80 * 1024 for value in fitting)
    lora, _ = settings("lora", gpu)
    lora_plan = memory_plan.plan(shape, lora, work, memory_plan.CUDA_CONTEXT_MIB)
    with pytest.raises(SystemExit) as refused:
        memory_plan.check_fits(lora_plan, shape, work, memory_plan.CUDA_CONTEXT_MIB, lora_plan.peak_mib * 0.8, "a GPU")
    assert "train.gradient_checkpointing: true" in str(refused.value) and "train.batch_size: 4" in str(refused.value)
    with pytest.raises(SystemExit, match="needs a larger device"):
        memory_plan.check_fits(result, shape, work, memory_plan.CUDA_CONTEXT_MIB, 2048, "a small GPU")
    memory_plan.check_fits(lora_plan, shape, work, memory_plan.CUDA_CONTEXT_MIB, 141 * 1024, "H200 total")  # fits


def test_train_refuses_before_loading_any_weight(tiny_base, tmp_path, monkeypatch):
    monkeypatch.setattr(memory_plan, "capacity_mib", lambda where: (100.0, "RAM available (test)"))
    monkeypatch.setattr(train, "build_model", lambda *args: pytest.fail("a model was loaded"))
    from transformers import AutoTokenizer

    rows = make_rows(AutoTokenizer.from_pretrained(tiny_base), 8)
    with pytest.raises(SystemExit, match="memory plan needs .* RAM available \\(test\\) is 100 MiB"):
        train.fit(tiny_base, TrainData(train=rows, eval=rows), section("train", max_steps=1), 42,
                  RunFiles(checkpoint_dir=tmp_path / "c", live_dir=tmp_path / "p", fingerprint={}), placement=CPU)


def test_the_command_prints_the_plan_for_a_public_shape_without_training(capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import memory_plan as command  # scripts/memory_plan.py

    command.main(["--shape", "Qwen2.5-0.5B", "--device", "cuda", "--dtype", "bfloat16", "train.method=qlora",
                      "train.batch_size=2", "format.max_seq_len=512"])
    out = capsys.readouterr().out
    printed = json.loads(out[out.index("{"):])
    assert printed["plan_peak_memory_mb"] > 0 and printed["plan"]["weights_4bit_mb"] > 0


def test_the_readme_table_is_what_the_command_prints():
    params = __import__("yaml").safe_load((ROOT / "params.yaml").read_text())
    table = memory_plan.readme_table(params)
    assert table in (ROOT / "README.md").read_text(), "README's memory plan table is stale: " \
        "python scripts/memory_plan.py --readme"

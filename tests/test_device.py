"""device: one helper picks where every model runs and in what precision; every stage that loads a model
goes through it, and the model really lands there."""
import ast
import shutil

import pytest
import torch
import yaml

from finetune.data import IGNORE
from finetune.runtime import device
from stages import evaluate as evaluation
from conftest import ROOT

# format's optional instruction paraphraser (augment.model) is not on the device plan yet: it loads in float32
NOT_PLACED = {"augment.py"}
# (file, the literal's source) that are right on every device: full fine-tuning keeps fp32 master weights
# (mixed precision comes from train.bf16/fp16 autocast), wherever the model runs; the base stage dequantizes a GGUF
# into an fp32 folder (the stored base, not a placement: later stages load it where their params say)
FIXED_ON_PURPOSE = {("train.py", "torch.float32"), ("gguf.py", "torch.float32")}
MODEL_STAGES = ["evaluate_base", "evaluate", "merge", "quantize", "train"]


@pytest.mark.parametrize("request_, hardware, expected", [
    (("auto", "auto"), dict(cuda=True, bf16=True), ("cuda", "bfloat16")),
    (("auto", "auto"), dict(cuda=True, bf16=False), ("cuda", "float16")),  # e.g. a T4 or V100
    (("auto", "auto"), dict(cuda=False, bf16=False), ("cpu", "float32")),
    (("cpu", "auto"), dict(cuda=True, bf16=True), ("cpu", "float32")),  # forced onto the CPU of a GPU box
    (("auto", "float32"), dict(cuda=True, bf16=True), ("cuda", "float32")),
    (("cuda", "float16"), dict(cuda=True, bf16=True), ("cuda", "float16")),
    (("auto", "bfloat16"), dict(cuda=False, bf16=False), ("cpu", "bfloat16")),  # what a GPU run uses, on a CPU
])
def test_resolve_picks_the_gpu_and_its_best_dtype(request_, hardware, expected):
    placement = device.resolve(*request_, **hardware)
    assert (placement.device, placement.dtype) == expected
    kwargs = placement.load_kwargs()
    assert kwargs["dtype"] == getattr(torch, expected[1])
    assert kwargs["device_map"] == ({"": 0} if expected[0] == "cuda" else "cpu")


@pytest.mark.parametrize("request_, hardware, message", [
    (("cuda", "auto"), dict(cuda=False, bf16=False), "no CUDA GPU"),
    (("auto", "bfloat16"), dict(cuda=True, bf16=False), "no bfloat16 support"),
    (("tpu", "auto"), dict(cuda=False, bf16=False), "device: must be"),
])
def test_resolve_refuses_what_the_hardware_cannot_do(request_, hardware, message):
    with pytest.raises(SystemExit, match=message):
        device.resolve(*request_, **hardware)


def test_resolve_reads_this_machine_when_not_told():
    placement = device.resolve()
    assert placement.device == ("cuda" if torch.cuda.is_available() else "cpu")
    memory = device.memory_metrics(placement)
    assert memory["peak_memory_mb"] > 0 and set(memory) == {"device", "dtype", "peak_memory_mb", "peak_gpu_memory_mb"}


# --------------------------------------------------------------------------- every stage goes through it
def model_loads(tree):
    """Every `<something>.from_pretrained(...)` call on a transformers/peft model class (not a tokenizer)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "from_pretrained":
            owner = node.func.value
            name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
            if "Tokenizer" not in name and "Config" not in name:
                yield node


def test_no_stage_loads_a_model_with_a_hard_coded_dtype_or_device():
    problems = []
    for path in sorted([*(ROOT / "stages").rglob("*.py"), *(ROOT / "finetune").rglob("*.py")]):
        if path.name in NOT_PLACED:
            continue
        for call in model_loads(ast.parse(path.read_text())):
            for keyword in call.keywords:  # fixed: a literal, or torch.float32 and the like
                fixed = isinstance(keyword.value, (ast.Constant, ast.Dict)) or ast.unparse(keyword.value).startswith("torch.")
                if (path.name, ast.unparse(keyword.value)) in FIXED_ON_PURPOSE:
                    continue
                if keyword.arg in ("dtype", "torch_dtype", "device_map", "device") and fixed:
                    problems.append(f"{path.relative_to(ROOT)}:{call.lineno}: from_pretrained({keyword.arg}="
                                    f"{ast.unparse(keyword.value)}); take it from device.resolve(...).load_kwargs()")
    assert not problems, "\n".join(problems)


def test_every_model_loading_stage_resolves_its_placement_from_params():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in MODEL_STAGES:
        script = next(word for word in stages[name]["cmd"].split() if word.startswith("stages.")).replace(".", "/") + ".py"
        tree = ast.parse((ROOT / script).read_text())
        calls = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Call)
                 and ast.unparse(node.func) in ("device.resolve", "resolve")]
        assert any("params.device" in call for call in calls), f"{script} does not call device.resolve(params.device, ...)"
        assert "device" in stages[name]["params"], f"{name}: reads `device` but dvc.yaml does not declare it"
        assert "finetune/runtime/device.py" in stages[name]["deps"], name


def complete_copy(folder, destination):
    shutil.copytree(folder, destination)
    (destination / ".complete").write_text("ok\n")  # what the base stage marks; evaluation.load refuses a folder without
    return destination


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_evaluate_loads_base_and_adapter_where_the_placement_says(tiny_base, tmp_path, dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, adapter = complete_copy(tiny_base, tmp_path / "base"), tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    AutoTokenizer.from_pretrained(base).save_pretrained(adapter)
    (adapter / ".complete").write_text("ok\n")
    placement = device.Placement("cpu", dtype)
    for adapter_dir in (None, adapter):
        model, _ = evaluation.load(base, adapter_dir, placement)
        weights = {parameter.dtype for name, parameter in model.named_parameters() if "lora_" not in name}
        assert weights == {getattr(torch, dtype)} and model.device.type == "cpu"
        assert hasattr(model, "peft_config") == (adapter_dir is not None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_model_and_its_scoring_run_there(tiny_base, tmp_path):
    from finetune.evaluation import scoring
    from transformers import AutoTokenizer

    tiny_base = complete_copy(tiny_base, tmp_path / "base")
    placement = device.resolve()
    assert placement.device == "cuda" and placement.dtype in ("bfloat16", "float16")
    model, tokenizer = evaluation.load(tiny_base, None, placement)
    assert model.device.type == "cuda" and model.dtype == placement.torch_dtype
    cpu, _ = evaluation.load(tiny_base, None, device.Placement("cpu", "float32"))
    ids = AutoTokenizer.from_pretrained(tiny_base)("The capital of France is")["input_ids"]
    rows = [{"input_ids": ids, "labels": [IGNORE] + ids[1:]}]
    assert scoring.perplexity(model, rows, 4) == pytest.approx(scoring.perplexity(cpu, rows, 4), rel=0.05)
    assert scoring.generate(model, tokenizer, ["Hello"], 4, 1) and device.peak_memory()["peak_gpu_mb"] > 0


def test_an_adapter_is_attached_without_importing_gptqmodel(tiny_base, tmp_path):
    """peft would import GPTQModel (~200 MB) to check the layers of a plain base; checked in a fresh process."""
    import subprocess
    import sys

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); from finetune.runtime import device; import importlib.util; "
             "from transformers import AutoModelForCausalLM; "
             "model = device.load_adapter(AutoModelForCausalLM.from_pretrained(sys.argv[2]), sys.argv[3]); "
             "print(type(model).__name__, 'gptqmodel' in sys.modules, importlib.util.find_spec('gptqmodel') is not None)")
    result = subprocess.run([sys.executable, "-c", probe, str(ROOT), str(tiny_base), str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # a peft model, gptqmodel never imported, and still installed as far as the rest of the process can tell
    kind, imported, findable = result.stdout.split()[-3:]
    assert kind.startswith("PeftModel") and (imported, findable) == ("False", "True"), result.stdout


HEAP_PROBE = ROOT / "tests" / "programs" / "heap_probe.py"


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's allocator only")
@pytest.mark.parametrize("switch, applied, kept_mib", [("1", "True", (0, 8)), ("0", "False", (0, 200))])
def test_freed_tensors_go_back_to_the_os_not_into_glibcs_heap(switch, applied, kept_mib):
    """The train stage's first call: after a step, blocks over 1 MiB are returned when freed (glibc's
    default keeps them in its heap once its dynamic threshold has climbed: 128 MiB of the probe's 2 x 128 here;
    FINETUNE_HEAP_LIMIT=0 keeps the default). What the default keeps is glibc's and the process's business (it
    kept 0 in two full-suite runs, CI's and one here, and 128 alone, where nothing in the environment differed
    that we could find), so with the switch off only "not applied" is asserted, and a sane number."""
    import os
    import subprocess
    import sys

    # glibc's default: no malloc setting from the environment (any of MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_,
    # MALLOC_MMAP_*, or a glibc.malloc tunable freezes the threshold the default lets climb)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("MALLOC_") and key != "GLIBC_TUNABLES"}
    result = subprocess.run([sys.executable, str(HEAP_PROBE), str(ROOT)], capture_output=True, text=True,
                            timeout=60, env={**env, "FINETUNE_HEAP_LIMIT": switch})
    assert result.returncode == 0, result.stderr[-3000:]
    was_applied, grown = result.stdout.split()
    assert was_applied == applied and kept_mib[0] <= int(grown) <= kept_mib[1], result.stdout


def test_the_heap_limit_is_the_first_thing_train_does():
    tree = ast.parse((ROOT / "stages" / "train.py").read_text())
    main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
    assert ast.unparse(main.body[1]) == "device.limit_heap_retention()"

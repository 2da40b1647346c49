"""quantize: each artifact is written, loaded by its real client, scored by the evaluation code, and checked."""
import json
import subprocess
import sys

import pytest
import torch

from finetune.params.sections import load_params
from finetune import ROOT
from finetune.runtime.files import read_jsonl
from finetune.params.core import ParamsError, read_yaml, section, validate
from finetune.params.quantize import QualityCheck, Quantize

pytest.importorskip("llama_cpp")
pytest.importorskip("gptqmodel")
from finetune.export import gptq  # noqa: E402
from finetune.export import llamacpp  # noqa: E402
from stages import format as fmt  # noqa: E402
from stages import quantize  # noqa: E402


def rows_for(tokenizer, tickets):
    """Formatted rows as the format stage writes them: chat prompt, answer tokens trained, reference label."""
    records = [{"id": f"t{index}", "messages": [{"role": "user", "content": f"{ticket['instruction']}\n\n{ticket['input']}"},
                                                {"role": "assistant", "content": ticket["output"]}]}
               for index, ticket in enumerate(tickets)]
    return fmt.formatted_rows(tokenizer, records, section("format", system_prompt=None))  # the tiny base's rows: no system turn


@pytest.fixture(scope="module")
def rows(tiny_base):
    from transformers import AutoTokenizer

    tickets = []
    for line in (ROOT / "data" / "raw" / "support_tickets.jsonl").read_bytes().decode(errors="replace").splitlines()[:60]:
        try:  # the raw file has planted malformed lines for ingest to reject
            ticket = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(ticket, dict) and all(isinstance(ticket.get(key), str) and ticket[key]
                                            for key in ("instruction", "input", "output")):
            tickets.append(ticket)
    return rows_for(AutoTokenizer.from_pretrained(tiny_base), tickets[:40])


def job(tiny_base, rows, out, **settings) -> "quantize.QuantizeJob":
    """The stage's inputs on the tiny base: rows[:12] scored, the rest to calibrate on; quantize.* from params.yaml
    plus `settings`."""
    return quantize.QuantizeJob(tiny_base, out, rows[:12], rows[12:], section("quantize", **settings),
                                load_params().evaluate, threads=1)


@pytest.fixture(scope="module")
def quantized(tiny_base, rows, tmp_path_factory):
    try:
        llamacpp.convert_script_dir()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    out = tmp_path_factory.mktemp("quantized")
    report = quantize.quantize(job(tiny_base, rows, out, formats=["gguf_q8_0", "gguf_q4_k_m", "gptq", "awq", "bnb_int8"],
                                   gptq={"group_size": 64, "desc_act": True, "calibration_rows": 16},
                                   awq={"group_size": "auto", "calibration_rows": 16}, speed_new_tokens=8))
    return report, out, rows


def test_every_artifact_is_measured_against_the_merged_model(quantized):
    report, out, _ = quantized
    assert set(report) == {"merged", "gguf_q8_0", "gguf_q4_k_m", "gptq", "awq", "bnb_int8"}
    assert {path.name for path in out.iterdir()} == {"model-q8_0.gguf", "model-q4_k_m.gguf", "gptq", "awq", "bnb_int8"}  # no f16
    assert report["merged"]["eval_rows"] == 12
    for name in ("gguf_q8_0", "gguf_q4_k_m", "gptq", "awq", "bnb_int8"):
        metrics = report[name]
        # bnb_int8 keeps embeddings and lm_head in fp32: half this tiny model, a small part of a real one
        assert 0 < metrics["size_ratio"] < (0.8 if name == "bnb_int8" else 0.5) and metrics["size_bytes"] > 0, name
        assert metrics["tokens_per_second"] > 0 and metrics["load_seconds"] >= 0, name
        assert 0.5 < metrics["top1_agreement"] <= 1, name
        assert metrics["perplexity_drop_percent"] == pytest.approx(
            100 * (metrics["perplexity"] / report["merged"]["perplexity"] - 1), abs=1e-3)
        assert {"task.accuracy", "delta.task.accuracy", "task.macro_f1"} <= set(metrics), name
    for name in ("gguf_q8_0", "bnb_int8"):  # 8-bit: close to the merged model even when barely trained
        assert report[name]["top1_agreement"] >= 0.97 and abs(report[name]["perplexity_drop_percent"]) < 1, name
    # hidden size 128: llama.cpp's K-quants need rows of 256, so q4_k_m really holds Q5_0/Q8_0 tensors; recorded as such
    q4_types = {key.split(".", 1)[1] for key in report["gguf_q4_k_m"] if key.startswith("tensor_types.")}
    assert "Q5_0" in q4_types and not any(kind.endswith("_K") for kind in q4_types)


def test_a_sound_quantization_passes_the_shipped_gates(quantized):
    report = quantized[0]
    cfg = load_params().quantize
    assert quantize.failed_checks(report, cfg.checks, cfg.max_task_drop_standard_errors) == []


def test_a_scrambled_artifact_fails_the_shipped_gates(quantized, tiny_base, tmp_path):
    """The same q8_0 export of a model whose first decoder layer has its weights shuffled (a broken conversion),
    scored against the real merged model: the gates catch it."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    report, _, rows = quantized
    scrambled = tmp_path / "scrambled"
    scrambled.mkdir()
    for path in tiny_base.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            (scrambled / path.name).write_bytes(path.read_bytes())
    weights, generator = load_file(tiny_base / "model.safetensors"), torch.Generator().manual_seed(0)
    for name, tensor in weights.items():
        if ".layers.0." in name and tensor.dim() == 2:
            weights[name] = tensor.flatten()[torch.randperm(tensor.numel(), generator=generator)].view_as(tensor)
    save_file(weights, scrambled / "model.safetensors", metadata={"format": "pt"})
    f16 = llamacpp.hf_to_gguf(scrambled, tmp_path / "model-f16.gguf")
    broken = llamacpp.LlamaCppLM(llamacpp.quantize_gguf(f16, tmp_path / "model-q8_0.gguf", "q8_0"),
                                 GenerationConfig.from_pretrained(tiny_base), n_ctx=256)
    settings = job(tiny_base, rows, tmp_path, speed_new_tokens=2)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    _, reference_top1 = quantize.score(AutoModelForCausalLM.from_pretrained(tiny_base).eval(), tokenizer, rows[:12], settings)
    metrics, top1 = quantize.score(broken, tokenizer, rows[:12], settings)
    compared = quantize.compare(metrics, top1, report["merged"], reference_top1)
    cfg = load_params().quantize
    problems = quantize.failed_checks({"merged": report["merged"], "gguf_q8_0": compared}, cfg.checks,
                                      cfg.max_task_drop_standard_errors)
    assert any("quantize.checks.gguf_q8_0.max_perplexity_drop_percent" in problem for problem in problems)
    assert any("quantize.checks.gguf_q8_0.min_top1_agreement" in problem for problem in problems)


def test_a_task_metric_may_fall_by_the_test_split_noise_and_no_more():
    """Two binomial standard errors of the merged model's score on the rows scored (smoothed, so a perfect score
    still has one): 0.95 on 180 rows allows a fall of 0.034 (6 rows); 1.0 on 60 rows allows one row, not two."""
    assert quantize.task_drop_limit(0.95, 180, 2) == pytest.approx(0.0340, abs=1e-4)
    assert quantize.task_drop_limit(1.0, 60, 2) == pytest.approx(0.0325, abs=1e-4)
    check = {"gptq": QualityCheck(max_perplexity_drop_percent=50, min_top1_agreement=0.5)}

    def report(merged, quantized, rows):
        return {"merged": {"task.accuracy": merged, "eval_rows": rows},
                "gptq": {"task.accuracy": quantized, "perplexity_drop_percent": 0.0, "top1_agreement": 1.0}}

    assert quantize.failed_checks(report(0.95, 0.95 - 6 / 180, 180), check, 2) == []
    assert quantize.failed_checks(report(0.95, 0.96, 180), check, 2) == []  # a rise is never a failure
    assert quantize.failed_checks(report(1.0, 59 / 60, 60), check, 2) == []
    problems = quantize.failed_checks(report(1.0, 58 / 60, 60), check, 2)
    assert len(problems) == 1 and "task.accuracy fell 0.0333 (1.0000 -> 0.9667) on 60 rows" in problems[0]
    assert "quantize.max_task_drop_standard_errors=2 standard errors (0.0325)" in problems[0]


def test_evaluation_rows_are_an_evenly_spaced_deterministic_subset():
    rows = [{"id": index} for index in range(180)]
    chosen = quantize.evaluation_rows(rows, 90)
    assert [row["id"] for row in chosen] == list(range(0, 180, 2)) and quantize.evaluation_rows(rows, 90) == chosen
    assert [row["id"] for row in quantize.evaluation_rows(rows, 7)] == [0, 25, 51, 77, 102, 128, 154]
    assert quantize.evaluation_rows(rows, None) == rows and quantize.evaluation_rows(rows[:5], 90) == rows[:5]


def test_gguf_generates_and_scores_in_llama_cpp(quantized, tiny_base):
    from finetune.evaluation import scoring
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    _, out, rows = quantized
    model = llamacpp.LlamaCppLM(out / "model-q8_0.gguf", GenerationConfig.from_pretrained(tiny_base), n_ctx=256)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    text = llamacpp.generate(model.llm, rows[0]["prompt"], max_tokens=6)  # llama.cpp's own tokenizer and sampler
    assert text.strip() == scoring.generate(model, tokenizer, [rows[0]["prompt"]], 6, 1)[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    assert quantize.agreement(quantize.answer_top1(model, rows[:4], 2), quantize.answer_top1(hf, rows[:4], 2)) > 0.95
    assert scoring.perplexity(model, rows[:4], 2) == pytest.approx(scoring.perplexity(hf, rows[:4], 2), rel=0.02)


def test_answer_top1_is_the_argmax_where_answer_tokens_are_predicted(tiny_base, rows):
    from finetune.evaluation import scoring
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([row["input_ids"]])).logits[0].argmax(-1).tolist() for row in rows[:6]]
    expected = [[tokens[position] for position, label in enumerate(row["labels"][1:]) if label != -100]
                for tokens, row in zip(alone, rows[:6])]
    assert all(3 <= len(tokens) < len(row["input_ids"]) // 4 for tokens, row in zip(expected, rows[:6]))  # answers only
    assert quantize.answer_top1(model, rows[:6], batch_size=4) == expected
    seen = {}  # what the stage does: keep the argmax of scoring's perplexity pass, then no second pass is needed
    handle = quantize.record_argmax(model, seen)
    scoring.perplexity(model, rows[:6], 4)
    handle.remove()
    for row in rows[:6]:  # a batch asks for its rows' union of answer positions
        assert set(quantize.answer_positions(row)) <= set(seen[tuple(row["input_ids"])]) and len(seen) == 6
        assert max(seen[tuple(row["input_ids"])]) < len(row["input_ids"])  # nothing from the padding
    assert quantize.answer_top1(model, rows[:6], 4, seen) == expected
    width = max(len(row["input_ids"]) for row in rows[:6])
    tight = width * scoring.vocab_size(model) * scoring.ARGMAX_BYTES_PER_LOGIT // 2  # half a row a pass
    assert scoring.argmax_tokens(model, [row["input_ids"] for row in rows[:6]], 4, budget=tight) == alone


PLAIN = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
layer = model.model.layers[0].self_attn.q_proj
with torch.no_grad():
    logits = model(input_ids=torch.tensor([json.loads(sys.argv[2])])).logits[0]
print(json.dumps({"layer": type(layer).__name__, "argmax": logits.argmax(-1).tolist(),
                  "project_code": [m for m in ("common", "quantize", "gptq") if m in sys.modules]}))
"""


@pytest.mark.parametrize("method, settings", [("gptq", ("gptq", 4, 64, True)), ("awq", ("awq", 4, 128, False))])
def test_gptqmodel_formats_reload_in_plain_transformers(quantized, tmp_path, method, settings):
    report, out, rows = quantized
    config = json.loads((out / method / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["bits"], config["group_size"], config["desc_act"]) == settings
    assert report[method]["group_size"] == settings[2]  # awq: `auto`, and 128 divides the tiny base's 128 and 384
    if method == "awq":  # the GEMM checkpoint layout that transformers' and vLLM's AWQ loaders read
        assert config["format"] == "gemm"
    calibration = read_jsonl(out / method / gptq.CALIBRATION)
    assert calibration == gptq.calibration_rows(rows[12:], 16, 0) and len(calibration) == 16
    assert report[method]["calibration_rows"] == 16
    assert not (ROOT / "logs").exists()  # gptqmodel's ./logs/ went to the worker's scratch folder
    result = subprocess.run([sys.executable, "-I", "-c", PLAIN, str(out / method), json.dumps(rows[0]["input_ids"])],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    plain = json.loads(result.stdout.strip().splitlines()[-1])
    assert plain["project_code"] == [] and plain["layer"] != "Linear"  # a real quantized kernel, not fp weights
    assert len(plain["argmax"]) == len(rows[0]["input_ids"])


def test_checks_fail_past_thresholds_and_name_the_param(quantized):
    report = quantized[0]
    strict = {name: QualityCheck(max_perplexity_drop_percent=1e-9, min_top1_agreement=1.0) for name in report}
    problems = quantize.failed_checks(report, strict, 2)
    assert any("quantize.checks.gguf_q4_k_m.max_perplexity_drop_percent" in problem for problem in problems)
    assert quantize.failed_checks(report, {name: QualityCheck(max_perplexity_drop_percent=50, min_top1_agreement=0.5)
                                           for name in report}, 2) == []


def write_widths(folder, widths: dict[str, tuple[int, int]]):
    """A safetensors file with a decoder layer's linear weights of these (output, input) shapes: all gptq.py reads."""
    from safetensors.torch import save_file

    folder.mkdir(exist_ok=True)
    save_file({f"model.layers.0.{name}.weight": torch.zeros(shape) for name, shape in widths.items()},
              folder / "model.safetensors")
    return folder


def test_group_size_auto_is_the_largest_common_one_the_kernels_take(tiny_base, tmp_path, caplog):
    """128 where it divides every layer's input width, else the next that does (SmolLM2: 576 and 1536 -> 64);
    -1 (a group per row) when none does; logged."""
    import logging

    smollm2 = write_widths(tmp_path / "smollm2", {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576),
                                                 "mlp.up_proj": (1536, 576), "mlp.down_proj": (576, 1536)})
    llama = write_widths(tmp_path / "llama", {"self_attn.q_proj": (4096, 4096), "mlp.down_proj": (4096, 11008)})
    odd = write_widths(tmp_path / "odd", {"self_attn.q_proj": (64, 100)})
    caplog.set_level(logging.INFO, logger="finetune.gptq")
    assert gptq.resolve_group_size(smollm2, "auto") == 64 and gptq.resolve_group_size(smollm2, "auto", "awq") == 64
    assert "quantize.gptq.group_size auto -> 64 (layer input widths 576, 1536)" in caplog.text
    assert gptq.resolve_group_size(llama, "auto") == 128 and gptq.resolve_group_size(tiny_base, "auto") == 128
    assert gptq.resolve_group_size(odd, "auto") == -1
    assert gptq.resolve_group_size(smollm2, 32) == 32  # a number is kept, and checked
    with pytest.raises(SystemExit, match="quantize.gptq.group_size=128 does not fit this model"):
        gptq.resolve_group_size(smollm2, 128)


def test_a_gptq_group_size_the_layer_widths_refuse_fails_before_any_artifact(tiny_base, rows, tmp_path):
    """hidden 128, down_proj's input 384: 256 divides neither, so GPTQModel's kernel would fail deep inside
    (`expect K to be divisible by qGroupSize`); the stage refuses it first, naming widths and valid sizes."""
    with pytest.raises(SystemExit) as refused:
        quantize.quantize(job(tiny_base, rows, tmp_path, formats=["gguf_q8_0", "gptq"], gptq={"group_size": 256}))
    message = str(refused.value)
    assert "quantize.gptq.group_size=256" in message and "384: down_proj" in message
    assert "128: gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in message
    assert "Valid here: [-1, 16, 32, 64, 128]" in message
    assert list(tmp_path.iterdir()) == []  # not even the GGUF conversion ran
    gptq.check_group_size(tiny_base, 128)  # divides both
    gptq.check_group_size(tiny_base, -1)


def test_an_awq_group_size_its_kernels_refuse_fails_before_any_artifact(tiny_base, rows, tmp_path):
    """AWQ's kernels take groups up to 128 (GPTQ's up to 1024): 256 is refused under awq's own key."""
    with pytest.raises(SystemExit) as refused:
        quantize.quantize(job(tiny_base, rows, tmp_path, formats=["gguf_q8_0", "awq"], awq={"group_size": 256}))
    message = str(refused.value)
    assert "quantize.awq.group_size=256" in message and "Valid here: [-1, 16, 32, 64, 128]" in message
    assert list(tmp_path.iterdir()) == []
    gptq.check_group_size(tiny_base, 128, "awq")


def test_awq_refuses_output_widths_its_clip_search_cannot_batch(tmp_path):
    """GPTQModel's AWQ takes output channels 64 at a time (an AssertionError deep inside, otherwise): refused first."""
    folder = write_widths(tmp_path / "model", {"self_attn.q_proj": (64, 64), "self_attn.v_proj": (32, 64)})
    with pytest.raises(SystemExit, match=r"multiple of 64 .*this model has v_proj \(32\)"):
        gptq.check_group_size(folder, 64, "awq")
    gptq.check_group_size(folder, 64, "gptq")  # GPTQ has no such limit


def test_awq_params_are_validated_with_their_key_paths():
    raw = read_yaml(ROOT / "params.yaml")["quantize"]
    assert "awq" not in raw["formats"]  # the default CPU pipeline does not make it
    broken = {**raw, "awq": {**raw["awq"], "bits": 8, "group_size": -2, "desc_act": False}}
    with pytest.raises(ParamsError) as caught:
        validate({"quantize": broken}, {"quantize": Quantize})
    message = str(caught.value)
    assert "quantize.awq.bits:" in message and "quantize.awq.desc_act: unknown key" in message
    assert "quantize.awq.group_size: must be auto, -1 (one group per row) or a group size > 0, got -2" in message
    unchecked = {**raw, "formats": ["awq"], "checks": {key: value for key, value in raw["checks"].items() if key != "awq"}}
    with pytest.raises(ParamsError, match=r"formats \['awq'\] have no quality check"):
        validate({"quantize": unchecked}, {"quantize": Quantize})
    missing = {**raw, "awq": {key: value for key, value in raw["awq"].items() if key != "calibration_rows"}}
    with pytest.raises(ParamsError, match="quantize.awq.calibration_rows"):  # no defaults in the schema
        validate({"quantize": missing}, {"quantize": Quantize})


def test_prompt_tuning_is_skipped(tmp_path):
    (tmp_path / "train_method.json").write_text(json.dumps({"method": "prompt_tuning"}))
    assert "soft prompt" in quantize.skip_reason(tmp_path)
    (tmp_path / "train_method.json").write_text(json.dumps({"method": "lora"}))
    assert quantize.skip_reason(tmp_path) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gptq_quantizes_and_serves_on_a_gpu(tiny_base, rows, tmp_path):
    from transformers import AutoModelForCausalLM

    gptq.quantize_gptq(tiny_base, tmp_path / "gptq", gptq.calibration_rows(rows, 16, 0), section("quantize.gptq", group_size=64), threads=1)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gptq", device_map="cuda:0").eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([rows[0]["input_ids"]], device="cuda:0")).logits
    assert logits.is_cuda and torch.isfinite(logits).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_awq_quantizes_and_serves_on_a_gpu(tiny_base, rows, tmp_path):
    """The stage's own path on the GPU: quantized there, reloaded by transformers in float16, scored."""
    from dataclasses import replace

    from finetune.runtime import device

    settings = job(tiny_base, rows, tmp_path, formats=["awq"], awq={"group_size": 64, "calibration_rows": 16},
                   speed_new_tokens=8)
    report = quantize.quantize(replace(settings, placement=device.resolve("cuda", "auto")))
    assert json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]["quant_method"] == "awq"
    assert 0.5 < report["awq"]["top1_agreement"] <= 1 and report["awq"]["tokens_per_second"] > 0

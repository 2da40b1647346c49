"""The model-family matrix: the whole pipeline, through the real `dvc`, on a tiny model of each family.

scripts/family_models.py builds each family (Qwen2, Llama 3, Llama 2, Phi-3, GPT-NeoX) with its real
tokenizer (llama.cpp's vocab files), chat template and end-of-turn token; scripts/family_matrix.py holds the
runs and the checks (and runs the same at bigger sizes). Per family, in its own copy of the repo:
`dvc repro` with LoRA (the family's own template, alpaca for GPT-NeoX, which has none; quantize: GGUF q8_0
and GPTQ), then `dvc exp run -S train.method=qlora merge`: the stages QLoRA changes (a 4-bit base in train,
its de-quantization in merge; what follows a merge is the same for both). Every stage is single-threaded,
so FAMILY_MATRIX_JOBS (default 2) families run at once; the checks that load models run one at a time.
FAMILY_MATRIX_FAMILIES=qwen2,phi3 runs a subset. Measured: 17.5 min for all five on a shared 2-core machine.

The fast tests at the end need no pipeline: what a family cannot do fails at once, naming what is missing.
"""
import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ROOT
from repo_tools import tracked_copy

sys.path.insert(0, str(ROOT / "scripts"))
import family_matrix  # noqa: E402
import family_models  # noqa: E402

FAMILIES = os.environ.get("FAMILY_MATRIX_FAMILIES", ",".join(family_models.FAMILIES)).split(",")  # a subset: qwen2,phi3
JOBS = int(os.environ.get("FAMILY_MATRIX_JOBS", "2"))
QLORA_STAGES = {"train", "merge"}  # with a target, dvc runs what it needs: not check_params
FUSED = {"phi3": (["qkv_proj"], ["qkv_proj", "o_proj"]), "gpt_neox": (["query_key_value"], ["query_key_value", "dense"])}
UNFUSED = (["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"])
REAL_SIZES = {"qwen2": (151646, 151936), "llama3": (128256, 128256), "llama2": (32000, 32000), "phi3": (32011, 32064),
              "gpt_neox": (50277, 50432)}  # tokenizer entries, embedding rows: as the real checkpoints


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """family -> its runs and checks (or the exception that stopped it), every family reproduced."""
    models = threading.Lock()  # in-process torch / llama.cpp work, one family at a time
    works = {family: tmp_path_factory.mktemp(family) for family in FAMILIES}

    def run(family):
        work = works[family]
        with models:
            model = family_models.build(family, work / "model", "tiny")
        repo = tracked_copy(work / "repo")
        family_matrix.configure(repo, family, model)
        family_matrix.init(repo)
        result = {"repo": repo}
        result["lora_stages"], result["lora_seconds"] = family_matrix.run_lora(repo)
        with models:
            result["lora"] = family_matrix.check(repo, family)
            result["lora"].update(family_matrix.check_quantized(repo, result["lora"]["end_of_turn_id"]))
        result["qlora_stages"], result["qlora_seconds"] = family_matrix.run_qlora(repo, "merge")
        with models:
            result["qlora"] = family_matrix.check(repo, family)
        return result

    with ThreadPoolExecutor(JOBS) as pool:
        futures = {family: pool.submit(run, family) for family in FAMILIES}
    results = {}
    for family, future in futures.items():
        try:
            results[family] = future.result()
        except Exception as error:  # noqa: BLE001  (reported by that family's tests, not the others')
            results[family] = error
    print({family: {key: result[key] for key in ("lora_seconds", "qlora_seconds")} if isinstance(result, dict)
           else repr(result)[:200] for family, result in results.items()})
    return results


@pytest.fixture(params=FAMILIES)
def family(request, matrix):
    result = matrix[request.param]
    if isinstance(result, Exception):
        raise result
    return request.param, result


@pytest.mark.e2e
def test_every_stage_runs_with_the_familys_own_template(family):
    name, result = family
    assert result["lora_stages"] == family_matrix.STAGES
    assert result["qlora_stages"] == QLORA_STAGES
    for method in ("lora", "qlora"):
        checked = result[method]
        assert checked["method"] == method
        assert checked["template"] == ("alpaca" if name == "gpt_neox" else "tokenizer")
        assert (checked["base"]["tokenizer_size"], checked["base"]["vocab_size"]) == REAL_SIZES[name]
        assert checked["rows_training_end_of_turn"] == 1  # every answer ends with the end of turn, trained


@pytest.mark.e2e
def test_the_merged_model_stops_at_the_end_of_turn_in_transformers(family):
    name, result = family
    for method in ("lora", "qlora"):
        checked = result[method]
        end_of_turn = checked["end_of_turn_id"]
        assert checked["end_of_turn"] == family_models.FAMILIES[name]["end_of_turn"]
        assert end_of_turn in checked["transformers"]["stop_ids"]
        assert checked["transformers"]["new_tokens"] == [end_of_turn]  # generate stopped right there
        assert checked["transformers"]["scoring_answer"] == ""  # and so did the stages' own generation
        assert family_matrix.problems(checked) == []


@pytest.mark.e2e
def test_llamacpp_stops_at_the_end_of_turn_and_tokenizes_like_transformers(family):
    name, result = family
    checked = result["lora"]
    cpp = checked["llamacpp"]
    assert cpp["eos"] == checked["end_of_turn_id"]
    assert (cpp["stop_finish"], cpp["stop_tokens"], cpp["control_finish"]) == ("stop", 0, "length")
    assert cpp["tokenization_differs"] == [] and cpp["texts_compared"] >= 14
    assert cpp["add_bos"] == (name in ("llama3", "llama2", "phi3"))
    assert cpp["pre"] == {"qwen2": "qwen2", "llama3": "llama-bpe", "gpt_neox": "olmo"}.get(name, "default")


@pytest.mark.e2e
def test_gguf_and_gptq_keep_the_merged_model(family):
    _, result = family
    checked = result["lora"]
    assert abs(checked["q8_0_perplexity_drop_percent"]) < 1
    assert abs(checked["gptq_perplexity_drop_percent"]) < 5
    assert checked["gptq_group_size"] == 64  # the largest that divides the tiny widths (64, 128)


@pytest.mark.e2e
def test_lora_presets_resolve_on_the_familys_own_layers(family):
    name, result = family
    attention, attention_all = FUSED.get(name, UNFUSED)
    assert result["lora"]["presets"] == {"attention": attention, "attention_all": attention_all, "all-linear": "all-linear"}


def test_a_family_without_a_chat_template_is_told_which_to_use():
    """GPT-NeoX ships no chat template: format.template=tokenizer fails at once naming the ones that work."""
    from stages import format as format_stage

    tokenizer, _ = family_models.load_tokenizer("gpt_neox")
    with pytest.raises(SystemExit, match="the base tokenizer has no chat template; choose chatml, alpaca"):
        format_stage.resolve_template("tokenizer", tokenizer)
    template = format_stage.resolve_template("alpaca", tokenizer)
    text = format_stage.render(tokenizer, template, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}])
    assert text.endswith("ok<|endoftext|>\n\n")


def test_unknown_families_and_sizes_name_the_choices(tmp_path):
    with pytest.raises(SystemExit, match="unknown family 'gemma'; known: qwen2, llama3, llama2, phi3, gpt_neox"):
        family_models.build("gemma", tmp_path)
    with pytest.raises(SystemExit, match="unknown size 'huge'; known: tiny, small, medium, 0.5b"):
        family_models.config_fields("llama", "huge")
    with pytest.raises(SystemExit, match=r"\['num_experts'\] are not gpt_neox config fields"):
        family_models.config_fields("gpt_neox", {"hidden_size": 64, "num_experts": 8})
    assert "num_key_value_heads" not in family_models.config_fields("gpt_neox", "tiny")  # it has none


def test_metadata_reader_reads_what_ggufreader_reads():
    from gguf import GGUFReader

    path = family_models.vocab_file("phi3")
    vocab, fields = family_models.read_vocab(path), GGUFReader(str(path)).fields
    assert vocab["tokens"] == [bytes(fields["tokenizer.ggml.tokens"].parts[i]).decode() for i in fields["tokenizer.ggml.tokens"].data]
    assert vocab["scores"] == [float(fields["tokenizer.ggml.scores"].parts[i][0]) for i in fields["tokenizer.ggml.scores"].data]
    assert vocab["chat_template"] == bytes(fields["tokenizer.chat_template"].parts[-1]).decode()
    assert (vocab["bos"], vocab["eos"], vocab["unk"]) == (1, 32000, 0)

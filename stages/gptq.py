"""GPTQ with GPTQModel (the maintained successor of AutoGPTQ, the backend transformers uses).

GPTQModel runs in its own process (`python stages/gptq.py SPEC.json`): importing it patches
transformers and safetensors and points HF_HOME at a temp folder unless it is set, and
quantizing writes `./logs/` into the working directory. So the worker gets an explicit
HF_HOME and a scratch working directory, and the calling process stays untouched.

On CPU (GPTQModel 7.6.0, torch 2.13): it quantizes (`pack_impl="original"` skips a long
kernel compile), and the result loads in plain `transformers` (`AutoModelForCausalLM`, with
`optimum` + `gptqmodel` installed) through GPTQModel's torch kernel. On a GPU it does the same, faster.
"""
from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("finetune.gptq")
CALIBRATION = "calibration.jsonl"


def calibration_rows(train_rows: list[dict], size: int, seed: int) -> list[dict]:
    """A seeded sample of the task's own training examples (whole sequences: prompt and answer)."""
    chosen = random.Random(seed).sample(range(len(train_rows)), min(size, len(train_rows)))
    return [{"id": train_rows[index].get("id", str(index)), "input_ids": train_rows[index]["input_ids"]}
            for index in sorted(chosen)]


def quantize_gptq(merged_dir, out_dir, calibration: list[dict], cfg, threads: int) -> float:
    """Quantize merged_dir into out_dir (with calibration.jsonl beside it); returns the seconds it took."""
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="gptq-") as scratch:
        spec = Path(scratch) / "spec.json"
        spec.write_text(json.dumps({"merged": str(Path(merged_dir).resolve()), "out": str(out_dir.resolve()),
                                    "calibration": calibration, "bits": cfg.bits, "group_size": cfg.group_size,
                                    "desc_act": cfg.desc_act, "threads": threads}))
        # GPTQModel's thread pool needs >= 2 CPU workers (its model loader alone asks for 2); torch keeps `threads`
        env = {**os.environ, "GPTQMODEL_CPU_WORKERS": str(max(threads, 2)), "OMP_NUM_THREADS": str(threads),
               "HF_HOME": os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))}
        started = time.time()
        result = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(spec)], cwd=scratch, env=env,
                                capture_output=True, text=True)
        seconds = time.time() - started
    if result.returncode != 0:
        raise SystemExit(f"quantize: GPTQ (gptqmodel) failed with exit code {result.returncode}:\n"
                         f"{result.stderr[-4000:]}\nIs gptqmodel==7.6.0 installed (make install)? Or drop `gptq` "
                         "from quantize.formats")
    (out_dir / CALIBRATION).write_text("".join(json.dumps(row) + "\n" for row in calibration))
    log.info("gptq: %d-bit, group %d, desc_act %s, %d calibration rows, %.1f s", cfg.bits, cfg.group_size,
             cfg.desc_act, len(calibration), seconds)
    return seconds


def _worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    from gptqmodel import GPTQModel, QuantizeConfig

    config = QuantizeConfig(bits=spec["bits"], group_size=spec["group_size"], desc_act=spec["desc_act"],
                            pack_impl="original", offload_to_disk=False)
    model = GPTQModel.load(spec["merged"], config, device="cpu" if not torch.cuda.is_available() else "cuda:0")
    model.quantize([{"input_ids": row["input_ids"], "attention_mask": [1] * len(row["input_ids"])}
                    for row in spec["calibration"]], batch_size=1)
    model.save(spec["out"])
    Path(spec["out"], "quant_log.csv").unlink(missing_ok=True)  # timings of this run: not part of the model


if __name__ == "__main__":
    _worker(sys.argv[1])

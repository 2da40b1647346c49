"""GPTQ and AWQ with GPTQModel (the maintained successor of AutoGPTQ and AutoAWQ, the backend transformers uses).

GPTQModel runs in its own process (`python finetune/export/gptq_worker.py SPEC.json`): importing it patches
transformers and safetensors and points HF_HOME at a temp folder unless it is set, and
quantizing writes `./logs/` into the working directory. So the worker gets an explicit
HF_HOME and a scratch working directory, and the calling process stays untouched.

On CPU (GPTQModel 7.6.0, torch 2.13): it quantizes (`pack_impl="original"` skips a long
kernel compile), and the result loads in plain `transformers` (`AutoModelForCausalLM`, with
`optimum` + `gptqmodel` installed) through GPTQModel's torch kernel. On a GPU it does the same, faster.

AWQ (`quant_method=awq`, the GEMM checkpoint format transformers and vLLM load): GPTQModel 7.6 packs with its
CUDA kernel by default ("AWQ: CUDA is not available" on a CPU); its portable torch packer
(`BACKEND.AWQ_TORCH`) writes the same GEMM checkpoint anywhere, and transformers reloads it on the CPU
through GPTQModel's torch AWQ kernel, on a GPU through its CUDA ones. llm-compressor is not an option: every
release caps transformers at or below 5.17.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("finetune.gptq")
CALIBRATION = "calibration.jsonl"
WORKER = "gptq_worker.py"  # the program the worker process runs
GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)  # what GPTQModel's kernels take (-1: one group per row)
AWQ_GROUP_SIZES = (-1, 16, 32, 64, 128)  # what its AWQ kernels take (torch and CUDA GEMM alike)
METHODS = {"gptq": GROUP_SIZES, "awq": AWQ_GROUP_SIZES}  # the quantize.formats GPTQModel makes
# group_size auto: the largest of these that divides every layer's input width. 128 is GPTQ's and AWQ's usual default
# and the largest vLLM's Marlin kernels take; smaller groups cost a little size for accuracy
AUTO_GROUP_SIZES = (128, 64, 32, 16)
DECODER_LAYER = re.compile(r"\.(layers|h|blocks)\.\d+\.")  # GPTQ quantizes the linear layers of the decoder blocks


def layer_widths(model_dir, dim: int = 1) -> dict[str, int]:
    """Input width (dim 1; dim 0: output width) of every linear layer GPTQ quantizes, from the safetensors
    headers (no weights loaded)."""
    from safetensors import safe_open

    widths = {}
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(shard), "pt") as tensors:
            for name in tensors.keys():
                shape = tensors.get_slice(name).get_shape()
                if name.endswith(".weight") and len(shape) == 2 and DECODER_LAYER.search(name):
                    widths[name.removesuffix(".weight")] = shape[dim]
    return widths


def check_group_size(model_dir, group_size: int, method: str = "gptq") -> None:
    """A group is a run of input columns sharing one scale: group_size must divide every layer's input width
    (else GPTQModel's kernel fails deep inside, `expect K to be divisible by qGroupSize`) and be one of the
    sizes `method`'s kernels take."""
    sizes = METHODS[method]
    if method == "awq":  # its clip search takes output channels in batches of 64 (an assert deep inside, otherwise)
        narrow = sorted({f"{name.rsplit('.', 1)[-1]} ({width})" for name, width in layer_widths(model_dir, 0).items()
                         if width % 64})
        if narrow:
            raise SystemExit(f"quantize.formats: awq needs every quantized layer's output width to be a multiple of 64 "
                             f"(GPTQModel's AWQ clip search); this model has {', '.join(narrow)}: drop awq, or use gptq")
    widths = layer_widths(model_dir)
    if group_size == -1 or not widths:
        return
    if group_size in sizes and all(width % group_size == 0 for width in widths.values()):
        return
    by_width: dict[int, list[str]] = {}
    for name, width in widths.items():
        by_width.setdefault(width, []).append(name.rsplit(".", 1)[-1])
    described = "; ".join(f"{width}: {', '.join(sorted(set(names)))}" for width, names in sorted(by_width.items()))
    valid = [size for size in sizes if size == -1 or all(width % size == 0 for width in widths.values())]
    raise SystemExit(f"quantize.{method}.group_size={group_size} does not fit this model: a group is a run of input "
                     f"columns, so it must divide every quantized layer's input width ({described}) and be one of "
                     f"GPTQModel's sizes {list(sizes)}. Valid here: {valid}")


def resolve_group_size(model_dir, group_size, method: str = "gptq") -> int:
    """quantize.<method>.group_size as a number: `auto` becomes the largest of AUTO_GROUP_SIZES that divides every
    quantized layer's input width (-1, one group per row, when none does); checked against the widths either way."""
    if group_size == "auto":
        widths = sorted(set(layer_widths(model_dir).values()))
        group_size = next((size for size in AUTO_GROUP_SIZES if all(width % size == 0 for width in widths)), -1)
        log.info("quantize.%s.group_size auto -> %d (layer input widths %s)", method, group_size,
                 ", ".join(map(str, widths)) or "none found")
    check_group_size(model_dir, group_size, method)
    return group_size


def calibration_rows(train_rows: list[dict], size: int, seed: int) -> list[dict]:
    """A seeded sample of the task's own training examples (whole sequences: prompt and answer)."""
    chosen = random.Random(seed).sample(range(len(train_rows)), min(size, len(train_rows)))
    return [{"id": train_rows[index].get("id", str(index)), "input_ids": train_rows[index]["input_ids"]}
            for index in sorted(chosen)]


def fuse_split_layers(merged_dir, out_dir) -> list[str]:
    """GPTQModel 7.6.0 quantizes Phi-3's fused `gate_up_proj` as two layers, `gate_proj` and `up_proj`, and saves
    them so; transformers (and vLLM) load `gate_up_proj`, and would leave it uninitialised (garbage g_idx). Join
    them back where the merged model has the fused layer: concatenated along the output dimension (GPTQ packs
    qweight along the input one, qzeros along the output one, 32 // bits per int32; AWQ's GEMM layout packs both
    along the output one, in blocks of 8 columns, and has no g_idx). Returns the joined layers."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    fused = []
    for shard in Path(merged_dir).glob("*.safetensors"):
        with safe_open(str(shard), "pt") as tensors:
            fused += [name.removesuffix(".weight") for name in tensors.keys() if name.endswith(".gate_up_proj.weight")]
    joined = []
    for shard in sorted(Path(out_dir).glob("*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(shard)
        for layer in fused:
            gate, up = layer.replace(".gate_up_proj", ".gate_proj"), layer.replace(".gate_up_proj", ".up_proj")
            if f"{gate}.qweight" not in tensors and f"{up}.qweight" not in tensors:
                continue
            if f"{gate}.qweight" not in tensors or f"{up}.qweight" not in tensors:
                raise SystemExit(f"quantize: GPTQ split {layer} into gate_proj/up_proj across shards; cannot join it back")
            if f"{gate}.g_idx" in tensors and not torch.equal(tensors[f"{gate}.g_idx"], tensors[f"{up}.g_idx"]):
                raise SystemExit(f"quantize: GPTQ quantized {layer}'s halves with different column orders (desc_act), "
                                 "which one fused layer cannot hold; use quantize.gptq.desc_act: false")
            for part, dim in (("qweight", 1), ("qzeros", 1), ("scales", 1), ("bias", 0)):
                if f"{gate}.{part}" in tensors:
                    tensors[f"{layer}.{part}"] = torch.cat([tensors.pop(f"{gate}.{part}"), tensors.pop(f"{up}.{part}")], dim)
            if f"{gate}.g_idx" in tensors:
                tensors[f"{layer}.g_idx"] = tensors.pop(f"{gate}.g_idx")
                del tensors[f"{up}.g_idx"]
            joined.append(layer)
        if joined:
            save_file(tensors, shard, metadata=metadata)
    index = Path(out_dir) / "model.safetensors.index.json"
    if joined and index.exists():
        data = json.loads(index.read_text())
        for layer in joined:
            for name in [name for name in data["weight_map"] if name.startswith((layer.replace(".gate_up_proj", ".gate_proj."),
                                                                                   layer.replace(".gate_up_proj", ".up_proj.")))]:
                shard = data["weight_map"].pop(name)
                data["weight_map"][f"{layer}.{name.rsplit('.', 1)[1]}"] = shard
        index.write_text(json.dumps(data, indent=2))
    return joined


def quantize_gptq(merged_dir, out_dir, calibration: list[dict], cfg, threads: int, method: str = "gptq",
                  group_size: int | None = None) -> dict:
    """Quantize merged_dir into out_dir (with calibration.jsonl beside it) with `method` (gptq: cfg is
    quantize.gptq; awq: quantize.awq) and `group_size` (default: cfg.group_size resolved); returns what it did:
    the group size, the calibration rows and the seconds it took."""
    out_dir = Path(out_dir)
    desc_act = getattr(cfg, "desc_act", False)  # AWQ has no column reordering
    group_size = resolve_group_size(merged_dir, cfg.group_size if group_size is None else group_size, method)
    with tempfile.TemporaryDirectory(prefix=f"{method}-") as scratch:
        spec = Path(scratch) / "spec.json"
        spec.write_text(json.dumps({"merged": str(Path(merged_dir).resolve()), "out": str(out_dir.resolve()),
                                    "method": method, "calibration": calibration, "bits": cfg.bits,
                                    "group_size": group_size, "desc_act": desc_act, "threads": threads}))
        # GPTQModel's thread pool needs >= 2 CPU workers (its model loader alone asks for 2); torch keeps `threads`
        env = {**os.environ, "GPTQMODEL_CPU_WORKERS": str(max(threads, 2)), "OMP_NUM_THREADS": str(threads),
               "HF_HOME": os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))}
        started = time.time()
        result = subprocess.run([sys.executable, str(Path(__file__).with_name(WORKER)), str(spec)], cwd=scratch, env=env,
                                capture_output=True, text=True)
        seconds = time.time() - started
    if result.returncode != 0:
        raise SystemExit(f"quantize: {method.upper()} (gptqmodel) failed with exit code {result.returncode}:\n"
                         f"{result.stderr[-4000:]}\nIs gptqmodel==7.6.0 installed (make install)? Or drop `{method}` "
                         "from quantize.formats")
    joined = fuse_split_layers(merged_dir, out_dir)
    if joined:
        log.info("%s: joined %d layers GPTQModel split (gate_proj + up_proj) back into gate_up_proj", method, len(joined))
    (out_dir / CALIBRATION).write_text("".join(json.dumps(row) + "\n" for row in calibration))
    log.info("%s: %d-bit, group %d, desc_act %s, %d calibration rows, %.1f s", method, cfg.bits, group_size,
             desc_act, len(calibration), seconds)
    return {"group_size": group_size, "calibration_rows": len(calibration), "quantize_seconds": round(seconds, 1)}

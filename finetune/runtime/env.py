"""The process environment every stage runs in, set when the `finetune` package is first imported (before torch
is): torch's CPU float paths pinned, known library noise silenced; plus the offline default and seeding.

Kept free of heavy imports so that `params.yaml` is validated in well under a second.
"""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import random
import re
import sys
from pathlib import Path

# The float code paths of torch on x86-64, pinned to what every AVX2 CPU has, so that the same params, data
# and seed give bit-identical metrics on any such machine, whatever its vendor or vector width: ATen's
# vectorised kernels (softmax, norms, reductions) at AVX2 rather than AVX-512 where the CPU has it, MKL's
# GEMM in conditional numerical reproducibility mode on its AVX2 branch (Intel otherwise picks its kernel
# by CPU), oneDNN (bf16 paths) at AVX2. Set before torch is imported (importing the `finetune`
# package does it); a value already in the environment wins; FINETUNE_CPU_PINS=0 turns them off (README "Determinism").
CPU_PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def pin_cpu_code_paths() -> None:
    if os.environ.get("FINETUNE_CPU_PINS", "1") != "0" and platform.machine().lower() in ("x86_64", "amd64"):
        for name, value in CPU_PINS.items():
            os.environ.setdefault(name, value)



# --------------------------------------------------------------------------- quiet output
# A stage prints one start line, its own progress and one summary line; FINETUNE_VERBOSE=1 (`FINETUNE_VERBOSE=1
# dvc repro`) brings back everything below. What is silenced is what no user of this project can act on,
# each with the reason:
VERBOSE = os.environ.get("FINETUNE_VERBOSE", "0") not in ("", "0")
NOISE = [  # (logger, text the message contains): why it is not actionable
    # we set TORCHAO_FORCE_SKIP_LOADING_SO_FILES ourselves, below
    ("torchao", "TORCHAO_FORCE_SKIP_LOADING_SO_FILES"),
    # Triton kernels are CUDA-only: on a CPU there is nothing to install
    ("torchao.kernel.intmm", "Detected no triton"),
    # torchao 0.18 (the version GPTQModel 7.6 requires) registers enums the way torch 2.13 deprecates
    ("torch.utils._pytree", "is an Enum subclass"),
    # bitsandbytes offers optional CPU 4-bit kernels from the Hub, which this offline pipeline never fetches
    ("bitsandbytes.backends.cpu.ops", "kernels-community"),
    # lm-eval is handed our already-loaded model on purpose (evaluation.py)
    ("lm_eval.models.huggingface", "already-initialized model"),
    ("lm_eval.models.huggingface", "`pretrained` model kwarg is not of type `str`"),
    # a GPTQ model loaded back through GPTQModel has no loss_type; we compute our own losses
    ("transformers.modeling_utils", "was set in the config but it is unrecognized"),
]
QUIET_LOGGERS = {  # logger: the lowest level still shown
    "lm_eval": logging.WARNING,  # task set-up chatter
    "logbar": logging.ERROR,  # GPTQModel's banner, environment notes and "GIL is enabled" advice
    # llama.cpp's loader dump and per-tensor quantize lines; the quantize stage reports K-quant fallbacks itself
    "llama-cpp-python": logging.ERROR,
}
WARNINGS = [  # (category, message start): Python warnings raised inside libraries about their own calls
    (FutureWarning, "`is_gradient_checkpointing` is deprecated"),  # peft calls transformers' old name
]


class _Noise(logging.Filter):
    def __init__(self, texts: list[str]):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.texts)


def quiet_libraries() -> None:
    """Runs before torch is imported. torchao's two compiled libraries (`_C_mxfp8`, `_C_cutlass_90a`) are
    CUDA kernels: with a CPU-only torch they cannot load and each import logged the failure; torchao's own
    switch skips them. On a CUDA build of torch nothing changes."""
    import importlib.util
    import warnings

    spec = importlib.util.find_spec("torch")
    torch_lib = Path(spec.origin).parent / "lib" if spec and spec.origin else None
    if torch_lib and torch_lib.is_dir() and not any(torch_lib.glob("libtorch_cuda*")):
        os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    if VERBOSE:
        return
    by_logger: dict[str, list[str]] = {}
    for name, text in NOISE:
        by_logger.setdefault(name, []).append(text)
    for name, texts in by_logger.items():
        logging.getLogger(name).addFilter(_Noise(texts))
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for category, start in WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(start), category=category)
    if not sys.stderr.isatty():  # logs and CI: no per-file bars (loading weights, downloads); long steps'
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # bars print at start, every 30 s, at the end
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_MININTERVAL", "30")



def quiet_gptqmodel() -> None:
    """GPTQModel's logger (logbar) sets itself to INFO when first created and prints a banner and environment
    notes on import; created here first at ERROR, it stays there. Call before anything imports gptqmodel."""
    if not VERBOSE:
        with contextlib.suppress(ImportError):
            from logbar import LogBar

            LogBar.shared().setLevel(logging.ERROR)


def offline_by_default() -> None:
    """The default pipeline never touches the network; a hub id in params opts in."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def seed_everything(seed: int, threads: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)

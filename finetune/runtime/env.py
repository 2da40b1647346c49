"""The process environment every stage runs in, set when the `finetune` package is first imported (before torch
is): torch's CPU float paths pinned, known library noise silenced; plus the offline default and seeding.

Kept free of heavy imports so that `params.yaml` is validated in well under a second.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import platform
import random
import re
import sys
from pathlib import Path

# `kernels` (params.yaml, top level): `reproducible` (the default) pins every float path of torch on x86-64 that
# picks its code by CPU, so that the same params, data and seed give bit-identical numbers on any AVX2 CPU, Intel
# or AMD; `native` lets each library use the best code the CPU has (AVX-512, AMX), faster and not bit-stable.
# The pins, set before torch is imported (importing the `finetune` package does it; a value already in the
# environment wins):
# - ATen's vectorised kernels (softmax, norms, reductions) at AVX2 rather than AVX-512 where the CPU has it;
# - MKL's GEMM and vector math (torch.exp, log, sin, cos, tanh, erf) in conditional numerical reproducibility
#   mode on its AVX2 branch, and MKL told that the CPU is an Intel one (`pin_mkl_vendor`): MKL honours
#   MKL_CBWR only on Intel CPUs. On an AMD EPYC it took a generic path whatever MKL_CBWR said: small GEMMs
#   without FMA, other K-blocking (256x256x256 summed in blocks of 128 where Intel's AVX2 branch sums all 256),
#   another exp; with the vendor check answered "Intel" every line of the kernel fingerprint equals an Intel
#   Xeon's (README "Determinism");
# - oneDNN (bf16 paths) at AVX2.
CPU_PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2"}
KERNELS = ("reproducible", "native")
KERNELS_ENV = "FINETUNE_KERNELS"  # overrides params.yaml's `kernels` (benchmarks compare both in one checkout)
applied_kernels = "native"  # what this process runs with: set by pin_cpu_code_paths()


def kernels_setting(params_file: Path) -> str:
    """`kernels` from the environment, else from params.yaml's top level (read as text: torch is not imported
    yet and params are not validated yet; check_params validates the value); `FINETUNE_CPU_PINS=0`, the older
    switch, means native."""
    if os.environ.get(KERNELS_ENV):
        return os.environ[KERNELS_ENV]
    if os.environ.get("FINETUNE_CPU_PINS") == "0":
        return "native"
    try:
        found = re.search(r"^kernels:\s*['\"]?(\w+)", params_file.read_text(encoding="utf-8"), re.MULTILINE)
    except OSError:
        found = None
    return found.group(1) if found else "reproducible"


def pin_cpu_code_paths(params_file: Path) -> None:
    global applied_kernels
    applied_kernels = kernels_setting(params_file)
    if applied_kernels != "reproducible" or platform.machine().lower() not in ("x86_64", "amd64"):
        return
    for name, value in CPU_PINS.items():
        os.environ.setdefault(name, value)
    if "torch" in sys.modules:
        pin_mkl_vendor()
    else:
        sys.meta_path.insert(0, _AfterImport("torch", pin_mkl_vendor))


def pin_mkl_vendor() -> bool:
    """Make MKL (linked into libtorch_cpu) take its Intel code paths on any x86-64 CPU, so that MKL_CBWR holds
    on AMD too. MKL asks `mkl_serv_intel_cpu_true()`, which caches the CPUID vendor check in a static int read
    by its first instruction (`mov eax, [rip+disp32]`); setting that int to 1 answers "Intel" from then on, the
    in-process form of the known LD_PRELOAD override of that function. Runs right after torch is imported,
    before any tensor operation lets MKL pick its kernels. A build whose function starts otherwise is left as
    it is (False; the kernel fingerprint then shows whether it matters)."""
    import ctypes
    import struct

    try:
        spec = importlib.util.find_spec("torch")
        library = ctypes.CDLL(str(Path(spec.origin).parent / "lib" / "libtorch_cpu.so"))
        address = ctypes.cast(library.mkl_serv_intel_cpu_true, ctypes.c_void_p).value
    except (OSError, AttributeError, TypeError):  # no MKL in this torch (ARM, another build)
        return False
    code = ctypes.string_at(address, 6)
    if code[:2] != b"\x8b\x05":
        return False
    ctypes.c_int.from_address(address + 6 + struct.unpack("<i", code[2:])[0]).value = 1
    return ctypes.CFUNCTYPE(ctypes.c_int)(address)() == 1


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `action` once, right after the module `name` has been imported (by whoever imports it first)."""

    def __init__(self, name: str, action):
        self.name, self.action = name, action

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        for finder in sys.meta_path:  # what the import system would find without us (find_spec() alone asks too)
            spec = None if finder is self else finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            exec_module = spec.loader.exec_module

            def run(module):
                exec_module(module)
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                    self.action()

            spec.loader.exec_module = run
        return spec


def check_kernels(setting: str) -> str:
    """A stage that computes in floats reads `kernels` here (so dvc.yaml lists it and a change reruns the stage)
    and records the result; the process was pinned, or not, when the package was imported."""
    if setting != applied_kernels:
        logging.getLogger("finetune").warning("kernels: params.yaml says %s, this process runs %s (%s or "
                                              "FINETUNE_CPU_PINS in the environment)", setting, applied_kernels,
                                              KERNELS_ENV)
    return applied_kernels


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

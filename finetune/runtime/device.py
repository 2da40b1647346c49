"""device: the one place that decides where a model runs and in what precision, for every stage that
loads one (train, evaluate, merge, quantize), and that reports peak memory.

`device: auto` is the GPU when CUDA sees one, else the CPU; `dtype: auto` is bfloat16 on a GPU that
supports it (float16 on one that does not) and float32 on the CPU. Both are top-level params, so a
user can force `device: cpu` on a GPU box or `dtype: bfloat16` on a CPU; a request the hardware
cannot serve fails at once with the fix.
"""
from __future__ import annotations

import os
import resource
from dataclasses import dataclass

DTYPES = ("float32", "bfloat16", "float16")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt() parameters (malloc.h)
HEAP_MMAP_THRESHOLD = 2**20  # bytes: larger blocks get their own mapping, returned to the OS when freed
LOOP_MMAP_THRESHOLD = 32 * 2**20  # glibc's largest: a step's buffers (2-6 MiB at SmolLM2's shapes) stay in the heap
LOOP_TRIM_THRESHOLD = 2**31 - 1  # (mallopt takes an int) and the heap keeps its free pages for the next step instead of unmapping them


@dataclass(frozen=True)
class Placement:
    device: str  # "cuda" or "cpu"
    dtype: str  # one of DTYPES

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def __str__(self) -> str:
        return f"{self.device}, {self.dtype}"

    def load_kwargs(self, gpu: int = 0) -> dict:
        """`from_pretrained` arguments: weights loaded straight into the target dtype and device, one copy
        (`gpu`: this process's GPU, e.g. its local rank under DDP)."""
        return {"dtype": self.torch_dtype, "device_map": {"": gpu} if self.device == "cuda" else "cpu"}


def resolve(device: str = "auto", dtype: str = "auto", cuda: bool | None = None, bf16: bool | None = None) -> Placement:
    """The placement for the `device` / `dtype` params. `cuda` and `bf16` default to what torch reports
    (tests pass them to check the choice on hardware this machine does not have)."""
    if cuda is None or bf16 is None:
        import torch

        cuda = torch.cuda.is_available() if cuda is None else cuda
        bf16 = (cuda and torch.cuda.is_bf16_supported()) if bf16 is None else bf16
    if device == "cuda" and not cuda:
        raise SystemExit("device: cuda, but no CUDA GPU is visible here; set `device: auto` (or cpu)")
    if device not in ("auto", "cpu", "cuda"):
        raise SystemExit(f"device: must be auto, cpu or cuda, got {device!r}")
    where = "cuda" if device == "cuda" or (device == "auto" and cuda) else "cpu"
    if dtype == "auto":
        dtype = ("bfloat16" if bf16 else "float16") if where == "cuda" else "float32"
    if dtype not in DTYPES:
        raise SystemExit(f"dtype: must be auto or one of {DTYPES}, got {dtype!r}")
    if dtype == "bfloat16" and where == "cuda" and not bf16:
        raise SystemExit("dtype: bfloat16, but this GPU has no bfloat16 support; use float16 or auto")
    return Placement(where, dtype)


def limit_heap_retention() -> bool:
    """Make glibc hand freed tensors back to the OS instead of keeping them in its heap: blocks over
    1 MiB get their own mmap and are unmapped when freed. glibc's default threshold starts at 128 KiB
    and climbs (up to 32 MiB) to the size of every large block freed, so after the first step the
    activations and their gradients come from the heap, and the heap keeps them: the train stage's RSS
    ran 7-32% above what autograd holds (README "Memory plan"). The same as MALLOC_MMAP_THRESHOLD_=1048576,
    without asking the user to set it; that variable, when set, wins, and FINETUNE_HEAP_LIMIT=0 turns this
    off. It changes where memory comes from, never a computed value. True when it was applied here."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not heap_retention_limited():
        return False
    import ctypes

    return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD))


def reuse_heap_in_loop() -> bool:
    """Called when the training loop begins (trainer.Observer): from then on the step's freed buffers stay in glibc's
    heap and the next step reuses them, where the 1 MiB threshold of limit_heap_retention() mapped, zero-filled and
    unmapped every one of them again each step (SmolLM2 at 1 thread: 127,000 minor faults/s, 47% of the CPU time in
    the kernel, 1.8x slower). Model loading ran under the low threshold, so its transients went back to the OS and
    the heap starts empty: it then grows to the step's own peak and stays there, which is what the memory plan
    counts. FINETUNE_HEAP_LIMIT=mmap keeps the low threshold through the loop (the old behaviour, for comparison).
    True when it was applied here."""
    if not heap_reused_in_loop():
        return False
    import ctypes

    libc = ctypes.CDLL(None)
    libc.malloc_trim(0)
    return bool(libc.mallopt(M_TRIM_THRESHOLD, LOOP_TRIM_THRESHOLD)
                and libc.mallopt(M_MMAP_THRESHOLD, LOOP_MMAP_THRESHOLD))


def heap_reused_in_loop() -> bool:
    """Whether the training loop keeps its freed buffers in the heap (reuse_heap_in_loop), as the memory plan counts:
    the heap is bounded first, and neither FINETUNE_HEAP_LIMIT=mmap nor MALLOC_MMAP_THRESHOLD_ keeps the bound on."""
    return heap_retention_limited() and os.environ.get("FINETUNE_HEAP_LIMIT") != "mmap" \
        and "MALLOC_MMAP_THRESHOLD_" not in os.environ


def qlora_compute_dtype(setting: str, placement: Placement) -> str:
    """`train.qlora.compute_dtype`: `auto` is the run's dtype (bf16 on a GPU that has it, fp32 on the CPU)."""
    return placement.dtype if setting == "auto" else setting


def heap_retention_limited() -> bool:
    """Whether a stage that calls limit_heap_retention() runs with freed large blocks returned to the OS
    (what the memory plan counts the heap by): glibc, and neither FINETUNE_HEAP_LIMIT=0 nor a
    MALLOC_MMAP_THRESHOLD_ over 1 MiB in the environment."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return False
    except (ValueError, OSError, AttributeError):  # not glibc (musl, macOS, Windows): its own allocator
        return False
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    if threshold is not None:
        return threshold.strip().isdigit() and int(threshold) <= HEAP_MMAP_THRESHOLD
    return os.environ.get("FINETUNE_HEAP_LIMIT", "1") != "0"


def load_adapter(model, folder):
    """`PeftModel.from_pretrained(model, folder)`, without GPTQModel when the base is not a GPTQ model: peft
    checks every adapted layer against GPTQModel's layer classes and so imports gptqmodel, ~200 MB resident
    (a fifth of a 0.5B model in bf16) for nothing. Hidden for the call only; nothing else changes."""
    import sys

    from peft import PeftModel, import_utils

    quantization = getattr(model.config, "quantization_config", None) or {}
    method = (quantization.get("quant_method") if isinstance(quantization, dict)
              else getattr(quantization, "quant_method", None))
    hide = "gptqmodel" not in sys.modules and getattr(method, "value", method) != "gptq"
    if hide:
        sys.modules["gptqmodel"] = None  # importlib.util.find_spec() then says it is not installed
        import_utils.is_gptqmodel_available.cache_clear()
    try:
        return PeftModel.from_pretrained(model, folder)
    finally:
        if hide:
            del sys.modules["gptqmodel"]
            import_utils.is_gptqmodel_available.cache_clear()


def peak_rss_mb() -> int:
    """Peak resident memory of this process (MiB): VmHWM, the high-water mark of its own memory map.
    getrusage's ru_maxrss is not that: Linux carries the parent's RSS at fork into the child's ru_maxrss,
    so a stage started by a large process (pytest, a notebook) would report the parent's size."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            return next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # Linux reports KiB


def peak_memory() -> dict:
    """Peak resident memory of this process (MiB) and, on a GPU, peak allocated GPU memory (MiB)."""
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = round(torch.cuda.max_memory_allocated() / 2**20)
    except ImportError:
        pass
    return {"peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": gpu}


def memory_metrics(placement: Placement) -> dict:
    """What a stage records in its metrics: where it ran and its peak memory so far, under names that
    scripts/check_metrics.py skips (`*memory*`: they vary run to run) and that train.json uses too."""
    peak = peak_memory()
    return {"device": placement.device, "dtype": placement.dtype, "peak_memory_mb": peak["peak_rss_mb"],
            "peak_gpu_memory_mb": peak["peak_gpu_mb"]}

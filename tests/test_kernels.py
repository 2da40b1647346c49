"""`kernels: reproducible` gives the same float bits on Intel and AMD; `native` leaves every library to pick its own code.

The reference is the kernel fingerprint of an Intel Xeon (AVX-512, 2 cores) with the pins applied
(benchmarks/fingerprints/intel-xeon-avx512.txt); an AMD EPYC gives the same lines once MKL's vendor check is pinned
too (benchmarks/fingerprints/amd-epyc-avx2.txt). Any x86-64 CPU with AVX2 must print them.
"""
import json
import os
import platform
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import check_metrics  # noqa: E402

FINGERPRINT = ROOT / "benchmarks" / "kernel_fingerprint.py"
REFERENCE = ROOT / "benchmarks" / "fingerprints" / "intel-xeon-avx512.txt"
x86 = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the pins are for x86-64")


def lines(text: str) -> dict[str, str]:
    """{'matmul 64x576x576': hash, ...} without the header lines."""
    return {line.rsplit(" ", 1)[0]: line.rsplit(" ", 1)[1] for line in text.splitlines() if line and not line.startswith("#")}


def run_python(code: str, **env) -> str:
    environment = {key: value for key, value in os.environ.items() if key not in ("FINETUNE_KERNELS", "MKL_CBWR",
                                                                                   "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**environment, **env}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


@x86
def test_this_cpu_computes_every_float_path_as_the_intel_reference_does():
    """GEMMs at SmolLM2's and LoRA's shapes, softmax, norms, exp, attention, a backward pass, AdamW, bitsandbytes' 4-bit
    kernels: byte for byte (the model's own lines need `--base models/base` and are checked by hand, README)."""
    env = {key: value for key, value in os.environ.items() if key not in ("FINETUNE_KERNELS", "FINETUNE_CPU_PINS")}
    done = subprocess.run([sys.executable, str(FINGERPRINT), "--threads", "2"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    here, reference = lines(done.stdout), lines(REFERENCE.read_text())
    assert len(here) >= 30
    differing = {name: (value, reference[name]) for name, value in here.items() if reference.get(name) != value}
    assert not differing, f"float paths that differ from the Intel reference (here, there): {differing}"


@x86
def test_reproducible_pins_the_libraries_and_native_leaves_them_alone():
    probe = ("import finetune, os, ctypes, torch; from finetune.runtime import env; "
             "lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), 'lib', 'libtorch_cpu.so')); "
             "print(env.applied_kernels, os.environ.get('MKL_CBWR'), os.environ.get('ATEN_CPU_CAPABILITY'), "
             "lib.mkl_serv_intel_cpu_true())")
    intel = "GenuineIntel" in open("/proc/cpuinfo").read()
    assert run_python(probe).split() == ["reproducible", "AVX2,STRICT", "avx2", "1"]
    native = run_python(probe, FINETUNE_KERNELS="native").split()
    assert native == ["native", "None", "None", "1" if intel else "0"]  # MKL answers for the real CPU


def metrics_folder(tmp_path, name, kernels, accuracy, loss):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "train.json").write_text(json.dumps({"kernels": kernels, "train_loss": loss}))
    (folder / "eval.json").write_text(json.dumps({"kernels": kernels, "task.accuracy": accuracy}))
    return folder


def test_check_metrics_compares_across_kernel_modes_with_the_stated_tolerance(tmp_path, capsys):
    committed = metrics_folder(tmp_path, "committed", "reproducible", 0.80537, 0.41234)
    same_bits = metrics_folder(tmp_path, "again", "reproducible", 0.80537, 0.41234)
    native = metrics_folder(tmp_path, "native", "native", 0.81208, 0.41301)  # one test row of 149, loss +0.2%
    far = metrics_folder(tmp_path, "far", "native", 0.76510, 0.41301)  # six rows
    moved = metrics_folder(tmp_path, "moved", "reproducible", 0.81208, 0.41234)
    assert check_metrics.main([str(committed), str(same_bits)]) == 0
    assert check_metrics.main([str(committed), str(moved)]) == 1  # same mode: exact, one row fails
    assert check_metrics.main([str(committed), str(native)]) == 0
    assert "comparing across modes" in capsys.readouterr().out
    assert check_metrics.main([str(committed), str(far)]) == 1

"""finetune: the library the stage scripts in `stages/` run on, one folder a concern:

- `params/`: the typed schema of params.yaml, one module a section;
- `data/`: reading sources, near-duplicate search, augmentation;
- `training/`: the trainer, LoRA targets, the memory plan, reference logits;
- `evaluation/`: scoring a model, task metrics, the code sandbox;
- `export/`: llama.cpp (GGUF) and GPTQModel (GPTQ, AWQ);
- `runtime/`: the process environment, stage start-up, devices, atomic files.

Importing the package sets the process environment (`runtime/env.py`) before anything imports torch: torch's
CPU float paths pinned to AVX2, so the same params, data and seed give the same numbers on any x86-64 CPU, and
known library noise silenced. No import order has to be remembered: every module here is inside the package.
"""
from pathlib import Path

from finetune.runtime import env as _env

ROOT = Path(__file__).resolve().parent.parent  # the repository: params.yaml, dvc.yaml, data/, models/

_env.pin_cpu_code_paths(ROOT / "params.yaml")
_env.quiet_libraries()

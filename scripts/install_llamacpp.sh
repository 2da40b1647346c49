#!/usr/bin/env bash
# Install llama.cpp tooling for finetune/export/llamacpp.py into an existing venv (idempotent).
#   scripts/install_llamacpp.sh VENV_DIR [CONVERT_DIR]
# - builds llama-cpp-python from source (PyPI ships only an sdist) with a trimmed CMake config,
#   plus sentencepiece (convert_hf_to_gguf.py imports it even for BPE vocabularies);
# - extracts llama.cpp's convert_hf_to_gguf.py + conversion/ + its own gguf-py from the same sdist
#   into CONVERT_DIR (default: $LLAMACPP_CONVERT_DIR or <repo>/.venv/llama.cpp), with llama.cpp's vocab-only
#   GGUF files of a few model families in models/ (real tokenizers, offline). The vendored gguf-py
#   is used (put first on sys.path), never the PyPI `gguf` package, so versions always match.
set -euo pipefail

VERSION=0.3.36
VENV=${1:?usage: $0 VENV_DIR [CONVERT_DIR]}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=${2:-${LLAMACPP_CONVERT_DIR:-$VENV/llama.cpp}}
PY="$VENV/bin/python"
STAMP="$DEST/.llama-cpp-python-$VERSION"

[ -x "$PY" ] || { echo "no python at $PY" >&2; exit 1; }

have_pkg() {
  "$PY" - <<EOF 2>/dev/null
import importlib.metadata as m, sys
import sentencepiece
ok = m.version("llama_cpp_python") == "$VERSION"
if ok:  # the fixed-instruction-set build below (AVX2, no AVX-512, no AMX): a native build is not installed
    import llama_cpp
    info = llama_cpp.llama_print_system_info().decode()
    ok = "AVX2 = 1" in info and "AVX512 = 1" not in info and "AMX_INT8 = 1" not in info
sys.exit(not ok)
EOF
}

# llama.cpp's vocab-only GGUF files: the real tokenizers of the model families the tests build offline
VOCABS="qwen2 llama-bpe llama-spm phi-3 gpt-neox"

if have_pkg && [ -f "$STAMP" ] && [ -f "$DEST/convert_hf_to_gguf.py" ] && [ -f "$DEST/models/ggml-vocab-gpt-neox.gguf" ]; then
  echo "llama.cpp $VERSION already installed ($DEST)"
  exit 0
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
CACHE="${FINETUNE_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune/wheels}"
SDIST="$CACHE/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
  mkdir -p "$CACHE"
  "$PY" -m pip download --quiet --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$WORK"
  mv "$WORK/llama_cpp_python-$VERSION.tar.gz" "$SDIST"
fi

if ! have_pkg; then
  # Only the shared libs the Python package loads: no mtmd/llava (multimodal; imported lazily),
  # no tests/examples/tools/server, no openssl. One fixed instruction set, not -march=native: AVX2 + FMA
  # + F16C (any x86-64 CPU since 2013-2015), so every such machine runs the same kernels and the GGUF
  # metrics are the same numbers everywhere (a native build on an AVX-512 CPU takes other float paths).
  # AMX is compiled out (-mno-amx-*): on AMX CPUs ggml's AMX matmul segfaults in ldtilecfg for
  # Q8_0/Q4_0/K-quant weights (llama.cpp issue #20824). --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS.
  NOAMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  ARGS="${LLAMACPP_CMAKE_ARGS:--DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF}"
  # The wheel depends only on these flags: keep it in a cache keyed by them, so a fresh clone (CI)
  # on the same machine installs in seconds instead of rebuilding for minutes.
  KEY=$(printf '%s\n%s\n' "$VERSION" "$ARGS $NOAMX" | sha256sum | cut -c1-16)
  WHEELS="$CACHE/llama-cpp-python-$KEY"
  start=$(date +%s)
  if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    mkdir -p "$WHEELS.tmp"
    CMAKE_ARGS="$ARGS" CFLAGS="${CFLAGS:-} $NOAMX" CXXFLAGS="${CXXFLAGS:-} $NOAMX" \
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
      "$PY" -m pip wheel --quiet --no-cache-dir --no-deps "$SDIST" -w "$WHEELS.tmp"
    rm -rf "$WHEELS" && mv "$WHEELS.tmp" "$WHEELS"
  fi
  "$PY" -m pip uninstall --quiet --yes llama_cpp_python 2>/dev/null || true  # same version, other build
  "$PY" -m pip install --quiet "$WHEELS"/llama_cpp_python-*.whl sentencepiece
  echo "llama-cpp-python $VERSION built and installed in $(( $(date +%s) - start )) s"
fi

SRC="llama_cpp_python-$VERSION/vendor/llama.cpp"
tar -xzf "$SDIST" -C "$WORK" "$SRC/convert_hf_to_gguf.py" "$SRC/conversion" "$SRC/gguf-py/gguf" "$SRC/LICENSE" \
  $(for vocab in $VOCABS; do echo "$SRC/models/ggml-vocab-$vocab.gguf"; done)
rm -rf "$DEST.tmp"
mkdir -p "$DEST.tmp/models"
cp -r "$WORK/$SRC/convert_hf_to_gguf.py" "$WORK/$SRC/conversion" "$WORK/$SRC/gguf-py" "$WORK/$SRC/LICENSE" "$DEST.tmp/"
cp "$WORK/$SRC"/models/ggml-vocab-*.gguf "$DEST.tmp/models/"
touch "$DEST.tmp/$(basename "$STAMP")"
rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
echo "llama.cpp convert script extracted to $DEST"
"$PY" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, llama_cpp.llama_print_system_info().decode())"

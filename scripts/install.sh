#!/usr/bin/env bash
# Install r1ray into ./.venv on a fresh machine: CPU torch first (a plain `torch` pulls a multi-GB CUDA
# build), DeepSpeed with its CPU ops prebuilt (otherwise the first run compiles them for ~2 minutes),
# then the package with its test extra. Idempotent; ~7 minutes from nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q --upgrade pip setuptools wheel
pip install -q -c scripts/constraints.txt torch
if ! python -c "import deepspeed.ops.op_builder" 2>/dev/null || ! python -c "import deepspeed" 2>/dev/null; then
  DS_BUILD_SHM_COMM=1 DS_BUILD_CPU_ADAM=1 pip install -q --no-build-isolation -c scripts/constraints.txt "deepspeed>=0.16,<0.21"
fi
pip install -q -c scripts/constraints.txt -e ".[test]"
# llama-cpp-python (real llama.cpp, to verify GGUF exports) builds llama.cpp from source: ~50 minutes on a loaded
# 2-core machine. Installed from a wheel cached on this machine when one is there (2.8 s); otherwise the GGUF parity
# tests skip, naming this step. Build the cache once with:
#   CMAKE_ARGS="-DLLAVA_BUILD=OFF" .venv/bin/pip wheel --no-deps -w ~/.cache/r1ray/wheels llama-cpp-python==0.3.36
WHEELS="${R1RAY_WHEELS:-$HOME/.cache/r1ray/wheels}"
if ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1 && ! python -c "import llama_cpp" 2>/dev/null; then
  pip install -q -c scripts/constraints.txt --only-binary llama-cpp-python --find-links "$WHEELS" llama-cpp-python \
    || echo "install.sh: the cached llama-cpp-python wheel did not install; GGUF parity tests will skip" >&2
fi
# A real Prometheus for tests/ray/test_prometheus.py (every dashboard panel's query evaluated against a real
# run). Debian's package; without root or apt the test fails and names this step.
if ! command -v prometheus >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null) \
      || echo "install.sh: apt-get install prometheus failed; tests/ray/test_prometheus.py will fail" >&2
  else
    echo "install.sh: prometheus is not installed (needs root + apt-get); tests/ray/test_prometheus.py will fail" >&2
  fi
fi
python -c "import torch, deepspeed, ray, transformers; print(f'torch {torch.__version__}, deepspeed {deepspeed.__version__}, ray {ray.__version__}, transformers {transformers.__version__}')"

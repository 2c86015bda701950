#!/usr/bin/env bash
# The GPU check, as ONE prepared device call of at most 10 minutes on one H100/H200: the GPU tests, then the
# GPU benchmark, everything written under $OUT (env.txt, gpu-tests.log, gpu-tests.xml, bench.log, bench.json).
#
# Before the call, on the machine with a package index (once; ~2 minutes, ~48 MB):
#   echo /.whl/ >> .git/info/exclude && bash ../shared/gpu/make_wheels.sh .whl
# The device call (the GPU image has CUDA torch, transformers, pytest; it lacks Ray, DeepSpeed, pydantic, hjson):
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)
# Without .whl it uses whatever the image has (a GPU machine with r1ray installed: `bash scripts/gpu_check.sh`).
#
# Budget (measured numbers go in docs/gpu.md once a GPU session has run this): install ~20 s, tests/gpu
# ~3 min (one Ray Train + DeepSpeed run, the engine, the chunked loss), benchmarks/gpu.py ~5 min. Each part
# has its own timeout so a hang in one still leaves the other's output; BENCH_ARGS shortens the benchmark
# (e.g. BENCH_ARGS=--skip-compile).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/r1ray-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=0
T0=$(date +%s)

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" | tee "$OUT/env.txt"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
# Ray workers start with the raylet's PATH: the image's tools (ninja) must be on it
export PATH="$(dirname "$(command -v "$PY")"):$PATH"

{
  echo "== $(date -u) host $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST-<unset>} CUDA_HOME=${CUDA_HOME-<unset>} nvcc=$(command -v nvcc || echo none)"
  "$PY" - <<'EOF'
import importlib
for m in ("torch", "transformers", "deepspeed", "ray", "pydantic", "vllm"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(m, "MISSING:", type(e).__name__, e)
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== tests/gpu ($(($(date +%s) - T0)) s)"
timeout 230 "$PY" -m pytest tests/gpu -q -p no:cacheprovider -o timeout=220 --junitxml="$OUT/gpu-tests.xml" \
  2>&1 | tee "$OUT/gpu-tests.log"
TESTS_RC=${PIPESTATUS[0]}

echo "== benchmarks/gpu.py ($(($(date +%s) - T0)) s)"
LEFT=$((560 - ($(date +%s) - T0)))
# shellcheck disable=SC2086
timeout "$LEFT" "$PY" benchmarks/gpu.py --json "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
BENCH_RC=${PIPESTATUS[0]}

echo "== done in $(($(date +%s) - T0)) s: tests rc=$TESTS_RC, benchmark rc=$BENCH_RC (124 = timed out)"
[ "$TESTS_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]

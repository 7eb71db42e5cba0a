#!/usr/bin/env bash
# One-shot GPU check of kernels/: correctness in bf16 against float64 first, then timings.
#
# Runs on a fresh CUDA machine from the repository root or anywhere:
#     bash bench/gpu_check.sh [OUT_DIR]
# Needs python3 with a CUDA build of torch and triton (kernels/ imports nothing else); it
# does not install the project: PYTHONPATH points at this checkout, so no network is
# needed. With the full project wanted instead, run `pip install -e .` first; the script
# then uses that install the same way. PY=/path/to/python picks another interpreter.
# Writes OUT_DIR/gpu_check.log and OUT_DIR/kernels_bench.json
# (default OUT_DIR: $OUT if set, else /tmp/ringmaster-gpu-check).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-${OUT:-/tmp/ringmaster-gpu-check}}"
PY="${PY:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
cd "$ROOT"
exec > >(tee "$OUT/gpu_check.log") 2>&1

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'PYEOF'
import sys, torch, triton
print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__)
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch: nothing to check")
print("device", torch.cuda.get_device_name())
PYEOF
"$PY" -c "import pytest" 2>/dev/null || "$PY" -m pip install -q pytest pytest-timeout

echo "== correctness: Triton bf16 vs float64 reference, at most 2x torch's own bf16 error"
"$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/kernels/test_gpu.py

echo "== timings"
"$PY" -m bench.kernel_speed --json "$OUT/kernels_bench.json"
echo "== done: $OUT"

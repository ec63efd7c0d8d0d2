#!/usr/bin/env bash
# Runs on the reference machine (AMX + GPU) over the carried devbuild/ (see
# device_build.sh): installs the wheel, runs the CUDA decode tests, then the whole-model
# benchmark (ktrs decode graphs vs HF with everything on the GPU) and prints its table.
# Usage (device tool): bash scripts/device_decode.sh [bench_model.py args...]
# Environment: TESTS (pytest paths, default the decode and patch-model tests; "" skips),
# SKIP_BENCH=1.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ktrs-out}; mkdir -p "$OUT"
cd "$(dirname "$0")/.."
grep -m1 "model name" /proc/cpuinfo; nproc
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site devbuild/*.whl || exit 1
python3 -c 'import pytest' 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site devbuild/pywheels/*.whl
export PYTHONPATH=/tmp/site
python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'
status=0
if [ -n "${TESTS-tests/test_decode.py tests/test_patch_model.py}" ]; then
  echo "== pytest ${TESTS-tests/test_decode.py tests/test_patch_model.py}"
  # shellcheck disable=SC2086
  python3 -m pytest -q -p no:cacheprovider -rs ${TESTS-tests/test_decode.py tests/test_patch_model.py} > "$OUT/pytest-decode.log" 2>&1 || status=1
  grep -E "passed|failed|Error|error" "$OUT/pytest-decode.log" | tail -15
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  echo "== bench_model"
  python3 benchmarks/bench_model.py --skip offload --json "$OUT/bench_model.json" "$@" 2>&1 | grep -v Warning | tee "$OUT/bench_model.log" | tail -40 || status=1
fi
exit $status

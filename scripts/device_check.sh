#!/usr/bin/env bash
# Runs on the AMX reference machine over the carried devbuild/ (see device_build.sh):
# install the wheel, run the Rust tests, pytest under each ISA, the layer benchmark, and
# print a table. Usage (device tool): bash scripts/device_check.sh [bench args...]
# Environment: ISAS (pytest ISAs, default "amx avx512 scalar"; any tier name works, e.g.
# ISAS="avx2" forces the AVX2 tier on the AVX-512 machine; "" skips pytest),
# PYTEST_ARGS (default "tests"; a full suite takes ~4 minutes per ISA there, so run
# the three ISAs in separate calls),
# PROBE=1 (single-thread GEMM probe), SWEEP_ARGS (run benchmarks/sweep_knobs.py with
# these arguments), SKIP_BENCH=1 (no bench_layer.py), SKIP_CARGO=1 (no Rust tests),
# SHAPES (bench_layer shapes, one run and table each, default "v2-lite"; also "v3",
# "qwen3-30b-a3b"; then README's table rows for all of them).
# Layer benches only, ktrs and kt-kernel (devbuild/ktpeer, see device_build.sh), one call:
#   ISAS="" SKIP_CARGO=1 SHAPES="qwen3-30b-a3b v3" bash scripts/device_check.sh --isa amx --repeats 3 --no-torch --kt on
# (measured 2026-12-02: ~15 s for V2-Lite or Qwen3-30B-A3B shape, ~2 min for V3 shape,
# whose layer holds 21 GiB in ktrs, as much in kt-kernel and the random source weights).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ktrs-out}; mkdir -p "$OUT"
cd "$(dirname "$0")/.."
grep -m1 "model name" /proc/cpuinfo; grep -o -w 'amx_[a-z0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' '; echo; nproc
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site devbuild/*.whl || exit 1
# pytest and hypothesis (the fuzz suite) from the carried wheels when the machine lacks them.
python3 -c 'import pytest, hypothesis' 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site devbuild/pywheels/*.whl
export PYTHONPATH=/tmp/site
[ -d devbuild/ktpeer ] && export PYTHONPATH=/tmp/site:$PWD/devbuild/ktpeer
python3 -m ktrs info
status=0
if [ "${SKIP_CARGO:-0}" != 1 ]; then
  echo "== cargo tests (every ISA this CPU has)"; ./devbuild/ktrs-tests -q 2>&1 | tail -3 || status=1
fi
run_pytest() {  # isa -> log in $OUT; exit status of pytest
  # shellcheck disable=SC2086
  KTRS_ISA=$1 python3 -m pytest -q -p no:cacheprovider --durations=8 ${PYTEST_ARGS:-tests} > "$OUT/pytest-$1.log" 2>&1
}
# One ISA at a time: three suites at once ran past 10 minutes, all three stuck in the
# demo test (likely oversubscription: 16-thread pools and torch's spinning OpenMP
# threads in each process; not investigated further).
for isa in ${ISAS-amx avx512 scalar}; do
  echo "== pytest KTRS_ISA=$isa"
  run_pytest "$isa" || status=1
  grep -E "^[0-9.]+s (call|setup)" "$OUT/pytest-$isa.log" | head -4; tail -2 "$OUT/pytest-$isa.log"
done
if [ "${PROBE:-0}" = 1 ]; then
  echo "== GEMM probes (single-thread kernel; tile-unit ceilings)"
  ./devbuild/ktrs-tests --ignored --nocapture --test-threads=1 probe_ 2>&1 | grep "^probe"
  ./devbuild/ktrs-tests --ignored --nocapture gemm_throughput 2>&1 | grep "^gemm"
  ./devbuild/ktrs-tests --ignored --nocapture amx_ceilings 2>&1 | grep "ceiling"
  for isa in avx2 avx512f; do
    WS_ISA=$isa ./devbuild/ktrs-tests --ignored --nocapture weight_stream 2>&1 | grep "weight stream"
  done
  ./devbuild/ktrs-tests --ignored --nocapture weight_stream 2>&1 | grep "weight stream"
fi
if [ -n "${SWEEP_ARGS:-}" ]; then
  echo "== knob sweep"
  # shellcheck disable=SC2086
  python3 benchmarks/sweep_knobs.py --json "$OUT/sweep.json" $SWEEP_ARGS || status=1
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  # One layer benchmark per shape (SHAPES, default v2-lite; "v2-lite v3 qwen3-30b-a3b" for
  # the issue-12 table). torch's baseline is skipped at V3 shape (minutes per T).
  for shape in ${SHAPES:-v2-lite}; do
    echo "== benchmark $shape"
    extra=""; [ "$shape" = v3 ] && extra="--no-torch"
    # shellcheck disable=SC2086
    python3 benchmarks/bench_layer.py --shape "$shape" $extra --json "$OUT/bench_layer-$shape.json" "$@" || status=1
  done
  jsons=$(for shape in ${SHAPES:-v2-lite}; do f="$OUT/bench_layer-$shape.json"; [ -f "$f" ] && echo "$f"; done)
  if [ -n "$jsons" ]; then
    echo "== README rows (one layer; ms: ktrs fwd / bwd | fwd TFLOPS | kt SFT fwd / bwd | kt inference fwd)"
    # shellcheck disable=SC2086
    python3 benchmarks/bench_layer.py --readme-rows $jsons || status=1
  fi
fi
exit $status

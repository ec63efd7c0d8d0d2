#!/usr/bin/env bash
# Builds, on this machine, everything the AMX reference machine needs into devbuild/
# (git-ignored; name it in the device tool's `carry`): the abi3 wheel, the Rust test
# binary, and pure-Python wheels of pytest in case the machine lacks it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
rm -rf devbuild && mkdir -p devbuild/pywheels
"$VENV/bin/maturin" build --release -q -o devbuild
bin=$(cargo test -p ktrs --release --no-run --message-format=json 2>/dev/null \
  | "$VENV/bin/python" -c 'import sys,json
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]=="ktrs": print(m["executable"])' | tail -1)
cp "$bin" devbuild/ktrs-tests
"$VENV/bin/python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d devbuild/pywheels pytest pluggy iniconfig hypothesis sortedcontainers attrs
# Optional: the peer for side-by-side numbers. KT_WHEEL=path/to/kt_kernel-0.7.2-cp312-*.whl
# keeps only its Python files, the AMX extension and its bundled libraries (~13 MB); it
# is carried, never committed.
if [ -n "${KT_WHEEL:-}" ]; then
  tmp=$(mktemp -d)
  unzip -q "$KT_WHEEL" 'kt_kernel/*' 'kt_kernel.libs/*' -d "$tmp"
  find "$tmp/kt_kernel" -name '_kt_kernel_ext_*.so' ! -name '_kt_kernel_ext_amx*' -delete
  mkdir -p devbuild/ktpeer && cp -r "$tmp/kt_kernel" "$tmp/kt_kernel.libs" devbuild/ktpeer/
  rm -rf "$tmp"
fi
ls -la devbuild devbuild/pywheels

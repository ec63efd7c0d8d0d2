# Quick start:  make demo   (set up, build, run the built-in demo)
#               make test   (set up, build, cargo test + pytest)
# Both are idempotent: the virtualenv and its packages are made once, the extension is
# rebuilt only when sources change (cargo is incremental).

VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.ktrs-deps
# torch from PyPI is a large CUDA build that also runs on the CPU; it is installed once.
DEPS    := torch numpy pytest "maturin>=1.5,<2" safetensors "transformers>=5" "peft>=0.21"

.PHONY: setup build test test-rust test-python demo bench wheel clean

setup: $(STAMP)

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(DEPS)
	touch $(STAMP)

build: setup
	VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/maturin develop --release -q

test-rust:
	cargo test -p ktrs

test-python: build
	$(PY) -m pytest tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

test: test-rust test-python

demo: build
	$(PY) -m ktrs demo

bench: build
	$(PY) benchmarks/bench_layer.py

# The abi3 wheel (cp310+) for other machines, e.g. the AMX reference machine.
wheel: setup
	$(VENV)/bin/maturin build --release -o wheelhouse

clean:
	cargo clean
	rm -rf wheelhouse

# Quick start:  make demo   (set up, build, run the built-in demo)
#               make test   (set up, build, cargo test + pytest)
# Both are idempotent: the virtualenv and its packages are made once, the extension is
# rebuilt only when sources change (cargo is incremental).

VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
# torch from PyPI is a large CUDA build that also runs on the CPU; it is installed once.
DEPS    := torch numpy pytest hypothesis "maturin>=1.5,<2" safetensors "transformers>=5.17,<6" "peft>=0.21,<0.22"
# The stamp's name carries a hash of DEPS: editing DEPS makes an existing .venv install
# what is new (pip skips what is there), and CI's fresh clone installs everything.
DEPS_ID := $(shell printf '%s' '$(DEPS)' | cksum | cut -d' ' -f1)
STAMP   := $(VENV)/.ktrs-deps-$(DEPS_ID)

.PHONY: setup build test test-rust test-python demo bench wheel clean

setup: $(STAMP)

# Set-up says what it is doing (the first one downloads ~3 GB and takes minutes);
# later builds stay quiet unless something fails.
$(STAMP):
	@test -x $(PY) || { echo "ktrs: creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@echo 'ktrs: installing into $(VENV): $(DEPS)'
	@echo "ktrs: (the first time this downloads torch, ~3 GB: several minutes)"
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install --progress-bar on $(DEPS) | grep -vE '^(Requirement already satisfied|Looking in links)' || true
	@$(PY) -c "import torch, pytest, hypothesis, maturin, transformers, peft" 2>/dev/null || { echo "ktrs: set-up failed (see above)"; exit 1; }
	@rm -f $(VENV)/.ktrs-deps*
	@touch $(STAMP)
	@echo "ktrs: set-up done"

build: setup
	@VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/maturin develop --release -q > $(VENV)/.ktrs-build.log 2>&1 \
		|| { cat $(VENV)/.ktrs-build.log; exit 1; }
	@echo "ktrs: built the extension into $(VENV)"

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

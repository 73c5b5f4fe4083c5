# The two commands of the README:
#   make demo  - set up .venv, build, and train GroupMamba on the embedded digits dataset (CPU is enough)
#   make test  - set up .venv, build, and run the test suite
# Set PYTHON to choose the interpreter; TORCH_CUDA_ARCH_LIST (default 9.0) picks the CUDA archs.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# INSTALL_FLAGS=-e gives an editable install for development (Python edits apply at once).
INSTALL_FLAGS ?=
export TORCH_CUDA_ARCH_LIST ?= 9.0
# Compile with both cores; more jobs only thrash a small machine.
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2

.PHONY: setup build test demo bench clean

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -r requirements-dev.txt
	touch $@

setup: $(VENV)/.deps build

build: $(VENV)/.deps
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PIP) install --no-build-isolation --no-deps -v $(INSTALL_FLAGS) . > $(VENV)/build.log 2>&1 \
	  || (tail -60 $(VENV)/build.log; exit 1)
	@grep -E "groupmamba: (building|CUDA)" $(VENV)/build.log || true

test: setup
	$(PY) -m pytest -q --timeout=900 tests

demo: setup
	$(PY) -m groupmamba.train --demo --output runs/demo

# model throughput (GroupMamba-T/S/B on a GPU, the small demo model on CPU); BENCH_ARGS e.g. --cuda-graph
bench: setup
	$(PY) benchmarks/bench_models.py $(BENCH_ARGS)

clean:
	rm -rf build _skbuild dist *.egg-info

# One command sets everything up and runs the main job (make demo); one sets
# everything up and runs the tests (make test). Both work from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch (small); TORCH_SPEC=torch==2.14.1 gives the CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

NATIVE_SOURCES := $(shell find csrc cmake -type f) CMakeLists.txt pyproject.toml

.PHONY: all setup build test demo bench docs clean

all: test

$(VENV)/.deps: requirements-dev.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

setup: $(VENV)/.deps

$(VENV)/.built: $(VENV)/.deps $(NATIVE_SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

test: build
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: build
	$(PY) -m longreach extrapolate

bench: build
	$(PY) -m longreach bench

# The API reference, generated offline from the docstrings into build/docs/api
# (tests/test_api_reference.py builds it in `make test` too).
docs: build
	$(PY) scripts/build_api_reference.py --out build/docs/api

clean:
	rm -rf build $(VENV)

# The CUDA build (docs/cuda.md): a venv of its own with torch's CUDA build, the
# nvcc of torch's CUDA version, kernels for LONGREACH_CUDA_ARCHS checked in the
# binary. Needs no GPU. test-cuda runs the whole suite against that build (the
# device="cuda" copies and tests/test_cuda.py skip without a GPU), including the
# host emulation of the CUDA kernels.
.PHONY: build-cuda test-cuda
build-cuda:
	scripts/build_cuda.sh

test-cuda: build-cuda
	LONGREACH_CUDA_EMULATION=1 $${CUDA_VENV:-.venv-cuda}/bin/python -m pytest -q $(PYTEST_ARGS)

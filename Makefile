# `make test` and `make demo` do all set-up themselves on a fresh machine.
# The venv sees system packages, so a torch you already have (CUDA or not) is used as is;
# only where no torch is importable is the pinned CPU build installed.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rf_compile-installed
TORCH_CPU ?= torch==2.13.0

.PHONY: setup test test-gpu demo lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_CPU)
	$(PY) -m pip install -e '.[dev]'
	$(PY) -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__)"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu -rfE --durations=20 tests

demo: $(STAMP)
	$(PY) -m rf_compile.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check rf_compile tests benchmarks

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

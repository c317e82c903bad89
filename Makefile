# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-all bench gpu-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: a CPU wheel of 2.13.0 is available locally; anything else pulls CUDA.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,notebooks]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m sim.demo

# Every capability at small sizes; tests marked slow (bigger sizes) run with `make test-all`.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

# CUDA checks (simulator step, kernel vs torch's hook, the DDP hook on NCCL), at most 10 minutes on one GPU;
# without CUDA a small CPU fallback (gloo) that `make test` also runs.
gpu-check: $(STAMP)
	$(PY) -m benchmarks.gpu_check --out benchmarks/gpu_check.json

clean:
	rm -rf $(VENV) results .pytest_cache .hypothesis

# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup data demo test test-all bench gpu-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: a CPU wheel of 2.13.0 is available locally; anything else pulls CUDA.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,notebooks,tensorboard]"
	touch $(STAMP)

setup: $(STAMP)

# Fashion-MNIST for the fashion-mnist-* tasks: Debian's dataset-fashion-mnist where apt-get and root allow.
data:
	@bash scripts/ensure_fashion_mnist.sh

demo: $(STAMP) data
	$(PY) -m sim.cli.demo

# Every capability at small sizes; tests marked slow (bigger sizes) run with `make test-all`.
test: $(STAMP) data
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

test-all: $(STAMP) data
	$(PY) -m pytest -q -n 2 --dist loadfile

bench: $(STAMP) data
	$(PY) -m benchmarks.run_all

# CUDA checks (simulator step, kernel vs torch's hook, the DDP hook on NCCL), at most 10 minutes on one GPU;
# without CUDA a small CPU fallback (gloo) that `make test` also runs.
gpu-check: $(STAMP)
	$(PY) -m benchmarks.gpu_check --out benchmarks/gpu_check.json

clean:
	rm -rf $(VENV) results .pytest_cache .hypothesis

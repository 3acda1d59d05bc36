# Two commands do all the set-up on a fresh machine:
#   make test   creates .venv (first time only) and runs the whole test suite
#   make demo   (arrives with the pre-training issue)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS := requirements/constraints.txt
STAMP := $(VENV)/.installed
# CI=true (set by .ci/run) runs the fast suite; the `slow` marker is for heavy tests run by hand.
PYTEST_ARGS ?= $(if $(filter true,$(CI)),-m "not slow",)

.PHONY: venv test test-all bench clean

venv: $(STAMP)

# torch==2.13.0 (the CPU wheel on these machines) goes in first, and every later install is constrained to
# it: timm -> torchvision would otherwise replace it with a CUDA build and gigabytes of nvidia packages.
$(STAMP): setup.py $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[torch,test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests -n 2 --durations=10 $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest tests -n 2

bench: $(STAMP)
	$(PY) benchmarks/model_step.py

clean:
	rm -rf $(VENV) .pytest_cache

# Two commands do all the set-up on a fresh machine:
#   make test   creates .venv (first time only) and runs the whole test suite
#   make demo   creates .venv if needed and runs the main job end to end on Fashion-MNIST on CPU
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS := requirements/constraints.txt
STAMP := $(VENV)/.installed
# `make test` runs the whole suite, the slow-marked tests (the 20-minute demo, the soak) included; CI=true (set by
# .ci/run) leaves those out. README "Tests" has the times of both.
PYTEST_ARGS ?= $(if $(filter true,$(CI)),-m "not slow",)

FMNIST := /usr/share/datasets/fashion-mnist
DEMO_DIR ?= /tmp/beit_demo
.PHONY: venv data demo test bench gpu-wheels clean

venv: $(STAMP)

# Fashion-MNIST, the real data of the demo and tests, from the Debian package (no network at run time).
data: $(FMNIST)/train-images-idx3-ubyte.gz
$(FMNIST)/train-images-idx3-ubyte.gz:
	@if [ "$$(id -u)" = 0 ]; then apt-get install -y -q dataset-fashion-mnist; \
	elif command -v sudo >/dev/null; then sudo apt-get install -y -q dataset-fashion-mnist; \
	else echo "Fashion-MNIST missing: run 'apt-get install -y dataset-fashion-mnist' as root" >&2; exit 1; fi

# torch==2.13.0 (the CPU wheel on these machines) goes in first, and every later install is constrained to
# it: timm -> torchvision would otherwise replace it with a CUDA build and gigabytes of nvidia packages.
$(STAMP): setup.py $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[torch,test]'
	# OpenAI's dall_e (the reference of the DALL-E tokenizer tests) and taming-transformers (the VQGAN peer of
	# benchmarks/train_step.py): plain PyTorch modules; their declared dependencies are not needed.
	$(PY) -m pip install -q --no-deps dall-e==0.1 taming-transformers==0.0.1
	touch $(STAMP)

demo: $(STAMP) data
	$(PY) -m beit_jax.experiments.miniature --workdir=$(DEMO_DIR)

test: $(STAMP) data
	$(PY) -m pytest tests -n 2 --durations=10 $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) .pytest_cache

# The pure-Python packages that benchmarks/gpu.sh needs beside a CUDA image's jax/torch/timm/flax, as wheels in
# .whl/ (copy the folder along; gpu.sh installs them there without an index).
gpu-wheels:
	mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: -d .whl ml_collections==1.1.0 dall-e==0.1 \
	  taming-transformers==0.0.1

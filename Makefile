# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# A tiny LLaVA trained on CPU at TP2 x PP2 (4 gloo ranks) on real photographs + conversations mixed with
# language-only dialogues (built from files shipped in the scikit-image wheel); the loss falls over 60 iterations.
demo: install
	$(BIN)/python examples/prepare_demo_data.py runs/demo_data
	OMP_NUM_THREADS=1 $(BIN)/torchrun --nproc-per-node 4 -m megallava.train --config examples/configs/demo.yaml

test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests

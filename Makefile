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

# The paper's recipe in miniature on CPU (4 gloo ranks at TP2 x PP2), on real photographs + conversations mixed with
# language-only dialogues (built from files shipped in the scikit-image wheel): stage 1 aligns the projector on the
# captions and saves; stage 2 fine-tunes projector + LLM from it; the result is exported to an HF directory and
# answers a question about a photograph through transformers alone.
TORCHRUN := OMP_NUM_THREADS=1 $(BIN)/torchrun --nproc-per-node 4 -m megallava.train
demo: install
	$(BIN)/python examples/prepare_demo_data.py runs/demo_data
	$(TORCHRUN) --config examples/configs/demo_stage1.yaml checkpoint.dir=runs/demo_stage1/ckpt checkpoint.overwrite=true
	$(TORCHRUN) --config examples/configs/demo.yaml checkpoint.load=runs/demo_stage1/ckpt checkpoint.finetune=true \
		checkpoint.dir=runs/demo/ckpt checkpoint.overwrite=true
	$(BIN)/python tools/convert_checkpoint.py megatron-to-hf --input runs/demo/ckpt --output runs/demo/hf --overwrite --quiet
	$(BIN)/python examples/chat_demo.py runs/demo/hf

test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests

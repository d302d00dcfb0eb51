# Set-up in two commands (README "Quick start"):
#   make train [ARGS="model=gru optimizer.lr=3e-3"]   # sets up .venv if needed, then scripts/train.py
#   make test  [ARGS="-x tests/test_train.py"]         # sets up .venv if needed, then pytest on JOBS processes
# The environment is made once: it is redone only when pyproject.toml changes (the stamp file).
#
# Variables:
#   VENV         where the virtual environment lives (default .venv; CI: a fresh one per run)
#   PYTHON       the interpreter that creates it (Python 3.11+)
#   TORCH        the pinned PyTorch release (README "Install")
#   JOBS         test processes (pytest-xdist; default 2: a 2-core machine runs the suite in ~4 min)
#   TORCH_INDEX  an index for PyTorch only, e.g. https://download.pytorch.org/whl/cpu on a CPU-only
#                machine with internet (skips PyPI's multi-GB CUDA build); empty: PyPI's default build
#                (CUDA on Linux), or a local wheel where pip is configured with one

VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
JOBS ?= 2
ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.seqexp-installed

.PHONY: train test setup

train: $(STAMP)
	$(BIN)/python scripts/train.py $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(JOBS) --dist worksteal --durations=15 $(ARGS)

setup: $(STAMP)

# PyTorch first, pinned, so that pip does not choose a build; then seqexp, editable, with its test
# extra (torch is then already satisfied: nothing more is downloaded).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -e ".[dev]"
	$(BIN)/python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
	touch $@

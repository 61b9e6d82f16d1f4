PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: install demo test chromium quality bench gpu-check
# The demo model continues Python standard-library code (see moe_prefetch/demo/README.md):
# the start of a codec class is text it has seen many times.
DEMO_PROMPT = 'class Codec(codecs.Codec):\n    def encode(self, input, errors="strict"):'
install:
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned, so the project's range is already met and never pulls a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"

demo: install
	printf $(DEMO_PROMPT) | $(BIN)/moe-prefetch run --model demo --max-new-tokens 64 \
		--cache-slots 24 --predictor m2r2 --lookahead 2 --device auto --report runs/demo
	$(BIN)/moe-prefetch report runs/demo/run.json

test: install chromium
	$(BIN)/python -m pytest

# Best effort, as .ci/run: a headless Chromium lets the report-rendering tests run instead of
# skipping. Only as root with apt-get, only when missing (then silent and instant); never fails.
chromium:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium (apt-get) for the HTML report tests"; \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
			|| echo "chromium not installed; the HTML report tests will skip"; \
	fi

quality:
	$(BIN)/ruff check moe_prefetch tests scripts
	$(BIN)/ruff format --check moe_prefetch tests scripts

bench:
	$(BIN)/python scripts/bench_resident.py
	$(BIN)/moe-prefetch bench --model demo --device cpu --json runs/bench-demo.json

gpu-check:
	bash scripts/gpu_check.sh

PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

# The project's own set-up installs the exact versions the suite passed with (constraints.txt);
# pyproject.toml keeps the range users get. test-lowest checks the range's lower end (the GPU
# image's transformers), test-latest the newest releases (see scripts/upstream_check.py).
PIN = constraints.txt
LOWEST = constraints-lowest.txt

.PHONY: install demo test test-random test-lowest test-latest chromium quality bench gpu-check mutate compare-llamacpp
# The demo model continues Python standard-library code (see moe_prefetch/demo/README.md):
# the start of a codec class is text it has seen many times.
DEMO_PROMPT = 'class Codec(codecs.Codec):\n    def encode(self, input, errors="strict"):'
install:
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c $(PIN) pip
	# torch first, pinned, so the project's range is already met and never pulls a multi-GB CUDA build
	$(BIN)/pip install -q -c $(PIN) torch
	$(BIN)/pip install -q -c $(PIN) -e ".[test]"

# `run` prints the summary and writes runs/demo/{run.json,report.html}; `moe-prefetch report runs/demo`
# shows every table again later.
demo: install
	printf $(DEMO_PROMPT) | $(BIN)/moe-prefetch run --model demo --max-new-tokens 64 \
		--cache-slots 24 --predictor m2r2 --lookahead 2 --device auto --report runs/demo

test: install chromium
	$(BIN)/python -m pytest

# Not in CI: the suite in a random order (pytest-random-order: the modules shuffled, and the tests
# within each), to find tests that pass only after others. SEED repeats an order; the run prints
# its seed. Seeds 24 and 1 passed (issue 24).
SEED ?= 24
test-random: install
	$(BIN)/python -m pytest -p no:cacheprovider --random-order-bucket=module --random-order-seed=$(SEED)

# The exactness and attach tests at the lowest transformers pyproject.toml admits.
test-lowest:
	test -d .venv-lowest || $(PY) -m venv .venv-lowest
	.venv-lowest/bin/pip install -q -c $(LOWEST) pip
	.venv-lowest/bin/pip install -q -c $(LOWEST) torch
	.venv-lowest/bin/pip install -q -c $(LOWEST) -e ".[test]"
	.venv-lowest/bin/python -m pytest -q tests/test_exactness.py tests/test_attach.py

# Not in CI: the suite against the newest transformers (and its hub and tokenizers), with a
# table of the architectures that are new upstream, pass or fail. Move the pin on what it says.
test-latest:
	test -d .venv-latest || $(PY) -m venv .venv-latest
	.venv-latest/bin/pip install -q -c $(PIN) pip
	.venv-latest/bin/pip install -q -c $(PIN) torch
	.venv-latest/bin/pip install -q -e ".[test]"
	.venv-latest/bin/pip install -q --upgrade transformers huggingface-hub tokenizers
	.venv-latest/bin/python scripts/upstream_check.py

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

# Not in CI: do the tests notice mistakes that never change the tokens (what the scheduler,
# cache, placement and uploads decide; recall; training; report figures)? First the mistakes
# that once got through (scripts/known_mutations.py: 13), then mutmut over the modules in
# pyproject.toml's [tool.mutmut]: 2,897 mutants, each against its module's own tests less the e2e
# ones (tests/conftest.py). The whole target: 20.6 min wall on an otherwise idle 2-core machine
# (2.5 known, 17 mutmut); 29 min for mutmut alone under a load of 4-5. Survivors: `$(BIN)/mutmut results`,
# `$(BIN)/mutmut show NAME`; each gets a test or a line in tests/mutation_survivors.md.
# MUTANTS narrows the run, e.g. MUTANTS='moe_prefetch.runtime.scheduler*'.
MUTANTS ?=
mutate: install
	$(BIN)/pip install -q -c $(PIN) mutmut
	$(BIN)/python scripts/known_mutations.py
	$(BIN)/mutmut run --max-children 2 $(MUTANTS)
	$(BIN)/mutmut results

# Not in CI: the host lane beside llama.cpp's CPU MoE path (issue 19; docs/benchmarks.md,
# section 9). llama-cpp-python is built from PyPI's sdist in its own venv under build/llamacpp
# (git-ignored: no llama.cpp code is committed; ~5 minutes on 2 cores, once); its sdist's
# vendor/llama.cpp/convert_hf_to_gguf.py converts the models to GGUF.
LLAMA = build/llamacpp
LLAMA_CPP_PYTHON = 0.3.36
LLAMA_SRC = $(LLAMA)/src/llama_cpp_python-$(LLAMA_CPP_PYTHON)
compare-llamacpp: install
	test -x $(LLAMA)/venv/bin/python || $(PY) -m venv $(LLAMA)/venv
	$(LLAMA)/venv/bin/python -c "import llama_cpp" 2>/dev/null || \
		nice $(LLAMA)/venv/bin/pip install -q --no-binary llama-cpp-python llama-cpp-python==$(LLAMA_CPP_PYTHON)
	test -d $(LLAMA_SRC) || ($(LLAMA)/venv/bin/pip download -q --no-binary :all: --no-deps -d $(LLAMA)/sdist \
		llama-cpp-python==$(LLAMA_CPP_PYTHON) && mkdir -p $(LLAMA)/src && \
		tar xzf $(LLAMA)/sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(LLAMA)/src)
	$(BIN)/python scripts/compare_llamacpp.py --work $(LLAMA) --llama-python $(LLAMA)/venv/bin/python \
		--llama-src $(LLAMA_SRC)/vendor/llama.cpp

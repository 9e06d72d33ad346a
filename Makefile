# Every target builds .venv from scratch when it is missing or pyproject.toml changed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: all venv test lint typecheck unit demo bench docs llama clean

all: test

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck unit

demo: $(STAMP)
	$(BIN)/python -m scripts.demo

# The benchmarks (figures and how to read them: docs/performance.md). Each prints its figures;
# none is a pass/fail test. About 6 minutes on two cores.
bench: $(STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)
	$(BIN)/python -m bench.tunnel_bench
	$(BIN)/python -m bench.stats_bench
	$(BIN)/python -m bench.flood_bench
	$(BIN)/python -m bench.pool_bench
	$(BIN)/python -m bench.redis_bench
	$(BIN)/python -m bench.floor_bench

# llama.cpp's llama-server and SmolLM2-135M for the real-model tier (tests/test_llama.py), built
# once into ~/.cache/backhaul (about 8 minutes on two cores; seconds when cached).
llama: $(STAMP)
	$(BIN)/python -m scripts.llama ensure

# docs/configuration.md is generated from the settings classes (tests/test_docs.py checks it).
docs: $(STAMP)
	$(BIN)/python docs/gen_config.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

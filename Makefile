# The two commands a newcomer needs: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUNTIME_STAMP := $(VENV)/.installed-runtime
PIP := $(BIN)/python -m pip
PYTEST_ARGS ?=
BENCH_ARGS ?=

export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: venv demo test lint typecheck bench clean

venv: $(STAMP)

# torch goes in first from the pinned constraints so pip takes the local CPU wheel,
# never a CUDA build resolved from the registry. The demo needs only the runtime packages
# (the dev tools and transformers add ~45 s to a fresh clone's first `make demo`).
# The native accelerators (optional C extensions) are rebuilt when their sources change.
NATIVE_SOURCES := setup.py $(wildcard routing/*.c kvcluster/core/*.c)

$(RUNTIME_STAMP): pyproject.toml constraints.txt $(NATIVE_SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch
	$(PIP) install -q -c constraints.txt -e .
	touch $(RUNTIME_STAMP)

$(STAMP): $(RUNTIME_STAMP)
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(RUNTIME_STAMP)
	$(BIN)/kvcluster demo

lint: $(STAMP)
	$(BIN)/ruff check kvcluster tiers routing tests benchmarks examples
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

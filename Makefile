VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast soak reliability-report bench-registry clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

# README command 1: the main job on the built-in default.
demo: setup
	$(BIN)/lorafleet demo

# README command 2: the whole test suite.
test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# Long reliability runs (fuzzing, load, faults) with soak parameters; rewrites docs/reliability.md.
soak: setup
	$(BIN)/lorafleet bench reliability --soak

# The same tests with the bounded CI parameters (they also run in `make test`).
reliability-report: setup
	$(BIN)/lorafleet bench reliability

bench-registry: setup
	$(BIN)/lorafleet bench registry

clean:
	rm -rf $(VENV) .pytest_cache

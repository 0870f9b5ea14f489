VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup lock check-latest demo test test-fast soak reliability-report bench-registry clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock scripts/setup.sh
	bash scripts/setup.sh

# Refresh requirements.lock on purpose (resolve the ranges, then check the new lock in a fresh venv).
lock:
	bash scripts/lock.sh

# Early warning: the newest versions the ranges allow, without the lock (not part of CI).
check-latest:
	bash scripts/check-latest.sh

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

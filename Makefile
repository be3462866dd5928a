# chatd: `make run` starts a server on the embedded defaults; `make test` runs every check.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: run test lint typecheck pytest bench server-bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.run-deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test-deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(VENV)/.run-deps

run: $(VENV)/.run-deps
	$(BIN)/chatd serve

lint: $(VENV)/.test-deps
	$(BIN)/ruff check chatd protocol storage loadtest tests
	$(BIN)/ruff format --check chatd protocol storage loadtest tests

typecheck: $(VENV)/.test-deps
	$(BIN)/mypy

pytest: $(VENV)/.test-deps
	$(BIN)/pytest -q

test: lint typecheck pytest

bench: $(VENV)/.test-deps
	$(BIN)/python -m loadtest bench --out reports/bench

server-bench: $(VENV)/.test-deps
	$(BIN)/python -m loadtest server-bench --out reports/server-bench --duration 15 --idle 2000 --rounds 2

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

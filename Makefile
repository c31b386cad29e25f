# Two entry points on a fresh clone: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/moegrow: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

.PHONY: install demo test lint
install: $(BIN)/moegrow

demo: install
	$(BIN)/moegrow demo

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .

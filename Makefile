# Two entry points on a fresh clone: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

# setuptools' warnings about the editable install are not for the person installing
PIP := PYTHONWARNINGS=ignore $(BIN)/python -m pip -q --disable-pip-version-check

$(BIN)/moegrow: pyproject.toml
	@echo "installing moegrow and its dependencies into $(VENV) (a few minutes the first time)"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e '.[dev]'
	touch $@
	@echo "installed: $(BIN)/moegrow (try \`$(BIN)/moegrow --help\`, \`make demo\`, \`make test\`)"

.PHONY: install demo test lint
install: $(BIN)/moegrow

demo: install
	$(BIN)/moegrow demo

test: install
	$(BIN)/python -m pytest

# the house (STYLE.md): ruff, and no Python file over MAX_LINES lines
MAX_LINES ?= 520
lint: install
	$(BIN)/ruff check .
	@long=$$(find runtime export tools device_kernels tests apps -name '*.py' 2>/dev/null \
	  | xargs wc -l | awk '$$2 != "total" && $$1 > $(MAX_LINES) {print $$2 " (" $$1 ")"}'); \
	  if [ -n "$$long" ]; then echo "over $(MAX_LINES) lines: $$long"; exit 1; fi

# The README's two commands: `make demo` (the main job end to end on the built-in sample) and `make test`.
# Both install what they need: Debian packages (infra/setup-system.sh), Python packages (.venv), and the
# Java artifacts (Maven, on the first `cdc stack up`).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test unit integration down clean

setup: $(VENV)/.installed
	@bash infra/setup-system.sh

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/cdc demo

test: setup
	$(BIN)/pytest tests/unit tests/integration

unit: setup
	$(BIN)/pytest tests/unit

integration: setup
	$(BIN)/pytest tests/integration

down:
	$(BIN)/cdc stack down

clean: down
	rm -rf .cdc infra/target

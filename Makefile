# The README's two commands: `make demo` (the main job end to end on the built-in sample) and `make test`.
# Both install what they need: Debian packages (infra/setup-system.sh), Python packages (.venv), and the
# Java artifacts (Maven, on the first `cdc stack up`).
#
# Python packages: .venv gets the exact versions in constraints.txt (the ones the suite last passed with), so a
# fresh machine next year installs what was tested, not whatever the open ranges of pyproject.toml resolve to then.
# pyproject.toml keeps the ranges for people who install the package into an environment of their own.
# To move to newer versions: `make lock` (re-resolves the ranges into constraints.txt), then `make test`, and
# commit constraints.txt once the suite passes.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := constraints.txt

.PHONY: setup demo test unit integration lint lock down clean

setup: $(VENV)/.installed
	@bash infra/setup-system.sh

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c $(LOCK) --upgrade pip
	$(BIN)/pip install -q -c $(LOCK) -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/cdc demo

test: setup lint
	$(BIN)/pytest tests/unit tests/integration

unit: setup
	$(BIN)/pytest tests/unit

integration: setup
	$(BIN)/pytest tests/integration

# Style and common bugs (ruff, rules in pyproject.toml), and types of the ground modules (mypy, files in
# pyproject.toml). Needs only the Python packages, not the stack nor the Debian packages.
lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy

# Re-resolve pyproject.toml's ranges to their newest versions in a throw-away venv and write them to the lock.
# pip and every dependency are pinned; setuptools and wheel are not (build tools, the ranges of
# [build-system] apply to them), nor the project itself (installed editable).
lock:
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(PYTHON) -m venv "$$tmp/venv" && \
	"$$tmp/venv/bin/pip" install -q --upgrade pip && \
	"$$tmp/venv/bin/pip" install -q -e '.[dev]' && \
	{ echo "# The tested versions that \`make setup\` installs (pip -c). Written by \`make lock\`; do not edit by hand."; \
	  "$$tmp/venv/bin/pip" freeze --all --exclude-editable | grep -v -E '^(setuptools|wheel)=='; } > $(LOCK).new && \
	mv $(LOCK).new $(LOCK)
	@echo "$(LOCK) rewritten; run \`make test\` and commit it when the suite passes"

down:
	$(BIN)/cdc stack down

clean: down
	rm -rf .cdc infra/target

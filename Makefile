# Two commands do all set-up on a fresh machine:
#   make demo   the main job on the example fleet
#   make test   the test suite
# Both create .venv (gpufleet and its dev extras), .venv-tools (checkov, which pins its own
# dependencies) and node_modules (Node 22 and the cdktn CLI) the first time.

PYTHON ?= python3
VENV := .venv
TOOLS := .venv-tools
BIN := $(VENV)/bin
CHECKOV_VERSION := 3.3.30

.PHONY: setup demo synth test typecheck lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

$(TOOLS)/.installed:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install -q --upgrade pip
	$(TOOLS)/bin/python -m pip install -q 'checkov==$(CHECKOV_VERSION)'
	touch $@

node_modules/.installed: package.json
	npm install --no-audit --no-fund --loglevel=error
	touch $@

setup: $(VENV)/.installed $(TOOLS)/.installed node_modules/.installed

# The main job: check the example fleet, synthesize its Terraform, then run the live demo.
demo: setup
	$(BIN)/gpufleet validate fleet.yaml
	$(BIN)/gpufleet synth fleet.yaml
	$(BIN)/gpufleet demo --fleet fleet.yaml

synth: setup
	$(BIN)/gpufleet synth fleet.yaml

test: setup
	$(BIN)/ruff check .
	$(BIN)/mypy
	PATH="$(CURDIR)/node_modules/.bin:$(CURDIR)/$(TOOLS)/bin:$$PATH" $(BIN)/python -m pytest

typecheck: setup
	$(BIN)/mypy

bench: setup
	for b in tests/bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) $(TOOLS) node_modules cdktf.out

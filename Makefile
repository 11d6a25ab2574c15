# strangler: build, demo and test entry points. Everything a target needs it installs.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit wheel bench clean services-deps

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python 3.11 or newer is required"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/strangler demo

lint: $(STAMP)
	$(VENV)/bin/ruff check proxy adapters flags tests bench
	$(VENV)/bin/ruff format --check proxy adapters flags tests bench
	$(VENV)/bin/mypy

# The whole suite: lint, types, then pytest with the real services (PostgreSQL,
# Unleash, Prometheus) started on loopback and stopped again whatever happens.
test: $(STAMP) services-deps lint
	tests/services/run-with-services.sh $(PY) -m pytest $(PYTEST_ARGS)

services-deps:
	tests/services/install.sh

bench: $(STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build dist *.egg-info tests/services/node_modules

wheel: $(STAMP)
	$(PY) -m build --wheel --no-isolation --outdir dist .

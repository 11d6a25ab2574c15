# strangler: build, demo and test entry points. Everything a target needs it installs.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The modules setup.py compiles with mypyc; rebuilt in place when one of them changes.
COMPILED := $(shell sed -n 's/^    "\(.*\.py\)",$$/\1/p' setup.py)
NATIVE := $(VENV)/.compiled

.PHONY: demo test lint typecheck unit wheel bench clean services-deps native

$(STAMP): pyproject.toml setup.py
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python 3.11 or newer is required"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	STRANGLER_NO_EXTENSIONS=1 $(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The per-request modules as C extension modules next to their sources, rebuilt after
# an edit (an extension module is imported before the source beside it).
native: $(NATIVE)
# The library is stamped after the build: when mypyc finds its C output unchanged (a
# source touched but not edited, a stash popped), nothing is recompiled and the copy
# keeps the old build's time, which the suite would take for a stale build.
$(NATIVE): $(STAMP) $(COMPILED)
	$(PY) setup.py --quiet build_ext --inplace
	for lib in proxy/_native__mypyc.*.so; do if [ -e "$$lib" ]; then touch "$$lib"; fi; done
	touch $(NATIVE)

demo: $(NATIVE)
	$(VENV)/bin/strangler demo

lint: $(STAMP)
	$(VENV)/bin/ruff check proxy adapters flags tests bench
	$(VENV)/bin/ruff format --check proxy adapters flags tests bench
	$(VENV)/bin/mypy

# The whole suite: lint, types, then pytest with the real services (PostgreSQL,
# Unleash, Prometheus) started on loopback and stopped again whatever happens.
test: $(NATIVE) services-deps lint
	tests/services/run-with-services.sh $(PY) -m pytest $(PYTEST_ARGS)

services-deps:
	tests/services/install.sh

bench: $(NATIVE)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build dist *.egg-info tests/services/node_modules
	find proxy adapters flags -name '*.so' -delete

wheel: $(STAMP)
	$(PY) -m build --wheel --no-isolation --outdir dist .

# edgevisor: the two commands are `make run` and `make test`; both install what they need.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
EV := $(VENV)/bin/edgevisor
# The real interpreter, not a pyenv shim (a shim costs ~200 ms per start).
PYTHON ?= $(shell python3 -c 'import os,sys; print(os.path.realpath(sys.executable))' 2>/dev/null || echo python3)
PYTEST_ARGS ?=

.PHONY: run test lint bench demo system venv clean

system:
	@./scripts/ensure-system.sh

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[dev]'
	@touch $@

venv: system $(VENV)/.installed

run: venv
	$(EV) up

test: venv
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy

bench: venv
	$(PY) bench/run_all.py --out docs/benchmarks.md

demo: venv
	$(PY) examples/demo.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache

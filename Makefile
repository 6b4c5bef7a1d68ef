# Every target does its own set-up: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
# torch is installed first, only where the venv has none, so pip never pulls a CUDA build
# by surprise. Override for another build, e.g. `make test TORCH_SPEC='torch==2.5.1'`.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help venv demo test lint typecheck docs bench-quick bench package-check ci clean

help:
	@echo "make demo | test | lint | typecheck | docs | bench-quick | bench | package-check | ci"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test,examples,docs,dev]"
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) examples/deblur_celeba.py

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -n -q -b html docs docs/_build/html

bench-quick: $(STAMP)
	$(PY) -m benchmarks run --suite all --quick --out runs/bench-quick

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m benchmarks run --suite all --device auto --out runs/bench

package-check: $(STAMP)
	bash .ci/package_check.sh

ci: lint typecheck test docs package-check

clean:
	rm -rf $(VENV) build dist *.egg-info docs/_build runs

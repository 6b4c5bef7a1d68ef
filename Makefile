# Every target does its own set-up: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
# torch is installed first, only where the venv has none, so pip never pulls a CUDA build
# by surprise. Override for another build, e.g. `make test TORCH_SPEC='torch==2.5.1'`.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# `make test-floor`: the suite against the lowest torch pyproject.toml allows, in its own venv,
# with the numpy 1.x that torch was built against. Delete $(FLOOR_VENV) after changing the spec.
FLOOR_VENV ?= .venv-floor
FLOOR_TORCH_SPEC ?= torch==2.2.2
FLOOR_NUMPY_SPEC ?= numpy<2
FLOOR_PY := $(FLOOR_VENV)/bin/python
FLOOR_STAMP := $(FLOOR_VENV)/.installed

.PHONY: help venv demo test test-floor lint typecheck docs bench-quick bench package-check ci clean mutation

help:
	@echo "make demo | test | test-floor | lint | typecheck | docs | bench-quick | bench | package-check | ci"

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

$(FLOOR_PY):
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_PY) -m pip install -q --upgrade pip

# torch and numpy first, then pinned as constraints, so the project's extras cannot upgrade them.
$(FLOOR_STAMP): pyproject.toml | $(FLOOR_PY)
	$(FLOOR_PY) -m pip install -q $(FLOOR_TORCH_SPEC)
	$(FLOOR_PY) -m pip install -q "$(FLOOR_NUMPY_SPEC)"
	$(FLOOR_PY) -c "from importlib.metadata import version as v; \
		print(f'torch=={v(\"torch\")}\nnumpy=={v(\"numpy\")}')" > $(FLOOR_VENV)/constraints.txt
	$(FLOOR_PY) -m pip install -q -c $(FLOOR_VENV)/constraints.txt -e ".[test,examples]"
	@touch $(FLOOR_STAMP)

test-floor: $(FLOOR_STAMP)
	@$(FLOOR_PY) -c "import numpy, torch; print('torch', torch.__version__, 'numpy', numpy.__version__)"
	$(FLOOR_PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

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

# `make mutation`: mutation testing of the core with mutmut, configured by [tool.mutmut] in
# pyproject.toml (see mutation/README.md). Too slow for `ci`: about an hour on two cores for
# a fresh run; later runs reuse the results kept in mutants/ for unchanged code (delete
# mutants/ to start over). MUTANTS='implicitlayers.solvers.*' re-runs only the matching
# mutants; MUTATION_JOBS sets the number of workers (default 2).
mutation: $(STAMP)
	$(PY) -m pip install -q "mutmut>=3.8,<4"
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children $(or $(MUTATION_JOBS),2) $(MUTANTS)
	$(PY) mutation/summary.py

clean:
	rm -rf $(VENV) $(FLOOR_VENV) build dist *.egg-info docs/_build runs

# keras_moe developer commands. Every target that runs Python first makes sure
# .venv exists and matches setup.py / pyproject.toml / the lock file.
#
#   make demo                 run the end-to-end demo (installs the `demo`
#                             extra only)
#   make test                 run every test (installs every extra)
#   make test MARKERS='not slow'   run a subset (pytest -m expression)
#   make bench                run the benchmark
#   make format / make lint   black + isort + ruff (fix / check)

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
CONSTRAINTS := requirements/constraints.txt
# The extras each target installs (setup.py): the demo needs only `demo`.
EXTRAS_test := test,bench
EXTRAS_demo := demo
# pytest -m expression; empty runs everything.
MARKERS ?=
PYTEST_ARGS ?=
ARGS ?=
LINT_PATHS := keras_moe apps export benchmarks tests setup.py

.PHONY: venv test demo bench format lint clean

venv: $(VENV)/.stamp-test

# One stamp per extras set, refreshed after each successful install, so the
# venv is reused until setup.py, pyproject.toml or the lock file change.
$(VENV)/.stamp-%: setup.py pyproject.toml $(CONSTRAINTS)
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -c $(CONSTRAINTS) -e '.[$(EXTRAS_$*)]'
	touch $@

test: $(VENV)/.stamp-test
	$(VPY) -m pytest tests -q $(if $(MARKERS),-m "$(MARKERS)") $(PYTEST_ARGS)

demo: $(VENV)/.stamp-demo
	$(VPY) -m apps.demo $(ARGS)

bench: venv
	$(VPY) -m apps.benchmark $(ARGS)

format: venv
	$(VPY) -m black $(LINT_PATHS)
	$(VPY) -m isort $(LINT_PATHS)
	$(VPY) -m ruff check --fix $(LINT_PATHS)

lint: venv
	$(VPY) -m black --check --diff $(LINT_PATHS)
	$(VPY) -m isort --check-only --diff $(LINT_PATHS)
	$(VPY) -m ruff check $(LINT_PATHS)

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

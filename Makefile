# The two commands of README.md: `make demo` and `make test`. Each sets up .venv itself.
SHELL := /bin/bash
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: venv demo test test-unit test-integration lint bench clean

$(STAMP): pyproject.toml
	@$(PY) -c 'import sys; assert sys.version_info[:2] == (3, 11), f"ckpt-stage needs Python 3.11, found {sys.version.split()[0]} ($(PY))"'
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/ckpt-stage demo --workdir .demo

test: venv
	$(BIN)/ruff check ckpt_stage dags tests bench
	$(BIN)/mypy ckpt_stage tests/typecheck
	$(BIN)/pytest $(PYTEST_ARGS) tests

test-unit: venv
	$(BIN)/pytest $(PYTEST_ARGS) tests/unit

test-integration: venv
	$(BIN)/pytest $(PYTEST_ARGS) tests/integration

lint: venv
	$(BIN)/ruff check ckpt_stage dags tests bench
	$(BIN)/mypy ckpt_stage tests/typecheck

BENCH_ARGS ?= --sizes 16M,64M --repeat 1

bench: venv
	$(BIN)/python -m bench.overhead $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .demo .pytest_cache build *.egg-info

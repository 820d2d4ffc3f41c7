# `make demo` and `make test` work on a fresh machine: they create .venv when missing and install
# the pinned set from requirements.txt (torch==2.13.0 first, so no multi-GB CUDA build is pulled).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: install test test-e2e test-all demo demo-quick bench lint clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -r requirements.txt
	$(PIP) install -q --disable-pip-version-check --no-deps -e .
	touch $@

# The unit and integration suite (under 5 minutes on 2 cores); the end-to-end tier (`blip demo --quick`
# with its floors, multi-process runs equal to one process) is `make test-e2e`; CI runs both.
test: install
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not e2e" $(PYTEST_ARGS)

test-e2e: install
	$(PY) -m pytest -q -n 2 --dist loadfile -m e2e $(PYTEST_ARGS)

test-all: test test-e2e

demo: install
	$(VENV)/bin/blip demo --out demo-output --overwrite

demo-quick: install
	$(VENV)/bin/blip demo --out demo-output-quick --quick --overwrite

$(BENCH_STAMP): $(STAMP) bench/requirements.txt
	$(PIP) install -q --disable-pip-version-check -r bench/requirements.txt
	touch $@

bench: $(BENCH_STAMP)
	$(PY) bench/run.py $(BENCH_ARGS)

lint: install
	$(VENV)/bin/ruff check blip_toolkit tests bench
	$(VENV)/bin/ruff format --check blip_toolkit tests bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

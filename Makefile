# extproc-otel: every target sets up what it needs from nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
GEN    := ext_proc/_gen/.generated
PROTOS := $(shell find proto -name '*.proto')
PYTEST_ARGS ?=

.PHONY: all demo test unit e2e lint proto bench clean venv

all: test

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

proto: $(GEN)

$(GEN): $(STAMP) $(PROTOS) proto/generate.py
	$(PY) proto/generate.py
	touch $@

demo: $(GEN)
	$(PY) -m ext_proc.demo $(DEMO_ARGS)

test: $(GEN)
	$(PY) -m pytest $(PYTEST_ARGS)

unit: $(GEN)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

e2e: $(GEN)
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

lint: $(GEN)
	$(PY) -m ruff check ext_proc tests proto
	$(PY) -m mypy ext_proc

clean:
	rm -rf $(VENV) ext_proc/_gen .pytest_cache .mypy_cache .ruff_cache

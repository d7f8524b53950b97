# extproc-otel: every target sets up what it needs from nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
GEN    := ext_proc/_gen/.generated
PROTOS := $(shell find proto -name '*.proto')
PYTEST_ARGS ?=

.PHONY: all demo test unit e2e lint proto bench clean venv tools soak soak-long dist

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

# The wheel and sdist users install (dist/): the sdist first, then the wheel built from
# it, so a file missing from the sdist fails here. setup.py generates ext_proc/_gen.
dist: $(STAMP)
	rm -rf dist
	$(PY) -m build --outdir dist .

demo: $(GEN)
	$(PY) -m ext_proc.dev.demo $(DEMO_ARGS)

# Debian's prometheus: the metrics e2e test scrapes the sidecar with it (CI runs as root).
# Debian's wrk: the load generator of `make bench` (and of its smoke test in `make test`).
tools:
	@command -v prometheus >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null)
	@command -v wrk >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null)

# Envoy alone / native tracer / sidecar (1 and N processes), interleaved; results/latest.*
# Knobs: BENCH_ROUNDS BENCH_SECONDS BENCH_LIGHT_RATE BENCH_WORKERS ... (see bench/run.py).
bench: $(GEN) tools
	$(PY) -m bench.run

test: $(GEN) tools
	$(PY) -m pytest $(PYTEST_ARGS)

unit: $(GEN)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

e2e: $(GEN) tools
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

# Steady load through the real stack (SOAK_SECONDS, default 300, at SOAK_RATE 400 req/s):
# the warm-up is reported, the steady state judged (docs/reliability.md); not in `test`.
soak: $(GEN)
	$(PY) -m ext_proc.dev.soak

# Millions of requests at saturation (wrk, the bench's fast upstream; SOAK_SECONDS,
# default 1200; SOAK_CONFIG=full for envoy-full.yaml), judged as `soak` is.
soak-long: $(GEN) tools
	$(PY) -m bench.soak

lint: $(GEN)
	$(PY) -m ruff check ext_proc tests proto bench
	$(PY) -m mypy ext_proc bench

clean:
	rm -rf $(VENV) ext_proc/_gen dist build .pytest_cache .mypy_cache .ruff_cache

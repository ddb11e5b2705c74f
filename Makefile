# The two commands: `make demo` and `make test`. Both build .venv from scratch when needed.
# `make check` is the inner loop: lint, format, types, import contracts and the unit tests (no real processes).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv demo hub test check static clean system-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# Exactly this torch, before the project: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	# lifelines, the survival tests' reference fits, declares pandas<3 (FLIP runs pandas 3.1, on which the fitters the
	# tests compare against work): installed without its pins; its formulaic comes with statsmodels (above).
	$(BIN)/pip install --quiet --no-deps lifelines==0.30.3 autograd==1.9.1 autograd-gamma==0.5.0
	$(BIN)/flip kernel install        # the "FLIP (Python 3)" kernel, in this environment
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/flip demo

# A local JupyterHub with the demo federation: log in as alice (project-heart) or bob; `flip down` stops it.
hub: $(STAMP)
	$(BIN)/flip hub

# Debian packages the tests use, installed when root (CI is): iproute2 (`ip netns`, the multi-host test),
# chromium (the browser test drives it with Playwright), docker-compose (validates deploy/'s compose files),
# nginx-light (the nginx fleet front, coordinator.nginx_front), postgresql (the OMOP sites' databases,
# flip_local.postgres: its initdb and pg_ctl, run as an unprivileged user).
SYSTEM_DEPS := iproute2:ip chromium:chromium docker-compose:docker-compose nginx-light:nginx postgresql:pg_ctlcluster
system-deps:
	@missing=""; for pair in $(SYSTEM_DEPS); do command -v $${pair#*:} >/dev/null || missing="$$missing $${pair%%:*}"; done; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi

# ruff (lint and format), mypy (strict on flip_core and flip_magics), the import contracts of pyproject.toml
static: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

check: static system-deps
	$(BIN)/python -m pytest -q -p no:cacheprovider tests --ignore=tests/integration --ignore=tests/redteam

test: $(STAMP) system-deps static
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15 tests

clean:
	rm -rf $(VENV) runs .flip build *.egg-info .mypy_cache .ruff_cache .import_linter_cache .hypothesis

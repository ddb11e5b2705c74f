# The two commands: `make demo` and `make test`. Both build .venv from scratch when needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv demo test clean system-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# Exactly this torch, before the project: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/flip kernel install        # the "FLIP (Python 3)" kernel, in this environment
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/flip demo

# Debian packages the tests use: iproute2 (`ip netns`, the multi-host test). Installed when root (CI is).
system-deps:
	@if [ "$$(id -u)" = 0 ] && ! command -v ip >/dev/null && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq iproute2; fi

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15 tests

clean:
	rm -rf $(VENV) runs .flip build *.egg-info

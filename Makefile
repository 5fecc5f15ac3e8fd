# meshd — developer entry points. `make demo` and `make test` work on a fresh machine:
# they bootstrap uv, build .venv from the hashed lock files and install what the tests need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
UV := $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test lint typecheck unit chaos bench lock system-deps clean

install: $(STAMP)

$(STAMP): requirements/dev.lock pyproject.toml client/pyproject.toml
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m uv --version >/dev/null 2>&1 || \
	  { echo "bootstrapping uv with pip"; $(PYTHON) -m pip install --quiet uv; }
	@test -x $(VPY) || $(UV) venv --quiet --python "$$(command -v python3.11 || command -v $(PYTHON))" $(VENV)
	$(UV) pip sync --quiet --require-hashes --python $(VPY) requirements/dev.lock
	$(UV) pip install --quiet --python $(VPY) --no-deps --no-build-isolation -e ./client -e .
	@touch $(STAMP)

# Debian packages the test suite and benchmarks use (namespaces, nftables, Serf as the reference,
# zsh to check meshctl's completion script, Debian's prometheus for /usr/bin/promtool).
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; \
	  command -v nft >/dev/null || missing="$$missing nftables"; \
	  command -v ip >/dev/null || missing="$$missing iproute2"; \
	  command -v serf >/dev/null || missing="$$missing serf"; \
	  command -v zsh >/dev/null || missing="$$missing zsh"; \
	  command -v promtool >/dev/null || missing="$$missing prometheus"; \
	  if [ -n "$$missing" ]; then \
	    echo "installing system packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  fi; \
	else echo "system-deps: not root or no apt-get; namespace/nftables tests will skip with a reason"; fi

demo: install
	$(VPY) examples/demo.py

lint: install
	$(VENV)/bin/ruff check meshd client chaos bench tests examples
	$(VENV)/bin/ruff format --check meshd client chaos bench tests examples

typecheck: install
	$(VENV)/bin/mypy

unit: install
	$(VPY) -m pytest -q tests $(PYTEST_ARGS)

# Two workers (the CI machine has two cores); chaos tests share one worker (tests/conftest.py).
test: install system-deps lint typecheck
	$(VPY) -m pytest -q -n 2 --dist loadgroup tests $(PYTEST_ARGS)

# Every shipped chaos scenario on real namespaces (root); `make test` runs the short CI subset.
# CHAOS_ARGS=--json for the JSON verdict; see docs/chaos.md.
CHAOS_ARGS ?=
chaos: install system-deps
	$(VPY) -m chaos run --all $(CHAOS_ARGS)

bench: install system-deps
	$(VPY) -m bench.membership --json
	$(VPY) -m bench.simulate --nodes 1000 --json

# Re-pin third-party dependencies (names, versions and hashes only; no download addresses).
lock:
	$(UV) pip compile --quiet --generate-hashes --no-header --no-emit-index-url --no-emit-find-links \
	  --python-version 3.11 requirements/runtime.in -o requirements/runtime.lock
	$(UV) pip compile --quiet --generate-hashes --no-header --no-emit-index-url --no-emit-find-links \
	  --python-version 3.11 requirements/dev.in -o requirements/dev.lock
	@! grep -l '://' requirements/*.lock

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

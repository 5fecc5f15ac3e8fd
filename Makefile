# meshd — developer entry points. `make demo` and `make test` work on a fresh machine:
# they bootstrap uv, build .venv from the hashed lock files and install what the tests need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
UV := $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test lint typecheck unit chaos bench lock system-deps clean \
	docker-engine docker-engine-stop docker-clean
# The Docker engine helper runs on the plain interpreter (standard library only): it can
# start before the virtualenv exists.
ENGINE := $(PYTHON) -m chaos.engine

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
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends -o DPkg::Lock::Timeout=300 $$missing >/dev/null; \
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

# The Docker engine under the chaos harness's Docker backend, made ready offline: packages,
# dockerd with the host's firewall left alone, the base image from Debian packages, the meshd
# image from the hashed lock files. Idempotent; images are cached. See docs/chaos.md#docker.
docker-engine:
	$(ENGINE) up

# Stop the dockerd that `make docker-engine` started (never one it found running).
docker-engine-stop:
	$(ENGINE) down

# Remove the images the harness built, its wheelhouse and compose v2 (the next build is cold).
docker-clean:
	$(ENGINE) clean

# Two workers (the CI machine has two cores); chaos tests share one worker (tests/conftest.py).
# The Docker engine and images are made ready (`docker-engine`) in the background while the
# virtualenv, lint, typecheck and the tests before the Docker ones run: the first Docker test
# waits for it (tests/chaos/test_suite.py runs them last). The run holds a lease on the engine,
# and an engine it started is stopped at the end. Where no engine can be had the Docker tests
# say why (and fail under CI).
test: system-deps
	@lease=$$$$; log=$$(mktemp); rc=0; \
	trap '$(ENGINE) release --lease '$$lease'; rm -f '$$log EXIT; \
	$(ENGINE) up --best-effort --for-tests --lease $$lease >$$log 2>&1 & engine=$$!; \
	$(MAKE) --no-print-directory install lint typecheck || rc=$$?; \
	if [ $$rc = 0 ]; then $(VPY) -m pytest -q -n 2 --dist loadgroup tests $(PYTEST_ARGS) || rc=$$?; fi; \
	wait $$engine; cat $$log; \
	exit $$rc

# Every shipped chaos scenario on real namespaces and on Docker containers (root); `make test`
# runs the short CI subset. CHAOS_BACKENDS=netns for namespaces only; CHAOS_ARGS=--json for
# the JSON verdict; see docs/chaos.md.
CHAOS_ARGS ?=
CHAOS_BACKENDS ?= netns docker
chaos: install system-deps
	@lease=$$$$; rc=0; trap '$(ENGINE) release --lease '$$lease EXIT; \
	for backend in $(CHAOS_BACKENDS); do \
	  if [ $$backend = docker ]; then $(ENGINE) up --lease $$lease || { rc=1; continue; }; fi; \
	  $(VPY) -m chaos run --all --backend $$backend $(CHAOS_ARGS) || rc=1; \
	done; exit $$rc

bench: install system-deps
	$(VPY) -m bench.membership --json
	$(VPY) -m bench.simulate --nodes 1000 --json

# Re-pin third-party dependencies (names, versions and hashes only; no download addresses).
lock:
	$(UV) pip compile --quiet --generate-hashes --no-header --no-emit-index-url --no-emit-find-links \
	  --python-version 3.11 requirements/runtime.in -o requirements/runtime.lock
	$(UV) pip compile --quiet --generate-hashes --no-header --no-emit-index-url --no-emit-find-links \
	  --python-version 3.11 requirements/runtime.in requirements/tracing.in -o requirements/tracing.lock
	$(UV) pip compile --quiet --generate-hashes --no-header --no-emit-index-url --no-emit-find-links \
	  --python-version 3.11 requirements/dev.in -o requirements/dev.lock
	@! grep -l '://' requirements/*.lock

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

# billfold — install, run, test, lint, bench.
#
# Needs: bash, python3 (3.11) and, for `install`, network access to PyPI (and to Debian's
# archive the first time, to install the Debian packages listed in DEB_PACKAGES).
# uv is installed with pip when it is missing. Everything else lives in .venv.
#
# Tests use PostgreSQL / Redis from BILLFOLD_DATABASE_URL / BILLFOLD_REDIS_URL when they
# are set in the environment and start embedded servers when they are not; this Makefile
# never sets them (.ci/run does, when the CI machine's own servers answer).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Debian packages the project needs (SoftHSM2: the PKCS#11 HSM used in development and CI;
# libgomp1: the OpenMP runtime LightGBM's wheel links against, for the fraud model).
DEB_PACKAGES ?= softhsm2 libgomp1
# Where uv goes when it is missing and pip cannot install it next to $(PYTHON).
UV_BOOTSTRAP ?= $(HOME)/.cache/billfold/uv-bootstrap
PYTEST_WORKERS ?= auto
# Extra arguments: `make test PYTEST_ARGS="-k tokens -x"`, `make run ARGS="--port 8001"`.
PYTEST_ARGS ?=
ARGS ?=

export UV_PYTHON_DOWNLOADS := never

# Prints the command that runs uv, or nothing when there is none yet.
define find_uv
{ command -v uv 2>/dev/null \
  || { $(PYTHON) -m uv --version >/dev/null 2>&1 && echo "$(PYTHON) -m uv"; } \
  || { [ -x "$(UV_BOOTSTRAP)/bin/uv" ] && echo "$(UV_BOOTSTRAP)/bin/uv"; } \
  || true; }
endef

.PHONY: help install deb-packages run test lint bench clean distclean

help:
	@echo "make install    uv (if missing) + .venv from uv.lock + Debian packages ($(DEB_PACKAGES))"
	@echo "make run        install, then 'billfold up' (embedded PostgreSQL + Valkey, demo data)"
	@echo "make test       install, then the whole suite with pytest -n $(PYTEST_WORKERS)"
	@echo "make lint       ruff check, ruff format --check, lint-imports"
	@echo "make bench      run every bench/*.py"
	@echo "make clean      remove caches and build output (distclean: also .venv and .billfold)"

install: deb-packages
	@uv="$$($(find_uv))"; \
	if [ -z "$$uv" ]; then \
	  echo "==> uv not found: installing it with pip"; \
	  if $(PYTHON) -m pip install --quiet uv && $(PYTHON) -m uv --version >/dev/null 2>&1; then \
	    uv="$(PYTHON) -m uv"; \
	  else \
	    echo "==> pip could not install uv next to $(PYTHON); bootstrapping it in $(UV_BOOTSTRAP)"; \
	    $(PYTHON) -m venv "$(UV_BOOTSTRAP)"; \
	    "$(UV_BOOTSTRAP)/bin/python" -m pip install --quiet uv; \
	    uv="$(UV_BOOTSTRAP)/bin/uv"; \
	  fi; \
	fi; \
	echo "==> $$uv sync --frozen"; \
	$$uv sync --frozen

# Installs what is missing only; as root directly, otherwise through passwordless sudo.
# Without either it explains what to run and carries on: only the tests that need the
# package fail later.
deb-packages:
	@missing=""; \
	if ! command -v dpkg >/dev/null 2>&1; then \
	  echo "==> not a Debian system: install $(DEB_PACKAGES) with your package manager"; exit 0; \
	fi; \
	for p in $(DEB_PACKAGES); do dpkg -s "$$p" >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	[ -z "$$missing" ] && exit 0; \
	if [ "$$(id -u)" -eq 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo"; \
	else \
	  echo "==> WARNING: Debian packages missing:$$missing"; \
	  echo "    not root and no passwordless sudo: run 'sudo apt-get install -y$$missing' yourself"; \
	  exit 0; \
	fi; \
	echo "==> apt-get install -y$$missing"; \
	if ! { $$sudo apt-get update -qq \
	       && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing; }; then \
	  echo "==> ERROR: apt-get could not install$$missing" >&2; \
	  if [ -n "$$sudo" ]; then echo "    (continuing: run it yourself)"; exit 0; fi; \
	  exit 1; \
	fi

run: install
	$(BIN)/billfold up $(ARGS)

# pytest exits 5 when it collected no test: that is a failure too, and says so.
test: install
	@rc=0; $(BIN)/pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: FAILED: pytest collected no tests (exit 5)" >&2; fi; \
	exit $$rc

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

bench: install
	@shopt -s nullglob; files=(bench/*.py); \
	if [ $${#files[@]} -eq 0 ]; then echo "no benchmarks in bench/"; exit 0; fi; \
	for f in "$${files[@]}"; do \
	  case "$$(basename "$$f")" in _*|conftest.py|common.py) continue;; esac; \
	  echo "==> $$f"; $(BIN)/python "$$f"; \
	done

clean:
	rm -rf .pytest_cache .ruff_cache .mypy_cache .import_linter_cache dist build
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
	find . -path ./$(VENV) -prune -o -type d -name '*.egg-info' -prune -exec rm -rf {} +

# Also the virtualenv and the local data directory (embedded database, keys, blobs).
distclean: clean
	rm -rf $(VENV) .billfold

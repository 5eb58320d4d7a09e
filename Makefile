# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test docs lint check bench compare chaos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/geste demo

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/pytest -q
	GESTE_WORKFLOW_CACHE_SIZE=0 $(BIN)/pytest -q  # again without the cache of suspended runs

docs: $(STAMP)  # the documentation site at http://127.0.0.1:8000, rebuilt as docs/ changes
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

chaos: $(STAMP)
	bash .ci/ensure-postgres
	$(BIN)/python -m tests.chaos --long --runs 10 --skew 2 --outage 10
	$(BIN)/python -m tests.chaos --long --backend postgres --failover --runs 5 --skew 2 --outage 10
	$(BIN)/python -m tests.chaos --long --backend pgbouncer --no-restart-postgres --runs 3 --skew 2 --outage 10

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py

compare: $(STAMP)
	$(BIN)/python benchmarks/compare.py

clean:
	rm -rf $(VENV) site geste.db geste.db-wal geste.db-shm .pytest_cache .mypy_cache .ruff_cache

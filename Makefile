# make demo: set up, build the quickstart zoo, answer a query.   make test: set up, run the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STORE ?= dlstore-store
# CPU build of torch from this machine's disk first, so that nothing pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: setup demo test test-slow lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/dlstore build-zoo zoo/quickstart.toml --store $(STORE)
	$(BIN)/dlstore sql --store $(STORE) \
	  "SELECT width, lr, round(avg(value), 3) AS test_acc, count(*) AS runs \
	   FROM final WHERE metric = 'test_acc' GROUP BY width, lr ORDER BY width, lr"

# ruff, then the layering contracts of pyproject.toml ([tool.importlinter])
lint: setup
	$(BIN)/ruff check dlstore tests bench
	$(BIN)/lint-imports --no-cache

# two workers: most tests wait on subprocesses and disks, so two cores run them in 3/4 the time
test: lint
	$(BIN)/python -m pytest -q -n 2

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(STORE) .pytest_cache .ruff_cache

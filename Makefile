# make demo: set up, build the quickstart zoo, answer a query.   make test: set up, run the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STORE ?= dlstore-store
# CPU build of torch from this machine's disk first, so that nothing pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: setup browser demo test test-slow lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Debian's chromium for the report's browser tests (Playwright drives it; it downloads no
# browser of its own): installed once, quietly, where apt-get can (root, or sudo without a
# password); the tests say why they skip where it cannot be installed
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
	  $$SUDO apt-get update -qq >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; } \
	  || echo "chromium could not be installed: the browser tests will skip" >&2

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
test: browser lint
	$(BIN)/python -m pytest -q -n 2

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(STORE) .pytest_cache .ruff_cache

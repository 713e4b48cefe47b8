# The two commands that matter:  make serve  /  make test
# Both create .venv on first use (CPU build of torch 2.13.0; see docs/gpu.md for CUDA).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 8000
WORKERS ?= 1

.PHONY: serve test lint docs install system-deps bench-load bench-accuracy clean

$(BIN)/ner: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned, so nothing pulls a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,train,ray]'
	touch $@

install: $(BIN)/ner

# Start the service: embedded SQLite file (./ner.db, migrated on the spot) and the bundled model.
serve: $(BIN)/ner
	$(BIN)/ner db upgrade
	$(BIN)/ner serve --host $(HOST) --port $(PORT) --workers $(WORKERS)

# Debian's prometheus package (Prometheus 2.42 + promtool) for the monitoring-stack tests,
# and chromium + chromium-driver for the annotation page's browser tests (tests/browser).
system-deps:
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else echo "promtool missing: sudo apt-get install prometheus" >&2; exit 1; fi; }
	@{ command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; } || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; \
	  else echo "chromium or chromedriver missing: sudo apt-get install chromium chromium-driver" >&2; exit 1; fi; }

# Lint (ruff, rule set in pyproject.toml) and types (mypy with the pydantic plugin).
lint: $(BIN)/ner
	$(BIN)/ruff check .
	$(BIN)/mypy

# The whole test suite, PostgreSQL tests included (server at 127.0.0.1:5432), after lint and types;
# then the documentation site, strictly (a broken link, a missing anchor or a page outside the nav fails).
test: $(BIN)/ner system-deps lint
	$(BIN)/python -m pytest -q
	$(MAKE) docs

# The documentation site (mkdocs.yml, pages under docs/) into site/ (git-ignored).
docs: $(BIN)/ner
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

bench-load: $(BIN)/ner
	$(BIN)/python benchmarks/load.py

bench-accuracy: $(BIN)/ner
	$(BIN)/python benchmarks/accuracy.py --data ../shared/data/conll2003 seeds --seeds 1 2 3
	$(BIN)/python benchmarks/accuracy.py --data ../shared/data/conll2003 ablations --epochs 8

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache site

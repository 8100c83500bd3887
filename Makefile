# Two entry points for a fresh machine: `make demo` and `make test`. Both create the venv and install.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL_DIR ?= models/grocery-lite1-ms512-sp208-int8
INDEX_DIR ?= index_data
DEMO := examples/grocery

.PHONY: demo serve test test-quick bench lint typecheck pytest system-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Serving install: no torch.
$(VENV)/.serve-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# Tests need the dev tools and the train extra (export test); torch==2.13.0 installs from local disk.
$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev,train,ray]'
	touch $@ $(VENV)/.serve-installed

# The demo index is rebuilt when the catalogue or the model changes.
$(INDEX_DIR)/CURRENT: $(DEMO)/catalogue.csv $(DEMO)/calibration.csv $(MODEL_DIR)/model.json | $(VENV)/.serve-installed
	$(BIN)/vps build-index --catalogue $(DEMO)/catalogue.csv --images-root $(DEMO)/images \
		--calibration-queries $(DEMO)/calibration.csv --out $(INDEX_DIR) --model $(MODEL_DIR)
	@touch $@  # an unchanged catalogue publishes no new version: CURRENT is up to date all the same

demo: $(VENV)/.serve-installed $(INDEX_DIR)/CURRENT
	VPS_CATALOGUE_IMAGES_DIR=$(DEMO)/images $(BIN)/vps serve --host $(HOST) --port $(PORT) --index-dir $(INDEX_DIR) --model-dir $(MODEL_DIR)

serve: demo

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.dev-installed
	$(BIN)/mypy

# Browser tests drive Debian's chromium (never a downloaded browser); the Kubernetes tests render with kubectl.
system-deps:
	@command -v chromium >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)
	@command -v kubectl >/dev/null || (echo "kubectl is needed to render deploy/kubernetes (kubectl kustomize)" >&2; exit 1)

pytest: $(VENV)/.dev-installed system-deps
	$(BIN)/pytest

# Every tier: unit, http, process, browser, deploy, data (tests/<tier>/, a marker each).
test: lint typecheck pytest

# The unit tier only: in-process tests, no servers, browser or dataset; the catalogue store on SQLite and PostgreSQL (about 80 s here).
test-quick: $(VENV)/.dev-installed
	$(BIN)/pytest -q -m unit tests/unit

# The headline figures again (search at 1M, service, start-up, embed), each beside the last committed one, changes
# beyond the run's own noise flagged: docs/bench/summary.md (docs/benchmarks.md). About 10 min here; a first run also
# builds the cached 1M indexes in .bench-cache/ (30+ min; ahead: scripts/bench_summary.py --build-only).
# The grocery dataset: VPS_DATASET_DIR, else ../shared/datasets/grocery-store.
bench: $(VENV)/.dev-installed $(INDEX_DIR)/CURRENT
	$(BIN)/python scripts/bench_summary.py --out docs/bench

clean:
	rm -rf $(VENV) $(INDEX_DIR) .pytest_cache .mypy_cache .ruff_cache

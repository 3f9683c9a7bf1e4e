# Quick start: `make demo` runs the whole pipeline on synthetic data; `make test` runs the tests.
# Both create .venv (torch 2.14.1 / torchvision 0.29.1 + the package, editable) when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Two pytest-xdist workers (one torch thread each, tests/conftest.py): the suite's target is
# 8 minutes on 2 cores (CI under 10). WORKERS=0 runs in one process (easier to debug).
WORKERS ?= 2
XDIST := $(if $(filter 0,$(WORKERS)),,-n $(WORKERS))

.PHONY: venv demo test test-fast lint bench clean docs

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test,onnx,smp,geo,footprints,tensorboard,cpu,weights,ray]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/buildseg demo --out demo_out

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks recipes

# The edit-run loop: lint + every test not marked slow (target: under 2 minutes on 2 cores).
test-fast: lint
	$(BIN)/python -m pytest tests -m "not slow" $(XDIST)

# The whole suite, as CI runs it (.ci/run).
test: lint
	$(BIN)/python -m pytest tests $(XDIST) --durations=15

# The defaults tables of docs/cli.md, generated from the settings objects.
docs: $(STAMP)
	$(BIN)/python -m buildseg.cli_docs --write

clean:
	rm -rf demo_out .pytest_cache

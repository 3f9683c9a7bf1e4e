# Quick start: `make demo` runs the whole pipeline on synthetic data; `make test` runs the tests.
# Both create .venv (torch 2.14.1 / torchvision 0.29.1 + the package, editable) when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test,onnx,smp,geo,footprints,tensorboard,cpu]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/buildseg demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest tests

clean:
	rm -rf demo_out .pytest_cache

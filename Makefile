# Two commands from a fresh clone:  `make quickstart`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup quickstart test lint typecheck unit bench clean

# torch is installed first and pinned (constraints.txt): 2.13.0 is a CPU wheel; an unpinned
# torch would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,onnx,plot]'
	touch $@

setup: $(VENV)/.installed

quickstart: setup
	$(BIN)/mtl train recipes/quickstart.yaml --out runs/quickstart --force
	$(BIN)/mtl eval runs/quickstart --split test

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

unit: setup
	$(BIN)/python -m pytest

test: lint typecheck unit

bench: setup
	$(BIN)/python benchmarks/train_speed.py

clean:
	rm -rf runs .mtl-cache .pytest_cache .mypy_cache .ruff_cache

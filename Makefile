# Two commands from a fresh clone:  `make quickstart`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup quickstart test lint typecheck unit numerics bench clean

# torch is installed first and pinned (constraints.txt): 2.13.0 is a CPU wheel; an unpinned
# torch would pull a multi-GB CUDA build. The package alone is what training needs (quickstart);
# the tests add the development tools and every extra they exercise.
$(VENV)/.base: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed: $(VENV)/.base
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,onnx,plot,tensorboard,mlflow]'
	touch $@

setup: $(VENV)/.installed

quickstart: $(VENV)/.base
	$(BIN)/mtl train recipes/quickstart.yaml --out runs/quickstart --force
	$(BIN)/mtl eval runs/quickstart --split test

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

# The tests run on every core, at most TEST_WORKERS processes (pytest-xdist): on CI's two cores the
# suite takes about 12 minutes instead of 20. Every test works in its own tmp_path, so the order and
# the worker a test lands on change nothing; TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 4
PYTEST = $(BIN)/python -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n auto --maxprocesses $(TEST_WORKERS))

unit: setup
	$(PYTEST)

# The tests marked `numerics` compare float32 results of different code paths. MKL, oneDNN and
# ATen pick their kernels by the CPU's instruction set, so rerun them under two other choices:
# a bound that holds only for this CPU's kernels fails here instead of on someone else's machine.
numerics: setup
	MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 $(PYTEST) -m numerics
	MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41 ATEN_CPU_CAPABILITY=default $(PYTEST) -m numerics

test: lint typecheck unit numerics

bench: setup
	$(BIN)/python benchmarks/train_speed.py

clean:
	rm -rf runs .mtl-cache .pytest_cache .mypy_cache .ruff_cache

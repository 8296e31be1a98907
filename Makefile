# Everything installs into .venv from this repository's own files.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch lies on this machine's disk; installing it first keeps
# every later dependency from pulling a multi-GB CUDA build.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)" "setuptools>=68" wheel
	# DeepSpeed builds from source against the torch already installed, so
	# no build isolation (which would fetch a second, CUDA, torch).
	$(BIN)/python -m pip install -q --no-build-isolation "$(TORCH)" -e ".[dev]"
	touch $(STAMP)

demo: install
	$(BIN)/clova demo

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	for b in dedup tokenizer tokenize train_step export serve; do $(BIN)/python benchmarks/bench_$$b.py || exit 1; done

lint: install
	$(BIN)/python -m compileall -q src tests benchmarks

clean:
	rm -rf $(VENV) demo-run .pytest_cache

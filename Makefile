# Everything installs into .venv from this repository's own files.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch lies on this machine's disk; installing it first keeps
# every later dependency from pulling a multi-GB CUDA build.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test bench gpu-bundle gpu-bundle-full gpu-check lint clean

install: $(STAMP)

# Comments sit here, outside the recipe, because make echoes every recipe line, comments included.
# DeepSpeed builds from source against the torch already installed, so no build isolation (which
# would fetch a second, CUDA, torch). With a CUDA toolkit and a CUDA build of torch, FusedAdam is
# compiled at install, once, instead of JIT on every fresh node (where a stale lock in a shared
# torch_extensions dir hangs the job); nvcc beside a CPU torch (as on CPU-only CI machines) builds nothing.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)" "setuptools>=68" wheel
	$(BIN)/python -m pip install -q --no-build-isolation "$(TORCH)" -e ".[dev]"
	if command -v nvcc >/dev/null 2>&1 && $(BIN)/python -c "import sys, torch; sys.exit(torch.version.cuda is None)" \
	   && ! $(BIN)/python -c "from deepspeed.git_version_info import installed_ops as o; assert o['fused_adam']" >/dev/null 2>&1; then \
		DS_BUILD_FUSED_ADAM=1 $(BIN)/python -m pip install -q --no-build-isolation --no-cache-dir --force-reinstall --no-deps \
			"deepspeed==$$($(BIN)/python -c 'from importlib.metadata import version; print(version("deepspeed"))')"; \
	fi
	touch $(STAMP)

demo: install
	$(BIN)/clova demo

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	for b in cli dedup tokenizer tokenize train_step export serve; do $(BIN)/python benchmarks/bench_$$b.py || exit 1; done

# On a machine with the package registry: .gpu/, the wheels and pre-tokenized data a GPU node without
# registry access lacks for gpu-check (under 60 MiB with the tree); gpu-bundle-full: .gpu-full/, every
# dependency (MeCab-ko too) for installing clova-train on such a node. The node is gpu/node-packages.txt.
gpu-bundle: install
	$(BIN)/python gpu/bundle.py

gpu-bundle-full: install
	$(BIN)/python gpu/bundle.py --full

# On the CUDA node, offline, with its own python3 (no venv): installs .gpu/ into a temporary dir, then bf16
# ZeRO-1/ZeRO-3 with FusedAdam, export parity and MFU beside transformers (under 9 minutes); figures in
# $OUT/gpu-check.json (default gpu-check-out/).
gpu-check:
	$(PY) gpu/check.py $(if $(OUT),--out "$(OUT)")

lint: install
	$(BIN)/python -m compileall -q src tests benchmarks gpu

clean:
	rm -rf $(VENV) demo-run .pytest_cache .gpu .gpu-full gpu-check-out

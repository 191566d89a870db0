# One command per habit. Every target that runs Python first runs `setup`, which is a sub-second no-op when the
# environment is up to date (scripts/setup_env.sh).
#
#   make setup        create/refresh the venv (.venv, or $HOGWILD_VENV) and build the extension
#   make test         the test suite (extra pytest arguments: make test PYTEST_ARGS="-k rope -x")
#   make demo         examples/offline_generate.py: a group of two workers on SmolLM2-135M-Instruct (--verbose: logs)
#   make lint         ruff + mypy
#   make bench        every benchmarks/bench_*.py, then benchmarks/throughput.py (the full set takes long: one
#                     script with `make bench BENCHES=benchmarks/bench_attention.py`); results under results/
#                     (bench_reference_engine, bench_vllm_groups) and benchmarks/results/ (the others)
#   make cuda-check   compile the CUDA code with nvcc (no GPU needed)
#   make isa-check    the CPU op rebuilt for AVX2 and for generic x86-64, its tests on each (then rebuilt native)
#   make gpu-check    on a GPU machine: build in place, op tests on CUDA, Triton timings (system python3, no venv)
#   make clean        build outputs and caches (keeps the venv; `make distclean` removes it too)

VENV ?= $(or $(HOGWILD_VENV),.venv)
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
BENCHES ?= $(sort $(wildcard benchmarks/bench_*.py)) $(wildcard benchmarks/throughput.py)
export HOGWILD_VENV := $(abspath $(VENV))

.PHONY: setup test demo lint bench cuda-check isa-check gpu-check clean distclean

setup:
	bash scripts/setup_env.sh

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: setup
	$(PY) examples/offline_generate.py

lint: setup
	$(VENV)/bin/ruff check hogwild_vllm tests scripts benchmarks setup.py
	$(VENV)/bin/mypy

bench: setup
	@set -e; benches="$(strip $(BENCHES))"; \
	if [ -z "$$benches" ]; then echo "no benchmarks/bench_*.py or benchmarks/throughput.py" >&2; exit 1; fi; \
	for b in $$benches; do echo "== $$b"; $(PY) $$b; done

cuda-check:
	bash scripts/nvcc_check.sh

isa-check: setup
	bash scripts/isa_check.sh

# Not on `setup`: the GPU machine has torch, triton, nvcc and pytest but no venv and no vLLM. Arguments:
# make gpu-check GPU_CHECK_ARGS="--device cpu --quick" (the CPU dry run).
GPU_CHECK_ARGS ?=
gpu-check:
	python3 scripts/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf build dist *.egg-info hogwild_vllm/_C*.so .pytest_cache .mypy_cache .ruff_cache
	find hogwild_vllm tests scripts examples benchmarks -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

# One command per habit. Every target that runs Python first runs `setup`, which is a sub-second no-op when the
# environment is up to date (scripts/setup_env.sh).
#
#   make setup        create/refresh the venv (.venv, or $HOGWILD_VENV) and build the extension
#   make test         the test suite (extra pytest arguments: make test PYTEST_ARGS="-k rope -x")
#   make demo         examples/offline_generate.py on a tiny local model
#   make lint         ruff + mypy
#   make bench        every benchmarks/bench_*.py; results under results/
#   make cuda-check   compile the CUDA code with nvcc (no GPU needed)
#   make clean        build outputs and caches (keeps the venv; `make distclean` removes it too)

VENV ?= $(or $(HOGWILD_VENV),.venv)
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
export HOGWILD_VENV := $(abspath $(VENV))

.PHONY: setup test demo lint bench cuda-check clean distclean

setup:
	bash scripts/setup_env.sh

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: setup
	$(PY) examples/offline_generate.py

lint: setup
	$(VENV)/bin/ruff check hogwild_vllm tests scripts setup.py
	$(VENV)/bin/mypy

bench: setup
	@set -e; benches=$$(ls benchmarks/bench_*.py 2>/dev/null || true); \
	if [ -z "$$benches" ]; then echo "no benchmarks/bench_*.py yet" >&2; exit 1; fi; \
	for b in $$benches; do echo "== $$b"; $(PY) $$b; done

cuda-check:
	bash scripts/nvcc_check.sh

clean:
	rm -rf build dist *.egg-info hogwild_vllm/_C*.so .pytest_cache .mypy_cache .ruff_cache
	find hogwild_vllm tests scripts examples benchmarks -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

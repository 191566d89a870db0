#!/usr/bin/env bash
# The CPU op's narrower builds against the same op tests as the default one (`make isa-check`, run by CI): the
# extension is rebuilt in place with HOGWILD_CPU_ISA=avx2 (where this CPU has AVX2) and =generic, the compiled-op
# tests run on each, and the default (native) build is put back at the end, also on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${HOGWILD_VENV:-.venv}/bin/python"
TESTS=(tests/test_attention_ops.py tests/test_csrc_ops.py)

restore() {
  echo "[isa-check] rebuilding the default (native) extension"
  "$PY" setup.py -q build_ext --inplace --force >/dev/null
}
trap restore EXIT

isas=(generic)
if grep -qw avx2 /proc/cpuinfo 2>/dev/null; then isas=(avx2 generic); fi
for isa in "${isas[@]}"; do
  echo "[isa-check] HOGWILD_CPU_ISA=$isa: building"
  HOGWILD_CPU_ISA="$isa" "$PY" setup.py -q build_ext --inplace --force >/dev/null
  echo "[isa-check] HOGWILD_CPU_ISA=$isa: ${TESTS[*]}"
  "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
done

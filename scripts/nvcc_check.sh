#!/usr/bin/env bash
# Proves the CUDA code compiles on a machine with nvcc but no GPU (no CUDA torch either).
#
#   1. csrc/device/*.cuh must not include torch headers, and each must compile on its own (self-contained).
#   2. csrc/device/nvcc_check.cu instantiates every kernel; it is compiled for each arch in HOGWILD_NVCC_ARCHS with
#      plain nvcc and torch's nvcc defines, warnings as errors.
#   3. csrc/cuda/*.cu (the launchers, which do include torch) are compiled too when a Python with torch is found
#      (the project venv): the CPU torch wheel ships the CUDA headers. Skipped, with a note, when there is none.
#
#   NVCC                 nvcc to use            (default: PATH, then $CUDA_HOME/bin, then /usr/local/cuda/bin)
#   HOGWILD_NVCC_ARCHS   SM versions to build   (default: "80 90")
#   HOGWILD_VENV         venv whose torch step 3 uses (default: .venv in the repo)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
csrc=$repo/csrc
archs=${HOGWILD_NVCC_ARCHS:-80 90}
venv=${HOGWILD_VENV:-$repo/.venv}

nvcc=${NVCC:-}
if [ -z "$nvcc" ]; then
  for candidate in "$(command -v nvcc || true)" "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" /usr/local/cuda/bin/nvcc; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then nvcc=$candidate; break; fi
  done
fi
if [ -z "$nvcc" ] || ! "$nvcc" --version >/dev/null 2>&1; then
  echo "[cuda-check] FAILED: nvcc not found (looked at \$NVCC, PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)." >&2
  echo "[cuda-check] Install the CUDA toolkit or set NVCC=/path/to/nvcc." >&2
  exit 1
fi
echo "[cuda-check] $nvcc: $("$nvcc" --version | grep -o 'release [0-9.]*'), archs: $archs"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# torch's COMMON_NVCC_FLAGS (torch.utils.cpp_extension): the extension build compiles with these, so check with them.
torch_nvcc_defines=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr)
strict=(--Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror)
gencode=()
for sm in $archs; do gencode+=(-gencode "arch=compute_$sm,code=sm_$sm"); done

# 1. No torch in device code; each header self-contained.
if grep -nE '#include *[<"](torch|ATen|c10|caffe2)/' "$csrc"/device/*.cuh "$csrc"/device/*.cu; then
  echo "[cuda-check] FAILED: csrc/device must not include torch headers (see the lines above)." >&2
  exit 1
fi
for header in "$csrc"/device/*.cuh; do
  name=$(basename "$header")
  printf '#include "device/%s"\n' "$name" >"$tmp/${name%.cuh}_alone.cu"
  "$nvcc" -std=c++17 "${torch_nvcc_defines[@]}" "${strict[@]}" -I "$csrc" -gencode arch=compute_80,code=sm_80 \
    -c "$tmp/${name%.cuh}_alone.cu" -o "$tmp/${name%.cuh}_alone.o"
  echo "[cuda-check] ok  device/$name compiles on its own"
done

# 2. Every kernel instantiated, for every arch.
"$nvcc" -std=c++17 "${torch_nvcc_defines[@]}" "${strict[@]}" -I "$csrc" "${gencode[@]}" \
  -c "$csrc/device/nvcc_check.cu" -o "$tmp/nvcc_check.o"
echo "[cuda-check] ok  device kernels (csrc/device/nvcc_check.cu) for sm_${archs// /, sm_}"

# 3. The launchers, against torch's headers, when a torch is at hand.
py=$venv/bin/python
if [ -x "$py" ] && torch_includes=$("$py" -c \
  'from torch.utils.cpp_extension import include_paths; print("\n".join(include_paths()))' 2>/dev/null); then
  includes=()
  while IFS= read -r dir; do includes+=(-I "$dir"); done <<<"$torch_includes"
  for launcher in "$csrc"/cuda/*.cu; do
    name=$(basename "$launcher")
    "$nvcc" -std=c++20 "${torch_nvcc_defines[@]}" -DHOGWILD_WITH_CUDA -DTORCH_API_INCLUDE_EXTENSION_H \
      -DTORCH_EXTENSION_NAME=_C -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -I "$csrc" "${includes[@]}" "${gencode[@]}" -Xcompiler -fPIC \
      -c "$launcher" -o "$tmp/${name%.cu}.o"
    echo "[cuda-check] ok  launcher cuda/$name (with torch headers)"
  done
else
  echo "[cuda-check] skip launchers csrc/cuda/*.cu: no torch at $py (run make setup first to include them)"
fi
echo "[cuda-check] passed"

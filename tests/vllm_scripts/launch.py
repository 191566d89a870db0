"""Run the engine scripts in this folder as subprocesses (each starts its own vLLM engine; the attention backend
selection is cached per process, so engines with the plugin on and off never share one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).parent
ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # collective_rpc with a lambda, to read the runner's state
}


class Script:
    """A started script; ``result()`` waits for it and returns its ``RESULT=`` JSON line, parsed."""

    def __init__(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.proc = subprocess.Popen([sys.executable, str(SCRIPTS / name), *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     env=dict(os.environ, **ENGINE_ENV, **(env or {})))

    def result(self, timeout: int = 900) -> dict:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError(f"{self.name} timed out after {timeout} s: {err[-4000:]}") from None
        lines = [line for line in out.splitlines() if line.startswith("RESULT=")]
        assert self.proc.returncode == 0 and lines, f"{self.name} failed: {err[-4000:]}"
        return json.loads(lines[-1][len("RESULT="):])


def run_script(name: str, *args: str, timeout: int = 900, env: dict[str, str] | None = None) -> dict:
    return Script(name, *args, env=env).result(timeout)

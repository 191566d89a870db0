"""Run the engine scripts in this folder as subprocesses (each starts its own vLLM engine; the attention backend
selection is cached per process, so engines with the plugin on and off never share one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPTS = Path(__file__).parent
ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # collective_rpc with a lambda, to read the runner's state
}


RESULT_ENV = "HOGWILD_RESULT_FILE"


def emit_result(result: dict) -> None:
    """Called by a script: its result as JSON, into ``$HOGWILD_RESULT_FILE`` when set (the engine core process
    shares stdout and may interleave log lines with a long line), else as a ``RESULT=`` line on stdout."""
    text = json.dumps(result)
    path = os.environ.get(RESULT_ENV)
    if path:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        print("RESULT=" + text)


class Script:
    """A started script; ``result()`` waits for it and returns what it emitted, parsed."""

    def __init__(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.name = name
        fd, self.result_path = tempfile.mkstemp(prefix="hogwild-result-", suffix=".json")
        os.close(fd)
        self.proc = subprocess.Popen([sys.executable, str(SCRIPTS / name), *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     env=dict(os.environ, **ENGINE_ENV, **(env or {}),
                                              **{RESULT_ENV: self.result_path}))

    def result(self, timeout: int = 900) -> dict:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError(f"{self.name} timed out after {timeout} s: {err[-4000:]}") from None
        try:
            text = Path(self.result_path).read_text(encoding="utf-8")
        finally:
            os.unlink(self.result_path)
        assert self.proc.returncode == 0 and text, f"{self.name} failed: {err[-4000:]}"
        return json.loads(text)


def run_script(name: str, *args: str, timeout: int = 900, env: dict[str, str] | None = None) -> dict:
    return Script(name, *args, env=env).result(timeout)


class GroupBatches:
    """``group_generate.py`` over ``batches`` (one ``LLM.generate`` each; items as that script documents), started
    at once; ``wait()`` collects the results, ``outputs(i)`` is batch i's per item (asserting it did not raise)."""

    def __init__(self, folder: Path, model: str, batches: list[list[dict]], engine: dict | None = None) -> None:
        spec = folder / "spec.json"
        spec.write_text(json.dumps({"model": model, "engine": engine or {}, "batches": batches}))
        self.script = Script("group_generate.py", str(spec))
        self.batches: list[dict] = []

    def wait(self, timeout: int = 1800) -> None:
        self.batches = self.script.result(timeout=timeout)["batches"]

    def outputs(self, batch: int) -> list[dict]:
        got = self.batches[batch]
        assert "outputs" in got, got
        return got["outputs"]

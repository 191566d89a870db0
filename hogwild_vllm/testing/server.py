"""``vllm serve`` on 127.0.0.1 for the tests and the load benchmark: started on a free port, waited for until
``/health`` answers, stopped (terminate, then kill) when the block ends; its output goes to a log file."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class ServerError(RuntimeError):
    """The server exited or did not come up; the message ends with the tail of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def vllm_server(model: str, log: Path, *args: str, plugin: bool = True, env: dict[str, str] | None = None,
                timeout_s: float = 600) -> Iterator[str]:
    """Serve ``model`` (extra ``vllm serve`` ``args``; ``plugin``: with ``--additional-config '{"hogwild": {}}'``)
    until the block ends; yields the OpenAI API's base URL, ``http://127.0.0.1:<port>/v1``."""
    port = free_port()
    vllm = Path(sys.executable).parent / "vllm"
    cmd = [str(vllm), "serve", model, "--host", "127.0.0.1", "--port", str(port), *args]
    if plugin:
        cmd += ["--additional-config", json.dumps({"hogwild": {}})]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise ServerError(f"vllm serve exited {proc.returncode}: {log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"vllm serve did not come up in {timeout_s:.0f} s: {log.read_text()[-4000:]}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=60)

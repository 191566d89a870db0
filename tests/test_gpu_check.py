"""scripts/gpu_check.py's dry run on CPU (``--device cpu --quick``), with vLLM unimportable: the script logic the GPU
machine runs (steps, child processes, timings table, CSV, summary) on tiny sizes under the Triton interpreter."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Run in the child before the script: any import of vllm (or a submodule) fails as if vLLM were not installed.
BLOCK_VLLM = """
import importlib.abc, sys
class BlockVllm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "vllm" or name.startswith("vllm."):
            raise ModuleNotFoundError(name + " is blocked")
        return None
sys.meta_path.insert(0, BlockVllm())
sys.modules["vllm"] = None
"""


@pytest.mark.skipif(not (ROOT / "scripts" / "gpu_check.py").exists(), reason="no scripts/gpu_check.py")
def test_gpu_check_dry_run_on_cpu(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    script = str(ROOT / "scripts" / "gpu_check.py")
    code = BLOCK_VLLM + (
        "import runpy\n"
        f"sys.argv = [{script!r}, '--device', 'cpu', '--quick', '--out', {str(tmp_path)!r}]\n"
        f"runpy.run_path({script!r}, run_name='__main__')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "imports without vLLM: ok" in (tmp_path / "gpu_check_imports.log").read_text()
    assert output.strip().splitlines()[-1] == "PASS", output[-4000:]
    for section in ("1. environment", "2. build", "3. op tests on cpu", "4. timings", "summary"):
        assert section in output
    assert "workers  keys" in output and "device copy" in output
    with (tmp_path / "gpu_check_bench_cpu.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    impls = {row["impl"] for row in rows}
    assert {"triton", "triton-1split", "sdpa-math"} <= impls
    assert all(row["ok"] == "True" for row in rows if row["impl"].startswith("triton"))

"""The examples as users run them (subprocesses, real vLLM engine): the offline example's ``--json`` fields, vLLM
equal to the reference engine through the example, and the batch example over a problems file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from vllm_scripts.launch import ENGINE_ENV

from hogwild_vllm.testing.tiny_models import build_tiny_model

pytestmark = [pytest.mark.engine, pytest.mark.slow]
EXAMPLES = Path(__file__).parent.parent / "examples"


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    build_tiny_model("qwen2")  # the examples' default model, built once in this process
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=900, env=dict(os.environ, **ENGINE_ENV))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_offline_example_json_vllm_equals_reference():
    common = ["--workers", "3", "--layout", "combined", "--max-tokens", "48", "--json"]
    got = json.loads(run("offline_generate.py", *common).stdout)
    ref = json.loads(run("offline_generate.py", *common, "--engine", "reference").stdout)
    for key in ("model", "prompt_token_ids", "banned_token_ids", "workers", "transcript", "answer"):
        assert key in got, key
    assert got["engine"] == "vllm" and ref["engine"] == "reference"
    assert [w["name"] for w in got["workers"]] == ["Alice", "Bob", "Carol"]
    for w in got["workers"]:
        assert len(w["forced"]) == len(w["token_ids"]) and w["forced"][0] is True
    for key in ("prompt_token_ids", "banned_token_ids", "workers", "transcript", "answer", "finish_reason"):
        assert got[key] == ref[key], key
    # The default answer marker: the tiny model writes a \boxed{...} early, which stops the whole group.
    assert got["finish_reason"] == "answer" and got["answer"] is not None and got["answer_worker"] is not None


def test_offline_example_rejects_bad_options():
    proc = subprocess.run([sys.executable, str(EXAMPLES / "offline_generate.py"), "--workers", "0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "'workers' must be an integer" in proc.stderr


def test_batch_example_runs_a_problems_file(tmp_path):
    problems = tmp_path / "problems.txt"
    problems.write_text("What is 2 + 2?\n\nName three colours.\nCount to five.\n")
    out = tmp_path / "out.jsonl"
    proc = run("batch_generate.py", "--problems", str(problems), "--workers", "2", "--max-tokens", "32",
               "--jsonl", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["problem"] for r in rows] == ["What is 2 + 2?", "Name three colours.", "Count to five."]
    assert all(len(r["workers"]) == 2 and r["finish_reason"] in ("answer", "length") for r in rows)
    assert "3 groups" in proc.stdout

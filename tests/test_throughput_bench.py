"""benchmarks/throughput.py: the order in which its engines take turns, and the script itself on the tiny model
(short lengths: it checks the plumbing and the report, not the figures; a 1k prompt keeps the prefill estimate,
t(L1) minus L1's decode passes, clear of this machine's timing noise)."""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import throughput  # noqa: E402


def test_engines_take_turns_request_by_request():
    args = argparse.Namespace(lengths=[24, 152], repeats=2, case_warmup=True, seed=0)
    jobs = throughput.Jobs(args)
    plans = [{"runs": [r for p in (3400, 1024) for r in jobs.runs("m", p, 2, "plain-off", "x")]},
             {"runs": [r for p in (3400, 1024) for s in ("plain-on", "group") for r in jobs.runs("m", p, 2, s, "x")]}]
    order = [(j, rid.split("|", 1)[1]) for j, rid in throughput.turns(plans)]
    assert len(order) == sum(len(p["runs"]) for p in plans) == 2 * 3 * (1 + 2 * 2)
    first = order[:15]  # prompt 1024 first: warm-ups, then each (repeat, length) on every system in turn
    assert [rid for _, rid in first[:3]] == ["1024|2|plain-off|4|w", "1024|2|plain-on|4|w", "1024|2|group|4|w"]
    assert [rid for _, rid in first[3:6]] == ["1024|2|plain-off|24|0", "1024|2|plain-on|24|0", "1024|2|group|24|0"]
    assert [j for j, _ in first[3:6]] == [0, 1, 1]
    assert all(rid.startswith("1024|") for _, rid in first) and all(rid.startswith("3400|") for _, rid in order[15:])


@pytest.mark.engine
@pytest.mark.slow
def test_throughput_script_on_the_tiny_model(tmp_path):
    cmd = [sys.executable, str(BENCH / "throughput.py"), "--models", "qwen2", "--prompts", "1024", "--workers", "2",
           "--lengths", "8", "40", "--skip-reference", "--kv-cache-gib", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ), cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = (tmp_path / "throughput.csv").read_text().splitlines()
    assert lines[0].startswith("# command: python ")
    rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    assert [r["system"] for r in rows] == ["plain-off", "plain-on", "group"]
    assert all(float(r["decode_tok_s"]) > 0 and float(r["prefill_s"]) > 0 for r in rows)
    assert float(rows[0]["decode_x"]) == 1.0 and all(float(r["decode_x"]) > 0 for r in rows)
    assert int(float(rows[2]["tokens_L2"])) > 40  # a worker reached the budget, its peer wrote too
    for name in ("throughput.md", "throughput.png", "throughput_step.png", "throughput_runs.jsonl"):
        assert (tmp_path / name).is_file(), name

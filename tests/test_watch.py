"""``hogwild-watch`` (hogwild_vllm/watch.py) against a real ``vllm serve`` on 127.0.0.1, on a real terminal.

The live view runs inside tmux at a fixed size (160 x 40) and is read with ``tmux capture-pane``: frames taken while
the group runs must show both workers' columns with their token counts growing; the final screen must show the
columns, the shared history and the answer. ``--no-live --save`` prints the final screen once and writes it as
text, HTML and SVG; a refused group and an unreachable server exit 1 with the message; ``--offline`` runs the same
group on an in-process engine with the engine's logs hidden.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vllm_scripts.launch import ENGINE_ENV

from hogwild_vllm.testing.server import free_port, vllm_server
from hogwild_vllm.testing.tiny_models import build_tiny_model

pytestmark = [pytest.mark.engine, pytest.mark.server, pytest.mark.slow]
TEMPLATES = {"templates": {"step_separator": "\n", "answer_marker": "ANSWER{"}}
WATCH = Path(sys.executable).parent / "hogwild-watch"
SIZE = (160, 40)  # the terminal's columns and rows
COUNTS = re.compile(r"Alice (\d+) tok · Bob (\d+) tok · [\d.]+ s · (\w+)")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """``vllm serve`` with the plugin on (the tiny model, 4k context: room for 1500 tokens per worker)."""
    model = str(build_tiny_model("qwen2"))
    log = tmp_path_factory.mktemp("server") / "server.log"
    with vllm_server(model, log, "--dtype", "float32", "--max-model-len", "4096", "--block-size", "32",
                     "--enforce-eager", "--seed", "0", env=ENGINE_ENV) as base:
        yield base, model


def watch_args(server: tuple[str, str], max_tokens: int, *more: str) -> list[str]:
    return [str(WATCH), "What is 2 + 2?", "--base-url", server[0], "--model", server[1], "--workers", "2",
            "--max-tokens", str(max_tokens), "--options", json.dumps(TEMPLATES), *more]


class Terminal:
    """One command in a detached tmux session of a fixed size, on a tmux server of its own (its own socket)."""

    def __init__(self, args: list[str], workdir: Path) -> None:
        self.socket = f"hogwild-watch-test-{os.getpid()}-{time.monotonic_ns()}"
        self.status = workdir / "exit-status"
        shell = f"{subprocess.list2cmdline(args)}; echo $? > {self.status}; sleep 600"
        self.tmux("new-session", "-d", "-x", str(SIZE[0]), "-y", str(SIZE[1]), shell)

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout

    def capture(self) -> str:
        return self.tmux("capture-pane", "-p")

    def exit_status(self) -> int | None:
        text = self.status.read_text() if self.status.exists() else ""
        return int(text) if text.strip() else None

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


def run_in_terminal(args: list[str], workdir: Path, timeout: float = 300) -> tuple[list[str], str, int]:
    """Frames captured every 0.1 s while ``args`` runs, the final screen and the exit status."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install -y tmux)")
    term = Terminal(args, workdir)
    frames: list[str] = []
    try:
        deadline = time.monotonic() + timeout
        while (status := term.exit_status()) is None:
            assert time.monotonic() < deadline, f"hogwild-watch did not end in {timeout} s:\n{term.capture()}"
            frames.append(term.capture())
            time.sleep(0.1)
        return frames, term.capture(), status
    finally:
        term.close()


def test_live_view_updates_while_the_group_runs(server, tmp_path):
    """Frames taken mid-run show both columns with step headers and token counts that grow; then the result."""
    frames, final, status = run_in_terminal(watch_args(server, 1500), tmp_path)
    assert status == 0, final
    running = []
    for frame in frames:
        m = COUNTS.search(frame)
        if m and m[3] == "running" and int(m[1]) > 0:
            running.append((int(m[1]), int(m[2]), frame))
    # About 5 s of decoding here at 8 refreshes a second: many frames, each with more tokens than the last.
    partial = sorted({(a, b) for a, b, _ in running if max(a, b) < 1500})
    assert len(partial) >= 2, f"fewer than two distinct live frames before the end: {partial}"
    _, _, frame = max(r for r in running if max(r[:2]) < 1500)
    assert "─ Alice ─" in frame and "─ Bob ─" in frame, frame
    assert "**Alice [" in frame and "**Bob [" in frame, frame
    assert "shared history" not in frame  # only known at the end
    m = COUNTS.search(final)
    assert m and m.groups() == ("1500", "1500", "done"), final
    assert "shared history (transcript)" in final and "answer: (none) · finish: length" in final


def test_final_screen_shows_columns_history_and_answer(server, tmp_path):
    _, final, status = run_in_terminal(watch_args(server, 32), tmp_path)
    assert status == 0, final
    lines = final.splitlines()
    assert len(lines) <= SIZE[1] and lines[0] == "problem: What is 2 + 2?", final  # fits; nothing scrolled away
    assert "─ Alice ─" in final and "─ Bob ─" in final, final
    columns = [line for line in lines if "Hi, I'm Alice." in line and "Hi, I'm Bob." in line]
    assert columns, f"no line shows the two intros side by side:\n{final}"
    assert "shared history (transcript)" in final and "**Alice [1]:** Hi, I'm Alice." in final.split("shared")[1]
    assert "answer: (none) · finish: length · sampled per worker: [" in final, final


def test_no_live_and_save(server, tmp_path):
    """--no-live prints the final screen once (a pipe); --save writes it as text, HTML and SVG."""
    run = subprocess.run([*watch_args(server, 32), "--no-live", "--save", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("problem: What is 2 + 2?") == 1 and "shared history (transcript)" in run.stdout
    text = (tmp_path / "run.txt").read_text()
    assert text == run.stdout
    page = html.unescape((tmp_path / "run.html").read_text())
    svg = html.unescape((tmp_path / "run.svg").read_text()).replace("\xa0", " ")
    for saved in (text, page, svg):
        assert "Hi, I'm Alice." in saved and "Hi, I'm Bob." in saved and "shared history (transcript)" in saved


def test_refused_group_exits_1_with_the_message(server):
    run = subprocess.run([*watch_args(server, 32), "--options", json.dumps({"workers": 3})],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert "the server refused the group (HTTP 400)" in run.stderr
    assert "n=2 asks for one choice per worker, but the hogwild option 'workers' is 3" in run.stderr


def test_unreachable_server_exits_1():
    model = str(build_tiny_model("qwen2"))
    url = f"http://127.0.0.1:{free_port()}/v1"
    run = subprocess.run([str(WATCH), "Hi?", "--base-url", url, "--model", model, "--no-live"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and f"cannot reach the server at {url}" in run.stderr, run.stderr[-3000:]


def test_offline(tmp_path):
    """--offline: the same group on an in-process engine; only the final screen reaches stdout."""
    model = str(build_tiny_model("qwen2"))
    run = subprocess.run([str(WATCH), "What is 2 + 2?", "--offline", "--model", model, "--dtype", "float32",
                          "--max-model-len", "1024", "--workers", "2", "--max-tokens", "32", "--options",
                          json.dumps(TEMPLATES), "--no-live"],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, **ENGINE_ENV))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("problem: What is 2 + 2?\n"), run.stdout[:3000]
    assert "Hi, I'm Alice." in run.stdout and "Hi, I'm Bob." in run.stdout and "answer: (none)" in run.stdout
    assert "INFO" not in run.stdout + run.stderr  # the engine's logs went to the hidden log

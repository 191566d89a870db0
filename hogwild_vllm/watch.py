"""hogwild-watch: watch a Hogwild! group work, one live column per worker, then the shared history and the answer.

    vllm serve /path/to/model --additional-config '{"hogwild": {}}'            # in another shell
    hogwild-watch --model /path/to/model --workers 3 "What is 17 * 23?"
    hogwild-watch --offline --model /path/to/model --workers 2 --max-tokens 256 "What is 17 * 23?"
    hogwild-watch --model M --no-live --save run "..."      # final screen only; writes run.txt, run.html, run.svg

The problem goes to the server as one group asking for one choice per worker (``n`` = workers, streamed; options in
``vllm_xargs``, see examples/stream_client.py), or with ``--offline`` to an in-process ``vllm.LLM`` stepped by hand
(``RequestOutputKind.DELTA``). Each worker's deltas fill its column as they arrive; the committed steps' order is
known only at the end, so the transcript (from the group's result) is shown then, with the answer. Exit status 1
when the server cannot be reached or the group is refused (the message is printed).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from hogwild_vllm.config import CONFIG_KEY, GroupConfig, HogwildConfigError
from hogwild_vllm.prompt import build_prompt_ids

STEP_HEADER = r"\*\*[^*\n]+ \[\d+\]:\*\*"  # "**Alice [3]:**" as the default templates write it
REFRESH_PER_SECOND = 8
QUIET_ENV = {"VLLM_LOGGING_LEVEL": "ERROR", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore",
             "VLLM_CPU_KVCACHE_SPACE": "1"}  # --offline: engine logs off; 1 GiB of KV cache on a CPU build


class WatchError(RuntimeError):
    """The group could not run (server unreachable, request refused, error result); the message says why."""


@dataclass
class Watch:
    """What the screen shows: each worker's text so far, token counts, the state, the clock and then the result.
    It renders itself (``Live`` redraws it at every refresh) at the terminal's current size."""

    problem: str
    names: tuple[str, ...]
    texts: list[str] = field(init=False)
    tokens: list[int] = field(init=False)
    state: str = "starting"
    start: float | None = None
    end: float | None = None
    result: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.texts, self.tokens = [""] * len(self.names), [0] * len(self.names)

    def sent(self) -> None:
        self.state, self.start = "running", time.monotonic()

    def add(self, worker: int, text: str, num_tokens: int) -> None:
        self.texts[worker] += text
        self.tokens[worker] += num_tokens

    def finish(self, result: dict[str, Any]) -> None:
        self.state, self.end, self.result = "done", time.monotonic(), result

    def elapsed(self) -> float:
        return 0.0 if self.start is None else (self.end or time.monotonic()) - self.start

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield screen(self, console.size.height)


class Tail:
    """The last ``height`` lines of ``text`` wrapped at the width it is rendered at (all lines when None)."""

    def __init__(self, text: Text, height: int | None) -> None:
        self.text, self.height = text, height

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = list(self.text.wrap(console, options.max_width))
        yield Text("\n").join(lines[-self.height:] if self.height else lines)


def panel(text: str, title: str, height: int | None, style: str) -> Panel:
    """``text`` (step headers in bold) in a box; with ``height`` the box is that tall and shows the text's tail."""
    body = Text(text)
    body.highlight_regex(STEP_HEADER, "bold cyan")
    return Panel(Tail(body, None if height is None else max(1, height - 2)), title=title, height=height,
                 border_style=style)


def header(w: Watch) -> Group:
    """Two lines: the problem, then tokens per worker, the clock and the state."""
    counts = " · ".join(f"{name} {n} tok" for name, n in zip(w.names, w.tokens, strict=True))
    problem = Text.assemble(("problem: ", "bold"), " ".join(w.problem.split()), no_wrap=True, overflow="ellipsis")
    status = Text.assemble((f"{len(w.names)} workers · ", "dim"), counts,
                           (f" · {w.elapsed():.1f} s · {w.state}", "dim"), no_wrap=True, overflow="ellipsis")
    return Group(problem, status)


def columns(w: Watch, height: int | None) -> Table:
    """One panel per worker, side by side, titled with the worker's name."""
    grid = Table.grid(expand=True)
    for _ in w.names:
        grid.add_column(ratio=1)
    grid.add_row(*(panel(text, name, height, "blue") for name, text in zip(w.names, w.texts, strict=True)))
    return grid


def summary(w: Watch, height: int | None) -> Group:
    """The shared history (the result's transcript: committed steps in order) and the answer line."""
    result = w.result or {}
    usage = result.get("usage", {})
    by = f" (by {result['answer_worker']})" if result.get("answer_worker") else ""
    answer = Text.assemble(("answer: ", "bold"), (str(result.get("answer") or "(none)"), "bold green"), by,
                           (f" · finish: {result.get('finish_reason')} · sampled per worker: "
                            f"{usage.get('generated_tokens')} · forward passes: {usage.get('forward_passes')}", "dim"),
                           no_wrap=height is not None, overflow="ellipsis")
    return Group(panel(result.get("transcript", ""), "shared history (transcript)", height, "green"), answer)


def screen(w: Watch, height: int | None) -> RenderableType:
    """The whole view; with ``height`` (a terminal's) it fits in that many lines, else it shows every text whole."""
    if height is None:
        return Group(header(w), columns(w, None), *([summary(w, None)] if w.result is not None else []))
    rest = max(8, height - 4)  # two header lines, the answer line, one line spare so the terminal never scrolls
    if w.result is None:
        return Group(header(w), columns(w, rest + 1))
    return Group(header(w), columns(w, rest // 2), summary(w, rest - rest // 2))


def run_server(args: argparse.Namespace, cfg: GroupConfig, options: dict[str, Any], w: Watch) -> dict | None:
    """Stream the group from the server into ``w``; the result comes in the choices' ``stop_reason``."""
    import openai
    from transformers import AutoTokenizer

    w.state = "loading the tokenizer"
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    except OSError as e:
        raise WatchError(f"cannot load the tokenizer (--tokenizer, default --model): {e}") from e
    prompt = build_prompt_ids(tokenizer, args.problem, cfg)
    client = openai.OpenAI(base_url=args.base_url, api_key="none", max_retries=0, timeout=3600)
    result = None
    try:
        w.sent()
        stream = client.completions.create(
            model=args.model, prompt=prompt, n=args.workers, stream=True, max_tokens=1, temperature=args.temperature,
            seed=args.seed, extra_body={"return_token_ids": True, "vllm_xargs": {CONFIG_KEY: json.dumps(options)}})
        for chunk in stream:
            for choice in chunk.choices:
                extra = choice.model_extra or {}
                w.add(choice.index, choice.text or "", len(extra.get("token_ids") or ()))
                stop = extra.get("stop_reason")
                if choice.finish_reason is not None and isinstance(stop, str) and stop.startswith("{"):
                    result = json.loads(stop)[CONFIG_KEY]
    except openai.APIConnectionError as e:
        raise WatchError(f"cannot reach the server at {args.base_url}: {e}") from e
    except openai.APIError as e:  # an HTTP error status, or an error event in the stream (how vLLM refuses n)
        body = e.body if isinstance(e.body, dict) else {}
        code = getattr(e, "status_code", None) or body.get("code")
        raise WatchError(f"the server refused the group{f' (HTTP {code})' if code else ''}: "
                         f"{body.get('message', e.message)}") from e
    return result


def run_offline(args: argparse.Namespace, cfg: GroupConfig, options: dict[str, Any], w: Watch) -> dict | None:
    """Run the group on an in-process engine, one ``step()`` at a time, each worker's delta into ``w``."""
    if options.get("workers", args.workers) != args.workers:  # what a server answers with a 400
        raise WatchError(f"--workers {args.workers} asks for one choice per worker, the options for "
                         f"{options['workers']} workers")
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    from hogwild_vllm import offline

    w.state = "starting the engine"
    llm = offline.make_llm(args.model, seed=args.seed or 0, dtype=args.dtype, max_model_len=args.max_model_len)
    params = offline.sampling_params(cfg, temperature=args.temperature, seed=args.seed, per_worker=True)
    params.output_kind = RequestOutputKind.DELTA
    prompt = TokensPrompt(prompt_token_ids=build_prompt_ids(llm.get_tokenizer(), args.problem, cfg))
    try:
        w.sent()
        llm.llm_engine.add_request("hogwild-watch", prompt, params)
    except ValueError as e:  # vLLM's frontend validation (bad options)
        raise WatchError(f"the engine refused the group: {e}") from e
    result = None
    while llm.llm_engine.has_unfinished_requests():
        for out in llm.llm_engine.step():
            for c in out.outputs:
                w.add(c.index, c.text, len(c.token_ids))
            result = (out.kv_transfer_params or {}).get(CONFIG_KEY, result)
    return result


@contextlib.contextmanager
def engine_output_hidden() -> Iterator[TextIO]:
    """Yield a stream on the real stdout while file descriptors 1 and 2 (the engine and its child processes) write
    to a log file, which is kept and named on stderr when the block fails."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    sys.stdout.flush()
    saved = os.dup(1), os.dup(2)
    display = os.fdopen(os.dup(1), "w", encoding="utf-8")
    log = tempfile.NamedTemporaryFile(prefix="hogwild-watch-engine-", suffix=".log", delete=False)
    for fd in (1, 2):
        os.dup2(log.fileno(), fd)
    failed = True
    try:
        yield display
        failed = False
    finally:
        display.close()
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, old in zip((1, 2), saved, strict=True):
            os.dup2(old, fd)
            os.close(old)
        log.close()
        if failed:
            print(f"engine log: {log.name}", file=sys.stderr)
        else:
            os.unlink(log.name)


def watch(args: argparse.Namespace, cfg: GroupConfig, options: dict[str, Any], out: TextIO) -> None:
    """Run the group, showing it on ``out``: live on a terminal unless ``--no-live``, else the final screen once.
    Raises :class:`WatchError`."""
    console = Console(file=out)
    w = Watch(args.problem, cfg.worker_names)
    live = console.is_terminal and not args.no_live
    with Live(w, console=console, refresh_per_second=REFRESH_PER_SECOND) if live else contextlib.nullcontext():
        result = run_offline(args, cfg, options, w) if args.offline else run_server(args, cfg, options, w)
        if result is None:
            raise WatchError("the group ended without a result (is the plugin on? --additional-config "
                             "'{\"hogwild\": {}}')")
        if "error" in result:
            raise WatchError(f"the group was refused: {result['error']}")
        w.finish(result)
    if not live:
        console.print(screen(w, None))
    if args.save:  # the final screen, every text whole
        rec = Console(record=True, file=io.StringIO(), width=console.width)
        rec.print(screen(w, None))
        rec.save_text(f"{args.save}.txt", clear=False)
        rec.save_html(f"{args.save}.html", clear=False)
        rec.save_svg(f"{args.save}.svg", title=f"hogwild-watch: {w.problem[:60]}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hogwild-watch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("problem")
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", required=True, help="the served model (path or name), or the model for --offline")
    p.add_argument("--tokenizer", default=None, help="tokenizer for the prompt (default: --model)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=256, help="own tokens per worker")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--options", default="{}", help="more group options as JSON (layout, templates, ...)")
    p.add_argument("--offline", action="store_true", help="run an in-process vLLM engine instead of a server")
    p.add_argument("--dtype", default="auto", help="--offline: the engine's dtype")
    p.add_argument("--max-model-len", type=int, default=None, help="--offline: the engine's context length")
    p.add_argument("--no-live", action="store_true", help="print the final screen only (pipes, CI)")
    p.add_argument("--save", metavar="PATH", help="write the final screen to PATH.txt, PATH.html and PATH.svg")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        extra = json.loads(args.options)
        if not isinstance(extra, dict):
            raise ValueError("--options must be a JSON object")
        options = {"max_tokens": args.max_tokens, **extra}
        cfg = GroupConfig.from_dict({**options, "workers": args.workers})  # the server checks workers against n
    except (ValueError, TypeError, HogwildConfigError) as e:
        print(f"hogwild-watch: bad options: {e}", file=sys.stderr)
        return 1
    try:
        with engine_output_hidden() if args.offline else contextlib.nullcontext(sys.stdout) as out:
            watch(args, cfg, options, out)
    except WatchError as e:
        print(f"hogwild-watch: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

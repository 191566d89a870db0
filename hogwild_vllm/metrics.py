"""Hogwild series on the server's Prometheus ``/metrics``: groups running and waiting, workers, committed steps,
forced and sampled tokens, prompt tokens served from the prefix cache, finished groups by reason, group latency.

The numbers live in the engine core (the scheduler); ``/metrics`` is served by the API server process, and vLLM's
stats channel between the two has no field for them. So the scheduler writes a small JSON snapshot
(:class:`MetricsWriter`, at most every ``WRITE_EVERY_S`` and whenever a group starts or ends) into a folder that
the API server's collector (:class:`HogwildCollector`, registered in prometheus_client's default registry by
``register()``) reads at every scrape. The folder is named by ``HOGWILD_METRICS_DIR``, set by the top process (the
one that is not a multiprocessing child: ``vllm serve``'s API server, or the script that builds an ``LLM``) and
inherited by the engine core it spawns, so two servers never read each other's numbers.

Limit: with several API server processes vLLM serves ``/metrics`` from a multiprocess registry, which this
collector is not part of.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DIR_ENV = "HOGWILD_METRICS_DIR"
WRITE_EVERY_S = 0.2
LATENCY_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0, math.inf)  # seconds


@dataclass
class EngineMetrics:
    """One engine's hogwild numbers. Gauges describe now; counters add up over the engine's life (finished
    groups' totals here, the running groups' part added by the scheduler when it takes a snapshot)."""

    groups_running: int = 0
    groups_waiting: int = 0  # admitted later: waiting for room, or for the rest of their n choices to arrive
    workers_running: int = 0
    committed_steps: int = 0
    forced_tokens: int = 0
    generated_tokens: int = 0  # sampled by workers
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # finish reason -> groups
    latency_buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))  # cumulative counts
    latency_sum: float = 0.0

    def observe_finished(self, reason: str, latency_s: float) -> None:
        self.finished[reason] = self.finished.get(reason, 0) + 1
        self.latency_sum += latency_s
        for i, bound in enumerate(LATENCY_BUCKETS):
            if latency_s <= bound:
                self.latency_buckets[i] += 1

    def add_tokens(self, committed: int, forced: int, generated: int, prompt: int, cached: int) -> None:
        self.committed_steps += committed
        self.forced_tokens += forced
        self.generated_tokens += generated
        self.prompt_tokens += prompt
        self.cached_prompt_tokens += cached


def metrics_dir() -> Path | None:
    value = os.environ.get(DIR_ENV)
    return Path(value) if value else None


def claim_metrics_dir() -> None:
    """Give this process tree its own folder (idempotent): a top process makes one and names it in the
    environment its children inherit; a multiprocessing child (engine core, worker) keeps its parent's."""
    if multiprocessing.parent_process() is not None or os.environ.get(f"{DIR_ENV}_OWNER") == str(os.getpid()):
        return
    folder = tempfile.mkdtemp(prefix="hogwild-metrics-")
    os.environ[DIR_ENV] = folder
    os.environ[f"{DIR_ENV}_OWNER"] = str(os.getpid())
    import atexit

    atexit.register(shutil.rmtree, folder, ignore_errors=True)


class MetricsWriter:
    """Engine side: writes snapshots as ``<dir>/engine-<pid>.json`` (atomically: a temporary file renamed)."""

    def __init__(self) -> None:
        folder = metrics_dir()
        self.path = folder / f"engine-{os.getpid()}.json" if folder is not None else None
        self.last = 0.0

    def due(self, force: bool = False) -> bool:
        """Whether :meth:`write` would write now (the caller builds a snapshot only then: every step asks)."""
        return self.path is not None and (force or time.monotonic() - self.last >= WRITE_EVERY_S)

    def write(self, metrics: EngineMetrics, force: bool = False) -> None:
        if not self.due(force):
            return
        self.last = time.monotonic()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(metrics)))
            tmp.replace(self.path)
        except OSError:  # metrics never stop an engine
            self.path = None

    def close(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def read_snapshots(folder: Path | None) -> list[dict[str, Any]]:
    if folder is None or not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.glob("engine-*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):  # being replaced this instant
            continue
    return out


GAUGES = {"groups_running": "Hogwild groups running (admitted, KV reserved)",
          "groups_waiting": "Hogwild groups waiting for room or for their choices to arrive",
          "workers_running": "Workers of the running hogwild groups"}
COUNTERS = {"committed_steps": "Steps committed to a group's shared history",
            "forced_tokens": "Tokens forced into workers' logs (intros, step headers)",
            "generated_tokens": "Tokens sampled by workers",
            "prompt_tokens": "Common-prompt tokens of hogwild groups",
            "cached_prompt_tokens": "Common-prompt tokens read from the prefix cache instead of computed"}


class HogwildCollector:
    """API-server side: the engines' snapshots as Prometheus families (summed over engines)."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        snaps = read_snapshots(self.folder)
        if not snaps:
            return
        for name, doc in GAUGES.items():
            yield GaugeMetricFamily(f"hogwild:{name}", doc, value=sum(s[name] for s in snaps))
        for name, doc in COUNTERS.items():
            yield CounterMetricFamily(f"hogwild:{name}", doc, value=sum(s[name] for s in snaps))
        finished = CounterMetricFamily("hogwild:groups_finished", "Hogwild groups ended, by finish reason",
                                       labels=["reason"])
        reasons = sorted({r for s in snaps for r in s["finished"]})
        for reason in reasons:
            finished.add_metric([reason], sum(s["finished"].get(reason, 0) for s in snaps))
        yield finished
        counts = [sum(s["latency_buckets"][i] for s in snaps) for i in range(len(LATENCY_BUCKETS))]
        buckets = [("+Inf" if math.isinf(b) else repr(b), c) for b, c in zip(LATENCY_BUCKETS, counts, strict=True)]
        yield HistogramMetricFamily("hogwild:group_latency_seconds",
                                    "Seconds from a group's arrival to its result (finisher included)",
                                    buckets=buckets, sum_value=sum(s["latency_sum"] for s in snaps))


_REGISTERED: list[bool] = []


def register_collector() -> None:
    """Claim this process tree's metrics folder and, in a top process, add the collector to prometheus_client's
    default registry, which vLLM's API server serves on ``/metrics`` (idempotent)."""
    claim_metrics_dir()
    if _REGISTERED or multiprocessing.parent_process() is not None:
        return
    from prometheus_client import REGISTRY

    REGISTRY.register(HogwildCollector(metrics_dir()))
    _REGISTERED.append(True)

"""One engine in its own process, for ``throughput.py``: runs a job file's requests and appends one JSON line a run.

    python benchmarks/_engines.py JOB.json

The job (written by ``throughput.py``) names the system, the model and a list of runs; results go, one JSON object
a line, to ``job["results"]`` as each run finishes (stdout is left to the engine's logs). After its warm-up the
engine runs nothing until the driver writes a run id on its stdin (one a line; EOF ends it), so that several
engines can stay up and take turns. Systems:

- ``plain-off``: ``vllm.LLM`` without ``additional_config`` (stock vLLM, its own CPU attention backend);
- ``plain-on``: ``vllm.LLM`` with the plugin on (``hogwild_vllm.offline.make_llm``); runs plain requests and groups;
- ``reference``: ``hogwild_vllm.reference_engine.ReferenceEngine`` (transformers), groups only.

A plain run is one request with ``SamplingParams(n=workers, temperature, top_k, seed, ignore_eos=True)``; a group run
is what ``offline.generate`` sends (the common prompt from ``build_prompt_ids``, ``extra_args["hogwild"]``) plus the
same ``top_k``. Every run's prompt is ``build_prompt_ids(tokenizer, problem, cfg)`` for its ``cfg``, so a plain run
and a group with the same ``cfg`` get the same token ids. Each process runs its ``warmup`` runs first, untimed.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

Run = dict[str, Any]


def _kv_blocks_plain(prompt: int, generated: int, n: int, block_size: int) -> int:
    """KV blocks of ``n`` sampled sequences of one prompt: each holds ``prompt + generated - 1`` tokens (the last
    sampled token is never fed); the prefix cache shares the full prompt blocks before the last prompt token
    among the n siblings (checked on vLLM 0.32: ``prefix_cache_hits`` = (n - 1) x that many tokens)."""
    own = math.ceil((prompt + generated - 1) / block_size)
    shared = (prompt - 1) // block_size
    return n * own - (n - 1) * shared


def _worker_facts(worker: Any) -> dict[str, Any]:
    """In the vLLM worker: the attention backends its model runner uses and its torch thread count."""
    import torch

    groups = getattr(worker.model_runner, "attn_groups", [])
    return {"attention_backends": "+".join(sorted({g.backend.get_name() for gs in groups for g in gs})),
            "worker_threads": torch.get_num_threads()}


def _worker_info(llm: Any) -> dict[str, Any]:
    """What the engine's worker runs (so a report shows the plugin was really off / on); sending the function
    needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``, else ``unknown``."""
    try:
        facts: dict[str, Any] = llm.collective_rpc(_worker_facts)[0]
        return facts
    except Exception as e:  # diagnostics only: never fail a benchmark over it
        return {"attention_backends": f"unknown ({type(e).__name__})"}


class VllmSystem:
    """A ``vllm.LLM`` with the plugin off (``plain-off``) or on (``plain-on``)."""

    def __init__(self, job: dict[str, Any]) -> None:
        from vllm import LLM

        kwargs: dict[str, Any] = dict(model=job["model"], dtype=job["dtype"], enforce_eager=True,
                                      max_model_len=job["max_model_len"], seed=0)
        if job["system"] == "plain-on":
            from hogwild_vllm import offline

            self.llm = offline.make_llm(**kwargs)
        else:
            self.llm = LLM(**kwargs)
        config = self.llm.llm_engine.vllm_config
        self.block_size = int(config.cache_config.block_size)
        self.info = {"block_size": self.block_size,
                     "max_num_batched_tokens": int(config.scheduler_config.max_num_batched_tokens),
                     "prefix_caching": bool(config.cache_config.enable_prefix_caching),
                     "additional_config": config.additional_config or {}, **_worker_info(self.llm)}
        self.tokenizer = self.llm.get_tokenizer()
        self.top_k = int(job["top_k"])
        self.temperature = float(job["temperature"])

    def run(self, run: Run) -> dict[str, Any]:
        """Time one plain request (n = workers) or one group; counts and KV blocks with it."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from hogwild_vllm.config import CONFIG_KEY, GroupConfig
        from hogwild_vllm.offline import group_output_of
        from hogwild_vllm.prompt import build_prompt_ids

        cfg = GroupConfig.from_dict(run["config"])
        ids = build_prompt_ids(self.tokenizer, run["problem"], cfg)
        prompt = [TokensPrompt(prompt_token_ids=ids)]
        if run["kind"] == "plain":
            params = SamplingParams(n=cfg.workers, temperature=self.temperature, top_k=self.top_k,
                                    seed=run["seed"], max_tokens=cfg.max_tokens, ignore_eos=True)
            t0 = time.perf_counter()
            (out,) = self.llm.generate(prompt, params, use_tqdm=False)
            seconds = time.perf_counter() - t0
            lengths = [len(c.token_ids) for c in out.outputs]
            return {"seconds": seconds, "prompt_tokens": len(ids), "tokens": sum(lengths), "forced": 0,
                    "per_seq": lengths, "passes": max(lengths),
                    "kv_blocks": _kv_blocks_plain(len(ids), max(lengths), cfg.workers, self.block_size)}
        params = SamplingParams(temperature=self.temperature, top_k=self.top_k, seed=run["seed"], max_tokens=1,
                                extra_args={CONFIG_KEY: cfg.to_dict()})
        t0 = time.perf_counter()
        (out,) = self.llm.generate(prompt, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        return _group_result(group_output_of(out), seconds)


class ReferenceSystem:
    """The transformers reference engine (the oracle), with vLLM's CPU block size so its KV blocks compare."""

    def __init__(self, job: dict[str, Any]) -> None:
        import torch

        from hogwild_vllm.reference_engine import ReferenceEngine

        torch.set_num_threads(int(job.get("threads", 1)))
        self.block_size = int(job.get("block_size", 128))
        self.engine = ReferenceEngine(job["model"], dtype=getattr(torch, job["dtype"]), block_size=self.block_size)
        self.temperature = float(job["temperature"])
        self.info = {"block_size": self.block_size, "threads": torch.get_num_threads(), "top_k": "none"}

    def run(self, run: Run) -> dict[str, Any]:
        """Time one group."""
        from hogwild_vllm.config import GroupConfig

        if run["kind"] != "group":
            raise ValueError("the reference system runs groups only")
        cfg = GroupConfig.from_dict(run["config"])
        t0 = time.perf_counter()
        out = self.engine.generate(run["problem"], cfg, temperature=self.temperature, seed=run["seed"])
        return _group_result(out, time.perf_counter() - t0)


def _group_result(out: Any, seconds: float) -> dict[str, Any]:
    """Timing and counts of one finished group (``hogwild_vllm.outputs.GroupOutput``)."""
    lengths = [len(w.token_ids) for w in out.workers]
    return {"seconds": seconds, "prompt_tokens": out.usage.prompt_tokens, "tokens": sum(lengths),
            "forced": sum(out.usage.forced_tokens), "per_seq": lengths, "passes": out.usage.forward_passes,
            "kv_blocks": out.usage.kv_blocks, "finish_reason": out.finish_reason}


def main(job_path: str) -> int:
    """Start the job's engine, run its warm-up, then each run the driver names, emitting ``ready``, ``warm``,
    ``run``... ``done``."""
    with open(job_path) as f:
        job = json.load(f)
    system: VllmSystem | ReferenceSystem = ReferenceSystem(job) if job["system"] == "reference" else VllmSystem(job)
    with open(job["results"], "a") as results:
        def emit(record: dict[str, Any]) -> None:
            results.write(json.dumps(record) + "\n")
            results.flush()

        emit({"event": "ready", "pid": os.getpid(), **system.info})
        for run in job.get("warmup", []):
            system.run(run)
        emit({"event": "warm"})
        by_id = {run["id"]: run for run in job["runs"]}
        for line in sys.stdin:  # the driver names each run, one id a line, when it is this engine's turn
            rid = line.strip()
            if rid:
                emit({"event": "run", "id": rid, **system.run(by_id[rid])})
        emit({"event": "done"})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

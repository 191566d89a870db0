"""What a finished group returns, the same from the reference engine and from vLLM."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any

from hogwild_vllm.layout import GroupState


@dataclass
class WorkerOutput:
    name: str
    token_ids: list[int]
    forced: list[bool]  # per token: True where the system forced it (intro, step headers)
    text: str


@dataclass
class Usage:
    prompt_tokens: int
    generated_tokens: list[int]  # sampled tokens per worker
    forced_tokens: list[int]  # forced tokens per worker
    forward_passes: int
    kv_blocks: int = 0
    finisher_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (not computed again)
    prefill_seconds: float | None = None  # wall time of pass 0 (the common prompt and the glue), engine side


@dataclass
class GroupOutput:
    prompt_token_ids: list[int]
    banned_token_ids: list[int]
    workers: list[WorkerOutput]
    transcript: str
    answer: str | None
    answer_worker: str | None
    finish_reason: str
    usage: Usage
    finisher_text: str | None = None
    finisher_skipped: str | None = None  # why the finisher did not run although it was on
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """As ``dataclasses.asdict`` (independent copies), without its element-by-element copy of every token id
        list (a long prompt's took milliseconds of the engine step that finishes the group)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["prompt_token_ids"], out["banned_token_ids"] = list(self.prompt_token_ids), list(self.banned_token_ids)
        out["workers"] = [{**vars(w), "token_ids": list(w.token_ids), "forced": list(w.forced)} for w in self.workers]
        out["usage"] = {**vars(self.usage), "generated_tokens": list(self.usage.generated_tokens),
                        "forced_tokens": list(self.usage.forced_tokens)}
        out["config"] = copy.deepcopy(self.config)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GroupOutput:
        """Inverse of :meth:`to_dict` (e.g. of ``RequestOutput.kv_transfer_params["hogwild"]``)."""
        fields = dict(d)
        fields["workers"] = [WorkerOutput(**w) for w in d["workers"]]
        fields["usage"] = Usage(**d["usage"])
        return cls(**fields)


def group_output(state: GroupState, prompt_ids: list[int], banned: list[int], forward_passes: int,
                 kv_blocks: int = 0) -> GroupOutput:
    """Collect a finished group's result from its state (the finisher, if any, is added by the caller)."""
    workers = [WorkerOutput(log.name, list(log.tokens), list(log.forced), state.codec.decode(log.tokens))
               for log in state.workers]
    forced = [sum(log.forced) for log in state.workers]
    usage = Usage(
        prompt_tokens=len(prompt_ids),
        generated_tokens=[len(log.tokens) - f for log, f in zip(state.workers, forced, strict=True)],
        forced_tokens=forced,
        forward_passes=forward_passes,
        kv_blocks=kv_blocks,
    )
    who = state.workers[state.answer_worker].name if state.answer_worker is not None else None
    return GroupOutput(list(prompt_ids), list(banned), workers, state.transcript(), state.answer, who,
                       state.finish_reason or "unfinished", usage, config=state.cfg.to_dict())

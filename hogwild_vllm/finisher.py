"""The finisher: when a group ends without an answer and ``finisher`` is on, one ordinary greedy request reads the
prompt, the transcript and a forced suffix ("... the final answer is \\boxed{") and writes the answer.

It runs as a plain request of the base scheduler (chunking, preemption and prefix caching as usual); its outputs
never reach the frontend: :meth:`Finishers.collect` takes them out and says when each finisher is done.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from vllm.sampling_params import SamplingParams
from vllm.v1.engine import EngineCoreOutputs
from vllm.v1.request import Request

from hogwild_vllm.compat import request_block_hasher
from hogwild_vllm.config import GroupConfig
from hogwild_vllm.layout import TokenCodec, find_answer
from hogwild_vllm.outputs import GroupOutput


@dataclass
class Finisher:
    key: str  # the group's
    out: GroupOutput  # the group's result, completed when the finisher ends
    request: Request
    marker: str
    suffix: str
    tokens: list[int] = field(default_factory=list)


@dataclass
class FinisherDone:
    finisher: Finisher
    answer: str | None
    stop_now: bool  # the answer is complete before the request stopped: the scheduler must end it


class Finishers:
    """The finishers in flight, by request id."""

    def __init__(self) -> None:
        self.by_id: dict[str, Finisher] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.by_id

    def __len__(self) -> int:
        return len(self.by_id)

    def make(self, key: str, request_id: str, cfg: GroupConfig, out: GroupOutput, codec: TokenCodec,
             eos: Iterable[int], max_model_len: int, like: Request) -> Request | None:
        """The finisher request of a group (``like``: a request of the group, for client, arrival and priority),
        or None when it cannot run on this engine (then ``out.finisher_skipped`` says why)."""
        suffix = cfg.templates.finisher_suffix
        ids = out.prompt_token_ids + codec.encode(out.transcript + suffix)
        budget = cfg.finisher_max_tokens
        if len(ids) + budget > max_model_len:
            out.finisher_skipped = (f"prompt + transcript + suffix ({len(ids)} tokens) plus finisher_max_tokens "
                                    f"({budget}) exceeds max_model_len {max_model_len}")
            return None
        params = SamplingParams(temperature=0.0, max_tokens=budget, stop_token_ids=sorted(eos),
                                extra_args={"hogwild_finisher": key})
        request = Request(request_id=request_id, prompt_token_ids=ids, sampling_params=params, pooling_params=None,
                          client_index=like.client_index, arrival_time=like.arrival_time, priority=like.priority,
                          block_hasher=request_block_hasher(like))
        self.by_id[request_id] = Finisher(key, out, request, cfg.templates.answer_marker, suffix)
        return request

    def collect(self, outputs: dict[int, EngineCoreOutputs], codec: TokenCodec) -> list[FinisherDone]:
        """Take the finishers' outputs out of what goes to the frontend; the finishers done this step (at EOS,
        length or a complete answer), removed from the set, their ``out`` completed."""
        done: list[FinisherDone] = []
        if not self.by_id:
            return done
        for eco in outputs.values():
            mine = [o for o in eco.outputs if o.request_id in self.by_id]
            if not mine:
                continue
            eco.outputs = [o for o in eco.outputs if o.request_id not in self.by_id]
            if eco.finished_requests:
                eco.finished_requests -= set(self.by_id)
            for o in mine:
                f = self.by_id[o.request_id]
                f.tokens.extend(o.new_token_ids)
                answer = find_answer(f.suffix + codec.decode(f.tokens), f.marker)
                if o.finish_reason is not None or answer is not None:
                    del self.by_id[o.request_id]
                    f.out.finisher_text = codec.decode(f.tokens)
                    f.out.answer = answer
                    f.out.usage.finisher_tokens = len(f.tokens)
                    done.append(FinisherDone(f, answer, stop_now=o.finish_reason is None))
        return done

    def of_group(self, key: str) -> list[str]:
        return [fid for fid, f in self.by_id.items() if f.key == key]

    def pop(self, request_id: str) -> Finisher:
        return self.by_id.pop(request_id)

    def ids(self) -> set[str]:
        return set(self.by_id)

"""The systems ``eval_accuracy.py`` compares, run on one vLLM engine with the plugin on: plain requests (one
sample, or N for self-consistency) and hogwild groups. Each (system, budget) is one batched ``LLM.generate``
call over all problems (plus one for plain finishers); every problem yields one record with its extracted answer(s),
whether it is correct, its forward passes and tokens."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _scoring import Problem, is_correct, majority_vote

from hogwild_vllm import offline
from hogwild_vllm.config import FEW_SHOT_EXAMPLES, GroupConfig, Layout, Templates
from hogwild_vllm.layout import find_answer
from hogwild_vllm.prompt import build_prompt_ids, eos_token_ids

# The plain systems' system message: the task and the answer format, nothing about collaboration.
PLAIN_SYSTEM = "Solve the problem step by step. When you are sure, write the final number once inside \\boxed{}."
Progress = bool | Callable[..., Any]  # LLM.generate's use_tqdm: on / off, or a tqdm factory
HEADER_ROOM = 32  # tokens per worker for step headers and the layout's markers, in the max_model_len estimate


@dataclass(frozen=True)
class System:
    kind: str  # "single" | "sc" | "hogwild"
    workers: int = 1
    layout: str | None = None

    @property
    def label(self) -> str:
        return {"single": "single", "sc": f"sc N={self.workers}",
                "hogwild": f"hogwild N={self.workers} {self.layout}"}[self.kind]


def parse_system(spec: str) -> System:
    """``single``, ``sc:N`` or ``hogwild:N:LAYOUT``; ValueError naming the accepted forms otherwise."""
    parts = spec.split(":")
    forms = "expected single, sc:N or hogwild:N:LAYOUT (layout: combined, interleaved, contiguous)"
    try:
        if parts == ["single"]:
            return System("single")
        if parts[0] == "sc" and len(parts) == 2 and int(parts[1]) >= 1:
            return System("sc", int(parts[1]))
        if parts[0] == "hogwild" and len(parts) == 3 and 1 <= int(parts[1]) <= 16:
            return System("hogwild", int(parts[1]), Layout(parts[2]).value)
    except ValueError:
        pass
    raise ValueError(f"bad system {spec!r}: {forms}")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class Engine:
    """The ``vllm.LLM`` (plugin on) and the settings every system shares."""

    def __init__(self, args: argparse.Namespace, problems: list[Problem]) -> None:
        self.args = args
        self.templates = Templates(few_shot_examples=FEW_SHOT_EXAMPLES if args.few_shot else "")
        self.config = json.loads((Path(args.model) / "config.json").read_text()) \
            if (Path(args.model) / "config.json").is_file() else {}
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        cuda = _has_cuda()
        self.dtype = args.dtype or ("auto" if cuda else "float32")
        self.max_model_len = args.max_model_len or self._needed_len(tokenizer, problems)
        # CPU: vLLM rewinds a seeded request's generator after a partial prefill chunk, which CPU generators
        # cannot do ("CPU Generator does not use offset"); without chunked prefill every prompt is fed whole.
        cpu = {} if cuda else {"enforce_eager": True, "enable_chunked_prefill": False,
                               "max_num_batched_tokens": max(self.max_model_len, 8192)}
        self.llm = offline.make_llm(args.model, max_model_len=self.max_model_len, dtype=self.dtype, seed=args.seed,
                                    **cpu)
        self.tokenizer = self.llm.get_tokenizer()
        gen = self.llm.llm_engine.model_config.hf_config
        self.eos = set(eos_token_ids(getattr(gen, "eos_token_id", None), self.tokenizer.eos_token_id))

    def user_text(self, problem: Problem) -> str:
        return f"{problem.problem}\n\n{self.args.instruction}" if self.args.instruction else problem.problem

    def group_config(self, workers: int, layout: str, budget: int) -> GroupConfig:
        return GroupConfig(workers=workers, layout=Layout(layout), max_tokens=budget, templates=self.templates,
                           finisher=self.args.finisher, finisher_max_tokens=self.args.finisher_tokens)

    def plain_prompt_ids(self, tokenizer: Any, problem: Problem) -> list[int]:
        """The chat template over (PLAIN_SYSTEM, problem), generation prompt added."""
        messages = [{"role": "system", "content": PLAIN_SYSTEM}, {"role": "user", "content": self.user_text(problem)}]
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = f"{PLAIN_SYSTEM}\n\n{self.user_text(problem)}\n\n"
        return list(tokenizer.encode(text, add_special_tokens=False))

    def _needed_len(self, tokenizer: Any, problems: list[Problem]) -> int:
        """Room for the longest group's longest view (prompt + every worker's budget and headers + markers) and
        the finisher, rounded up to 256."""
        args = self.args
        workers = max([s.workers for s in args.system_list if s.kind == "hogwild"] or [1])
        prompt = max(len(build_prompt_ids(tokenizer, self.user_text(p), self.group_config(workers, "combined", 1)))
                     for p in problems)
        need = prompt + workers * (max(args.budgets) + HEADER_ROOM) + 4 * HEADER_ROOM
        need += args.finisher_tokens + HEADER_ROOM if args.finisher else 0
        return -(-need // 256) * 256

    def describe(self, args: argparse.Namespace, problems: list[Problem]) -> list[str]:
        """Report header lines: model, problems, sampling and engine settings."""
        c = self.config
        shape = (f"{c.get('model_type', '?')}, {c.get('num_hidden_layers', '?')} layers, hidden "
                 f"{c.get('hidden_size', '?')}, heads {c.get('num_attention_heads', '?')} / "
                 f"{c.get('num_key_value_heads', '?')} KV") if c else "config not read"
        cache = self.llm.llm_engine.vllm_config.cache_config
        sched = self.llm.llm_engine.vllm_config.scheduler_config
        kv_space = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "-")
        return [f"model: {args.model} ({shape}); dtype {self.dtype}",
                f"problems: {args.problems} (first {len(problems)})",
                f"budgets (tokens per worker / sample): {args.budgets}; systems: "
                f"{', '.join(s.label for s in args.system_list)}",
                f"sampling: temperature {args.temperature}, top_p {args.top_p}, seed {args.seed} + problem index; "
                f"finisher {args.finisher} ({args.finisher_tokens} tokens); few-shot {args.few_shot}",
                f"instruction after each problem: {args.instruction!r}; plain system message: {PLAIN_SYSTEM!r}",
                f"engine: max_model_len {self.max_model_len}, block_size {cache.block_size}, prefix caching "
                f"{cache.enable_prefix_caching}, chunked prefill {sched.enable_chunked_prefill}, "
                f"max_num_batched_tokens {sched.max_num_batched_tokens}, VLLM_CPU_KVCACHE_SPACE {kv_space} GiB "
                "(CPU builds)"]


def make_engine(args: argparse.Namespace, problems: list[Problem]) -> Engine:
    return Engine(args, problems)


def warm_up(engine: Engine, problem: Problem) -> None:
    """One short plain request and one short group, untimed: the first calls pay one-time set-up costs."""
    run_system(engine, System("single"), [problem], 4, use_tqdm=False)
    run_system(engine, System("hogwild", 2, "combined"), [problem], 4, use_tqdm=False)


def run_system(engine: Engine, system: System, problems: list[Problem], budget: int,
               use_tqdm: Progress = True) -> list[dict[str, Any]]:
    """One record per problem: ``id``, ``expected``, ``answer`` (the one scored: a group's, or the plain samples'
    majority), ``answers`` (each sample's), ``correct``, ``forward_passes``, ``tokens``, ``finish_reasons``,
    ``finisher_ran``, ``error`` (a group the engine refused), ``note`` (e.g. why a finisher was skipped)."""
    if system.kind == "hogwild":
        assert system.layout is not None
        return _run_groups(engine, engine.group_config(system.workers, system.layout, budget), problems, use_tqdm)
    return _run_plain(engine, system.workers, problems, budget, use_tqdm)


def _run_groups(engine: Engine, cfg: GroupConfig, problems: list[Problem],
                use_tqdm: Progress) -> list[dict[str, Any]]:
    args = engine.args
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=build_prompt_ids(engine.tokenizer, engine.user_text(p), cfg))
               for p in problems]
    params = [offline.sampling_params(cfg, temperature=args.temperature, top_p=args.top_p, seed=args.seed + i)
              for i in range(len(problems))]
    outs = engine.llm.generate(prompts, params, use_tqdm=use_tqdm)
    records = []
    for p, o in zip(problems, outs, strict=True):
        try:
            g = offline.group_output_of(o)
        except offline.GroupRequestError as e:
            records.append({**_record(p, None, [], 0, 0, ["error"], False, []), "error": str(e)})
            continue
        u = g.usage
        text = g.transcript + ("" if g.finisher_text is None else cfg.templates.finisher_suffix + g.finisher_text)
        records.append(_record(p, g.answer, [g.answer], u.forward_passes + u.finisher_tokens,
                               sum(u.generated_tokens) + sum(u.forced_tokens) + u.finisher_tokens,
                               [g.finish_reason], g.finisher_text is not None, [text], g.finisher_skipped))
    return records


def _run_plain(engine: Engine, n: int, problems: list[Problem], budget: int,
               use_tqdm: Progress) -> list[dict[str, Any]]:
    args, marker = engine.args, engine.templates.answer_marker
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompt_ids = [engine.plain_prompt_ids(engine.tokenizer, p) for p in problems]
    params = [SamplingParams(n=n, temperature=args.temperature, top_p=args.top_p, seed=args.seed + i,
                             max_tokens=budget) for i in range(len(problems))]
    outs = engine.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params, use_tqdm=use_tqdm)
    samples = [[list(c.token_ids) for c in o.outputs] for o in outs]
    texts = [[c.text for c in o.outputs] for o in outs]
    answers = [[find_answer(t, marker) for t in row] for row in texts]
    reasons = [[str(c.finish_reason) for c in o.outputs] for o in outs]
    extra = [[0] * n for _ in problems]
    if args.finisher:
        _plain_finishers(engine, prompt_ids, samples, answers, extra, texts)
    records = []
    for i, p in enumerate(problems):
        lengths = [len(s) + e for s, e in zip(samples[i], extra[i], strict=True)]
        voted = majority_vote(answers[i])
        records.append(_record(p, voted, answers[i], max(lengths), sum(lengths), reasons[i], any(extra[i]),
                               texts[i]))
    return records


def _plain_finishers(engine: Engine, prompt_ids: list[list[int]], samples: list[list[list[int]]],
                     answers: list[list[str | None]], extra: list[list[int]], texts: list[list[str]]) -> None:
    """The engine's finisher for plain samples without an answer: prompt + sample (trailing EOS dropped) + the
    finisher suffix, greedy, up to --finisher-tokens; fills in ``answers``, the finisher's token count in
    ``extra`` and its text (after the suffix) in ``texts``."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    suffix, marker = engine.templates.finisher_suffix, engine.templates.answer_marker
    suffix_ids = list(engine.tokenizer.encode(suffix, add_special_tokens=False))
    todo = [(i, j) for i, row in enumerate(answers) for j, a in enumerate(row) if a is None]
    if not todo:
        return
    prompts = []
    for i, j in todo:
        ids = samples[i][j]
        while ids and ids[-1] in engine.eos:
            ids = ids[:-1]
        prompts.append(TokensPrompt(prompt_token_ids=prompt_ids[i] + ids + suffix_ids))
    params = SamplingParams(temperature=0.0, max_tokens=engine.args.finisher_tokens, stop_token_ids=sorted(engine.eos))
    outs = engine.llm.generate(prompts, params, use_tqdm=False)
    for (i, j), o in zip(todo, outs, strict=True):
        answers[i][j] = find_answer(suffix + o.outputs[0].text, marker)
        extra[i][j] = len(o.outputs[0].token_ids)
        texts[i][j] += suffix + o.outputs[0].text


def _record(p: Problem, answer: str | None, answers: list[str | None], passes: int, tokens: int,
            reasons: list[str], finisher_ran: bool, texts: list[str], note: str | None = None) -> dict[str, Any]:
    return {"id": p.id, "expected": p.answer, "answer": answer, "answers": answers,
            "correct": is_correct(answer, p.answer), "forward_passes": passes, "tokens": tokens,
            "finish_reasons": reasons, "finisher_ran": finisher_ran, "error": None, "note": note, "texts": texts}

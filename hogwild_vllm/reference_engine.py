"""A small, clear Hogwild! engine on Hugging Face transformers: the oracle for the vLLM plugin.

The model runs with a registered attention function ("hogwild_reference") that writes every fed token's K/V once
into a paged cache (one row per source: prompt, glue, each worker) and then attends through the position-delta
reference op. A forward pass takes all workers' fed tokens as one flat batch at their natural positions, so K/V of
every token is written before any attention of that layer runs (instant visibility).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

from hogwild_vllm.config import GroupConfig
from hogwild_vllm.layout import GLUE, PROMPT, GroupState, Query, Segment, find_answer
from hogwild_vllm.metadata import segment_table
from hogwild_vllm.ops.reference import SegmentTable, hogwild_attention_reference, write_kv_reference
from hogwild_vllm.outputs import GroupOutput, group_output
from hogwild_vllm.prompt import HFCodec, banned_token_ids, build_prompt_ids, eos_token_ids
from hogwild_vllm.rope import DeltaRope, delta_rope_for_model

ATTENTION_NAME = "hogwild_reference"
# attention(query, key_cache, value_cache, block_tables, table, rope, scale) -> out [T, Hq, Dv]
AttentionFn = Callable[..., Any]


class PagedKV:
    """Per-layer paged K/V caches and one block table row per source; blocks come from a shuffled pool."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, seed: int = 0) -> None:
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.key = [torch.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.value = [torch.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.block_size = block_size
        gen = torch.Generator().manual_seed(seed)
        self.free = torch.randperm(num_blocks, generator=gen).tolist()
        self.rows: list[dict[int, int]] = []  # row -> {block index in row: physical block}

    def add_row(self) -> int:
        self.rows.append({})
        return len(self.rows) - 1

    def slot(self, row: int, pos: int) -> int:
        blocks = self.rows[row]
        index = pos // self.block_size
        if index not in blocks:
            if not self.free:
                raise RuntimeError("reference engine ran out of KV blocks")
            blocks[index] = self.free.pop()
        return blocks[index] * self.block_size + pos % self.block_size

    def block_tables(self) -> torch.Tensor:
        width = max((max(r) + 1 for r in self.rows if r), default=1)
        table = torch.zeros((len(self.rows), width), dtype=torch.int32)  # [rows, max_blocks]
        for row, blocks in enumerate(self.rows):
            for index, block in blocks.items():
                table[row, index] = block
        return table

    @property
    def used_blocks(self) -> int:
        return sum(len(r) for r in self.rows)


@dataclass
class _Pass:
    kv: PagedKV
    slots: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [rows, max_blocks] int32
    table: SegmentTable
    rope: DeltaRope
    attention: AttentionFn


_CURRENT: list[_Pass] = []


def _hogwild_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                       **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention interface: query [1, Hq, T, D], key/value [1, Hkv, T, D] -> out [1, T, Hq, Dv]."""
    if not _CURRENT:
        raise RuntimeError(f"the '{ATTENTION_NAME}' attention only runs inside ReferenceEngine")
    p = _CURRENT[-1]
    layer = int(module.layer_idx)  # type: ignore[arg-type]
    q = query[0].transpose(0, 1)  # [T, Hq, D]
    write_kv_reference(key[0].transpose(0, 1), value[0].transpose(0, 1), p.kv.key[layer], p.kv.value[layer], p.slots)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    out = p.attention(q, p.kv.key[layer], p.kv.value[layer], p.block_tables, p.table, p.rope, scale)
    return out.unsqueeze(0), None  # [1, T, Hq, Dv]


AttentionInterface.register(ATTENTION_NAME, _hogwild_attention)


@contextmanager
def _running(p: _Pass) -> Iterator[None]:
    _CURRENT.append(p)
    try:
        yield
    finally:
        _CURRENT.pop()


@dataclass
class PassRecord:
    """One forward pass, kept when ``record=True``: each worker's next-token logits and the tables it used."""

    logits: torch.Tensor  # [N, vocab] fp32
    table: SegmentTable
    block_tables: torch.Tensor
    slots: torch.Tensor
    tokens: list[int] = field(default_factory=list)


class ReferenceEngine:
    """Runs hogwild groups with a transformers model. ``attention`` may replace the paged reference op (tests
    pass a dense oracle with the same signature)."""

    def __init__(self, model: str | Path, *, dtype: torch.dtype = torch.float32, block_size: int = 16,
                 attention: AttentionFn = hogwild_attention_reference, device: str = "cpu") -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(str(model))
        self.model = AutoModelForCausalLM.from_pretrained(str(model), dtype=dtype, attn_implementation=ATTENTION_NAME)
        self.model.to(device).eval()
        self.config = self.model.config
        self.rope = delta_rope_for_model(self.config, str(model), device=device)
        self.codec = HFCodec(self.tokenizer)
        self.dtype, self.block_size, self.attention, self.device = dtype, block_size, attention, device
        self.eos_ids = eos_token_ids(getattr(self.model.config, "eos_token_id", None),
                                     getattr(getattr(self.model, "generation_config", None), "eos_token_id", None))

    # ---- one group -----------------------------------------------------------------------------------------
    def generate(self, problem: str | None = None, cfg: GroupConfig | None = None, *,
                 prompt_ids: Sequence[int] | None = None, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, record: list[PassRecord] | None = None, progress: bool = False) -> GroupOutput:
        cfg = cfg or GroupConfig()
        if prompt_ids is None:
            if problem is None:
                raise ValueError("give a problem or prompt_ids")
            prompt_ids = build_prompt_ids(self.tokenizer, problem, cfg)
        return self._run([_Group(self, list(prompt_ids), cfg, seed, 0)], temperature, top_p, record, progress)[0]

    def generate_many(self, prompts: Sequence[Sequence[int]], cfgs: Sequence[GroupConfig], *,
                      temperature: float = 0.0, top_p: float = 1.0, seeds: Sequence[int] | None = None,
                      ) -> list[GroupOutput]:
        """Several groups in lockstep: every pass feeds all running groups' tokens in one forward, so the weights
        are read once for all of them. Each group reads only its own rows (its own prompt, glue and workers);
        its result is what :meth:`generate` gives it alone, up to the order of float reductions."""
        if len(prompts) != len(cfgs) or (seeds is not None and len(seeds) != len(cfgs)):
            raise ValueError("give one prompt (and one seed, if any) per group config")
        groups = [_Group(self, list(p), c, seeds[g] if seeds is not None else 0, g)
                  for g, (p, c) in enumerate(zip(prompts, cfgs, strict=True))]
        return self._run(groups, temperature, top_p, None, False)

    def _run(self, groups: list[_Group], temperature: float, top_p: float, record: list[PassRecord] | None,
             progress: bool) -> list[GroupOutput]:
        kv = self._new_cache([(g.cfg, len(g.prompt), len(g.state.glue_tokens)) for g in groups])
        rows: dict[int, int] = {}
        for g in groups:
            for source in (PROMPT, GLUE, *range(g.cfg.workers)):
                rows[g.source(source)] = kv.add_row()

        # Pass 0: each prompt (causal) and its glue pieces (each after the prompt).
        views, queries, tokens, sources = [], [], [], []
        for g in groups:
            glue = g.state.glue_views()
            views += [g.segments([Segment(PROMPT, 0, len(g.prompt), 0)])] + [g.segments(v) for v, _ in glue]
            queries += [[Query(i, i) for i in range(len(g.prompt))]] + [q for _, q in glue]
            tokens += g.prompt + g.state.glue_tokens
            sources += [g.source(PROMPT)] * len(g.prompt) + [g.source(GLUE)] * len(g.state.glue_tokens)
        self._forward(kv, rows, tokens, sources, views, queries)
        bar = tqdm(total=max(g.cfg.max_tokens for g in groups), desc="hogwild group", unit="tok",
                   disable=not progress)
        while running := [g for g in groups if not g.state.finished]:
            views, queries, tokens, sources, fed = [], [], [], [], []
            for g in running:
                for w, plan in enumerate(g.state.plan_pass()):
                    views.append(g.segments(plan.segments))
                    queries.append(plan.queries)
                    tokens += plan.tokens
                    sources += [g.source(w)] * len(plan.tokens)
                    fed.append(len(plan.tokens))
            logits_all, rec = self._forward(kv, rows, tokens, sources, views, queries,
                                            keep_tables=record is not None)
            logits = logits_all[torch.tensor(_last_indices(fed))].float()  # [workers of running groups, vocab]
            at = 0
            for g in running:
                mine = logits[at: at + g.cfg.workers]
                at += g.cfg.workers
                mine[:, g.banned] = float("-inf")
                sampled = sample(mine, temperature, top_p, g.gen)
                if record is not None and rec is not None:
                    record.append(PassRecord(mine, *rec, tokens=sampled))
                g.state.mark_fed()
                g.state.on_sampled(sampled)
                g.passes += 1
            bar.update(max(len(log.tokens) for g in groups for log in g.state.workers) - bar.n)
        bar.close()
        outs = []
        for g in groups:
            blocks = sum(len(kv.rows[rows[g.source(s)]]) for s in (PROMPT, GLUE, *range(g.cfg.workers)))
            out = group_output(g.state, g.prompt, g.banned, g.passes, blocks)
            if g.cfg.finisher and g.state.answer is None:
                self._finish(out, g.cfg)
            outs.append(out)
        return outs

    def _finish(self, out: GroupOutput, cfg: GroupConfig) -> None:
        """One greedy generation over prompt + transcript + finisher suffix; the answer is its balanced {...}."""
        suffix = cfg.templates.finisher_suffix
        ids = out.prompt_token_ids + self.codec.encode(out.transcript + suffix)
        new = self.generate_plain(ids, cfg.finisher_max_tokens, stop_ids=self.eos_ids,
                                  stop_text=lambda text: find_answer(suffix + text, cfg.templates.answer_marker))
        text = self.codec.decode(new)
        out.finisher_text = text
        out.answer = find_answer(suffix + text, cfg.templates.answer_marker)
        out.usage.finisher_tokens = len(new)

    def generate_plain(self, ids: Sequence[int], max_new: int, *, stop_ids: Sequence[int] = (),
                       stop_text: Callable[[str], Any] | None = None, banned: Sequence[int] = ()) -> list[int]:
        """Ordinary greedy decoding of one sequence through the same paged attention (one segment)."""
        ids = list(ids)
        kv = self._new_cache([(None, len(ids) + max_new, 0)])
        rows = {0: kv.add_row()}
        new: list[int] = []
        fed = 0
        while len(new) < max_new:
            n = len(ids)
            view = [Segment(0, 0, n, 0)]
            queries = [Query(i, i) for i in range(fed, n)]
            logits, _ = self._forward(kv, rows, ids[fed:], [0] * (n - fed), [view], [queries])
            last = logits[-1].float()
            last[list(banned)] = float("-inf")
            tok = int(torch.argmax(last))
            fed = n
            ids.append(tok)
            new.append(tok)
            if tok in stop_ids or (stop_text is not None and stop_text(self.codec.decode(new))):
                break
        return new

    # ---- machinery -------------------------------------------------------------------------------------------
    def _new_cache(self, groups: Sequence[tuple[GroupConfig | None, int, int]]) -> PagedKV:
        """Blocks for every (config or None for a plain sequence, prompt length, glue length)."""
        c = self.config
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        kv_heads = getattr(c, "num_key_value_heads", None) or heads
        blocks = 0
        for cfg, prompt_len, glue_len in groups:
            per_row = prompt_len + glue_len + (cfg.max_tokens + 256 if cfg else 0)
            rows = 1 + (2 + cfg.workers if cfg else 0)
            blocks += rows * (per_row // self.block_size + 2)
        return PagedKV(c.num_hidden_layers, blocks, self.block_size, kv_heads, head_dim, self.dtype)

    @torch.no_grad()
    def _forward(self, kv: PagedKV, rows: dict[int, int], tokens: list[int], sources: list[int],
                 views: list[list[Segment]], queries: list[list[Query]], keep_tables: bool = False,
                 ) -> tuple[torch.Tensor, tuple[SegmentTable, torch.Tensor, torch.Tensor] | None]:
        """Feed ``tokens`` (source ``sources[i]``, natural position from ``queries``); returns logits [T, vocab]."""
        flat = [q for qs in queries for q in qs]
        assert len(flat) == len(tokens) == len(sources)
        slots = [kv.slot(rows[s], q.natural) for s, q in zip(sources, flat, strict=True)]
        table = segment_table(views, queries, rows.__getitem__, self.device)
        block_tables = kv.block_tables().to(self.device)
        slot_mapping = torch.tensor(slots, dtype=torch.int64, device=self.device)  # [T]
        p = _Pass(kv, slot_mapping, block_tables, table, self.rope, self.attention)
        input_ids = torch.tensor([tokens], device=self.device)  # [1, T]
        positions = torch.tensor([[q.natural for q in flat]], device=self.device)  # [1, T]
        with _running(p):
            logits = self.model(input_ids=input_ids, position_ids=positions, use_cache=False).logits[0]
        return logits, ((table, block_tables, p.slots) if keep_tables else None)


class _Group:
    """One group of a run: its state, prompt, banned ids and sampler, and its sources' ids in the shared cache."""

    SOURCES = 64  # source ids per group in the shared cache's row map (PROMPT, GLUE and up to 16 workers fit)

    def __init__(self, engine: ReferenceEngine, prompt: list[int], cfg: GroupConfig, seed: int, index: int) -> None:
        self.prompt, self.cfg, self.index = prompt, cfg, index
        self.state = GroupState(cfg, len(prompt), engine.codec)
        self.banned = banned_token_ids(engine.tokenizer, cfg, engine.eos_ids)
        self.gen = torch.Generator().manual_seed(seed)
        self.passes = 1  # pass 0 computes the prompt and the glue

    def source(self, source: int) -> int:
        """This group's layout source id as an id of the shared row map."""
        return self.index * self.SOURCES + source

    def segments(self, segments: Sequence[Segment]) -> list[Segment]:
        return [replace(s, source=self.source(s.source)) for s in segments]


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> list[int]:
    """logits [N, vocab] fp32 (banned ids already -inf) -> one token per row; greedy when temperature == 0."""
    if temperature <= 0:
        return logits.argmax(dim=-1).tolist()
    probs = torch.softmax(logits / temperature, dim=-1)  # [N, vocab]
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the top token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1).tolist()


def _last_indices(lengths: list[int]) -> list[int]:
    out, end = [], 0
    for n in lengths:
        end += n
        out.append(end - 1)
    return out

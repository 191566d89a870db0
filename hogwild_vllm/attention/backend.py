"""The HOGWILD attention backend for vLLM: plain rows on vLLM's own kernel, group rows on the position-delta op.

CPU (the tested path). The per-layer cache is exactly vLLM's CPU one, ``[num_blocks, Hkv, block_size, 2 * D]``
(LBHNC) with vLLM's page packing (keys dim-major inside a page, values row-major; ISA ``vec`` / ``vec16``), and
vLLM's CPU impl writes every token's K/V. Each step the builder splits the batch into

* **plain runs** (``metadata.plain_runs``): rows outside any group, and the prompt request's chunk of the common
  prompt C: they go to vLLM's CPU kernel with vLLM's own metadata, so plain requests are computed exactly as with
  the plugin off (bitwise, when no group shares the batch). Contiguous runs are sliced, never copied. Where vLLM
  would pack the cache for AMX (bf16 on AMX CPUs; the cache keeps the ``vec`` packing groups read), runs of
  >= :data:`AMX_MIN_QUERIES` queries (prefill) take vLLM's AMX kernel over a scratch copy of their keys and values
  in its packing: bitwise the plugin-off engine's prefill, 3.6x faster than the ``vec`` kernel at 3k tokens;
* **group tokens**: the rest (workers, glue), attended by :func:`hogwild_vllm.ops.hogwild_attention` (the compiled
  CPU op) over the views the scheduler planned (``SchedulerOutput.hogwild``, published by the runner hook in
  ``compat.py``), reading the same cache through strided views.

CUDA (compiled and kernel-tested, not run inside vLLM here): the cache is the LBHNC layout with K/V written by
this backend, and every row, plain or not, goes through the Triton kernel. The metadata is built once per step in
``build``, on the device; ``forward`` does no host sync on CUDA. CUDA graphs: the builder declares ``NEVER``
(attention runs eagerly between vLLM's captured pieces).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import Any, ClassVar

import torch
from vllm.platforms import current_platform
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import KVCacheLayout

from hogwild_vllm.compat import BACKEND_NAME, cpu_attention, current_step, register_runner_hook
from hogwild_vllm.metadata import PlainRun, build_table, plain_runs, plain_segment_table
from hogwild_vllm.ops import SegmentTable, hogwild_attention, write_kv_reference
from hogwild_vllm.ops.layouts import cpu_page_views, flash_page_views
from hogwild_vllm.rope import DeltaRope, delta_rope_for_model

ON_CPU = current_platform.is_cpu()


class HogwildAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[Any]] = ["auto"]

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec: Any = None) -> list[int | MultipleOf]:
        # vLLM's CPU backend declares multiples of 32, but its kernels also run on multiples of 16 (ISA "vec16",
        # which vLLM's builder picks for them); the position-delta op takes any multiple of 8 on its fast path.
        return [MultipleOf(16)]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[HogwildAttentionImpl]:
        return HogwildAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[HogwildMetadataBuilder]:
        return HogwildMetadataBuilder

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(cpu_attention().backend.get_supported_head_sizes()) if ON_CPU else []  # GPU: any

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


# A plain run of at least this many queries takes the AMX kernel over a scratch copy of its keys and values (where
# vLLM would use AMX). Measured with tiny qwen2 shapes, bf16, one thread: copying 3077 keys from the cache costs
# 0.7 ms (0.2 ms from the batch), the AMX kernel saves ~5.6 ns a (query, key) pair (37 -> 10 ms at 3077^2 / 2);
# break-even at ~48 queries after a long cached prefix.
AMX_MIN_QUERIES = 64

Tokens = slice | torch.Tensor  # batch tokens: one contiguous slice, else [T] int64 indices in order


@dataclass
class ScratchFill:
    """What every layer writes into the AMX call's scratch (vLLM's ``amx`` packing) before the call: the cache pages
    of the runs' tokens from earlier steps (chunked prefill, a cached prefix), then the runs' own tokens.

    pages:       [P] int64 cache blocks holding the runs' tokens before this step's.
    page_slots:  [P * block_size] int64 the scratch slots of those pages' tokens, page after page.
    token_slots: [Tp] int64 the scratch slot of each of the call's batch tokens.
    """

    pages: torch.Tensor
    page_slots: torch.Tensor
    token_slots: torch.Tensor


@dataclass
class PlainCall:
    """One call of vLLM's CPU kernel over some plain runs.

    meta:   vLLM's CPU metadata of just these runs (the whole batch's when ``tokens`` is None).
    tokens: their batch tokens; None: the whole batch.
    fill:   AMX only: how the scratch that ``meta``'s block table reads is filled.
    """

    meta: Any
    tokens: Tokens | None = None
    fill: ScratchFill | None = None


@dataclass
class HogwildMetadata:
    """One step's attention metadata, built once and shared by every layer.

    plain:        vLLM kernel calls for the plain runs (empty: there are none, or not on CPU).
    scratch:      [B, Hkv, block_size, 2 * D] the AMX call's blocks, rewritten by every layer (None: no AMX call).
    table:        the position-delta views of the group tokens (None: there are none).
    group_tokens: the batch tokens that ``table``'s queries are; None when they are the whole batch.
    block_table:  [rows, max_blocks] int32 that ``table`` indexes (the batch's, plus rows for unscheduled sources).
    """

    num_actual_tokens: int
    slot_mapping: torch.Tensor  # [num_tokens] int64
    plain: list[PlainCall] = field(default_factory=list)
    scratch: torch.Tensor | None = None
    table: SegmentTable | None = None
    group_tokens: Tokens | None = None
    block_table: torch.Tensor | None = None


def _tokens(runs: list[tuple[int, int]], device: torch.device) -> Tokens:
    """The batch tokens of sorted, disjoint (start, length) runs: a slice when they touch, else [T] int64."""
    if all(start + length == after for (start, length), (after, _) in pairwise(runs)):
        return slice(runs[0][0], runs[-1][0] + runs[-1][1])
    return torch.cat([torch.arange(s, s + n) for s, n in runs]).to(device)


def _native_isa(kv_cache_spec: Any, vllm_config: Any) -> str:
    """The page packing vLLM's own CPU builder picks for this cache (``compat.CpuAttention`` replaces ``amx``)."""
    return cpu_attention().module._get_attn_isa(vllm_config.model_config.dtype, kv_cache_spec.block_size,
                                                kv_cache_spec.head_size, vllm_config.cache_config.cache_dtype)


class HogwildMetadataBuilder(AttentionMetadataBuilder[HogwildMetadata]):
    # The Triton kernel launches without host syncs, but each step's segment table is built from the scheduler's
    # plan on the host and changes size every step: attention runs outside CUDA graphs (vLLM then runs it eagerly
    # between the captured pieces under piecewise graphs).
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        register_runner_hook()  # this is the worker process: make the runner publish group steps
        self._cpu = cpu_attention().make_builder(kv_cache_spec, layer_names, vllm_config, device) if ON_CPU else None
        self._amx = None  # vLLM's builder for its AMX kernel, where vLLM would have packed this cache for it
        if self._cpu is not None and _native_isa(kv_cache_spec, vllm_config) == "amx":
            torch.cpu._init_amx()  # the process may use AMX tiles (vLLM's worker asks too; idempotent)
            self._amx = copy.copy(self._cpu)
            self._amx.isa = "amx"  # its metadata only: the layers keep writing the cache in "vec"

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> HogwildMetadata:
        m = common_attn_metadata
        step = current_step()
        meta = step.meta if step is not None and step.meta.rows else None
        req_ids = step.req_ids[: m.num_reqs] if step is not None else []
        if self._cpu is None:  # CUDA: every row through the position-delta op
            return self._build_all_delta(m, meta, req_ids)
        out = HogwildMetadata(m.num_actual_tokens, m.slot_mapping)
        long_runs = self._amx is not None and m.max_query_len >= AMX_MIN_QUERIES
        if meta is None and not long_runs:  # no group row, no long run: the batch is vLLM's own
            out.plain.append(PlainCall(self._cpu.build(common_prefix_len, m)))
            return out
        qsl = m.query_start_loc_cpu[: m.num_reqs + 1].tolist()
        lens = m.seq_lens.cpu()[: m.num_reqs].tolist()
        if meta is None:
            runs = [PlainRun(r, qsl[r], qsl[r + 1] - qsl[r], lens[r]) for r in range(m.num_reqs) if qsl[r + 1] > qsl[r]]
        else:
            runs = plain_runs(meta, req_ids, qsl, lens)
            table, out.block_table = build_table(meta, req_ids, qsl, lens, m.block_table_tensor, device=self.device)
            group_runs = _complement([(r.token_start, r.length) for r in runs], m.num_actual_tokens)
            if group_runs == [(0, m.num_actual_tokens)]:  # a batch of group rows only (decode steps)
                out.table = table
            elif group_runs:
                out.group_tokens = tokens = _tokens(group_runs, self.device)
                out.table = replace(table, query_view=table.query_view[tokens], query_pos=table.query_pos[tokens])
        amx = [r for r in runs if long_runs and r.length >= AMX_MIN_QUERIES]
        vec = [r for r in runs if not (long_runs and r.length >= AMX_MIN_QUERIES)]
        if vec:
            rows = torch.tensor([r.row for r in vec], dtype=torch.long, device=m.block_table_tensor.device)
            out.plain.append(PlainCall(self._cpu.build(0, _subset(m, vec, m.block_table_tensor[rows])),
                                       _tokens([(r.token_start, r.length) for r in vec], self.device)))
        if amx:
            call, out.scratch = self._amx_call(m, amx)
            out.plain.append(call)
        return out

    def _amx_call(self, m: CommonAttentionMetadata, runs: list[PlainRun]) -> tuple[PlainCall, torch.Tensor]:
        """vLLM's AMX kernel call for ``runs`` over a scratch holding each run's blocks in turn, and the scratch."""
        assert self._amx is not None
        spec, size = self.kv_cache_spec, self.kv_cache_spec.block_size
        table = torch.zeros(len(runs), -(-max(r.seq_len for r in runs) // size), dtype=torch.int32)  # [Ra, blocks]
        pages, page_slots, token_slots, first = [], [], [], 0
        for i, r in enumerate(runs):
            blocks, before = -(-r.seq_len // size), r.seq_len - r.length  # blocks it reads, tokens before its own
            table[i, :blocks] = torch.arange(first, first + blocks)
            pages.append(m.block_table_tensor[r.row, : -(-before // size)].long())
            page_slots.append(torch.arange(first * size, (first + pages[-1].numel()) * size))
            token_slots.append(torch.arange(first * size + before, first * size + r.seq_len))
            first += blocks
        fill = ScratchFill(torch.cat(pages), torch.cat(page_slots), torch.cat(token_slots))
        # zeros: the AMX kernel reads whole blocks, and uninitialised slots past a run's end could hold NaN bits
        scratch = torch.zeros((first, spec.num_kv_heads, size, 2 * spec.head_size), dtype=spec.dtype)
        meta = self._amx.build(0, _subset(m, runs, table.to(m.block_table_tensor.device)))
        return PlainCall(meta, _tokens([(r.token_start, r.length) for r in runs], self.device), fill), scratch

    def _build_all_delta(self, m: CommonAttentionMetadata, meta: Any, req_ids: list[str]) -> HogwildMetadata:
        if meta is None:
            table = plain_segment_table(m.query_start_loc_cpu, m.seq_lens.cpu(), m.num_actual_tokens).to(self.device)
            return HogwildMetadata(m.num_actual_tokens, m.slot_mapping, table=table, block_table=m.block_table_tensor)
        table, block_table = build_table(meta, req_ids, m.query_start_loc_cpu, m.seq_lens.cpu(),
                                         m.block_table_tensor, device=self.device)
        return HogwildMetadata(m.num_actual_tokens, m.slot_mapping, table=table, block_table=block_table)


def _complement(runs: list[tuple[int, int]], total: int) -> list[tuple[int, int]]:
    """The (start, length) runs of 0 .. total - 1 not covered by the sorted, disjoint ``runs``."""
    gaps, at = [], 0
    for start, length in runs:
        if start > at:
            gaps.append((at, start - at))
        at = start + length
    if total > at:
        gaps.append((at, total - at))
    return gaps


def _subset(m: CommonAttentionMetadata, runs: list[PlainRun], block_table: torch.Tensor) -> CommonAttentionMetadata:
    """vLLM's metadata for a batch of just the plain runs (one row each, in order), reading ``block_table``
    ([len(runs), max_blocks] int32)."""
    q_lens = torch.tensor([r.length for r in runs], dtype=torch.int32)  # [Rp]
    qsl = torch.zeros(len(runs) + 1, dtype=torch.int32)  # [Rp + 1]
    qsl[1:] = torch.cumsum(q_lens, 0)
    seq_lens = torch.tensor([r.seq_len for r in runs], dtype=torch.int32)  # [Rp]
    device = m.query_start_loc.device
    return replace(m, query_start_loc=qsl.to(device), query_start_loc_cpu=qsl, seq_lens=seq_lens.to(device),
                   num_reqs=len(runs), num_actual_tokens=int(qsl[-1]), max_query_len=int(q_lens.max()),
                   max_seq_len=int(seq_lens.max()), block_table_tensor=block_table,
                   slot_mapping=m.slot_mapping[:0], seq_lens_cpu_upper_bound=None)


class HogwildAttentionImpl(AttentionImpl[HogwildMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto", logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name: str | None = None,
                 **extra: Any) -> None:
        unsupported = {"alibi_slopes": alibi_slopes, "sliding_window": sliding_window,
                       "logits_soft_cap": logits_soft_cap or None, "sinks": extra.get("sinks")}
        bad = [k for k, v in unsupported.items() if v is not None]
        if bad or kv_cache_dtype != "auto" or attn_type != AttentionType.DECODER:
            raise NotImplementedError(
                f"the {BACKEND_NAME} attention backend does not support {bad or [kv_cache_dtype, attn_type]}")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.attn_type = attn_type
        from vllm.config import get_current_vllm_config

        model_config = get_current_vllm_config().model_config  # set while the model is built
        device = "cpu" if ON_CPU else torch.device("cuda", torch.cuda.current_device())  # the op reads it there
        self.rope: DeltaRope = delta_rope_for_model(model_config.hf_text_config, model_config.model, device)
        self._cpu = cpu_attention().make_impl(num_heads, head_size, scale, self.num_kv_heads) if ON_CPU else None

    def _paged(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Strided [num_blocks, block_size, Hkv, D] key and value views of one layer's cache, whatever its packing."""
        if self._cpu is not None:
            return cpu_page_views(kv_cache)
        return flash_page_views(kv_cache, self.head_size)

    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        if self._cpu is not None:
            self._cpu.do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
            return
        key_cache, value_cache = self._paged(kv_cache)
        n = slot_mapping.shape[0]
        write_kv_reference(key[:n], value[:n], key_cache, value_cache, slot_mapping.long())

    def forward(self, layer: AttentionLayer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: HogwildMetadata | None, output: torch.Tensor,
                output_scale: torch.Tensor | None = None, output_block_scale: torch.Tensor | None = None,
                ) -> torch.Tensor:
        if attn_metadata is None:  # profiling / warm-up run
            return output
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError(f"{BACKEND_NAME} does not fuse output quantization")
        md = attn_metadata
        for call in md.plain:
            self._plain(layer, call, query, key, value, kv_cache, md.scratch, output)
        if md.table is not None:
            assert md.block_table is not None
            n, tokens = md.num_actual_tokens, md.group_tokens
            out = output[:n].view(n, self.num_heads, -1)  # [n, Hq, Dv]
            key_cache, value_cache = self._paged(kv_cache)
            if tokens is None or isinstance(tokens, slice):
                part = slice(0, n) if tokens is None else tokens
                hogwild_attention(query[part], key_cache, value_cache, md.block_table, md.table, self.rope,
                                  self.scale, out=out[part])
            else:
                part_out = hogwild_attention(query.index_select(0, tokens), key_cache, value_cache, md.block_table,
                                             md.table, self.rope, self.scale)  # [Tg, Hq, Dv]
                assert isinstance(part_out, torch.Tensor)
                out.index_copy_(0, tokens, part_out)
        return output

    def _plain(self, layer: AttentionLayer, call: PlainCall, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, kv_cache: torch.Tensor, scratch: torch.Tensor | None, output: torch.Tensor,
               ) -> None:
        """vLLM's CPU kernel over one call's plain runs, into their tokens of ``output``."""
        assert self._cpu is not None
        tokens = call.tokens
        if tokens is None:  # the whole batch: vLLM's own call
            self._cpu.forward(layer, query, key, value, kv_cache, call.meta, output)
            return
        if call.fill is not None:  # AMX: the call's block table reads the scratch
            assert scratch is not None
            fill_scratch(scratch, kv_cache, _take(key, tokens), _take(value, tokens), call.fill)
            kv_cache = scratch
        if isinstance(tokens, slice):
            self._cpu.forward(layer, query[tokens], key, value, kv_cache, call.meta, output[tokens])
        else:
            part = output.new_empty((tokens.shape[0], *output.shape[1:]))  # [Tp, ...] like output
            self._cpu.forward(layer, query.index_select(0, tokens), key, value, kv_cache, call.meta, part)
            output.index_copy_(0, tokens, part)


def _take(x: torch.Tensor, tokens: Tokens) -> torch.Tensor:
    """The rows ``tokens`` of x: a view for a slice, a copy for indices."""
    return x[tokens] if isinstance(tokens, slice) else x.index_select(0, tokens)


def fill_scratch(scratch: torch.Tensor, kv_cache: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 fill: ScratchFill) -> None:
    """Write ``fill.pages`` of the cache, then the call's own ``keys`` and ``values`` ([Tp, Hkv, D], this step's, from
    the batch), into the scratch in vLLM's ``amx`` packing. kv_cache: [num_blocks, Hkv, block_size, 2 * D] in the
    ``vec`` packing; scratch: [B, Hkv, block_size, 2 * D], same dtype."""
    from vllm import _custom_ops as vllm_ops

    num_blocks, num_kv_heads, block_size, two_d = scratch.shape
    key_cache, value_cache = scratch.view(num_blocks, num_kv_heads, 2 * block_size, two_d // 2).chunk(2, dim=2)
    if fill.pages.numel():
        key_pages, value_pages = cpu_page_views(kv_cache)  # [num_blocks, block_size, Hkv, D] strided
        vllm_ops.cpu_attn_reshape_and_cache(key_pages.index_select(0, fill.pages).flatten(0, 1),  # [P * bs, Hkv, D]
                                            value_pages.index_select(0, fill.pages).flatten(0, 1),
                                            key_cache, value_cache, fill.page_slots, "amx")
    vllm_ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, fill.token_slots, "amx")

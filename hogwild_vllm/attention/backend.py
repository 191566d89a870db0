"""The HOGWILD attention backend for vLLM: plain rows on vLLM's own kernel, group rows on the position-delta op.

CPU (the tested path). The per-layer cache is exactly vLLM's CPU one, ``[num_blocks, Hkv, block_size, 2 * D]``
(LBHNC) with vLLM's page packing (keys dim-major inside a page, values row-major; ISA ``vec`` / ``vec16``), and
vLLM's CPU impl writes every token's K/V. Each step the builder splits the batch into

* **plain runs** (``metadata.plain_runs``): rows outside any group, and the prompt request's chunk of the common
  prompt C: they go to vLLM's CPU kernel with vLLM's own metadata, so plain requests are computed exactly as with
  the plugin off (bitwise, when no group shares the batch). Contiguous runs are sliced, never copied;
* **group tokens**: the rest (workers, glue), attended by :func:`hogwild_vllm.ops.hogwild_attention` (the compiled
  CPU op) over the views the scheduler planned (``SchedulerOutput.hogwild``, published by the runner hook in
  ``compat.py``), reading the same cache in the packing vLLM chose for it: strided page views for ``vec`` /
  ``vec16``, the op's ``packing="amx"`` path for ``amx`` (bf16 on CPUs with AMX tiles, where vLLM's AMX kernel
  is 1.4-2x faster than its ``vec`` one at decode and ~4x at prefill).

CUDA (compiled and kernel-tested, not run inside vLLM here): the cache is the LBHNC layout with K/V written by
this backend, and every row, plain or not, goes through the Triton kernel. The metadata is built once per step in
``build``, on the device; ``forward`` does no host sync on CUDA. CUDA graphs: the builder declares ``NEVER``
(attention runs eagerly between vLLM's captured pieces).
"""

from __future__ import annotations

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
from hogwild_vllm.ops.layouts import amx_pages, cpu_page_views, flash_page_views
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


Tokens = slice | torch.Tensor  # batch tokens: one contiguous slice, else [T] int64 indices in order


@dataclass
class PlainCall:
    """One call of vLLM's CPU kernel over some plain runs.

    meta:   vLLM's CPU metadata of just these runs (the whole batch's when ``tokens`` is None).
    tokens: their batch tokens; None: the whole batch.
    """

    meta: Any
    tokens: Tokens | None = None


@dataclass
class HogwildMetadata:
    """One step's attention metadata, built once and shared by every layer.

    plain:        vLLM kernel calls for the plain runs (empty: there are none, or not on CPU).
    packing:      how the op reads the cache: "strided" (page views) or "amx" (vLLM's AMX packing, CPU).
    table:        the position-delta views of the group tokens (None: there are none).
    group_tokens: the batch tokens that ``table``'s queries are; None when they are the whole batch.
    block_table:  [rows, max_blocks] int32 that ``table`` indexes (the batch's, plus rows for unscheduled sources).
    """

    num_actual_tokens: int
    slot_mapping: torch.Tensor  # [num_tokens] int64
    plain: list[PlainCall] = field(default_factory=list)
    packing: str = "strided"
    table: SegmentTable | None = None
    group_tokens: Tokens | None = None
    block_table: torch.Tensor | None = None


def _tokens(runs: list[tuple[int, int]], device: torch.device) -> Tokens:
    """The batch tokens of sorted, disjoint (start, length) runs: a slice when they touch, else [T] int64."""
    if all(start + length == after for (start, length), (after, _) in pairwise(runs)):
        return slice(runs[0][0], runs[-1][0] + runs[-1][1])
    return torch.cat([torch.arange(s, s + n) for s, n in runs]).to(device)


class HogwildMetadataBuilder(AttentionMetadataBuilder[HogwildMetadata]):
    # The Triton kernel launches without host syncs, but each step's segment table is built from the scheduler's
    # plan on the host and changes size every step: attention runs outside CUDA graphs (vLLM then runs it eagerly
    # between the captured pieces under piecewise graphs).
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        register_runner_hook()  # this is the worker process: make the runner publish group steps
        self._cpu = cpu_attention().make_builder(kv_cache_spec, layer_names, vllm_config, device) if ON_CPU else None
        self._packing = "amx" if self._cpu is not None and self._cpu.isa == "amx" else "strided"
        if self._packing == "amx":
            torch.cpu._init_amx()  # the process may use AMX tiles (vLLM's worker asks too; idempotent)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> HogwildMetadata:
        m = common_attn_metadata
        step = current_step()
        meta = step.meta if step is not None and step.meta.rows else None
        req_ids = step.req_ids[: m.num_reqs] if step is not None else []
        if self._cpu is None:  # CUDA: every row through the position-delta op
            return self._build_all_delta(m, meta, req_ids)
        out = HogwildMetadata(m.num_actual_tokens, m.slot_mapping, packing=self._packing)
        if meta is None:  # no group row: the batch is vLLM's own
            out.plain.append(PlainCall(self._cpu.build(common_prefix_len, m)))
            return out
        qsl = m.query_start_loc_cpu[: m.num_reqs + 1].tolist()
        lens = m.seq_lens.cpu()[: m.num_reqs].tolist()
        runs = plain_runs(meta, req_ids, qsl, lens)
        table, out.block_table = build_table(meta, req_ids, qsl, lens, m.block_table_tensor, device=self.device)
        group_runs = _complement([(r.token_start, r.length) for r in runs], m.num_actual_tokens)
        if group_runs == [(0, m.num_actual_tokens)]:  # a batch of group rows only (decode steps)
            out.table = table
        elif group_runs:
            out.group_tokens = tokens = _tokens(group_runs, self.device)
            out.table = replace(table, query_view=table.query_view[tokens], query_pos=table.query_pos[tokens])
        if runs:
            rows = torch.tensor([r.row for r in runs], dtype=torch.long, device=m.block_table_tensor.device)
            out.plain.append(PlainCall(self._cpu.build(0, _subset(m, runs, m.block_table_tensor[rows])),
                                       _tokens([(r.token_start, r.length) for r in runs], self.device)))
        return out

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

    def _paged(self, kv_cache: torch.Tensor, packing: str = "strided") -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's cache as the op reads it: strided [num_blocks, block_size, Hkv, D] key and value views, or
        with ``packing="amx"`` the key and value pages [num_blocks, Hkv, block_size, D] in vLLM's AMX packing."""
        if self._cpu is None:
            return flash_page_views(kv_cache, self.head_size)
        return amx_pages(kv_cache) if packing == "amx" else cpu_page_views(kv_cache)

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
            self._plain(layer, call, query, key, value, kv_cache, output)
        if md.table is not None:
            assert md.block_table is not None
            n, tokens = md.num_actual_tokens, md.group_tokens
            out = output[:n].view(n, self.num_heads, -1)  # [n, Hq, Dv]
            key_cache, value_cache = self._paged(kv_cache, md.packing)
            if tokens is None or isinstance(tokens, slice):
                part = slice(0, n) if tokens is None else tokens
                hogwild_attention(query[part], key_cache, value_cache, md.block_table, md.table, self.rope,
                                  self.scale, out=out[part], packing=md.packing)
            else:
                part_out = hogwild_attention(query.index_select(0, tokens), key_cache, value_cache, md.block_table,
                                             md.table, self.rope, self.scale, packing=md.packing)  # [Tg, Hq, Dv]
                assert isinstance(part_out, torch.Tensor)
                out.index_copy_(0, tokens, part_out)
        return output

    def _plain(self, layer: AttentionLayer, call: PlainCall, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, kv_cache: torch.Tensor, output: torch.Tensor) -> None:
        """vLLM's CPU kernel over one call's plain runs, into their tokens of ``output``."""
        assert self._cpu is not None
        tokens = call.tokens
        if tokens is None:  # the whole batch: vLLM's own call
            self._cpu.forward(layer, query, key, value, kv_cache, call.meta, output)
        elif isinstance(tokens, slice):
            self._cpu.forward(layer, query[tokens], key, value, kv_cache, call.meta, output[tokens])
        else:
            part = output.new_empty((tokens.shape[0], *output.shape[1:]))  # [Tp, ...] like output
            self._cpu.forward(layer, query.index_select(0, tokens), key, value, kv_cache, call.meta, part)
            output.index_copy_(0, tokens, part)

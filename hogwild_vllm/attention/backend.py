"""The HOGWILD attention backend for vLLM: writes K/V itself and attends through position-delta segments.

Per-layer cache: vLLM's logical layout [num_blocks, kv_heads, block_size, 2 * head_size] (LBHNC), keys in the first
``head_size`` channels, values in the rest; this backend is the only reader and writer, so nothing depends on a CPU
ISA packing. Every batch row (request) gets one view; a request outside any hogwild group has a single segment
(its own tokens at their own positions, delta 0), which is exactly ordinary causal attention. Rows of group
workers get the views the scheduler planned (``SchedulerOutput.hogwild``, published by the runner hook in
``compat.py``): segments of peers' rows and of the shared prompt, each with its position delta.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import KVCacheLayout

from hogwild_vllm.compat import BACKEND_NAME, current_step, register_runner_hook
from hogwild_vllm.metadata import build_table, plain_segment_table
from hogwild_vllm.ops.reference import SegmentTable, hogwild_attention_reference, write_kv_reference
from hogwild_vllm.rope import DeltaRope, delta_rope_for_model


class HogwildAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[Any]] = ["auto"]

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec: Any = None) -> list[int | MultipleOf]:
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
        return []  # any head size

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


@dataclass
class HogwildMetadata:
    num_actual_tokens: int
    table: SegmentTable
    block_table: torch.Tensor  # [num_reqs, max_blocks] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64


class HogwildMetadataBuilder(AttentionMetadataBuilder[HogwildMetadata]):
    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        register_runner_hook()  # this is the worker process: make the runner publish group steps

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> HogwildMetadata:
        m = common_attn_metadata
        step = current_step()
        if step is None or not step.meta.rows:  # no group row in this batch: one plain segment per request
            table = plain_segment_table(m.query_start_loc_cpu, m.seq_lens.cpu(), m.num_actual_tokens)
            table = SegmentTable(*(t.to(self.device, non_blocking=True) for t in
                                  (table.segments, table.view_offsets, table.query_view, table.query_pos)))
            return HogwildMetadata(m.num_actual_tokens, table, m.block_table_tensor, m.slot_mapping)
        table, block_table = build_table(step.meta, step.req_ids[: m.num_reqs], m.query_start_loc_cpu,
                                         m.seq_lens.cpu(), m.block_table_tensor, device=self.device)
        return HogwildMetadata(m.num_actual_tokens, table, block_table, m.slot_mapping)


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
        self.rope: DeltaRope = delta_rope_for_model(model_config.hf_text_config, model_config.model)

    def _split(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # kv_cache: [num_blocks, Hkv, block_size, 2 * D] -> key, value views [num_blocks, block_size, Hkv, D]
        paged = kv_cache.permute(0, 2, 1, 3)
        return paged[..., : self.head_size], paged[..., self.head_size:]

    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        key_cache, value_cache = self._split(kv_cache)
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
        n = attn_metadata.num_actual_tokens
        key_cache, value_cache = self._split(kv_cache)
        out = hogwild_attention_reference(query[:n], key_cache, value_cache, attn_metadata.block_table,
                                          attn_metadata.table, self.rope, self.scale)
        assert isinstance(out, torch.Tensor)
        output[:n].view(n, self.num_heads, -1).copy_(out)  # [n, Hq, D]
        return output

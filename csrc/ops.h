// Launchers of the hogwild_C ops, one per device. Schemas live in torch_bindings.cpp; the CPU implementations are
// registered there and the CUDA ones in their own .cu files (built only with a CUDA toolchain and a CUDA torch).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

// hogwild_C::rotate_by_delta(Tensor! x, Tensor delta, Tensor cos_sin_table, int rotary_dim, bool is_neox) -> ()
// In place: rotates the first rotary_dim dims of every head of x[t] by delta[t] positions.
//   x:             [num_tokens, num_heads, head_size], fp32 / bf16 / fp16, last dim contiguous (modified)
//   delta:         [num_tokens], int64, signed, |delta| < table_rows
//   cos_sin_table: [table_rows, rotary_dim], fp32: cos(angle(d)) then sin(angle(d)) for d = 0 .. table_rows - 1
void rotate_by_delta_cpu(at::Tensor& x, const at::Tensor& delta, const at::Tensor& cos_sin_table, int64_t rotary_dim,
                         bool is_neox);

// hogwild_C::hogwild_attention(Tensor! out, Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables,
//     Tensor segments, Tensor view_offsets, Tensor query_view, Tensor query_pos, Tensor cos_sin_table,
//     int rotary_dim, bool is_neox, float scale, Tensor!? lse, int packing=0) -> ()
// Position-delta attention of every query token over its view (semantics: hogwild_vllm/ops/reference.py).
//   out:          [T, Hq, Dv], query dtype, last dim contiguous (written)
//   query:        [T, Hq, D], fp32 / bf16 / fp16, rotated at natural positions, last dim contiguous
//   packing 0 (strided views):
//   key_cache:    [num_blocks, block_size, Hkv, D], query dtype, contiguous along D or along a page's tokens
//   value_cache:  [num_blocks, block_size, Hkv, Dv], query dtype, last dim contiguous
//   packing 1 (vLLM's amx pages, bf16 / fp16, block_size and D multiples of 32; see device/hogwild_attention.cuh):
//   key_cache, value_cache: [num_blocks, Hkv, block_size, D], each (block, head) page contiguous
//   block_tables: [num_seqs, max_blocks] int32; segments [S, 4], view_offsets [V + 1], query_view [T],
//   query_pos [T, 2]: int32, contiguous (hogwild_vllm.ops.segments.SegmentTable)
//   cos_sin_table: [rows, rotary_dim] fp32 (unit cos | sin of delta d's angles); lse: [T, Hq] fp32 (written)
void hogwild_attention_cpu(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                           const at::Tensor& value_cache, const at::Tensor& block_tables, const at::Tensor& segments,
                           const at::Tensor& view_offsets, const at::Tensor& query_view, const at::Tensor& query_pos,
                           const at::Tensor& cos_sin_table, int64_t rotary_dim, bool is_neox, double scale,
                           const std::optional<at::Tensor>& lse, int64_t packing);

// hogwild_C::cpu_amx_tiles() -> bool
// Whether hogwild_attention multiplies bf16 amx pages with AMX tiles in this process (the build has the tile code,
// the CPU has AMX-BF16, the kernel granted the tile state, HOGWILD_CPU_AMX_TILES is not "0"); else fp32 vectors.
bool hogwild_cpu_amx_tiles();

#if defined(HOGWILD_WITH_CUDA)
void rotate_by_delta_cuda(at::Tensor& x, const at::Tensor& delta, const at::Tensor& cos_sin_table, int64_t rotary_dim,
                          bool is_neox);
#endif

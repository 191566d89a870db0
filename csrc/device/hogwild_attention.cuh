// Position-delta attention over a paged cache: the math every implementation shares, no torch headers.
//
// A query token of view v (natural position n_q, view position p_q) attends to the keys of v's segments. Segment
// (seq, start, length, view_start) holds tokens start .. start + length - 1 of block-table row seq at view positions
// view_start .. view_start + length - 1. Keys were stored rotated at their natural positions and the query at n_q,
// so scoring the segment at view positions means rotating the query by
//     delta = (p_q - n_q) - (view_start - start)
// (once per segment; keys are never rewritten). A key is visible iff its view position <= p_q. All segments of a
// view are merged into one softmax with the running (max, sum) pair of an online softmax.
#pragma once

#include "common.cuh"

namespace hogwild {

// How the cache pages are laid out (the op's `packing` argument).
//   kStridedPages: key_cache / value_cache are [num_blocks, block_size, Hkv, D] views with any strides.
//   kAmxPages:     vLLM's `amx` CPU packing (bf16 / fp16, block_size and D multiples of 32): the caches are
//                  [num_blocks, Hkv, block_size, D] tensors whose (block, head) pages are block_size * D contiguous
//                  elements, key (t, d) at (t / 16) * 16 D + (d / 2) * 32 + (t % 16) * 2 + d % 2 and value (t, d) at
//                  (d / 16) * 16 block_size + (t / 2) * 32 + (d % 16) * 2 + t % 2 (hogwild_vllm/ops/layouts.py).
enum PagePacking : int { kStridedPages = 0, kAmxPages = 1 };
constexpr int64_t kAmxAlign = 32;  // block_size and D of amx pages are multiples of this

// Raw view of hogwild_C::hogwild_attention's arguments. Strides count elements. Query, out and cache share one
// element type; the last dim of query, out and value_cache is contiguous; strided keys may be dim-contiguous
// (k_stride_dim == 1) or token-contiguous inside a page (k_stride_token == 1, vLLM's `vec` CPU packing). Amx pages
// have only block and head strides (k_stride_token / k_stride_dim / v_stride_token are 0).
template <typename scalar_t>
struct HogwildAttentionParams {
  const scalar_t* query;  // [num_tokens, num_heads, head_size], rotated at natural positions
  int64_t q_stride_token, q_stride_head;
  scalar_t* out;  // [num_tokens, num_heads, value_size] (written)
  int64_t o_stride_token, o_stride_head;
  float* lse;  // [num_tokens, num_heads] or nullptr (written)
  int64_t lse_stride_token;
  const scalar_t* key_cache;  // [num_blocks, block_size, num_kv_heads, head_size], any strides; or amx pages
  int64_t k_stride_block, k_stride_token, k_stride_head, k_stride_dim;
  const scalar_t* value_cache;  // [num_blocks, block_size, num_kv_heads, value_size], last dim contiguous; or amx
  int64_t v_stride_block, v_stride_token, v_stride_head;
  PagePacking packing;
  const int32_t* block_tables;  // [num_seqs, max_blocks]
  int64_t bt_stride, num_seqs, max_blocks, num_blocks;
  const int32_t* segments;      // [num_segments, 4] contiguous: seq, start, length, view_start
  const int32_t* view_offsets;  // [num_views + 1]
  const int32_t* query_view;    // [num_tokens]
  const int32_t* query_pos;     // [num_tokens, 2] contiguous: natural n_q, view p_q
  int64_t num_segments, num_views;
  const float* cos_sin_table;  // [table_rows, rotary_dim]: cos of delta d's angles, then sin
  int64_t table_rows, table_stride;
  int64_t num_tokens, num_heads, num_kv_heads, head_size, value_size, rotary_dim, block_size;
  float scale;
  bool is_neox;
};

// One segment as read from the table.
struct SegmentRow {
  int32_t seq, start, length, view_start;
};

HOGWILD_HOST_DEVICE HOGWILD_INLINE SegmentRow load_segment(const int32_t* segments, int64_t s) {
  const int32_t* row = segments + 4 * s;
  return SegmentRow{row[0], row[1], row[2], row[3]};
}

// The extra rotation of the query for one segment.
HOGWILD_HOST_DEVICE HOGWILD_INLINE int64_t segment_delta(int64_t n_q, int64_t p_q, const SegmentRow& seg) {
  return (p_q - n_q) - (static_cast<int64_t>(seg.view_start) - seg.start);
}

// How many of the segment's keys (a prefix of it) the query sees: those at view positions <= p_q.
HOGWILD_HOST_DEVICE HOGWILD_INLINE int64_t visible_keys(int64_t p_q, const SegmentRow& seg) {
  const int64_t seen = p_q - seg.view_start + 1;
  return seen <= 0 ? 0 : (seen < seg.length ? seen : seg.length);
}

// True when the segment reads only tokens the table says its sequence has: a bad table must not read out of bounds.
HOGWILD_HOST_DEVICE HOGWILD_INLINE bool segment_in_bounds(const SegmentRow& seg, int64_t num_seqs, int64_t max_blocks,
                                                          int64_t block_size) {
  return seg.seq >= 0 && seg.seq < num_seqs && seg.start >= 0 && seg.length >= 0 && seg.view_start >= 0 &&
         static_cast<int64_t>(seg.start) + seg.length <= max_blocks * block_size;
}

// out = R(delta) q * scale, in fp32, for one head of head_size dims; dims past rotary_dim are only scaled.
// row: the cos/sin row of |delta| (see cos_sin_row in rotate_by_delta.cuh).
HOGWILD_HOST_DEVICE HOGWILD_INLINE void rotate_scaled(const float* q, float* out, int64_t head_size, int64_t rotary_dim,
                                                      bool is_neox, const float* cos, const float* sin, float sin_sign,
                                                      float scale) {
  const int64_t half = rotary_dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    const int64_t i1 = is_neox ? i : 2 * i;
    const int64_t i2 = is_neox ? i + half : 2 * i + 1;
    const float c = cos[i], s = sin_sign * sin[i];
    out[i1] = (q[i1] * c - q[i2] * s) * scale;
    out[i2] = (q[i2] * c + q[i1] * s) * scale;
  }
  for (int64_t i = rotary_dim; i < head_size; ++i) out[i] = q[i] * scale;
}

// Running state of an online softmax over the keys seen so far: max score m, sum of exp(score - m) l.
// Scores are natural-log-scale (already multiplied by the softmax scale); lse = m + log(l).
struct SoftmaxState {
  float m;
  float l;
};

}  // namespace hogwild

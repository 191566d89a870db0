// Argument checks and raw-parameter extraction for hogwild_C::hogwild_attention (shapes, dtypes, devices, strides).
// Values inside the tables are not read here (that would synchronize a GPU); the kernels bound-check as they read.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "device/hogwild_attention.cuh"

namespace hogwild {

inline void check_int32(const at::Tensor& t, const char* name, int64_t dims, c10::Device device) {
  TORCH_CHECK(t.dim() == dims, "hogwild_attention: ", name, " must be ", dims, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kInt, "hogwild_attention: ", name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, "hogwild_attention: ", name, " is on ", t.device(), ", the query on ", device);
}

// The cache's sizes, wherever the packing puts them.
struct CacheShape {
  int64_t num_blocks, block_size, num_kv_heads, value_size;
};

inline CacheShape cache_shape(const at::Tensor& key_cache, const at::Tensor& value_cache, int64_t packing) {
  if (packing == kAmxPages) {  // [num_blocks, Hkv, block_size, D]
    return {key_cache.size(0), key_cache.size(2), key_cache.size(1), value_cache.size(3)};
  }
  return {key_cache.size(0), key_cache.size(1), key_cache.size(2), value_cache.size(3)};
}

// packing 0: strided [num_blocks, block_size, Hkv, D] views, keys contiguous along the dim or a page's tokens.
inline void check_strided_caches(const at::Tensor& key_cache, const at::Tensor& value_cache, int64_t head_size) {
  // key_cache: [num_blocks, block_size, Hkv, D]; value_cache: [num_blocks, block_size, Hkv, Dv]
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.size(3) == head_size,
              "hogwild_attention: key_cache must be [num_blocks, block_size, Hkv, D = ", head_size, "], got shape ",
              key_cache.sizes());
  TORCH_CHECK(value_cache.dim() == 4 && value_cache.sizes().slice(0, 3) == key_cache.sizes().slice(0, 3),
              "hogwild_attention: value_cache must be [num_blocks, block_size, Hkv, Dv] like key_cache, got ",
              value_cache.sizes(), " and ", key_cache.sizes());
  TORCH_CHECK(key_cache.stride(3) == 1 || key_cache.stride(1) == 1,
              "hogwild_attention: keys must be contiguous along the dim or along the tokens of a page, strides ",
              key_cache.strides());
  TORCH_CHECK(value_cache.stride(3) == 1, "hogwild_attention: value_cache needs a contiguous last dim");
}

// packing 1: vLLM's amx pages [num_blocks, Hkv, block_size, D], each (block, head) page contiguous.
inline void check_amx_pages(const at::Tensor& key_cache, const at::Tensor& value_cache, int64_t head_size) {
  // key_cache, value_cache: [num_blocks, Hkv, block_size, D]
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.size(3) == head_size && value_cache.sizes() == key_cache.sizes(),
              "hogwild_attention: amx pages must be key_cache and value_cache [num_blocks, Hkv, block_size, D = ",
              head_size, "] (value size = D), got ", key_cache.sizes(), " and ", value_cache.sizes());
  TORCH_CHECK(key_cache.scalar_type() == at::kBFloat16 || key_cache.scalar_type() == at::kHalf,
              "hogwild_attention: amx pages must be bfloat16 or float16, got ", key_cache.scalar_type());
  TORCH_CHECK(key_cache.size(2) % kAmxAlign == 0 && head_size % kAmxAlign == 0, "hogwild_attention: amx pages need "
              "block_size and D multiples of ", kAmxAlign, ", got block_size ", key_cache.size(2), ", D ", head_size);
  for (const at::Tensor* t : {&key_cache, &value_cache}) {
    TORCH_CHECK(t->stride(3) == 1 && t->stride(2) == head_size, "hogwild_attention: each amx page must be "
                "contiguous (strides [*, *, D, 1]), got strides ", t->strides());
  }
}

inline void check_hogwild_attention_args(const at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                                         const at::Tensor& value_cache, const at::Tensor& block_tables,
                                         const at::Tensor& segments, const at::Tensor& view_offsets,
                                         const at::Tensor& query_view, const at::Tensor& query_pos,
                                         const at::Tensor& cos_sin_table, int64_t rotary_dim,
                                         const std::optional<at::Tensor>& lse, int64_t packing,
                                         c10::DeviceType device_type) {
  // query: [T, Hq, D]; out: [T, Hq, Dv]
  TORCH_CHECK(query.dim() == 3, "hogwild_attention: query must be [T, Hq, D], got shape ", query.sizes());
  TORCH_CHECK(query.device().type() == device_type, "hogwild_attention: query is on ", query.device());
  TORCH_CHECK(query.scalar_type() == at::kFloat || query.scalar_type() == at::kBFloat16 ||
                  query.scalar_type() == at::kHalf,
              "hogwild_attention: query must be float32, bfloat16 or float16, got ", query.scalar_type());
  const c10::Device device = query.device();
  const int64_t num_tokens = query.size(0), num_heads = query.size(1), head_size = query.size(2);
  for (const at::Tensor* t : {&key_cache, &value_cache, &out}) {
    TORCH_CHECK(t->scalar_type() == query.scalar_type(), "hogwild_attention: cache and out dtypes must be the "
                "query's (", query.scalar_type(), "), got ", t->scalar_type());
    TORCH_CHECK(t->device() == device, "hogwild_attention: a cache or out is on ", t->device(), ", query on ", device);
  }
  TORCH_CHECK(packing == kStridedPages || packing == kAmxPages, "hogwild_attention: packing must be 0 (strided "
              "[num_blocks, block_size, Hkv, D] views) or 1 (vLLM's amx pages), got ", packing);
  if (packing == kAmxPages) {
    check_amx_pages(key_cache, value_cache, head_size);
  } else {
    check_strided_caches(key_cache, value_cache, head_size);
  }
  const CacheShape cache = cache_shape(key_cache, value_cache, packing);
  const int64_t num_kv_heads = cache.num_kv_heads, value_size = cache.value_size;
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "hogwild_attention: ", num_heads,
              " query heads are not a multiple of ", num_kv_heads, " KV heads");
  TORCH_CHECK(query.stride(2) == 1, "hogwild_attention: query needs a contiguous last dim");
  TORCH_CHECK(out.dim() == 3 && out.size(0) == num_tokens && out.size(1) == num_heads && out.size(2) == value_size &&
                  out.stride(2) == 1,
              "hogwild_attention: out must be [T, Hq, Dv] = [", num_tokens, ", ", num_heads, ", ", value_size,
              "] with a contiguous last dim, got shape ", out.sizes(), " strides ", out.strides());
  // block_tables: [num_seqs, max_blocks] int32, rows contiguous
  check_int32(block_tables, "block_tables", 2, device);
  TORCH_CHECK(block_tables.size(1) <= 1 || block_tables.stride(1) == 1, "hogwild_attention: block_tables rows must "
              "be contiguous");
  // segments: [S, 4]; view_offsets: [V + 1]; query_view: [T]; query_pos: [T, 2]; all contiguous int32
  check_int32(segments, "segments", 2, device);
  check_int32(view_offsets, "view_offsets", 1, device);
  check_int32(query_view, "query_view", 1, device);
  check_int32(query_pos, "query_pos", 2, device);
  TORCH_CHECK(segments.size(1) == 4, "hogwild_attention: segments must be [S, 4], got ", segments.sizes());
  TORCH_CHECK(view_offsets.size(0) >= 1, "hogwild_attention: view_offsets must be [V + 1]");
  TORCH_CHECK(query_view.size(0) == num_tokens && query_pos.size(0) == num_tokens && query_pos.size(1) == 2,
              "hogwild_attention: query_view must be [T] and query_pos [T, 2] with T = ", num_tokens);
  for (const at::Tensor* t : {&segments, &view_offsets, &query_view, &query_pos}) {
    TORCH_CHECK(t->is_contiguous(), "hogwild_attention: the segment table tensors must be contiguous");
  }
  // cos_sin_table: [rows, rotary_dim] fp32
  TORCH_CHECK(cos_sin_table.dim() == 2 && cos_sin_table.size(1) == rotary_dim &&
                  cos_sin_table.scalar_type() == at::kFloat && cos_sin_table.device() == device &&
                  cos_sin_table.stride(1) == 1,
              "hogwild_attention: cos_sin_table must be [rows, rotary_dim = ", rotary_dim, "] float32 on ", device);
  TORCH_CHECK(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= head_size,
              "hogwild_attention: rotary_dim must be even and in (0, head_size = ", head_size, "], got ", rotary_dim);
  if (lse.has_value()) {
    // lse: [T, Hq] fp32
    TORCH_CHECK(lse->dim() == 2 && lse->size(0) == num_tokens && lse->size(1) == num_heads &&
                    lse->scalar_type() == at::kFloat && lse->device() == device && lse->stride(1) == 1,
                "hogwild_attention: lse must be [T, Hq] float32 with a contiguous last dim, got ", lse->sizes());
  }
}

template <typename scalar_t>
HogwildAttentionParams<scalar_t> make_hogwild_attention_params(
    at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
    const at::Tensor& block_tables, const at::Tensor& segments, const at::Tensor& view_offsets,
    const at::Tensor& query_view, const at::Tensor& query_pos, const at::Tensor& cos_sin_table, int64_t rotary_dim,
    bool is_neox, double scale, const std::optional<at::Tensor>& lse, int64_t packing) {
  const CacheShape cache = cache_shape(key_cache, value_cache, packing);
  const bool amx = packing == kAmxPages;  // amx pages: [num_blocks, Hkv, block_size, D], no token or dim strides
  HogwildAttentionParams<scalar_t> p;
  p.query = reinterpret_cast<const scalar_t*>(query.data_ptr());
  p.q_stride_token = query.stride(0);
  p.q_stride_head = query.stride(1);
  p.out = reinterpret_cast<scalar_t*>(out.data_ptr());
  p.o_stride_token = out.stride(0);
  p.o_stride_head = out.stride(1);
  p.lse = lse.has_value() ? lse->data_ptr<float>() : nullptr;
  p.lse_stride_token = lse.has_value() ? lse->stride(0) : 0;
  p.key_cache = reinterpret_cast<const scalar_t*>(key_cache.data_ptr());
  p.k_stride_block = key_cache.stride(0);
  p.k_stride_token = amx ? 0 : key_cache.stride(1);
  p.k_stride_head = key_cache.stride(amx ? 1 : 2);
  p.k_stride_dim = amx ? 0 : key_cache.stride(3);
  p.value_cache = reinterpret_cast<const scalar_t*>(value_cache.data_ptr());
  p.v_stride_block = value_cache.stride(0);
  p.v_stride_token = amx ? 0 : value_cache.stride(1);
  p.v_stride_head = value_cache.stride(amx ? 1 : 2);
  p.packing = amx ? kAmxPages : kStridedPages;
  p.block_tables = block_tables.data_ptr<int32_t>();
  p.bt_stride = block_tables.stride(0);
  p.num_seqs = block_tables.size(0);
  p.max_blocks = block_tables.size(1);
  p.num_blocks = cache.num_blocks;
  p.segments = segments.data_ptr<int32_t>();
  p.view_offsets = view_offsets.data_ptr<int32_t>();
  p.query_view = query_view.data_ptr<int32_t>();
  p.query_pos = query_pos.data_ptr<int32_t>();
  p.num_segments = segments.size(0);
  p.num_views = view_offsets.size(0) - 1;
  p.cos_sin_table = cos_sin_table.data_ptr<float>();
  p.table_rows = cos_sin_table.size(0);
  p.table_stride = cos_sin_table.stride(0);
  p.num_tokens = query.size(0);
  p.num_heads = query.size(1);
  p.num_kv_heads = cache.num_kv_heads;
  p.head_size = query.size(2);
  p.value_size = cache.value_size;
  p.rotary_dim = rotary_dim;
  p.block_size = cache.block_size;
  p.scale = static_cast<float>(scale);
  p.is_neox = is_neox;
  return p;
}

}  // namespace hogwild

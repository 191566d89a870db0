// Argument checks and raw-parameter extraction for hogwild_C::rotate_by_delta, shared by the CPU and CUDA launchers.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <c10/util/Exception.h>

#include "device/rotate_by_delta.cuh"

namespace hogwild {

// Validates everything that does not need to read tensor data. device_type: where the launcher runs.
inline void check_rotate_by_delta_args(const at::Tensor& x, const at::Tensor& delta, const at::Tensor& cos_sin_table,
                                       int64_t rotary_dim, c10::DeviceType device_type) {
  // x: [num_tokens, num_heads, head_size]
  TORCH_CHECK(x.dim() == 3, "rotate_by_delta: x must be [num_tokens, num_heads, head_size], got shape ", x.sizes());
  TORCH_CHECK(x.device().type() == device_type, "rotate_by_delta: x is on ", x.device(), ", expected ", device_type);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "rotate_by_delta: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  // x[t][h][:]: contiguous (rotated in place, so no copy can stand in for it)
  TORCH_CHECK(x.size(2) <= 1 || x.stride(2) == 1, "rotate_by_delta: x's last dim must be contiguous, strides ",
              x.strides());
  at::assert_no_internal_overlap(x);
  // rotary_dim: even, 0 < rotary_dim <= head_size
  TORCH_CHECK(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= x.size(2),
              "rotate_by_delta: rotary_dim must be even and in (0, head_size = ", x.size(2), "], got ", rotary_dim);
  // delta: [num_tokens], int64, on x's device
  TORCH_CHECK(delta.dim() == 1 && delta.size(0) == x.size(0), "rotate_by_delta: delta must be [num_tokens = ",
              x.size(0), "], got shape ", delta.sizes());
  TORCH_CHECK(delta.scalar_type() == at::kLong, "rotate_by_delta: delta must be int64, got ", delta.scalar_type());
  TORCH_CHECK(delta.device() == x.device(), "rotate_by_delta: delta is on ", delta.device(), ", x on ", x.device());
  // cos_sin_table: [table_rows, rotary_dim], float32, on x's device
  TORCH_CHECK(cos_sin_table.dim() == 2 && cos_sin_table.size(1) == rotary_dim,
              "rotate_by_delta: cos_sin_table must be [table_rows, rotary_dim = ", rotary_dim, "], got shape ",
              cos_sin_table.sizes());
  TORCH_CHECK(cos_sin_table.scalar_type() == at::kFloat, "rotate_by_delta: cos_sin_table must be float32, got ",
              cos_sin_table.scalar_type());
  TORCH_CHECK(cos_sin_table.device() == x.device(), "rotate_by_delta: cos_sin_table is on ", cos_sin_table.device(),
              ", x on ", x.device());
}

// |delta[t]| < table_rows for every t. Reads delta: on CUDA this synchronizes with the current stream.
inline void check_delta_range(const at::Tensor& delta, int64_t table_rows) {
  if (delta.numel() == 0) return;
  const auto [lo, hi] = at::aminmax(delta);
  const int64_t min_delta = lo.item<int64_t>();
  const int64_t max_delta = hi.item<int64_t>();
  TORCH_CHECK(min_delta > -table_rows && max_delta < table_rows, "rotate_by_delta: delta must lie in (-",
              table_rows, ", ", table_rows, ") (the cos_sin_table rows), got values in [", min_delta, ", ", max_delta,
              "]");
}

// storage_t: the element type the device code sees (float, c10::Half, __half, ...), same bit layout as x's dtype.
// delta and cos_sin_table must be contiguous (the launchers pass .contiguous() copies).
template <typename storage_t>
RotateByDeltaParams<storage_t> make_rotate_by_delta_params(at::Tensor& x, const at::Tensor& delta,
                                                           const at::Tensor& cos_sin_table, int64_t rotary_dim) {
  TORCH_CHECK(delta.is_contiguous() && cos_sin_table.is_contiguous(), "rotate_by_delta: internal: expected contiguous");
  RotateByDeltaParams<storage_t> p;
  p.x = reinterpret_cast<storage_t*>(x.data_ptr());
  p.delta = delta.data_ptr<int64_t>();
  p.cos_sin_table = cos_sin_table.data_ptr<float>();
  p.num_tokens = x.size(0);
  p.num_heads = x.size(1);
  p.rotary_dim = rotary_dim;
  p.x_stride_token = x.stride(0);
  p.x_stride_head = x.stride(1);
  p.table_rows = cos_sin_table.size(0);
  p.table_stride = cos_sin_table.stride(0);
  return p;
}

}  // namespace hogwild

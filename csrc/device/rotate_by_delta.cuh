// Rotary re-rotation of cached keys by a per-token position delta: device/host math, no torch headers.
//
// A key stored after RoPE at position p becomes the key at position p + delta when rotated by delta, because
// rotations compose: R(p + delta) = R(delta) R(p). Pairs of dims are rotated in fp32:
//   out1 = x1 * cos - x2 * sin,  out2 = x2 * cos + x1 * sin
// neox style pairs (i, i + rotary_dim / 2), gpt-j style pairs (2i, 2i + 1), for 0 <= i < rotary_dim / 2.
// Dims at and past rotary_dim are left untouched.
#pragma once

#include "common.cuh"

namespace hogwild {

// Raw view of hogwild_C::rotate_by_delta's arguments; strides count elements, not bytes.
template <typename scalar_t>
struct RotateByDeltaParams {
  scalar_t* x;                 // [num_tokens, num_heads, head_size]; x[t][h][i] = x[t * x_stride_token + h * x_stride_head + i]
  const int64_t* delta;        // [num_tokens], contiguous, signed
  const float* cos_sin_table;  // [table_rows, rotary_dim]: row d holds cos(angle(d)) then sin(angle(d)), rotary_dim / 2 each
  int64_t num_tokens;
  int64_t num_heads;
  int64_t rotary_dim;          // even, 0 < rotary_dim <= head_size
  int64_t x_stride_token;
  int64_t x_stride_head;
  int64_t table_rows;
  int64_t table_stride;        // elements between consecutive table rows
};

// The cos/sin row for a signed delta: rotating by -d uses cos(d) and -sin(d).
struct CosSinRow {
  const float* cos;  // [rotary_dim / 2]
  const float* sin;  // [rotary_dim / 2]
  float sin_sign;    // +1 or -1
};

// False when |delta| is outside the table (the launchers reject that before launching; this keeps reads in bounds).
HOGWILD_HOST_DEVICE HOGWILD_INLINE bool cos_sin_row(const float* table, int64_t table_rows, int64_t table_stride,
                                                    int64_t rotary_dim, int64_t delta, CosSinRow* row) {
  if (delta <= -table_rows || delta >= table_rows) return false;
  const int64_t d = delta < 0 ? -delta : delta;
  row->cos = table + d * table_stride;
  row->sin = row->cos + rotary_dim / 2;
  row->sin_sign = delta < 0 ? -1.0f : 1.0f;
  return true;
}

// Rotates pair i (0 <= i < half = rotary_dim / 2) of one head in place.
template <typename scalar_t, bool kIsNeox>
HOGWILD_HOST_DEVICE HOGWILD_INLINE void rotate_pair(scalar_t* head, int64_t i, int64_t half, float cos, float sin) {
  const int64_t i1 = kIsNeox ? i : 2 * i;
  const int64_t i2 = kIsNeox ? i + half : 2 * i + 1;
  const float x1 = to_float(head[i1]);
  const float x2 = to_float(head[i2]);
  head[i1] = from_float<scalar_t>(x1 * cos - x2 * sin);
  head[i2] = from_float<scalar_t>(x2 * cos + x1 * sin);
}

// Rotates head h of token t in place (the CPU implementation's unit of work).
template <typename scalar_t, bool kIsNeox>
HOGWILD_HOST_DEVICE HOGWILD_INLINE void rotate_head(const RotateByDeltaParams<scalar_t>& p, int64_t t, int64_t h) {
  CosSinRow row;
  if (!cos_sin_row(p.cos_sin_table, p.table_rows, p.table_stride, p.rotary_dim, p.delta[t], &row)) return;
  scalar_t* head = p.x + t * p.x_stride_token + h * p.x_stride_head;
  const int64_t half = p.rotary_dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    rotate_pair<scalar_t, kIsNeox>(head, i, half, row.cos[i], row.sin_sign * row.sin[i]);
  }
}

#if defined(__CUDACC__)
// Grid: one block per token. The block's threads stride over (head, pair) of that token.
template <typename scalar_t, bool kIsNeox>
__global__ void rotate_by_delta_kernel(RotateByDeltaParams<scalar_t> p) {
  const int64_t t = blockIdx.x;
  CosSinRow row;
  if (!cos_sin_row(p.cos_sin_table, p.table_rows, p.table_stride, p.rotary_dim, p.delta[t], &row)) return;
  scalar_t* token = p.x + t * p.x_stride_token;
  const int64_t half = p.rotary_dim / 2;
  for (int64_t j = threadIdx.x; j < p.num_heads * half; j += blockDim.x) {
    const int64_t h = j / half;
    const int64_t i = j - h * half;
    rotate_pair<scalar_t, kIsNeox>(token + h * p.x_stride_head, i, half, row.cos[i], row.sin_sign * row.sin[i]);
  }
}
#endif

}  // namespace hogwild

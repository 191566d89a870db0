// Launchers of the hogwild_C ops, one per device. Schemas live in torch_bindings.cpp; the CPU implementations are
// registered there and the CUDA ones in their own .cu files (built only with a CUDA toolchain and a CUDA torch).
#pragma once

#include <ATen/core/Tensor.h>

// hogwild_C::rotate_by_delta(Tensor! x, Tensor delta, Tensor cos_sin_table, int rotary_dim, bool is_neox) -> ()
// In place: rotates the first rotary_dim dims of every head of x[t] by delta[t] positions.
//   x:             [num_tokens, num_heads, head_size], fp32 / bf16 / fp16, last dim contiguous (modified)
//   delta:         [num_tokens], int64, signed, |delta| < table_rows
//   cos_sin_table: [table_rows, rotary_dim], fp32: cos(angle(d)) then sin(angle(d)) for d = 0 .. table_rows - 1
void rotate_by_delta_cpu(at::Tensor& x, const at::Tensor& delta, const at::Tensor& cos_sin_table, int64_t rotary_dim,
                         bool is_neox);

#if defined(HOGWILD_WITH_CUDA)
void rotate_by_delta_cuda(at::Tensor& x, const at::Tensor& delta, const at::Tensor& cos_sin_table, int64_t rotary_dim,
                          bool is_neox);
#endif

// CUDA launcher of hogwild_C::rotate_by_delta: validates, then launches the device kernel on the current stream.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../device/rotate_by_delta.cuh"
#include "../ops.h"
#include "../rotate_by_delta_args.h"

namespace {

constexpr int64_t kMaxThreadsPerBlock = 512;
constexpr int64_t kWarpSize = 32;

// cuda_t: CUDA's type with the same bit layout as x's dtype (float, __half, __nv_bfloat16).
template <typename cuda_t>
void launch(at::Tensor& x, const at::Tensor& delta, const at::Tensor& cos_sin_table, int64_t rotary_dim,
            bool is_neox) {
  const auto p = hogwild::make_rotate_by_delta_params<cuda_t>(x, delta, cos_sin_table, rotary_dim);
  const int64_t pairs_per_token = p.num_heads * (rotary_dim / 2);
  const int64_t threads = std::min(kMaxThreadsPerBlock, (pairs_per_token + kWarpSize - 1) / kWarpSize * kWarpSize);
  const dim3 grid(static_cast<unsigned int>(p.num_tokens));  // one block per token
  const dim3 block(static_cast<unsigned int>(threads));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (is_neox) {
    hogwild::rotate_by_delta_kernel<cuda_t, true><<<grid, block, 0, stream>>>(p);
  } else {
    hogwild::rotate_by_delta_kernel<cuda_t, false><<<grid, block, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void rotate_by_delta_cuda(at::Tensor& x, const at::Tensor& delta, const at::Tensor& cos_sin_table, int64_t rotary_dim,
                          bool is_neox) {
  hogwild::check_rotate_by_delta_args(x, delta, cos_sin_table, rotary_dim, c10::DeviceType::CUDA);
  const c10::cuda::OptionalCUDAGuard device_guard(x.device());
  const at::Tensor delta_c = delta.contiguous();          // [num_tokens]
  const at::Tensor table_c = cos_sin_table.contiguous();  // [table_rows, rotary_dim]
  // Synchronizes (reads delta on the host); the attention ops that come later trust their metadata instead.
  hogwild::check_delta_range(delta_c, table_c.size(0));
  if (x.numel() == 0) return;
  TORCH_CHECK(x.size(0) <= static_cast<int64_t>(std::numeric_limits<int>::max()),
              "rotate_by_delta: too many tokens for one grid: ", x.size(0));
  switch (x.scalar_type()) {
    case at::kFloat:
      launch<float>(x, delta_c, table_c, rotary_dim, is_neox);
      break;
    case at::kBFloat16:
      launch<__nv_bfloat16>(x, delta_c, table_c, rotary_dim, is_neox);
      break;
    case at::kHalf:
      launch<__half>(x, delta_c, table_c, rotary_dim, is_neox);
      break;
    default:
      TORCH_CHECK(false, "rotate_by_delta: unsupported dtype ", x.scalar_type());
  }
}

TORCH_LIBRARY_IMPL(hogwild_C, CUDA, m) { m.impl("rotate_by_delta", &rotate_by_delta_cuda); }

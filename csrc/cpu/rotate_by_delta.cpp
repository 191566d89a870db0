// CPU launcher of hogwild_C::rotate_by_delta: validates, then runs the shared device/host math over (token, head).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "../ops.h"
#include "../rotate_by_delta_args.h"

namespace {

// Work items of about this many rotated pairs per parallel task.
constexpr int64_t kPairsPerTask = 4096;

template <typename scalar_t, bool kIsNeox>
void rotate_all_heads(const hogwild::RotateByDeltaParams<scalar_t>& p) {
  const int64_t num_heads = p.num_heads;
  const int64_t grain = std::max<int64_t>(1, kPairsPerTask / (p.rotary_dim / 2));
  at::parallel_for(0, p.num_tokens * num_heads, grain, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      hogwild::rotate_head<scalar_t, kIsNeox>(p, j / num_heads, j % num_heads);
    }
  });
}

template <typename scalar_t>
void launch(at::Tensor& x, const at::Tensor& delta, const at::Tensor& cos_sin_table, int64_t rotary_dim,
            bool is_neox) {
  const auto p = hogwild::make_rotate_by_delta_params<scalar_t>(x, delta, cos_sin_table, rotary_dim);
  if (is_neox) {
    rotate_all_heads<scalar_t, true>(p);
  } else {
    rotate_all_heads<scalar_t, false>(p);
  }
}

}  // namespace

void rotate_by_delta_cpu(at::Tensor& x, const at::Tensor& delta, const at::Tensor& cos_sin_table, int64_t rotary_dim,
                         bool is_neox) {
  hogwild::check_rotate_by_delta_args(x, delta, cos_sin_table, rotary_dim, c10::DeviceType::CPU);
  const at::Tensor delta_c = delta.contiguous();          // [num_tokens]
  const at::Tensor table_c = cos_sin_table.contiguous();  // [table_rows, rotary_dim]
  hogwild::check_delta_range(delta_c, table_c.size(0));
  if (x.numel() == 0) return;
  switch (x.scalar_type()) {
    case at::kFloat:
      launch<float>(x, delta_c, table_c, rotary_dim, is_neox);
      break;
    case at::kBFloat16:
      launch<c10::BFloat16>(x, delta_c, table_c, rotary_dim, is_neox);
      break;
    case at::kHalf:
      launch<c10::Half>(x, delta_c, table_c, rotary_dim, is_neox);
      break;
    default:
      TORCH_CHECK(false, "rotate_by_delta: unsupported dtype ", x.scalar_type());
  }
}

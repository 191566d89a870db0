// Instantiates every device kernel and host/device helper for each storage type, so that plain nvcc (no torch
// headers) proves the device code compiles for the archs CI checks. Compiled by scripts/nvcc_check.sh only; not part
// of the extension build (setup.py builds csrc/cuda/*.cu).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "device/common.cuh"
#include "device/rotate_by_delta.cuh"

namespace hogwild {

#define HOGWILD_INSTANTIATE_ROTATE_BY_DELTA(T, NEOX)                                                          \
  template __global__ void rotate_by_delta_kernel<T, NEOX>(RotateByDeltaParams<T>);                          \
  template HOGWILD_HOST_DEVICE void rotate_head<T, NEOX>(const RotateByDeltaParams<T>&, int64_t, int64_t);

HOGWILD_INSTANTIATE_ROTATE_BY_DELTA(float, true)
HOGWILD_INSTANTIATE_ROTATE_BY_DELTA(float, false)
HOGWILD_INSTANTIATE_ROTATE_BY_DELTA(__half, true)
HOGWILD_INSTANTIATE_ROTATE_BY_DELTA(__half, false)
HOGWILD_INSTANTIATE_ROTATE_BY_DELTA(__nv_bfloat16, true)
HOGWILD_INSTANTIATE_ROTATE_BY_DELTA(__nv_bfloat16, false)

#undef HOGWILD_INSTANTIATE_ROTATE_BY_DELTA

}  // namespace hogwild

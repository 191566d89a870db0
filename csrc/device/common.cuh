// Helpers shared by host (g++) and device (nvcc) code.
//
// Everything under csrc/device/ includes NO torch headers: it takes raw pointers and strides, so it compiles with
// plain nvcc (scripts/nvcc_check.sh) and with the host compiler for the CPU implementation.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define HOGWILD_HOST_DEVICE __host__ __device__
#define HOGWILD_INLINE __forceinline__
#else
#define HOGWILD_HOST_DEVICE
#define HOGWILD_INLINE inline
#endif

namespace hogwild {

// fp32 <-> storage type. The generic version covers float and any type with conversions to and from float
// (c10::Half and c10::BFloat16 on the CPU path, both rounding to nearest even).
template <typename T>
struct FloatConvert {
  static HOGWILD_HOST_DEVICE HOGWILD_INLINE float to_float(T v) { return static_cast<float>(v); }
  static HOGWILD_HOST_DEVICE HOGWILD_INLINE T from_float(float v) { return static_cast<T>(v); }
};

#if defined(__CUDACC__)
// CUDA's own half types (same bit layout as c10::Half / c10::BFloat16; the launcher reinterprets the pointer).
template <>
struct FloatConvert<__half> {
  static HOGWILD_HOST_DEVICE HOGWILD_INLINE float to_float(__half v) { return __half2float(v); }
  static HOGWILD_HOST_DEVICE HOGWILD_INLINE __half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct FloatConvert<__nv_bfloat16> {
  static HOGWILD_HOST_DEVICE HOGWILD_INLINE float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static HOGWILD_HOST_DEVICE HOGWILD_INLINE __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};
#endif

template <typename T>
HOGWILD_HOST_DEVICE HOGWILD_INLINE float to_float(T v) {
  return FloatConvert<T>::to_float(v);
}

template <typename T>
HOGWILD_HOST_DEVICE HOGWILD_INLINE T from_float(float v) {
  return FloatConvert<T>::from_float(v);
}

}  // namespace hogwild

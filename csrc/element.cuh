// Element access shared by the .cu files: float conversions of every element type the kernels take, and loads of
// small operands (factors, vectors) whose dtype is known only at run time; and the launchers' two host helpers.
// Torch-free, as the .cu files are.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "peftkern.h"

namespace peftkern {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(double v) { return static_cast<float>(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_float<double>(float v) { return static_cast<double>(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// The adapters come in any float dtype; they are small, so a uniform branch per element is cheap.
__device__ __forceinline__ float load_any(const void* p, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kFloat16: return to_float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return to_float(static_cast<const __nv_bfloat16*>(p)[i]);
    case DType::kFloat64: return to_float(static_cast<const double*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether p may be read or written in 16-byte vectors
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace peftkern

// The bottleneck adapter around cuBLAS: the four skinny products of each direction stay in cuBLAS (called from
// adapter_bindings.cpp through ATen), as in the Triton backend's gemm-first schedule; these kernels are everything
// around them, one pass each.
//
// Math (h: M x d, Wd: b x d, Wu: d x b, s = scaling [* learned scale], r = h (sequential) or a given tensor
// (parallel); LN optional, on the adapter's input, folded into the down weight: W' = Wd gamma, c1 = W' 1,
// c2 = Wd beta, so that LN(h) Wd^T = rstd (h W'^T - mean c1) + c2 and no normalised copy of h is written):
//   forward   stats = (mean, rstd) of each row                adapter_row_stats_kernel (LN)
//             W', c1, c2                                      adapter_fold_ln_kernel (LN; b x d, small)
//             acc = h W'^T                                    cuBLAS, float32 result
//             z = [rstd (acc - mean c1) + c2] + bd, in place  adapter_forward_rows_kernel, which also writes
//             a = act(z) [* learned] in h's dtype             a for the up projection
//             out = r + s bu                                  adapter_residual_kernel
//             out += scaling a Wu^T                           cuBLAS with beta = 1 (reads out in its epilogue)
//   backward  gu = g [Wu, bu]                                 cuBLAS, float32 (the bu column: the learned scale's)
//             dz = s act'(z) gu, a = [act(z), 1], LN's row    adapter_backward_rows_kernel: one pass over z and gu;
//             terms, dz rstd, and the sums over M             its sums over M go through per-block partials that
//                                                             adapter_sum_partials_kernel adds in a fixed order
//             dh = dz Wd [+ g]                                cuBLAS (beta = 1 onto g for the sequential form), or
//             dh = rstd (dz W' - r1 - xhat r2) [+ g]          under LN: cuBLAS dz W' in float32, then
//                                                             adapter_ln_backward_kernel
//             dWu, dbu = s g^T [a, 1]; dWd = dz^T h, or       cuBLAS (and ATen on b x d tensors: the LN fold's
//             (dz rstd)^T h - (dz rstd)^T mean under LN       gamma, beta, dgamma, dbeta)
//
// Traffic (bf16, M = 8192, d = 4096, b = 256; one (M, d) pass is 64 MiB, an (M, b) operand 4-8 MiB): the forward
// reads h in cuBLAS's product, r in adapter_residual_kernel and writes out there, and cuBLAS reads and writes out once
// more: 5 passes (6 with LN's statistics), about 350 MiB with the (M, b) operands, against the floor's 2 (read h, write
// out). The backward reads g in g [Wu, bu] and in g^T [a, 1], h in dz^T h, and writes dh: parallel 4 passes; the
// sequential form's dh = g + dz Wd (ATen's addmm copies g into dh, then cuBLAS reads and writes it) 7, ~490 MiB; under
// LN dz W' is written and read in float32 (4 passes' bytes) and adapter_ln_backward_kernel reads h (and g) and writes
// dh: 10 (parallel 9). The floor is 3 (read g and h, write dh). Every (M, d) kernel moves 16-byte vectors where its
// pointers and row strides allow.
//
// Numerics follow kernels/triton/adapter.py: z in float32; a, dz and dz rstd rounded to h's dtype for the tensor-core
// products; the LN statistics summed shifted by the row's first element; LN's mean_d(dz W') taken from the rounded dz
// that cuBLAS reads, so that it cancels against dz W' as the GEMM summed it. Activations are reference.py's formulas
// (gelu through erf, gelu_tanh through sigmoid(2u), silu), with ReLU keeping a NaN as torch.relu does.

#include <cstdint>
#include <cstring>
#include <initializer_list>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "adapter.h"
#include "element.cuh"

namespace peftkern {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxGridBlocks = 65535 * 8;  // grid-stride loops cover the rest
constexpr int kRowsMaxWarps = kThreads / 32;
constexpr int kRowsPerBlockMax = 32;

template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements of a 16-byte vector

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// VEC elements from src as floats: 16-byte loads when VEC > 1 (the caller checked the alignment), else one scalar.
template <typename T, int VEC>
__device__ __forceinline__ void load_floats(const T* src, float (&v)[VEC]) {
  if constexpr (VEC == 1) {
    v[0] = to_float(*src);
  } else {
    constexpr int kBytes = VEC * static_cast<int>(sizeof(T));
    static_assert(kBytes % 16 == 0, "whole 16-byte vectors");
    T e[VEC];
#pragma unroll
    for (int q = 0; q < kBytes / 16; ++q) {
      const uint4 raw = reinterpret_cast<const uint4*>(src)[q];
      memcpy(reinterpret_cast<char*>(e) + 16 * q, &raw, 16);
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = to_float(e[i]);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_floats(T* dst, const float (&v)[VEC]) {
  if constexpr (VEC == 1) {
    *dst = from_float<T>(v[0]);
  } else {
    constexpr int kBytes = VEC * static_cast<int>(sizeof(T));
    static_assert(kBytes % 16 == 0, "whole 16-byte vectors");
    T e[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) e[i] = from_float<T>(v[i]);
#pragma unroll
    for (int q = 0; q < kBytes / 16; ++q) {
      uint4 raw;
      memcpy(&raw, reinterpret_cast<const char*>(e) + 16 * q, 16);
      reinterpret_cast<uint4*>(dst)[q] = raw;
    }
  }
}

struct Activated {
  float value, grad;
};

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// reference.adapter_activation: (act(z), act'(z)) in float32.
__device__ __forceinline__ Activated activate(float z, AdapterActivation activation) {
  switch (activation) {
    case AdapterActivation::kRelu:
      // a NaN stays NaN, as in torch.relu (fmaxf would return the 0 beside it); its gradient is 0, as clamp_min's
      return {(z > 0.0f || z != z) ? z : 0.0f, z > 0.0f ? 1.0f : 0.0f};
    case AdapterActivation::kGelu: {
      const float cdf = 0.5f * (1.0f + erff(z * 0.7071067811865476f));
      return {z * cdf, cdf + z * expf(-0.5f * z * z) * 0.3989422804014327f};
    }
    case AdapterActivation::kGeluTanh: {
      // 0.5 (1 + tanh(u)) = sigmoid(2u), u = sqrt(2/pi) (z + 0.044715 z^3)
      const float sig = sigmoid(1.5957691216057308f * (z + 0.044715f * z * z * z));
      const float du = 0.7978845608028654f * (1.0f + 0.134145f * z * z);
      return {z * sig, sig + 2.0f * z * sig * (1.0f - sig) * du};
    }
    default: {
      const float sig = sigmoid(z);
      return {z * sig, sig * (1.0f + z * (1.0f - sig))};
    }
  }
}

__device__ __forceinline__ float scale_value(const void* scale, DType scale_dtype) {
  return scale != nullptr ? load_any(scale, scale_dtype, 0) : 1.0f;
}

// ------------------------------------------------------------------------------------------------ forward

// One warp a row (kRowsMaxWarps rows a block); the sums are of h - h[m, 0], as row_stats_kernel's in Triton: a row
// whose mean is large against its spread would otherwise lose the variance to cancellation.
template <typename T, int VEC>
__global__ void adapter_row_stats_kernel(const T* h, int64_t ldh, int64_t M, int64_t D, float eps, float* stats) {
  const int64_t m = blockIdx.x * static_cast<int64_t>(kRowsMaxWarps) + threadIdx.x / 32;
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (m >= M) return;  // a whole warp: no block barrier below
  const T* row = h + m * ldh;
  const float shift = to_float(row[0]);
  float sum1 = 0.0f, sum2 = 0.0f;
  const int64_t vectors = D / VEC;
  for (int64_t k = lane; k < vectors; k += 32) {
    float v[VEC];
    load_floats<T, VEC>(row + k * VEC, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float centred = v[i] - shift;
      sum1 += centred;
      sum2 += centred * centred;
    }
  }
  for (int64_t k = vectors * VEC + lane; k < D; k += 32) {
    const float centred = to_float(row[k]) - shift;
    sum1 += centred;
    sum2 += centred * centred;
  }
  sum1 = warp_sum(sum1);
  sum2 = warp_sum(sum2);
  if (lane == 0) {
    const float d = static_cast<float>(D);
    const float mean_shifted = sum1 / d;
    const float var = sum2 / d - mean_shifted * mean_shifted;
    // a row holding an inf has a NaN variance (inf - inf) that must stay NaN, as in torch's layer_norm
    stats[2 * m] = mean_shifted + shift;
    stats[2 * m + 1] = 1.0f / sqrtf((var < 0.0f ? 0.0f : var) + eps);
  }
}

// One block a row j of Wd: folded[j] = round(Wd[j] gamma), c1[j] = sum of the rounded row, c2[j] = Wd[j] . beta.
template <typename T>
__global__ void adapter_fold_ln_kernel(const void* wd, DType wd_dtype, int64_t stride_wb, int64_t stride_wd,
                                       const void* gamma, DType gamma_dtype, const void* beta, DType beta_dtype,
                                       int64_t D, T* folded, float* c1, float* c2) {
  __shared__ float warp_sums[2][kThreads / 32];
  const int64_t j = blockIdx.x;
  float sum1 = 0.0f, sum2 = 0.0f;
  for (int64_t k = threadIdx.x; k < D; k += kThreads) {
    const float w = load_any(wd, wd_dtype, j * stride_wb + k * stride_wd);
    const T f = from_float<T>(gamma != nullptr ? w * load_any(gamma, gamma_dtype, k) : w);
    folded[j * D + k] = f;
    sum1 += to_float(f);
    if (beta != nullptr) sum2 += w * load_any(beta, beta_dtype, k);
  }
  sum1 = warp_sum(sum1);
  sum2 = warp_sum(sum2);
  if (threadIdx.x % 32 == 0) {
    warp_sums[0][threadIdx.x / 32] = sum1;
    warp_sums[1][threadIdx.x / 32] = sum2;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float total1 = 0.0f, total2 = 0.0f;
    for (int w = 0; w < kThreads / 32; ++w) {
      total1 += warp_sums[0][w];
      total2 += warp_sums[1][w];
    }
    c1[j] = total1;
    c2[j] = total2;
  }
}

template <typename T>
__global__ void adapter_forward_rows_kernel(float* z, int64_t ldz, const float* stats, const float* c1,
                                            const float* c2, const void* down_bias, DType down_bias_dtype,
                                            const void* scale, DType scale_dtype, AdapterActivation activation,
                                            int64_t M, int64_t B, T* a, int64_t lda) {
  const float learned = scale_value(scale, scale_dtype);
  const int64_t total = M * B;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / B, j = i % B;
    float v = z[m * ldz + j];
    if (stats != nullptr) v = stats[2 * m + 1] * (v - stats[2 * m] * c1[j]) + c2[j];
    if (down_bias != nullptr) v += load_any(down_bias, down_bias_dtype, j);
    z[m * ldz + j] = v;
    a[m * lda + j] = from_float<T>(learned * activate(v, activation).value);
  }
}

template <typename T, int VEC>
__global__ void adapter_residual_kernel(const T* r, int64_t ldr, const void* up_bias, DType up_bias_dtype,
                                        const void* scale, DType scale_dtype, float scaling, int64_t M, int64_t D,
                                        T* out, int64_t ldo) {
  const float s = scaling * scale_value(scale, scale_dtype);
  const int64_t per_row = D / VEC, total = M * per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / per_row, n = (i % per_row) * VEC;
    float v[VEC];
    load_floats<T, VEC>(r + m * ldr + n, v);
    if (up_bias != nullptr) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[e] += s * load_any(up_bias, up_bias_dtype, n + e);
    }
    store_floats<T, VEC>(out + m * ldo + n, v);
  }
}

// ----------------------------------------------------------------------------------------------- backward

struct RowsPlan {
  int64_t rows_per_block, blocks;
  int threads;
};

// About four blocks an SM, at most kRowsPerBlockMax rows each; a thread a column of the bottleneck, up to
// kThreads of them (wider bottlenecks loop over column chunks).
RowsPlan rows_plan(int64_t M, int64_t B, int sm_count) {
  const int64_t want = 4 * static_cast<int64_t>(sm_count > 0 ? sm_count : 1);
  int64_t rows = (M + want - 1) / want;
  rows = rows < 1 ? 1 : (rows > kRowsPerBlockMax ? kRowsPerBlockMax : rows);
  const int64_t width = B < kThreads ? (B + 31) / 32 * 32 : kThreads;
  return {rows, (M + rows - 1) / rows, static_cast<int>(width < 32 ? 32 : width)};
}

// Block blockIdx.x takes rows [m0, m0 + rows_per_block) and every column: thread t the columns t, t + blockDim.x, ...
// down those rows, so the column sums over the block's rows are a register each (written as this block's partials),
// and each row's sums over the columns are a warp's shuffle plus a fixed-order sum over the warps in shared memory.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    adapter_backward_rows_kernel(const AdapterBackwardRows p, int64_t rows_per_block, float* part_dz,
                                 float* part_dz_rstd_mean, float* part_scale) {
  __shared__ float row_sums[kRowsPerBlockMax][kRowsMaxWarps][3];
  __shared__ float row_scale[kRowsPerBlockMax];
  const int lane = static_cast<int>(threadIdx.x % 32), warp = static_cast<int>(threadIdx.x / 32);
  const int warps = static_cast<int>(blockDim.x / 32);
  const int64_t m0 = blockIdx.x * rows_per_block;
  const int rows = static_cast<int>(p.M - m0 < rows_per_block ? p.M - m0 : rows_per_block);
  float* row_sums_flat = &row_sums[0][0][0];
  for (int i = static_cast<int>(threadIdx.x); i < kRowsPerBlockMax * kRowsMaxWarps * 3; i += blockDim.x) {
    row_sums_flat[i] = 0.0f;
  }
  __syncthreads();

  const float s = p.scaling * scale_value(p.scale, p.scale_dtype);
  T* dz_out = static_cast<T*>(p.dz);
  T* a_out = static_cast<T*>(p.a_ext);
  T* dz_rstd_out = static_cast<T*>(p.dz_rstd);
  const bool ln_rows = p.ln_rows != nullptr, scale_sum = p.scale_grad_sum != nullptr;
  for (int64_t c0 = 0; c0 < p.B; c0 += blockDim.x) {
    const int64_t j = c0 + threadIdx.x;
    const bool in = j < p.B;
    float c1 = 0.0f, c2 = 0.0f, bd = 0.0f;
    if (in && ln_rows) {
      c1 = p.c1[j];
      c2 = p.c2[j];
      if (p.down_bias != nullptr) bd = load_any(p.down_bias, p.down_bias_dtype, j);
    }
    float col_dz = 0.0f, col_dz_rstd_mean = 0.0f;
    for (int r = 0; r < rows; ++r) {
      const int64_t m = m0 + r;
      float t1 = 0.0f, t2 = 0.0f, t3 = 0.0f;
      if (in) {
        const float zv = p.z[m * p.ldz + j];
        const Activated act = activate(zv, p.activation);
        if (a_out != nullptr) a_out[m * p.lda + j] = from_float<T>(act.value);
        if (p.gu != nullptr) {
          const float gu = p.gu[m * p.ldgu + j];
          const float dz = s * act.grad * gu;
          col_dz += dz;
          const T dz_rounded = from_float<T>(dz);
          if (dz_out != nullptr) dz_out[m * p.lddz + j] = dz_rounded;
          // the rounded dz that cuBLAS's dz W' reads: mean_d(dz W') = dz . c1 / d then cancels against it
          const float dzq = to_float(dz_rounded);
          if (ln_rows) {
            t1 = dzq * c1;
            // a unit with dz = 0 (ReLU's dead side) adds nothing, as in torch's LN backward: its centred z is
            // -inf - (-inf) = NaN where bd (or beta, through c2) is -inf (a NaN dz stays: NaN != 0)
            t2 = dzq != 0.0f ? dzq * (zv - c2 - bd) : 0.0f;
          }
          if (dz_rstd_out != nullptr) {
            const T q = from_float<T>(dzq * p.stats[2 * m + 1]);
            dz_rstd_out[m * p.lddz_rstd + j] = q;
            col_dz_rstd_mean += to_float(q) * p.stats[2 * m];
          }
          if (scale_sum) t3 = act.value * gu;
        }
      }
      if (ln_rows) {
        t1 = warp_sum(t1);
        t2 = warp_sum(t2);
      }
      if (scale_sum) t3 = warp_sum(t3);
      if (lane == 0) {  // only this warp's lane 0 touches row_sums[r][warp]: ordered over the column chunks
        row_sums[r][warp][0] += t1;
        row_sums[r][warp][1] += t2;
        row_sums[r][warp][2] += t3;
      }
    }
    if (in && part_dz != nullptr) part_dz[blockIdx.x * p.B + j] = col_dz;
    if (in && part_dz_rstd_mean != nullptr) part_dz_rstd_mean[blockIdx.x * p.B + j] = col_dz_rstd_mean;
  }
  if (a_out != nullptr) {
    const int64_t pad = p.lda - p.B;
    for (int64_t i = threadIdx.x; i < rows * pad; i += blockDim.x) {
      const int64_t r = i / pad, k = i % pad;
      a_out[(m0 + r) * p.lda + p.B + k] = from_float<T>(k == 0 ? 1.0f : 0.0f);
    }
  }
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < rows && (ln_rows || scale_sum)) {
    const int r = static_cast<int>(threadIdx.x);
    const int64_t m = m0 + r;
    float sum1 = 0.0f, sum2 = 0.0f, sum3 = 0.0f;
    for (int w = 0; w < warps; ++w) {
      sum1 += row_sums[r][w][0];
      sum2 += row_sums[r][w][1];
      sum3 += row_sums[r][w][2];
    }
    if (ln_rows) {
      const float d = static_cast<float>(p.D);
      p.ln_rows[2 * m] = sum1 / d;
      p.ln_rows[2 * m + 1] = sum2 / d;
    }
    if (scale_sum) row_scale[r] = sum3 + (p.gu_bias_dot ? p.gu[m * p.ldgu + p.B] : 0.0f);
  }
  if (scale_sum) {  // uniform over the block
    __syncthreads();
    if (threadIdx.x == 0) {
      float total = 0.0f;
      for (int r = 0; r < rows; ++r) total += row_scale[r];
      part_scale[blockIdx.x] = total;
    }
  }
}

// result[c] = the sum over the blocks of part[block, c]: one warp a column, each lane adding every 32nd block in
// order, then a fixed butterfly: deterministic.
__global__ void adapter_sum_partials_kernel(const float* part, int64_t blocks, int64_t C, float* result) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(kThreads / 32) + threadIdx.x / 32;
  if (c >= C) return;  // a whole warp
  float acc = 0.0f;
  for (int64_t b = threadIdx.x % 32; b < blocks; b += 32) acc += part[b * C + c];
  acc = warp_sum(acc);
  if (threadIdx.x % 32 == 0) result[c] = acc;
}

template <typename T, int VEC>
__global__ void adapter_ln_backward_kernel(const float* dx, int64_t lddx, const T* h, int64_t ldh, const float* stats,
                                           const float* ln_rows, const T* g, int64_t ldg, int64_t M, int64_t D, T* dh,
                                           int64_t lddh) {
  const int64_t per_row = D / VEC, total = M * per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / per_row, n = (i % per_row) * VEC;
    const float mean = stats[2 * m], rstd = stats[2 * m + 1], r1 = ln_rows[2 * m], r2 = ln_rows[2 * m + 1];
    float v[VEC], x[VEC];
    load_floats<float, VEC>(dx + m * lddx + n, v);
    load_floats<T, VEC>(h + m * ldh + n, x);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float xhat = (x[e] - mean) * rstd;
      v[e] = rstd * (v[e] - r1 - xhat * r2);
    }
    if (g != nullptr) {
      float gv[VEC];
      load_floats<T, VEC>(g + m * ldg + n, gv);
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[e] += gv[e];
    }
    store_floats<T, VEC>(dh + m * lddh + n, v);
  }
}

// ---------------------------------------------------------------------------------------------- launchers

// launch(T{}) for the element type of dtype (h's: float32, float16 or bfloat16).
template <typename Launch>
cudaError_t by_dtype(DType dtype, Launch&& launch) {
  switch (dtype) {
    case DType::kFloat16: return launch(__half{});
    case DType::kBFloat16: return launch(__nv_bfloat16{});
    case DType::kFloat32: return launch(float{});
    default: return cudaErrorInvalidValue;
  }
}

unsigned grid_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < kMaxGridBlocks ? blocks : kMaxGridBlocks);
}

}  // namespace

cudaError_t adapter_row_stats(const void* h, DType dtype, int64_t M, int64_t D, int64_t ldh, float eps, float* stats,
                              cudaStream_t stream) {
  if (M == 0 || D == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((M + kRowsMaxWarps - 1) / kRowsMaxWarps);
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* hp = static_cast<const T*>(h);
    if (aligned16(h) && ldh % kVec<T> == 0) {
      adapter_row_stats_kernel<T, kVec<T>><<<blocks, kThreads, 0, stream>>>(hp, ldh, M, D, eps, stats);
    } else {
      adapter_row_stats_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(hp, ldh, M, D, eps, stats);
    }
    return cudaGetLastError();
  });
}

cudaError_t adapter_fold_ln(const void* wd, DType wd_dtype, int64_t B, int64_t D, int64_t stride_wb, int64_t stride_wd,
                            const void* gamma, DType gamma_dtype, const void* beta, DType beta_dtype, void* folded,
                            DType folded_dtype, float* c1, float* c2, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  return by_dtype(folded_dtype, [&](auto tag) {
    using T = decltype(tag);
    adapter_fold_ln_kernel<T><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        wd, wd_dtype, stride_wb, stride_wd, gamma, gamma_dtype, beta, beta_dtype, D, static_cast<T*>(folded), c1, c2);
    return cudaGetLastError();
  });
}

cudaError_t adapter_forward_rows(float* z, int64_t M, int64_t B, int64_t ldz, const float* stats, const float* c1,
                                 const float* c2, const void* down_bias, DType down_bias_dtype, const void* scale,
                                 DType scale_dtype, AdapterActivation activation, void* a, DType dtype, int64_t lda,
                                 cudaStream_t stream) {
  if (M == 0 || B == 0) return cudaSuccess;
  if (stats != nullptr && (c1 == nullptr || c2 == nullptr)) return cudaErrorInvalidValue;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    adapter_forward_rows_kernel<T><<<grid_for(M * B), kThreads, 0, stream>>>(
        z, ldz, stats, c1, c2, down_bias, down_bias_dtype, scale, scale_dtype, activation, M, B, static_cast<T*>(a),
        lda);
    return cudaGetLastError();
  });
}

cudaError_t adapter_residual(const void* r, DType dtype, int64_t M, int64_t D, int64_t ldr, const void* up_bias,
                             DType up_bias_dtype, const void* scale, DType scale_dtype, float scaling, void* out,
                             int64_t ldo, cudaStream_t stream) {
  if (M == 0 || D == 0) return cudaSuccess;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = kVec<T>;
    const T* rp = static_cast<const T*>(r);
    T* op = static_cast<T*>(out);
    if (aligned16(r) && aligned16(out) && ldr % V == 0 && ldo % V == 0 && D % V == 0) {
      adapter_residual_kernel<T, V><<<grid_for(M * (D / V)), kThreads, 0, stream>>>(
          rp, ldr, up_bias, up_bias_dtype, scale, scale_dtype, scaling, M, D, op, ldo);
    } else {
      adapter_residual_kernel<T, 1><<<grid_for(M * D), kThreads, 0, stream>>>(
          rp, ldr, up_bias, up_bias_dtype, scale, scale_dtype, scaling, M, D, op, ldo);
    }
    return cudaGetLastError();
  });
}

int64_t adapter_backward_rows_workspace(int64_t M, int64_t B, int sm_count) {
  if (M == 0) return 0;
  return rows_plan(M, B, sm_count).blocks * (2 * B + 1);
}

cudaError_t adapter_backward_rows(const AdapterBackwardRows& p, float* workspace, int sm_count, cudaStream_t stream) {
  const bool needs_gu = p.dz != nullptr || p.dz_rstd != nullptr || p.ln_rows != nullptr || p.dz_colsum != nullptr ||
                        p.dz_rstd_mean != nullptr || p.scale_grad_sum != nullptr;
  const bool needs_ln = p.dz_rstd != nullptr || p.ln_rows != nullptr || p.dz_rstd_mean != nullptr;
  if ((needs_gu && p.gu == nullptr) || (needs_ln && p.stats == nullptr) ||
      (p.ln_rows != nullptr && (p.c1 == nullptr || p.c2 == nullptr)) ||
      (p.dz_rstd_mean != nullptr && p.dz_rstd == nullptr) || (p.a_ext != nullptr && p.lda <= p.B)) {
    return cudaErrorInvalidValue;
  }
  if (p.B == 0) return cudaSuccess;
  if (p.M == 0) {  // empty sums are zero
    for (float* sum : {p.dz_colsum, p.dz_rstd_mean}) {
      if (sum == nullptr) continue;
      const cudaError_t err = cudaMemsetAsync(sum, 0, p.B * sizeof(float), stream);
      if (err != cudaSuccess) return err;
    }
    return p.scale_grad_sum != nullptr ? cudaMemsetAsync(p.scale_grad_sum, 0, sizeof(float), stream) : cudaSuccess;
  }
  const RowsPlan plan = rows_plan(p.M, p.B, sm_count);
  float* part_dz = p.dz_colsum != nullptr ? workspace : nullptr;
  float* part_dz_rstd_mean = p.dz_rstd_mean != nullptr ? workspace + plan.blocks * p.B : nullptr;
  float* part_scale = p.scale_grad_sum != nullptr ? workspace + 2 * plan.blocks * p.B : nullptr;
  cudaError_t err = by_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    adapter_backward_rows_kernel<T><<<static_cast<unsigned>(plan.blocks), plan.threads, 0, stream>>>(
        p, plan.rows_per_block, part_dz, part_dz_rstd_mean, part_scale);
    return cudaGetLastError();
  });
  const struct {
    const float* part;
    int64_t columns;
    float* result;
  } sums[] = {{part_dz, p.B, p.dz_colsum}, {part_dz_rstd_mean, p.B, p.dz_rstd_mean}, {part_scale, 1, p.scale_grad_sum}};
  for (const auto& sum : sums) {
    if (err != cudaSuccess || sum.result == nullptr) continue;
    const unsigned blocks = static_cast<unsigned>((sum.columns + kThreads / 32 - 1) / (kThreads / 32));
    adapter_sum_partials_kernel<<<blocks, kThreads, 0, stream>>>(sum.part, plan.blocks, sum.columns, sum.result);
    err = cudaGetLastError();
  }
  return err;
}

cudaError_t adapter_ln_backward(const float* dx, int64_t M, int64_t D, int64_t lddx, const void* h, DType dtype,
                                int64_t ldh, const float* stats, const float* ln_rows, const void* g, int64_t ldg,
                                void* dh, int64_t lddh, cudaStream_t stream) {
  if (M == 0 || D == 0) return cudaSuccess;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = kVec<T>;
    const T* hp = static_cast<const T*>(h);
    const T* gp = static_cast<const T*>(g);
    T* out = static_cast<T*>(dh);
    const bool g_ok = g == nullptr || (aligned16(g) && ldg % V == 0);
    if (aligned16(dx) && aligned16(h) && aligned16(dh) && g_ok && lddx % V == 0 && ldh % V == 0 && lddh % V == 0 &&
        D % V == 0) {
      adapter_ln_backward_kernel<T, V><<<grid_for(M * (D / V)), kThreads, 0, stream>>>(
          dx, lddx, hp, ldh, stats, ln_rows, gp, ldg, M, D, out, lddh);
    } else {
      adapter_ln_backward_kernel<T, 1><<<grid_for(M * D), kThreads, 0, stream>>>(
          dx, lddx, hp, ldh, stats, ln_rows, gp, ldg, M, D, out, lddh);
    }
    return cudaGetLastError();
  });
}

}  // namespace peftkern

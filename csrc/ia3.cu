// IA3 around cuBLAS: the frozen GEMMs stay in cuBLAS (called from bindings.cpp through ATen); these kernels do the
// rescaling and the reductions for the vector's gradient, each reading its big operands once.
//
// Math (x: M x K, W: N x K frozen, l: the learned vector, z = x W^T + b):
//   output form  y = z * l            forward: cuBLAS z, then ia3_scale_kernel (y = z * l[col])
//                                      backward: ia3_scale_reduce_kernel on (dy, z): g = dy * l written,
//                                      dl = sum_m dy * z and dbias = sum_m dy * l in the same pass; cuBLAS dx = g W
//   input form   y = (x * l) W^T + b  forward: W' = W * l (ia3_scale_kernel over the weight) when M > N, else
//                                      x' = x * l; then cuBLAS
//                                      backward: cuBLAS G = dy W, then ia3_scale_reduce_kernel on (G, x):
//                                      dx = G * l written, dl = sum_m G * x in the same pass
//   merge        W *= l (rows or columns), b *= l: ia3_scale_kernel in place (1 / l for unmerge, from the caller)
//
// Every product by l is computed in fp32 and rounded once to the output's dtype; the vector may be in any float
// dtype (PEFT keeps it in fp32 beside a bf16 base). The reductions over M split the rows into blocks of fp32 partial
// sums that ia3_sum_partials_kernel adds in a fixed order: deterministic.
//
// Floor (bf16, M = 8192, N = K = 4096): the GEMMs are 275 GFLOP each way; the rescaling is M N multiplies, nothing.
// What costs is bytes: the output form's forward writes z and y (one extra pass beside cuBLAS's), its backward reads
// dy and z and writes g (three); the input form's forward scales W (an N x K pass, when M > N), its backward writes
// G, reads it and x, writes dx (three). This is the Triton backend's "split" schedule; the Triton backend's
// persistent kernels fuse more of it (kernels/triton/NOTES-ia3.md).

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "element.cuh"
#include "peftkern.h"

namespace peftkern {
namespace {

constexpr int kScaleThreads = 256;
constexpr int kReduceThreads = 256;  // one column per thread: a block covers 256 columns of one row split
constexpr int kRowsPerSplitMin = 64;

// out[r, c] = in[r, c] * l[c] (scale_cols) or * l[r], fp32 math, one rounding. in and out are row-major with row
// strides ld_in, ld_out (out may alias in: each element is read once, before it is written).
template <typename T>
__global__ void ia3_scale_kernel(const T* in, int64_t ld_in, const void* scale, DType scale_dtype, int64_t rows,
                                 int64_t cols, bool scale_cols, T* out, int64_t ld_out) {
  const int64_t total = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    const float s = load_any(scale, scale_dtype, scale_cols ? c : r);
    out[r * ld_out + c] = from_float<T>(to_float(in[r * ld_in + c]) * s);
  }
}

// For the rows of split blockIdx.y and the columns c of this block: out[m, c] = a[m, c] * l[c] if out is given,
// part[split, c] = sum_m a[m, c] * b[m, c] if b is given, colsum[split, c] = sum_m a[m, c] * l[c] if colsum is given.
template <typename T>
__global__ void ia3_scale_reduce_kernel(const T* a, int64_t lda, const T* b, int64_t ldb, const void* scale,
                                        DType scale_dtype, int64_t M, int64_t C, int64_t rows_per_split, T* out,
                                        int64_t ldo, float* part, float* colsum) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(kReduceThreads) + threadIdx.x;
  if (c >= C) return;
  const int64_t m_start = blockIdx.y * rows_per_split;
  const int64_t m_end = m_start + rows_per_split < M ? m_start + rows_per_split : M;
  const float s = load_any(scale, scale_dtype, c);
  float dot = 0.0f, sum = 0.0f;
  for (int64_t m = m_start; m < m_end; ++m) {
    const float av = to_float(a[m * lda + c]);
    if (b != nullptr) dot += av * to_float(b[m * ldb + c]);
    const float scaled = av * s;
    sum += scaled;
    if (out != nullptr) out[m * ldo + c] = from_float<T>(scaled);
  }
  if (part != nullptr) part[blockIdx.y * C + c] = dot;
  if (colsum != nullptr) colsum[blockIdx.y * C + c] = sum;
}

// result[c] = sum over s in order of part[s, c]: the partial sums of the splits, added deterministically.
__global__ void ia3_sum_partials_kernel(const float* part, int64_t splits, int64_t C, float* result) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  float acc = 0.0f;
  for (int64_t s = 0; s < splits; ++s) acc += part[s * C + c];
  result[c] = acc;
}

int64_t reduce_splits(int64_t M, int64_t C, int sm_count) {
  // about four blocks per SM over the column blocks, each split at least kRowsPerSplitMin rows; no columns: one
  if (C <= 0) return 1;
  const int64_t col_blocks = (C + kReduceThreads - 1) / kReduceThreads;
  const int64_t want = (4 * static_cast<int64_t>(sm_count) + col_blocks - 1) / col_blocks;
  const int64_t most = (M + kRowsPerSplitMin - 1) / kRowsPerSplitMin;
  int64_t splits = want < most ? want : most;
  return splits < 1 ? 1 : splits;
}

template <typename T>
cudaError_t scale_typed(const void* in, int64_t ld_in, const void* scale, DType scale_dtype, int64_t rows,
                        int64_t cols, bool scale_cols, void* out, int64_t ld_out, cudaStream_t stream) {
  const int64_t total = rows * cols;
  int64_t blocks = (total + kScaleThreads - 1) / kScaleThreads;
  blocks = blocks < 65535 * 8 ? blocks : 65535 * 8;
  ia3_scale_kernel<T><<<static_cast<unsigned>(blocks), kScaleThreads, 0, stream>>>(
      static_cast<const T*>(in), ld_in, scale, scale_dtype, rows, cols, scale_cols, static_cast<T*>(out), ld_out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t scale_reduce_typed(const void* a, int64_t lda, const void* b, int64_t ldb, const void* scale,
                               DType scale_dtype, int64_t M, int64_t C, void* out, int64_t ldo, float* dot_sum,
                               float* colsum, float* workspace, int sm_count, cudaStream_t stream) {
  const int64_t splits = reduce_splits(M, C, sm_count);
  const int64_t rows_per_split = (M + splits - 1) / splits;
  const int64_t used = (M + rows_per_split - 1) / rows_per_split;
  float* part = dot_sum != nullptr ? workspace : nullptr;
  float* col_part = colsum != nullptr ? workspace + used * C : nullptr;
  const dim3 grid(static_cast<unsigned>((C + kReduceThreads - 1) / kReduceThreads), static_cast<unsigned>(used));
  ia3_scale_reduce_kernel<T><<<grid, kReduceThreads, 0, stream>>>(
      static_cast<const T*>(a), lda, static_cast<const T*>(b), ldb, scale, scale_dtype, M, C, rows_per_split,
      static_cast<T*>(out), ldo, part, col_part);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const unsigned col_blocks = static_cast<unsigned>((C + 255) / 256);
  if (dot_sum != nullptr) {
    ia3_sum_partials_kernel<<<col_blocks, 256, 0, stream>>>(part, used, C, dot_sum);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (colsum != nullptr) {
    ia3_sum_partials_kernel<<<col_blocks, 256, 0, stream>>>(col_part, used, C, colsum);
    err = cudaGetLastError();
  }
  return err;
}

}  // namespace

int64_t ia3_scale_reduce_workspace(int64_t M, int64_t C, int sm_count) {
  return 2 * reduce_splits(M, C, sm_count) * C;
}

cudaError_t ia3_scale(const void* in, DType dtype, int64_t ld_in, const void* scale, DType scale_dtype, int64_t rows,
                      int64_t cols, bool scale_cols, void* out, int64_t ld_out, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat16:
      return scale_typed<__half>(in, ld_in, scale, scale_dtype, rows, cols, scale_cols, out, ld_out, stream);
    case DType::kBFloat16:
      return scale_typed<__nv_bfloat16>(in, ld_in, scale, scale_dtype, rows, cols, scale_cols, out, ld_out, stream);
    case DType::kFloat32:
      return scale_typed<float>(in, ld_in, scale, scale_dtype, rows, cols, scale_cols, out, ld_out, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t ia3_scale_reduce(const void* a, DType dtype, int64_t lda, const void* b, int64_t ldb, const void* scale,
                             DType scale_dtype, int64_t M, int64_t C, void* out, int64_t ldo, float* dot_sum,
                             float* colsum, float* workspace, int sm_count, cudaStream_t stream) {
  if (C == 0) return cudaSuccess;
  if (M == 0) {  // empty sums are zero
    if (dot_sum != nullptr) {
      const cudaError_t err = cudaMemsetAsync(dot_sum, 0, C * sizeof(float), stream);
      if (err != cudaSuccess) return err;
    }
    return colsum != nullptr ? cudaMemsetAsync(colsum, 0, C * sizeof(float), stream) : cudaSuccess;
  }
  switch (dtype) {
    case DType::kFloat16:
      return scale_reduce_typed<__half>(a, lda, b, ldb, scale, scale_dtype, M, C, out, ldo, dot_sum, colsum,
                                        workspace, sm_count, stream);
    case DType::kBFloat16:
      return scale_reduce_typed<__nv_bfloat16>(a, lda, b, ldb, scale, scale_dtype, M, C, out, ldo, dot_sum, colsum,
                                               workspace, sm_count, stream);
    case DType::kFloat32:
      return scale_reduce_typed<float>(a, lda, b, ldb, scale, scale_dtype, M, C, out, ldo, dot_sum, colsum,
                                       workspace, sm_count, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace peftkern

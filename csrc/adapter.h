// The bottleneck adapter's launchers (adapter.cu): plain C++ over raw pointers, sizes and strides, torch-free like
// peftkern.h's. adapter_bindings.cpp checks the tensors, runs the skinny products in cuBLAS through ATen and calls
// these on the current stream. Each returns the launch's cudaError_t (cudaSuccess when a size of 0 left nothing to
// launch).
//
// Sizes follow reference.py: h (M, d) (D here), Wd (b, d) (B here), Wu (d, b); "dtype" is h's (float32, float16 or
// bfloat16), the dtype of every (M, d) operand and of the (M, b) operands the kernels write for cuBLAS. Vectors
// (biases, LN's gamma and beta, the learned scale) come in any float DType and are read with load_any; a null
// pointer means "absent". Matrices are row-major with unit column stride and the row stride given as ld.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "peftkern.h"

namespace peftkern {

// reference.adapter_activation's activations, in kernels/triton/adapter.py's ACTIVATION_IDS order.
enum class AdapterActivation : int { kRelu = 0, kGelu = 1, kGeluTanh = 2, kSilu = 3 };

// stats (M, 2) float32 = each row's (mean, 1 / sqrt(var + eps)) of h, the sums taken of h - h[m, 0] so that the
// variance does not cancel when a row's mean is large against its spread. One warp a row, one read of h.
cudaError_t adapter_row_stats(const void* h, DType dtype, int64_t M, int64_t D, int64_t ldh, float eps, float* stats,
                              cudaStream_t stream);

// LN folded into the down weight: folded (B, D) row-major in folded_dtype = Wd * gamma (gamma null: Wd), c1 (B,)
// float32 = the row sums of the rounded folded weight (so that the mean cancels against what the GEMM summed) and
// c2 (B,) float32 = Wd beta (beta null: zeros). Wd at strides (stride_wb, stride_wd) in any DType.
cudaError_t adapter_fold_ln(const void* wd, DType wd_dtype, int64_t B, int64_t D, int64_t stride_wb, int64_t stride_wd,
                            const void* gamma, DType gamma_dtype, const void* beta, DType beta_dtype, void* folded,
                            DType folded_dtype, float* c1, float* c2, cudaStream_t stream);

// The forward's row kernel, on cuBLAS's float32 product acc = h W'^T (M, B) (row stride ldz), in place:
// z = rstd (acc - mean c1) + c2 under LN (stats not null), else acc; z += bd; then a (M, B) in dtype (row stride
// lda) = learned * act(z), learned the scale tensor's value (1 when null): cuBLAS's alpha carries `scaling`.
cudaError_t adapter_forward_rows(float* z, int64_t M, int64_t B, int64_t ldz, const float* stats, const float* c1,
                                 const float* c2, const void* down_bias, DType down_bias_dtype, const void* scale,
                                 DType scale_dtype, AdapterActivation activation, void* a, DType dtype, int64_t lda,
                                 cudaStream_t stream);

// out (M, D) = r + scaling * learned * bu (bu null: r), fp32 math and one rounding: the C that cuBLAS then adds
// scaling (a Wu^T) to (beta = 1). r and out in dtype at row strides ldr, ldo.
cudaError_t adapter_residual(const void* r, DType dtype, int64_t M, int64_t D, int64_t ldr, const void* up_bias,
                             DType up_bias_dtype, const void* scale, DType scale_dtype, float scaling, void* out,
                             int64_t ldo, cudaStream_t stream);

// The backward's row kernel: one pass over z and gu = g [Wu, bu] (cuBLAS, float32) writes what the products over M
// and the LN backward need, and sums over M through per-block partials added in a fixed order. Every output is
// optional (null: not computed); gu may be null when only a_ext is wanted.
struct AdapterBackwardRows {
  int64_t M, B, D;
  DType dtype;  // h's: dz, a_ext and dz_rstd are written in it
  AdapterActivation activation;
  const float* z;  // (M, B) pre-activation, row stride ldz
  int64_t ldz;
  const float* gu;  // (M, B) g Wu, row stride ldgu; with gu_bias_dot, column B holds g . bu
  int64_t ldgu;
  bool gu_bias_dot;
  const float* stats;  // (M, 2) (mean, rstd) under LN, else null
  const float* c1;     // (B,) adapter_fold_ln's, under LN
  const float* c2;
  const void* down_bias;
  DType down_bias_dtype;
  const void* scale;  // s = scaling * scale[0] (scale null: scaling)
  DType scale_dtype;
  float scaling;
  void* dz;  // (M, B), row stride lddz: round(s act'(z) gu)
  int64_t lddz;
  void* a_ext;  // (M, lda) with lda > B: [act(z), 1, 0, ...], so that g^T a_ext gives dWu and sum_m g in one GEMM
  int64_t lda;
  void* dz_rstd;  // (M, B), row stride lddz_rstd: round(round(dz) rstd), LN's (dz rstd)^T h
  int64_t lddz_rstd;
  float* ln_rows;          // (M, 2): mean_d(dz W') = dz . c1 / D and mean_d(dz W' xhat) = dz . (z - c2 - bd) / D
  float* dz_colsum;        // (B,) sum_m s act'(z) gu (unrounded)
  float* dz_rstd_mean;     // (B,) sum_m dz_rstd * mean, the centring term of LN's dz^T xhat
  float* scale_grad_sum;   // (1,) sum_m (act(z) . gu + g . bu): dscale / scaling
};

// fp32 elements of workspace that adapter_backward_rows needs for these sizes.
int64_t adapter_backward_rows_workspace(int64_t M, int64_t B, int sm_count);

cudaError_t adapter_backward_rows(const AdapterBackwardRows& p, float* workspace, int sm_count, cudaStream_t stream);

// The LN backward, elementwise on dx = dz W' (M, D) float32 (row stride lddx): dh = rstd (dx - r1 - xhat r2) [+ g],
// xhat = (h - mean) rstd, with (mean, rstd) from stats and (r1, r2) from ln_rows ((M, 2) float32 each); g (null: the
// parallel form) at row stride ldg; h, g and dh in dtype.
cudaError_t adapter_ln_backward(const float* dx, int64_t M, int64_t D, int64_t lddx, const void* h, DType dtype,
                                int64_t ldh, const float* stats, const float* ln_rows, const void* g, int64_t ldg,
                                void* dh, int64_t lddh, cudaStream_t stream);

}  // namespace peftkern

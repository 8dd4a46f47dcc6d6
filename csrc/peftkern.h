// peftkern's CUDA kernels: plain C++ launchers over raw pointers, sizes and strides (no torch types), so the
// .cu files compile with nvcc alone. bindings.cpp checks tensors, allocates outputs and workspaces and calls
// these on the current stream. Every launcher returns the launch's cudaError_t (cudaSuccess when nothing
// was launched because a size is 0).
//
// Conventions: matrices are row-major views given by a row stride ("ld", elements) with unit column stride,
// or by two strides where the kernel reads a small operand with generic loads. Sizes follow reference.py:
// x (M, K), the frozen weight W (N, K), lora_A (R, K), lora_B (N, R). The dropout keep-mask of element
// (m, k) is drawn by Philox-4x32-10 keyed by the seed with counter (k / 4, m), word k % 4: it depends on
// (seed, m, k) alone, so forward and backward regenerate it instead of storing it.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace peftkern {

// Element types the launchers accept (float64 only for adapters and the outputs that take their dtype).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// fp32 elements of workspace that lora_down / lora_grad need for these sizes (the per-split partial sums
// they reduce deterministically). sm_count: the device's multiprocessor count.
int64_t lora_down_workspace(int64_t M, int64_t K, int64_t R, int sm_count);
int64_t lora_grad_workspace(int64_t M, int64_t P, int64_t R, bool colsum, int sm_count);

// out (M, R) fp32, row stride ld_out = drop(x) w^T, w (R, K) at strides (stride_wr, stride_wk) in any DType:
// xa = drop(x) A^T in the forward, dyb = dy B in the backward (w = B^T). drop(x) = keep * x / (1 - p).
// One read of x (16-byte vector loads where x and ld allow), fp32 accumulation.
cudaError_t lora_down(const void* x, DType x_dtype, int64_t M, int64_t K, int64_t ldx,
                      const void* w, DType w_dtype, int64_t R, int64_t stride_wr, int64_t stride_wk,
                      float dropout_p, uint64_t seed, float* out, int64_t ld_out,
                      float* workspace, int sm_count, cudaStream_t stream);

// out (P, R) = scale * drop(big)^T small, written in out_dtype at strides (stride_out_p, stride_out_r), with
// big (M, P) (row stride ld_big, DType of x) and small (M, R) fp32 (row stride ld_small): dA^T = s drop(x)^T dyb
// and dB = s dy^T xa. colsum (P,) fp32, if not null, gets the column sums of drop(big): the bias gradient in
// the same pass over dy. out may be null when only colsum is wanted.
cudaError_t lora_grad(const void* big, DType big_dtype, int64_t M, int64_t P, int64_t ld_big,
                      const float* small, int64_t R, int64_t ld_small,
                      float dropout_p, uint64_t seed, float scale,
                      void* out, DType out_dtype, int64_t stride_out_p, int64_t stride_out_r,
                      float* colsum, float* workspace, int sm_count, cudaStream_t stream);

// out (M, N) = scale * drop(low up^T) + bias, written once in out_dtype (row stride ld_out), with low (M, R)
// fp32 (row stride ld_low), up (N, R) at strides (stride_up_n, stride_up_r) in any DType, bias (N,) contiguous
// in out_dtype or null. The forward's C = s xa B^T + b and the backward's s drop'(dyb A), both written before
// cuBLAS adds the frozen product into them (beta = 1).
cudaError_t lora_up(const float* low, int64_t M, int64_t R, int64_t ld_low,
                    const void* up, DType up_dtype, int64_t N, int64_t stride_up_n, int64_t stride_up_r,
                    const void* bias, float scale, float dropout_p, uint64_t seed,
                    void* out, DType out_dtype, int64_t ld_out, cudaStream_t stream);

// w (rows, cols) += alpha * u v in place, fp32 math and one rounding to w's dtype; u (rows, R) and v (R, cols)
// at any strides and DTypes: W += sign s B A, or for a (K, N) weight W^T += sign s A^T B^T.
cudaError_t lora_merge(void* w, DType w_dtype, int64_t rows, int64_t cols, int64_t stride_row, int64_t stride_col,
                       const void* u, DType u_dtype, int64_t stride_u_row, int64_t stride_u_r,
                       const void* v, DType v_dtype, int64_t stride_v_r, int64_t stride_v_col,
                       int64_t R, float alpha, cudaStream_t stream);

// keep (M, K) contiguous bytes (0/1): the mask every kernel above draws for (seed, p). For tests.
cudaError_t lora_dropout_mask(uint8_t* keep, int64_t M, int64_t K, float dropout_p, uint64_t seed,
                              cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------- IA3
// out (rows, cols) = in * l along columns (scale_cols: l has cols entries) or along rows (l has rows entries), in and
// out row-major in dtype at row strides ld_in, ld_out (out may be in: in place), l in any DType; fp32 math, one
// rounding. The output form's y = z * l, the input form's W * l or x * l, and merge / unmerge.
cudaError_t ia3_scale(const void* in, DType dtype, int64_t ld_in, const void* scale, DType scale_dtype, int64_t rows,
                      int64_t cols, bool scale_cols, void* out, int64_t ld_out, cudaStream_t stream);

// fp32 elements of workspace that ia3_scale_reduce needs for these sizes.
int64_t ia3_scale_reduce_workspace(int64_t M, int64_t C, int sm_count);

// One pass over a (M, C) and b (M, C), both row-major in dtype (row strides lda, ldb; b may be null), l (C,) in any
// DType: out = a * l (if out is not null, row stride ldo), dot_sum (C,) fp32 = sum_m a * b (if not null), colsum (C,)
// fp32 = sum_m a * l (if not null). Output form's backward: a = dy, b = z (g, dl, dbias); input form's: a = dy W,
// b = x (dx, dl). The sums over M go through per-split partials added in a fixed order.
cudaError_t ia3_scale_reduce(const void* a, DType dtype, int64_t lda, const void* b, int64_t ldb, const void* scale,
                             DType scale_dtype, int64_t M, int64_t C, void* out, int64_t ldo, float* dot_sum,
                             float* colsum, float* workspace, int sm_count, cudaStream_t stream);

}  // namespace peftkern

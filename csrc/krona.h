// KronA's launchers (krona.cu): plain C++ over raw pointers, sizes and strides, no torch types, as peftkern.h's.
// krona_bindings.cpp checks tensors, allocates outputs and workspaces and calls these on the current stream. Every
// launcher returns the launch's cudaError_t (cudaSuccess when nothing was launched because a size is 0).
//
// Layout (torch.kron's): (A (x) B)[i1 n2 + i2, j1 k2 + j2] = A[i1, j1] B[i2, j2] for A (n1, k1), B (n2, k2);
// a row z_m of length c1 c2 is read as the row-major (c1, c2) matrix Z_m.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "peftkern.h"

namespace peftkern {

// The T terms of a factor sum, factor t's element (i, j) at data[t stride_t + i stride_r + j stride_c], in any
// DType: a (rows, cols) view of each term, so a transposed factor is the same tensor with its strides swapped.
struct KronaFactor {
  const void* data;
  DType dtype;
  int64_t rows, cols;
  int64_t stride_t, stride_r, stride_c;
};

// Bytes of shared memory krona_term needs for out (r1 x r2) = sum_t L_t (r1 x c1) Z (c1 x c2) R_t^T (R_t: r2 x c2)
// with every factor whole in shared memory; compare with the device's opt-in maximum per block.
int64_t krona_term_smem(DType z_dtype, int64_t r1, int64_t c1, int64_t r2, int64_t c2, int64_t terms);

// out_m = scale * sum_t vec(L_t Z_m R_t^T) (+ bias), written once in z's dtype for every row m of z (M, c1 c2) at
// row stride ldz; out (M, r1 r2) at row stride ld_out; bias (r1 r2,) contiguous in z's dtype, or null. The forward
// (L = A, R = B on x) and the dx term (L = A^T, R = B^T on dy). z's DType is float32, float16 or bfloat16.
// Needs krona_term_smem(...) <= max_smem (the device's opt-in maximum): cudaErrorInvalidValue otherwise.
cudaError_t krona_term(const void* z, DType z_dtype, int64_t M, int64_t ldz, const KronaFactor& L,
                       const KronaFactor& R, int64_t terms, const void* bias, float scale, void* out, int64_t ld_out,
                       int sm_count, int64_t max_smem, cudaStream_t stream);

// Tokens per block of krona_grad (it runs ceil(M / rows) blocks and writes as many rows of partial sums), or 0
// where its shared memory (factors A (n1, k1), B (n2, k2), with_dx: the dx term's buffers too) passes max_smem.
// reg_acc lets the kernel keep dA and dB in registers where they fit (less shared memory); pass krona_grad the same.
int64_t krona_grad_rows(DType dtype, int64_t M, int64_t n1, int64_t k1, int64_t n2, int64_t k2, int64_t terms,
                        bool with_dx, int sm_count, int64_t max_smem, bool reg_acc = true);

// fp32 elements of one row of krona_grad's partial sums: T n1 k1 + T n2 k2.
int64_t krona_grad_width(int64_t n1, int64_t k1, int64_t n2, int64_t k2, int64_t terms);

// One pass over dy (M, n1 n2) and x (M, k1 k2), both in dtype at row strides ldg, ldx (G_m, X_m their rows as
// matrices), with rows tokens per block (krona_grad_rows):
//   dAB (fp32, krona_grad_width elements) = scale * [sum_m G_m B_t X_m^T for each t | sum_m G_m^T A_t X_m for each t],
//   the (T, n1, k1) and (T, n2, k2) blocks contiguous; per-block partial sums in workspace (ceil(M / rows) x width
//   fp32) added by a second kernel in a fixed order;
//   dx (M, k1 k2) in dtype at row stride ld_dx, if not null: scale * sum_t vec(A_t^T G_m B_t), written once.
cudaError_t krona_grad(const void* dy, const void* x, DType dtype, int64_t M, int64_t ldg, int64_t ldx,
                       const KronaFactor& A, const KronaFactor& B, int64_t terms, float scale, int64_t rows,
                       void* dx, int64_t ld_dx, float* dAB, float* workspace, int64_t max_smem, cudaStream_t stream,
                       bool reg_acc = true);

// w (N, K) += alpha * sum_t A_t (x) B_t in place at strides (stride_row, stride_col), every element its own sum of
// T products in fp32, rounded once to w's dtype (float32, float16, bfloat16).
cudaError_t krona_merge(void* w, DType w_dtype, int64_t N, int64_t K, int64_t stride_row, int64_t stride_col,
                        const KronaFactor& A, const KronaFactor& B, int64_t terms, float alpha, int sm_count,
                        cudaStream_t stream);

}  // namespace peftkern

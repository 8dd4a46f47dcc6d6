// LoRA around cuBLAS: the frozen GEMMs stay in cuBLAS (called from bindings.cpp through ATen); these kernels
// are everything around them, each reading its big operand once.
//
// Math (x: M x K, W: N x K frozen, A: r x K, B: N x r, s = scaling, drop(x) = keep * x / (1 - p)):
//   forward   xa = drop(x) A^T                      lora_down_kernel (+ lora_reduce_kernel), fp32 (M, r)
//             y  = s xa B^T + b                      lora_up_kernel, written once
//             y += x W^T                             cuBLAS with beta = 1 (reads y in its epilogue)
//   backward  dyb = dy B                             lora_down_kernel on dy, fp32 (M, r)
//             dx  = s drop'(dyb A)                   lora_up_kernel with the mask regenerated, written once
//             dx += dy W                             cuBLAS with beta = 1
//             dA  = s dyb^T drop(x)                  lora_grad_kernel on x (mask regenerated)
//             dB  = s dy^T xa, db = sum_m dy         lora_grad_kernel on dy: one pass for both
//   merge     W  += sign s B A                       lora_merge_kernel, fp32 math, one rounding
//
// Floor (bf16, M = 8192, N = K = 4096, r = 16, H100 ~3.3 TB/s): the base GEMM is 2MNK = 275 GFLOP
// (~0.35 ms); the LoRA terms add 2Mr(N + K) = 4.3 GFLOP forward and 8.6 GFLOP backward (< 3%), so they are
// bound by bytes. Forward: lora_down reads x once (2MK = 64 MB, ~20 us); lora_up writes y once (64 MB,
// ~20 us), which cuBLAS then reads in its epilogue while it is compute-bound (hidden). Backward: dy is read
// by lora_down and by lora_grad (2 x 64 MB), x by lora_grad (64 MB), dx written once (64 MB): ~80 us of
// traffic beside ~0.35 ms of cuBLAS (dx = dy W). The split partial sums cost splits x rows x r x 4 bytes
// (~4 MB, 6% of a pass).
//
// The small products run on tensor cores (WMMA, fp32 accumulation) for fp16/bf16 inputs; the adapters and
// the fp32 intermediates (xa, dyb) are rounded to the input's dtype when staged, as a bf16 GEMM would.
// fp32 inputs run the same tiles on CUDA cores in exact fp32 (their frozen GEMM is ~15x slower anyway).
// Every big operand moves in 16-byte vectors when its pointer and row stride allow, scalar otherwise.
// Dropout: one Philox-4x32-10 call gives the keep bits of four neighbouring elements, keyed by the seed,
// with counter (k / 4, m): no per-element generator state, and the same mask in every kernel.

#include <cstdint>
#include <cstring>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include "element.cuh"
#include "peftkern.h"

namespace peftkern {
namespace {

constexpr int kThreads = 128;  // four warps in every tile kernel

// to_float, from_float, load_any: element.cuh

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* dst, const float (&v)[VEC]) {
  constexpr int kBytes = VEC * static_cast<int>(sizeof(T));
  static_assert(kBytes == 8 || kBytes % 16 == 0, "8-byte or 16-byte stores");
  T e[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) e[i] = from_float<T>(v[i]);
  if constexpr (kBytes == 8) {
    uint2 raw;
    memcpy(&raw, e, 8);
    *reinterpret_cast<uint2*>(dst) = raw;
  } else {
#pragma unroll
    for (int q = 0; q < kBytes / 16; ++q) {
      uint4 raw;
      memcpy(&raw, reinterpret_cast<const char*>(e) + 16 * q, 16);
      reinterpret_cast<uint4*>(dst)[q] = raw;
    }
  }
}

// Shared-memory rows are padded by 16 bytes: rows stay 16-byte aligned for vector stores, WMMA pointers
// 32-byte aligned, and consecutive rows start in different banks.
template <typename T>
constexpr int kPad = 16 / static_cast<int>(sizeof(T));

// ----------------------------------------------------------------------------------------------- dropout

struct Dropout {
  uint32_t key_lo, key_hi;
  uint32_t threshold;  // keep an element iff its 32-bit draw >= threshold: P(keep) = 1 - p
  bool active;
};

__device__ __forceinline__ uint4 philox4x32_10(uint4 ctr, uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint32_t hi0 = __umulhi(0xD2511F53u, ctr.x), lo0 = 0xD2511F53u * ctr.x;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, ctr.z), lo1 = 0xCD9E8D57u * ctr.z;
    ctr = make_uint4(hi1 ^ ctr.y ^ k0, lo1, hi0 ^ ctr.w ^ k1, lo0);
  }
  return ctr;
}

// The draws of elements (row, col4 .. col4 + 3), col4 a multiple of 4.
__device__ __forceinline__ uint4 dropout_draws(const Dropout& d, int64_t row, int64_t col4) {
  const uint64_t c = static_cast<uint64_t>(col4) >> 2, r = static_cast<uint64_t>(row);
  return philox4x32_10(make_uint4(static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32),
                                  static_cast<uint32_t>(r), static_cast<uint32_t>(r >> 32)),
                       d.key_lo, d.key_hi);
}

// v[e] = 0 where element (row, col + e) is dropped; col is a multiple of 4.
template <int VEC>
__device__ __forceinline__ void apply_keep(const Dropout& d, int64_t row, int64_t col, float (&v)[VEC]) {
  static_assert(VEC % 4 == 0, "whole Philox draws");
#pragma unroll
  for (int q = 0; q < VEC / 4; ++q) {
    const uint4 draw = dropout_draws(d, row, col + 4 * q);
    v[4 * q + 0] = draw.x >= d.threshold ? v[4 * q + 0] : 0.0f;
    v[4 * q + 1] = draw.y >= d.threshold ? v[4 * q + 1] : 0.0f;
    v[4 * q + 2] = draw.z >= d.threshold ? v[4 * q + 2] : 0.0f;
    v[4 * q + 3] = draw.w >= d.threshold ? v[4 * q + 3] : 0.0f;
  }
}

// ---------------------------------------------------------------------------------------- tile staging

// A ROWS x COLS tile of a row-major matrix g (nrows x ncols, unit column stride, row stride ld) on its way
// to shared memory, in two halves so the next tile's loads are in flight while the warps multiply the
// current one: fetch() issues one 16-byte vector per thread and pass into registers (scalar loads where
// vec_ok is false or at the right edge, zeros outside the matrix); commit() zeroes dropped elements and
// stores the tile as TS. With COLSUM it also adds the tile to the thread's column sums: kThreads is a
// multiple of the vectors per row, so a thread always holds the same VEC columns.
template <typename TG, int ROWS, int COLS>
struct TileFetch {
  static constexpr int VEC = 16 / static_cast<int>(sizeof(TG));
  static constexpr int VPR = COLS / VEC;
  static constexpr int PASSES = ROWS * VPR / kThreads;
  static_assert(COLS % VEC == 0 && (ROWS * VPR) % kThreads == 0, "whole vectors, whole passes");
  uint4 raw[PASSES];

  __device__ __forceinline__ void fetch(const TG* __restrict__ g, int64_t ld, int64_t row0, int64_t col0,
                                        int64_t nrows, int64_t ncols, bool vec_ok) {
#pragma unroll
    for (int i = 0; i < PASSES; ++i) {
      const int v = static_cast<int>(threadIdx.x) + i * kThreads;
      const int64_t gr = row0 + v / VPR, gc = col0 + (v % VPR) * VEC;
      if (gr < nrows && vec_ok && gc + VEC <= ncols) {
        raw[i] = *reinterpret_cast<const uint4*>(g + gr * ld + gc);
      } else {
        TG e[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) e[j] = (gr < nrows && gc + j < ncols) ? g[gr * ld + gc + j] : from_float<TG>(0.0f);
        memcpy(&raw[i], e, 16);
      }
    }
  }

  template <typename TS, bool COLSUM>
  __device__ __forceinline__ void commit(TS* s, int lds, int64_t row0, int64_t col0, const Dropout& drop,
                                         float* colsum) const {
#pragma unroll
    for (int i = 0; i < PASSES; ++i) {
      const int v = static_cast<int>(threadIdx.x) + i * kThreads;
      const int r = v / VPR, c = (v % VPR) * VEC;
      if constexpr (std::is_same_v<TG, TS> && !COLSUM) {
        if (!drop.active) {
          *reinterpret_cast<uint4*>(s + r * lds + c) = raw[i];
          continue;
        }
      }
      TG e[VEC];
      memcpy(e, &raw[i], 16);
      float vals[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) vals[j] = to_float(e[j]);
      if (drop.active) apply_keep<VEC>(drop, row0 + r, col0 + c, vals);
      if constexpr (COLSUM) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) colsum[j] += vals[j];
      }
      store_vec<TS, VEC>(s + r * lds + c, vals);
    }
  }
};

// Stages the ROWS x COLS tile at (row0, col0) of a small operand with any strides and dtype (the adapters),
// zeros outside nrows x ncols. Consecutive threads walk the unit-stride dimension, so the loads coalesce
// for A (r, K) and B (N, r) as well as for the transposed views B^T and A^T that the backward reads.
template <typename TS, int ROWS, int COLS>
__device__ __forceinline__ void stage_tile_strided(TS* s, int lds, const void* __restrict__ g, DType dtype,
                                                   int64_t stride_row, int64_t stride_col, int64_t row0, int64_t col0,
                                                   int64_t nrows, int64_t ncols) {
  static_assert((ROWS * COLS) % kThreads == 0, "whole passes");
  const bool rows_fast = stride_row == 1 && stride_col != 1;
#pragma unroll 4
  for (int i = 0; i < ROWS * COLS / kThreads; ++i) {
    const int v = static_cast<int>(threadIdx.x) + i * kThreads;
    const int r = rows_fast ? v % ROWS : v / COLS, c = rows_fast ? v / ROWS : v % COLS;
    const int64_t gr = row0 + r, gc = col0 + c;
    const float val = (gr < nrows && gc < ncols) ? load_any(g, dtype, gr * stride_row + gc * stride_col) : 0.0f;
    s[r * lds + c] = from_float<TS>(val);
  }
}

// --------------------------------------------------------------------------------------- warp products

// C += A B over one k-step of 16 for the warp's strip of C: rows [16 MT warp, 16 MT (warp + 1)) and all
// 16 NT columns. A (rows x k) and B (k x cols) are in shared memory, each row- or column-major with its
// leading dimension. store() writes the strip into a row-major fp32 matrix (shared or global).

// CUDA cores, exact fp32: lane (lane / 4, lane % 4) owns rows lane/4 + 8i and columns lane%4 + 4j of the
// strip, so per k a lane loads 2 MT + 4 NT operands for 8 MT NT FMAs.
template <typename T, int MT, int NT, bool A_ROW, bool B_ROW>
struct FmaTile {
  float acc[2 * MT][4 * NT];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 2 * MT; ++i)
#pragma unroll
      for (int j = 0; j < 4 * NT; ++j) acc[i][j] = 0.0f;
  }

  __device__ __forceinline__ void step(const T* a, int lda, const T* b, int ldb, int k0, int warp) {
    const int lane = static_cast<int>(threadIdx.x) & 31;
    const int row = warp * 16 * MT + (lane >> 2), col = lane & 3;
#pragma unroll 4
    for (int kk = 0; kk < 16; ++kk) {
      const int k = k0 + kk;
      float av[2 * MT], bv[4 * NT];
#pragma unroll
      for (int i = 0; i < 2 * MT; ++i) av[i] = to_float(A_ROW ? a[(row + 8 * i) * lda + k] : a[k * lda + row + 8 * i]);
#pragma unroll
      for (int j = 0; j < 4 * NT; ++j) bv[j] = to_float(B_ROW ? b[k * ldb + col + 4 * j] : b[(col + 4 * j) * ldb + k]);
#pragma unroll
      for (int i = 0; i < 2 * MT; ++i)
#pragma unroll
        for (int j = 0; j < 4 * NT; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void store(float* c, int64_t ldc, int warp) const {
    const int lane = static_cast<int>(threadIdx.x) & 31;
    const int row = warp * 16 * MT + (lane >> 2), col = lane & 3;
#pragma unroll
    for (int i = 0; i < 2 * MT; ++i)
#pragma unroll
      for (int j = 0; j < 4 * NT; ++j) c[(row + 8 * i) * ldc + col + 4 * j] = acc[i][j];
  }
};

// bf16 WMMA needs sm_80; the device passes for older GPUs (TORCH_CUDA_ARCH_LIST) run every dtype on FmaTile.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
namespace wmma = nvcuda::wmma;

// Tensor cores: 16x16x16 fragments of fp16/bf16 with fp32 accumulators.
template <typename T, int MT, int NT, bool A_ROW, bool B_ROW>
struct WmmaTile {
  using ALayout = std::conditional_t<A_ROW, wmma::row_major, wmma::col_major>;
  using BLayout = std::conditional_t<B_ROW, wmma::row_major, wmma::col_major>;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[MT][NT];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }

  __device__ __forceinline__ void step(const T* a, int lda, const T* b, int ldb, int k0, int warp) {
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> fb[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const T* pb = B_ROW ? b + k0 * ldb + 16 * j : b + 16 * j * ldb + k0;
      wmma::load_matrix_sync(fb[j], pb, ldb);
    }
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      const int i0 = (warp * MT + i) * 16;
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALayout> fa;
      wmma::load_matrix_sync(fa, A_ROW ? a + i0 * lda + k0 : a + k0 * lda + i0, lda);
#pragma unroll
      for (int j = 0; j < NT; ++j) wmma::mma_sync(acc[i][j], fa, fb[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void store(float* c, int64_t ldc, int warp) const {
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
        wmma::store_matrix_sync(c + static_cast<int64_t>((warp * MT + i) * 16) * ldc + 16 * j, acc[i][j],
                                static_cast<unsigned>(ldc), wmma::mem_row_major);
  }
};

template <typename T, int MT, int NT, bool A_ROW, bool B_ROW>
using WarpTile = std::conditional_t<std::is_same_v<T, float>, FmaTile<T, MT, NT, A_ROW, B_ROW>,
                                    WmmaTile<T, MT, NT, A_ROW, B_ROW>>;
#else
template <typename T, int MT, int NT, bool A_ROW, bool B_ROW>
using WarpTile = FmaTile<T, MT, NT, A_ROW, B_ROW>;
#endif

// ---------------------------------------------------------------------------------------------- kernels

constexpr int kRankTile = 16;
constexpr int kMaxRankTiles = 4;  // 64 ranks per pass: a warp's 16 x 64 fp32 accumulators stay in registers
constexpr int kDownRows = 64, kDownCols = 64;
// 128 columns x 32 rows per step: the staged tile, its prefetched successor and a 32 x 64 accumulator strip
// per warp fit in 168 registers, so three blocks (12 warps, ~24 KB of loads in flight) share an SM.
constexpr int kGradCols = 128, kGradRows = 32, kGradMinBlocks = 3;
constexpr int kUpRows = 64, kUpCols = 64, kUpRank = 32;
constexpr int kMergeRows = 32, kMergeCols = 64, kMergeRank = 32;

// part[split, m, j] = sum over this split's k of drop(x)[m, k] w[j, k] for a 64-row tile and one chunk of
// 16 RT ranks (grid: row tiles x k-splits x rank chunks). x's tiles are read once, the next one fetched while
// the current one is multiplied; w's tile is re-read per k-step from L2 (w is r x K, tiny). Rows past M are
// staged as zeros, so every partial row is written.
template <typename T, int RT>
__global__ void __launch_bounds__(kThreads) lora_down_kernel(
    const T* __restrict__ x, int64_t M, int64_t K, int64_t ldx, bool x_vec,
    const void* __restrict__ w, DType w_dtype, int64_t R, int64_t stride_wr, int64_t stride_wk,
    Dropout drop, int64_t k_per_split, float* __restrict__ part, int64_t rows_pad, int64_t ld_part) {
  constexpr int BM = kDownRows, BK = kDownCols, RP = kRankTile * RT, LD = BK + kPad<T>;
  __shared__ __align__(128) T x_s[BM * LD];
  __shared__ __align__(128) T w_s[RP * LD];
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * k_per_split;
  const int64_t k_end = k_begin + k_per_split < K ? k_begin + k_per_split : K;
  const int64_t j0 = static_cast<int64_t>(blockIdx.z) * RP;
  WarpTile<T, 1, RT, true, false> tile;  // A = x tile (row-major), B(k, j) = w_s[j][k] (column-major)
  tile.zero();
  TileFetch<T, BM, BK> x_tile;
  if (k_begin < k_end) x_tile.fetch(x, ldx, m0, k_begin, M, K, x_vec);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += BK) {
    x_tile.template commit<T, false>(x_s, LD, m0, k0, drop, nullptr);
    stage_tile_strided<T, RP, BK>(w_s, LD, w, w_dtype, stride_wr, stride_wk, j0, k0, R, K);
    __syncthreads();
    if (k0 + BK < k_end) x_tile.fetch(x, ldx, m0, k0 + BK, M, K, x_vec);
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) tile.step(x_s, LD, w_s, LD, kk, warp);
    __syncthreads();
  }
  tile.store(part + (static_cast<int64_t>(blockIdx.y) * rows_pad + m0) * ld_part + j0, ld_part, warp);
}

// part[split, p, j] = sum over this split's rows m of drop(big)[m, p] small[m, j] for a 128-column tile of
// big and one rank chunk (grid: column tiles x m-splits x rank chunks); colsum_part[split, p] = the column
// sums of drop(big), gathered in registers while staging (the bias gradient rides along the dB pass). The
// next row tile's loads are in flight while the current one is multiplied.
template <typename T, int RT>
__global__ void __launch_bounds__(kThreads, kGradMinBlocks) lora_grad_kernel(
    const T* __restrict__ big, int64_t M, int64_t P, int64_t ld_big, bool big_vec,
    const float* __restrict__ small, int64_t R, int64_t ld_small, bool small_vec,
    Dropout drop, int64_t m_per_split, float* __restrict__ part, int64_t rows_pad, int64_t ld_part,
    float* __restrict__ colsum_part) {
  constexpr int BP = kGradCols, BM = kGradRows, RP = kRankTile * RT;
  constexpr int LDB = BP + kPad<T>, LDS = RP + kPad<T>;
  constexpr int VEC = 16 / static_cast<int>(sizeof(T)), VPR = BP / VEC, GROUPS = kThreads / VPR;
  __shared__ __align__(128) T big_s[BM * LDB];
  __shared__ __align__(128) T small_s[BM * LDS];
  static_assert(sizeof(big_s) >= GROUPS * BP * sizeof(float), "the column-sum scratch fits in big_s");
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * BP;
  const int64_t m_begin = static_cast<int64_t>(blockIdx.y) * m_per_split;
  const int64_t m_end = m_begin + m_per_split < M ? m_begin + m_per_split : M;
  const int64_t j0 = static_cast<int64_t>(blockIdx.z) * RP;
  const bool colsum = colsum_part != nullptr && blockIdx.z == 0;
  float col_acc[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) col_acc[e] = 0.0f;
  WarpTile<T, 2, RT, false, true> tile;  // A(p, m) = big_s[m][p] (column-major), B = small tile (row-major)
  tile.zero();
  TileFetch<T, BM, BP> big_tile;
  TileFetch<float, BM, RP> small_tile;
  if (m_begin < m_end) {
    big_tile.fetch(big, ld_big, m_begin, p0, M, P, big_vec);
    small_tile.fetch(small, ld_small, m_begin, j0, M, R, small_vec);
  }
  for (int64_t m0 = m_begin; m0 < m_end; m0 += BM) {
    if (colsum) {
      big_tile.template commit<T, true>(big_s, LDB, m0, p0, drop, col_acc);
    } else {
      big_tile.template commit<T, false>(big_s, LDB, m0, p0, drop, nullptr);
    }
    small_tile.template commit<T, false>(small_s, LDS, m0, j0, Dropout{}, nullptr);
    __syncthreads();
    if (m0 + BM < m_end) {
      big_tile.fetch(big, ld_big, m0 + BM, p0, M, P, big_vec);
      small_tile.fetch(small, ld_small, m0 + BM, j0, M, R, small_vec);
    }
#pragma unroll
    for (int kk = 0; kk < BM; kk += 16) tile.step(big_s, LDB, small_s, LDS, kk, warp);
    __syncthreads();
  }
  tile.store(part + (static_cast<int64_t>(blockIdx.y) * rows_pad + p0) * ld_part + j0, ld_part, warp);
  if (!colsum) return;
  // Threads t, t + VPR, ... hold the same columns: add them up through shared memory (big_s is free now).
  float* scratch = reinterpret_cast<float*>(big_s);
  const int t = static_cast<int>(threadIdx.x);
#pragma unroll
  for (int e = 0; e < VEC; ++e) scratch[(t / VPR) * BP + (t % VPR) * VEC + e] = col_acc[e];
  __syncthreads();
  if (t < BP) {
    float sum = 0.0f;
#pragma unroll
    for (int g = 0; g < GROUPS; ++g) sum += scratch[g * BP + t];
    colsum_part[static_cast<int64_t>(blockIdx.y) * rows_pad + p0 + t] = sum;
  }
}

// out[i, j] = scale * sum over splits of part[s, i, j], in a fixed order (deterministic), cast to out's dtype.
template <typename TO>
__global__ void lora_reduce_kernel(const float* __restrict__ part, int64_t splits, int64_t split_stride,
                                   int64_t rows, int64_t R, int64_t ld_part, float scale, TO* __restrict__ out,
                                   int64_t stride_out_row, int64_t stride_out_col) {
  const int64_t n = rows * R;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / R, col = i - row * R;
    const float* p = part + row * ld_part + col;
    float sum = 0.0f;
    for (int64_t s = 0; s < splits; ++s) sum += p[s * split_stride];
    out[row * stride_out_row + col * stride_out_col] = from_float<TO>(scale * sum);
  }
}

// out[m, n] = scale * keep[m, n] * sum_j low[m, j] up[n, j] + bias[n] for a 64 x 64 tile, the rank in steps
// of 32. The product goes through shared memory so the epilogue knows each element's (m, n) for the mask
// and writes whole 16-byte vectors of out.
template <typename T>
__global__ void __launch_bounds__(kThreads) lora_up_kernel(
    const float* __restrict__ low, int64_t M, int64_t R, int64_t ld_low, bool low_vec,
    const void* __restrict__ up, DType up_dtype, int64_t N, int64_t stride_up_n, int64_t stride_up_r,
    const T* __restrict__ bias, float scale, Dropout drop, T* __restrict__ out, int64_t ld_out, bool out_vec) {
  constexpr int BM = kUpRows, BN = kUpCols, RK = kUpRank, LDL = RK + kPad<T>, LDC = BN + 4;
  constexpr int VEC = 16 / static_cast<int>(sizeof(T)), VPR = BN / VEC;
  static_assert((BM * VPR) % kThreads == 0, "whole passes");
  __shared__ __align__(128) T low_s[BM * LDL];
  __shared__ __align__(128) T up_s[BN * LDL];
  __shared__ __align__(128) float c_s[BM * LDC];
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  WarpTile<T, 1, BN / 16, true, false> tile;  // A = low tile (row-major), B(j, n) = up_s[n][j] (column-major)
  tile.zero();
  for (int64_t j0 = 0; j0 < R; j0 += RK) {
    TileFetch<float, BM, RK> low_tile;
    low_tile.fetch(low, ld_low, m0, j0, M, R, low_vec);
    low_tile.template commit<T, false>(low_s, LDL, m0, j0, Dropout{}, nullptr);
    stage_tile_strided<T, BN, RK>(up_s, LDL, up, up_dtype, stride_up_n, stride_up_r, n0, j0, N, R);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < RK; kk += 16) tile.step(low_s, LDL, up_s, LDL, kk, warp);
    __syncthreads();
  }
  tile.store(c_s, LDC, warp);
  __syncthreads();
#pragma unroll
  for (int i = 0; i < BM * VPR / kThreads; ++i) {
    const int v = static_cast<int>(threadIdx.x) + i * kThreads;
    const int r = v / VPR, c = (v % VPR) * VEC;
    const int64_t gm = m0 + r, gn = n0 + c;
    if (gm >= M || gn >= N) continue;
    float vals[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) vals[e] = scale * c_s[r * LDC + c + e];
    if (drop.active) apply_keep<VEC>(drop, gm, gn, vals);
    if (bias != nullptr) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) vals[e] += gn + e < N ? to_float(bias[gn + e]) : 0.0f;
    }
    T* dst = out + gm * ld_out + gn;
    if (out_vec && gn + VEC <= N) {
      store_vec<T, VEC>(dst, vals);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        if (gn + e < N) dst[e] = from_float<T>(vals[e]);
    }
  }
}

// w[i, c] += alpha * sum_j u[i, j] v[j, c] for a 32 x 64 tile of w, the rank in steps of 32 staged as fp32.
// Threads run along w's columns (its unit-stride dimension in the layouts bindings.cpp passes).
template <typename TW>
__global__ void __launch_bounds__(kThreads) lora_merge_kernel(
    TW* __restrict__ w, int64_t rows, int64_t cols, int64_t stride_row, int64_t stride_col,
    const void* __restrict__ u, DType u_dtype, int64_t stride_u_row, int64_t stride_u_r,
    const void* __restrict__ v, DType v_dtype, int64_t stride_v_r, int64_t stride_v_col, int64_t R, float alpha) {
  constexpr int ROW_GROUPS = kThreads / kMergeCols, ROWS_PER_THREAD = kMergeRows / ROW_GROUPS;
  __shared__ float u_s[kMergeRows][kMergeRank + 1];
  __shared__ float v_s[kMergeRank][kMergeCols];
  const int t = static_cast<int>(threadIdx.x);
  const int col = t % kMergeCols, row_group = t / kMergeCols;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kMergeRows;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kMergeCols;
  float acc[ROWS_PER_THREAD];
#pragma unroll
  for (int q = 0; q < ROWS_PER_THREAD; ++q) acc[q] = 0.0f;
  for (int64_t r0 = 0; r0 < R; r0 += kMergeRank) {
    for (int e = t; e < kMergeRows * kMergeRank; e += kThreads) {
      const int i = e / kMergeRank, j = e % kMergeRank;
      u_s[i][j] = (i0 + i < rows && r0 + j < R)
                      ? load_any(u, u_dtype, (i0 + i) * stride_u_row + (r0 + j) * stride_u_r) : 0.0f;
    }
    for (int e = t; e < kMergeRank * kMergeCols; e += kThreads) {
      const int j = e / kMergeCols, c = e % kMergeCols;
      v_s[j][c] = (r0 + j < R && c0 + c < cols)
                      ? load_any(v, v_dtype, (r0 + j) * stride_v_r + (c0 + c) * stride_v_col) : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int j = 0; j < kMergeRank; ++j) {
      const float vj = v_s[j][col];
#pragma unroll
      for (int q = 0; q < ROWS_PER_THREAD; ++q) acc[q] = fmaf(u_s[row_group + ROW_GROUPS * q][j], vj, acc[q]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int q = 0; q < ROWS_PER_THREAD; ++q) {
    const int64_t i = i0 + row_group + ROW_GROUPS * q, c = c0 + col;
    if (i < rows && c < cols) {
      TW* p = w + i * stride_row + c * stride_col;
      *p = from_float<TW>(to_float(*p) + alpha * acc[q]);
    }
  }
}

// keep[m, k] for groups of four columns: one Philox call each, as the kernels above draw them.
__global__ void lora_dropout_mask_kernel(uint8_t* __restrict__ keep, int64_t M, int64_t K, Dropout drop) {
  const int64_t groups = (K + 3) / 4, n = M * groups;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / groups, k = (i - m * groups) * 4;
    const uint4 draw = dropout_draws(drop, m, k);
    const uint32_t d[4] = {draw.x, draw.y, draw.z, draw.w};
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (k + e < K) keep[m * K + k + e] = static_cast<uint8_t>(!drop.active || d[e] >= drop.threshold);
  }
}

// --------------------------------------------------------------------------------------------- launchers

constexpr int kBlocksPerSm = 8;  // resident blocks the splits aim for: enough 16-byte loads in flight per SM
constexpr int kReduceThreads = 256;

// 16-byte vectors along rows need a 16-byte aligned base and a row stride of whole vectors (any stride when
// there is one row).
bool vectorizable(const void* p, int64_t ld, int64_t rows, int64_t elem_size) {
  return aligned16(p) && (rows <= 1 || (ld * elem_size) % 16 == 0);
}

Dropout make_dropout(float p, uint64_t seed) {
  Dropout d{};
  d.key_lo = static_cast<uint32_t>(seed);
  d.key_hi = static_cast<uint32_t>(seed >> 32);
  d.active = p > 0.0f;
  const double threshold = static_cast<double>(p) * 4294967296.0;
  d.threshold = d.active ? static_cast<uint32_t>(threshold < 4294967295.0 ? threshold : 4294967295.0) : 0u;
  return d;
}

float keep_scale(float p) { return p > 0.0f ? 1.0f / (1.0f - p) : 1.0f; }

// The rank in chunks of up to 64 (a grid dimension); ws_cols: the padded rank of the partial sums.
struct RankChunks {
  int tiles;  // 16-wide rank tiles per chunk
  int64_t chunks, ws_cols;
};

RankChunks rank_chunks(int64_t R) {
  const int64_t tiles = ceil_div(R, kRankTile);
  const int per_chunk = static_cast<int>(tiles < kMaxRankTiles ? tiles : kMaxRankTiles);
  const int64_t chunks = ceil_div(tiles, per_chunk);
  return {per_chunk, chunks, chunks * per_chunk * kRankTile};
}

// A reduction over `tiles` tiles split so that about kBlocksPerSm blocks per SM run beside `other_blocks`,
// with at least min_tiles tiles per split: each split costs a row of partial sums in the workspace.
struct Splits {
  int64_t count, tiles_per_split;
};

Splits pick_splits(int64_t other_blocks, int64_t tiles, int sm_count, int64_t min_tiles) {
  const int64_t want = ceil_div(static_cast<int64_t>(kBlocksPerSm) * sm_count, other_blocks);
  const int64_t cap = tiles / min_tiles > 1 ? tiles / min_tiles : 1;
  const int64_t count = want < 1 ? 1 : (want > cap ? cap : want);
  const int64_t per = ceil_div(tiles, count);
  return {ceil_div(tiles, per), per};
}

// The partial sums of a split reduction: `rows` output rows in tiles (padded to whole tiles), the rank in
// chunks, and the reduced dimension (`length`, in tiles of reduce_tile) split across blocks.
struct SplitPlan {
  RankChunks rank;
  int64_t row_tiles, rows_pad;
  Splits splits;
  int64_t partial() const { return splits.count * rows_pad * rank.ws_cols; }
};

SplitPlan plan_split(int64_t rows, int row_tile, int64_t length, int reduce_tile, int64_t R, int64_t min_tiles,
                     int sm_count) {
  SplitPlan plan{};
  plan.rank = rank_chunks(R);
  plan.row_tiles = ceil_div(rows, row_tile);
  plan.rows_pad = plan.row_tiles * row_tile;
  const int64_t tiles = length > 0 ? ceil_div(length, reduce_tile) : 1;
  plan.splits = pick_splits(plan.row_tiles * plan.rank.chunks, tiles, sm_count, min_tiles);
  return plan;
}

// lora_down: rows of x in 64-row tiles, K split with at least 256 columns per split.
SplitPlan plan_down(int64_t M, int64_t K, int64_t R, int sm_count) {
  return plan_split(M, kDownRows, K, kDownCols, R, 4, sm_count);
}

// lora_grad: columns of big in 128-column tiles, M split with at least 512 rows per split.
SplitPlan plan_grad(int64_t M, int64_t P, int64_t R, int sm_count) {
  return plan_split(P, kGradCols, M, kGradRows, R, 16, sm_count);
}

int reduce_blocks(int64_t n, int sm_count) {
  const int64_t blocks = ceil_div(n, kReduceThreads), cap = static_cast<int64_t>(sm_count) * 16;
  return static_cast<int>(blocks < cap ? (blocks > 0 ? blocks : 1) : cap);
}

template <typename TO>
cudaError_t launch_reduce(const float* part, int64_t splits, int64_t split_stride, int64_t rows, int64_t R,
                          int64_t ld_part, float scale, void* out, int64_t stride_out_row, int64_t stride_out_col,
                          int sm_count, cudaStream_t stream) {
  lora_reduce_kernel<TO><<<reduce_blocks(rows * R, sm_count), kReduceThreads, 0, stream>>>(
      part, splits, split_stride, rows, R, ld_part, scale, static_cast<TO*>(out), stride_out_row, stride_out_col);
  return cudaGetLastError();
}

cudaError_t reduce_to(DType out_dtype, const float* part, int64_t splits, int64_t split_stride, int64_t rows,
                      int64_t R, int64_t ld_part, float scale, void* out, int64_t stride_out_row,
                      int64_t stride_out_col, int sm_count, cudaStream_t stream) {
  switch (out_dtype) {
    case DType::kFloat32:
      return launch_reduce<float>(part, splits, split_stride, rows, R, ld_part, scale, out, stride_out_row,
                                  stride_out_col, sm_count, stream);
    case DType::kFloat16:
      return launch_reduce<__half>(part, splits, split_stride, rows, R, ld_part, scale, out, stride_out_row,
                                   stride_out_col, sm_count, stream);
    case DType::kBFloat16:
      return launch_reduce<__nv_bfloat16>(part, splits, split_stride, rows, R, ld_part, scale, out,
                                          stride_out_row, stride_out_col, sm_count, stream);
    case DType::kFloat64:
      return launch_reduce<double>(part, splits, split_stride, rows, R, ld_part, scale, out, stride_out_row,
                                   stride_out_col, sm_count, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t launch_down(const SplitPlan& plan, const void* x, int64_t M, int64_t K, int64_t ldx, const void* w,
                        DType w_dtype, int64_t R, int64_t stride_wr, int64_t stride_wk, const Dropout& drop,
                        float* part, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(plan.row_tiles), static_cast<unsigned>(plan.splits.count),
                  static_cast<unsigned>(plan.rank.chunks));
  const T* xt = static_cast<const T*>(x);
  const bool x_vec = vectorizable(x, ldx, M, sizeof(T));
  const int64_t k_per_split = plan.splits.tiles_per_split * kDownCols;
  const int64_t ld = plan.rank.ws_cols;
  switch (plan.rank.tiles) {
    case 1:
      lora_down_kernel<T, 1><<<grid, kThreads, 0, stream>>>(xt, M, K, ldx, x_vec, w, w_dtype, R, stride_wr, stride_wk,
                                                            drop, k_per_split, part, plan.rows_pad, ld);
      break;
    case 2:
      lora_down_kernel<T, 2><<<grid, kThreads, 0, stream>>>(xt, M, K, ldx, x_vec, w, w_dtype, R, stride_wr, stride_wk,
                                                            drop, k_per_split, part, plan.rows_pad, ld);
      break;
    case 3:
      lora_down_kernel<T, 3><<<grid, kThreads, 0, stream>>>(xt, M, K, ldx, x_vec, w, w_dtype, R, stride_wr, stride_wk,
                                                            drop, k_per_split, part, plan.rows_pad, ld);
      break;
    default:
      lora_down_kernel<T, 4><<<grid, kThreads, 0, stream>>>(xt, M, K, ldx, x_vec, w, w_dtype, R, stride_wr, stride_wk,
                                                            drop, k_per_split, part, plan.rows_pad, ld);
      break;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_grad(const SplitPlan& plan, const void* big, int64_t M, int64_t P, int64_t ld_big,
                        const float* small, int64_t R, int64_t ld_small, const Dropout& drop, float* part,
                        float* colsum_part, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(plan.row_tiles), static_cast<unsigned>(plan.splits.count),
                  static_cast<unsigned>(plan.rank.chunks));
  const T* bt = static_cast<const T*>(big);
  const bool big_vec = vectorizable(big, ld_big, M, sizeof(T));
  const bool small_vec = vectorizable(small, ld_small, M, sizeof(float));
  const int64_t m_per_split = plan.splits.tiles_per_split * kGradRows;
  const int64_t ld = plan.rank.ws_cols;
  switch (plan.rank.tiles) {
    case 1:
      lora_grad_kernel<T, 1><<<grid, kThreads, 0, stream>>>(bt, M, P, ld_big, big_vec, small, R, ld_small, small_vec,
                                                            drop, m_per_split, part, plan.rows_pad, ld, colsum_part);
      break;
    case 2:
      lora_grad_kernel<T, 2><<<grid, kThreads, 0, stream>>>(bt, M, P, ld_big, big_vec, small, R, ld_small, small_vec,
                                                            drop, m_per_split, part, plan.rows_pad, ld, colsum_part);
      break;
    case 3:
      lora_grad_kernel<T, 3><<<grid, kThreads, 0, stream>>>(bt, M, P, ld_big, big_vec, small, R, ld_small, small_vec,
                                                            drop, m_per_split, part, plan.rows_pad, ld, colsum_part);
      break;
    default:
      lora_grad_kernel<T, 4><<<grid, kThreads, 0, stream>>>(bt, M, P, ld_big, big_vec, small, R, ld_small, small_vec,
                                                            drop, m_per_split, part, plan.rows_pad, ld, colsum_part);
      break;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_up(const float* low, int64_t M, int64_t R, int64_t ld_low, const void* up, DType up_dtype,
                      int64_t N, int64_t stride_up_n, int64_t stride_up_r, const void* bias, float scale,
                      const Dropout& drop, void* out, int64_t ld_out, cudaStream_t stream) {
  const int64_t n_tiles = ceil_div(N, kUpCols);
  if (n_tiles > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(ceil_div(M, kUpRows)), static_cast<unsigned>(n_tiles));
  lora_up_kernel<T><<<grid, kThreads, 0, stream>>>(
      low, M, R, ld_low, vectorizable(low, ld_low, M, sizeof(float)), up, up_dtype, N, stride_up_n, stride_up_r,
      static_cast<const T*>(bias), scale, drop, static_cast<T*>(out), ld_out, vectorizable(out, ld_out, M, sizeof(T)));
  return cudaGetLastError();
}

template <typename TW>
cudaError_t launch_merge(void* w, int64_t rows, int64_t cols, int64_t stride_row, int64_t stride_col, const void* u,
                         DType u_dtype, int64_t stride_u_row, int64_t stride_u_r, const void* v, DType v_dtype,
                         int64_t stride_v_r, int64_t stride_v_col, int64_t R, float alpha, cudaStream_t stream) {
  const int64_t col_tiles = ceil_div(cols, kMergeCols);
  if (col_tiles > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(ceil_div(rows, kMergeRows)), static_cast<unsigned>(col_tiles));
  lora_merge_kernel<TW><<<grid, kThreads, 0, stream>>>(static_cast<TW*>(w), rows, cols, stride_row, stride_col, u,
                                                       u_dtype, stride_u_row, stride_u_r, v, v_dtype, stride_v_r,
                                                       stride_v_col, R, alpha);
  return cudaGetLastError();
}

}  // namespace

int64_t lora_down_workspace(int64_t M, int64_t K, int64_t R, int sm_count) {
  if (M <= 0 || R <= 0) return 0;
  return plan_down(M, K, R, sm_count).partial();
}

int64_t lora_grad_workspace(int64_t M, int64_t P, int64_t R, bool colsum, int sm_count) {
  if (P <= 0 || R <= 0) return 0;
  const SplitPlan plan = plan_grad(M, P, R, sm_count);
  return plan.partial() + (colsum ? plan.splits.count * plan.rows_pad : 0);
}

cudaError_t lora_down(const void* x, DType x_dtype, int64_t M, int64_t K, int64_t ldx,
                      const void* w, DType w_dtype, int64_t R, int64_t stride_wr, int64_t stride_wk,
                      float dropout_p, uint64_t seed, float* out, int64_t ld_out,
                      float* workspace, int sm_count, cudaStream_t stream) {
  if (M <= 0 || R <= 0) return cudaSuccess;
  const SplitPlan plan = plan_down(M, K, R, sm_count);
  const Dropout drop = make_dropout(dropout_p, seed);
  cudaError_t err = cudaErrorInvalidValue;
  switch (x_dtype) {
    case DType::kFloat32:
      err = launch_down<float>(plan, x, M, K, ldx, w, w_dtype, R, stride_wr, stride_wk, drop, workspace, stream);
      break;
    case DType::kFloat16:
      err = launch_down<__half>(plan, x, M, K, ldx, w, w_dtype, R, stride_wr, stride_wk, drop, workspace, stream);
      break;
    case DType::kBFloat16:
      err = launch_down<__nv_bfloat16>(plan, x, M, K, ldx, w, w_dtype, R, stride_wr, stride_wk, drop, workspace,
                                       stream);
      break;
    default:
      break;
  }
  if (err != cudaSuccess) return err;
  return reduce_to(DType::kFloat32, workspace, plan.splits.count, plan.rows_pad * plan.rank.ws_cols, M, R,
                   plan.rank.ws_cols, keep_scale(dropout_p), out, ld_out, 1, sm_count, stream);
}

cudaError_t lora_grad(const void* big, DType big_dtype, int64_t M, int64_t P, int64_t ld_big,
                      const float* small, int64_t R, int64_t ld_small,
                      float dropout_p, uint64_t seed, float scale,
                      void* out, DType out_dtype, int64_t stride_out_p, int64_t stride_out_r,
                      float* colsum, float* workspace, int sm_count, cudaStream_t stream) {
  if (P <= 0 || R <= 0) return cudaSuccess;
  const SplitPlan plan = plan_grad(M, P, R, sm_count);
  const Dropout drop = make_dropout(dropout_p, seed);
  float* colsum_part = colsum != nullptr ? workspace + plan.partial() : nullptr;
  cudaError_t err = cudaErrorInvalidValue;
  switch (big_dtype) {
    case DType::kFloat32:
      err = launch_grad<float>(plan, big, M, P, ld_big, small, R, ld_small, drop, workspace, colsum_part, stream);
      break;
    case DType::kFloat16:
      err = launch_grad<__half>(plan, big, M, P, ld_big, small, R, ld_small, drop, workspace, colsum_part, stream);
      break;
    case DType::kBFloat16:
      err = launch_grad<__nv_bfloat16>(plan, big, M, P, ld_big, small, R, ld_small, drop, workspace, colsum_part,
                                       stream);
      break;
    default:
      break;
  }
  if (err != cudaSuccess) return err;
  const float keep = keep_scale(dropout_p);
  if (out != nullptr) {
    err = reduce_to(out_dtype, workspace, plan.splits.count, plan.rows_pad * plan.rank.ws_cols, P, R,
                    plan.rank.ws_cols, scale * keep, out, stride_out_p, stride_out_r, sm_count, stream);
    if (err != cudaSuccess) return err;
  }
  if (colsum != nullptr) {
    err = reduce_to(DType::kFloat32, colsum_part, plan.splits.count, plan.rows_pad, P, 1, 1, keep, colsum, 1, 1,
                    sm_count, stream);
  }
  return err;
}

cudaError_t lora_up(const float* low, int64_t M, int64_t R, int64_t ld_low,
                    const void* up, DType up_dtype, int64_t N, int64_t stride_up_n, int64_t stride_up_r,
                    const void* bias, float scale, float dropout_p, uint64_t seed,
                    void* out, DType out_dtype, int64_t ld_out, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  const Dropout drop = make_dropout(dropout_p, seed);
  const float s = scale * keep_scale(dropout_p);
  switch (out_dtype) {
    case DType::kFloat32:
      return launch_up<float>(low, M, R, ld_low, up, up_dtype, N, stride_up_n, stride_up_r, bias, s, drop, out,
                              ld_out, stream);
    case DType::kFloat16:
      return launch_up<__half>(low, M, R, ld_low, up, up_dtype, N, stride_up_n, stride_up_r, bias, s, drop, out,
                               ld_out, stream);
    case DType::kBFloat16:
      return launch_up<__nv_bfloat16>(low, M, R, ld_low, up, up_dtype, N, stride_up_n, stride_up_r, bias, s, drop,
                                      out, ld_out, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t lora_merge(void* w, DType w_dtype, int64_t rows, int64_t cols, int64_t stride_row, int64_t stride_col,
                       const void* u, DType u_dtype, int64_t stride_u_row, int64_t stride_u_r,
                       const void* v, DType v_dtype, int64_t stride_v_r, int64_t stride_v_col,
                       int64_t R, float alpha, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  switch (w_dtype) {
    case DType::kFloat32:
      return launch_merge<float>(w, rows, cols, stride_row, stride_col, u, u_dtype, stride_u_row, stride_u_r, v,
                                 v_dtype, stride_v_r, stride_v_col, R, alpha, stream);
    case DType::kFloat16:
      return launch_merge<__half>(w, rows, cols, stride_row, stride_col, u, u_dtype, stride_u_row, stride_u_r, v,
                                  v_dtype, stride_v_r, stride_v_col, R, alpha, stream);
    case DType::kBFloat16:
      return launch_merge<__nv_bfloat16>(w, rows, cols, stride_row, stride_col, u, u_dtype, stride_u_row, stride_u_r,
                                         v, v_dtype, stride_v_r, stride_v_col, R, alpha, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t lora_dropout_mask(uint8_t* keep, int64_t M, int64_t K, float dropout_p, uint64_t seed,
                              cudaStream_t stream) {
  const int64_t n = M * ceil_div(K, 4);
  if (n <= 0) return cudaSuccess;
  const int64_t blocks = ceil_div(n, kReduceThreads);
  lora_dropout_mask_kernel<<<static_cast<unsigned>(blocks < 65536 ? blocks : 65536), kReduceThreads, 0, stream>>>(
      keep, M, K, make_dropout(dropout_p, seed));
  return cudaGetLastError();
}

}  // namespace peftkern

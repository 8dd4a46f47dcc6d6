// KronA around cuBLAS: the frozen GEMMs stay in cuBLAS (called from krona_bindings.cpp through ATen); these kernels
// apply the Kronecker sum through the reshape identity, one token at a time, never as an N x K matrix.
//
// Math (x: M x K, W: N x K frozen, s = scaling, terms t with A_t: n1 x k1, B_t: n2 x k2, N = n1 n2, K = k1 k2,
// torch.kron's layout). Per token m, X_m is x_m as a row-major (k1, k2) matrix and G_m is dy_m as (n1, n2):
//   forward   C_m  = s sum_t vec(A_t X_m B_t^T) + b        krona_term_kernel (P = X B^T, then A P), written once
//             y    = C + x W^T                             cuBLAS with beta = 1 (reads C in its epilogue)
//   backward  dx_m = s sum_t vec(A_t^T G_m B_t)            krona_grad_kernel beside dA and dB (or krona_term_kernel
//             dx  += dy W                                  with A^T, B^T on dy), then cuBLAS with beta = 1
//             dA_t = s sum_m G_m (X_m B_t^T)^T             krona_grad_kernel: per-block fp32 partial sums, added in a
//             dB_t = s sum_m G_m^T (A_t X_m)               fixed order by krona_reduce_kernel (deterministic)
//   merge     W   += sign s sum_t A_t (x) B_t              krona_merge_kernel, each element its own T products
//
// Each block holds every term's whole factors in shared memory (zero-padded to multiples of 16, rounded to x's dtype
// for 16-bit x as a bf16 GEMM would) and walks its own run of tokens, the next token's rows fetched by cp.async
// while this one's products run (two buffers, where they fit): a token's X (and G) is staged, the small
// products run on tensor cores (mma.sync m16n8k16, fp32 accumulation) for fp16/bf16 and on CUDA cores in exact fp32
// for fp32, intermediates (P = X B^T, A X, G B) are rounded to x's dtype between products, sums over terms and the
// dA / dB / dx accumulators stay fp32: in shared memory, or for dA and dB in the warps' registers where their tiles
// fit (kRegTiles; then two blocks share an SM at 64 x 64). Where the factors do not fit in shared memory the bindings
// run the backward pass once per term (where one term's fit) or take cuBLAS GEMMs on reshaped views instead.
//
// Floor (bf16, M = 8192, N = K = 4096, one 64 x 64 term): the base GEMM is 2MNK = 275 GFLOP each way; the term is
// 2M(K n2 + N k1) = 8.6 GFLOP forward, the dx term, dA and dB 8.6 GFLOP each. Bytes: x, y, dy and dx are 64 MB each.
// Forward: krona_term_kernel reads x and writes C (128 MB); cuBLAS reads C as its beta input. Backward with dA or
// dB wanted: krona_grad_kernel reads dy and x once and writes the dx term once (192 MB), plus partial sums of
// blocks x (T n1 k1 + T n2 k2) fp32 (8.6 MB at two blocks an SM on 132 SMs) and their reduction.

#include <cstdint>
#include <cstring>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline_primitives.h>
#include <cuda_runtime.h>

#include "element.cuh"
#include "krona.h"

namespace peftkern {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kScratchLd = 20;  // a warp's 16 x 16 fp32 staging tile; rows padded to keep lanes off one bank
constexpr int kReduceThreads = 256;
constexpr int kMergeThreads = 256;
// krona_grad_kernel's dA and dB tiles a warp may keep in registers across its tokens (4 fragments of 8 fp32 values),
// where terms x (dA's + dB's 16 x 16 tiles) <= kWarps kRegTiles: no fp32 accumulators in shared memory then.
constexpr int kRegTiles = 4;

// to_float, from_float, load_any: element.cuh

// ------------------------------------------------------------------------------------------- warp tile products
// One warp computes a 16 x 16 tile C(i0.., j0..) += sum_k A(i, k) B(k, j) over kdim (a multiple of 16), A and B in
// shared memory: A(i, k) = a[i lda + k] when A_ROW, else a[k lda + i]; B(k, j) = b[k ldb + j] when B_ROW, else
// b[j ldb + k]. Accumulators load from and store to row-major fp32 shared memory.

// CUDA cores: lane owns row lane / 2 and the eight columns from 8 (lane % 2) of the tile.
template <typename T>
struct FmaMma {
  struct Acc {
    float v[8];
  };

  __device__ static __forceinline__ int row() { return (static_cast<int>(threadIdx.x) & 31) >> 1; }
  __device__ static __forceinline__ int col() { return (static_cast<int>(threadIdx.x) & 1) * 8; }

  __device__ static __forceinline__ void zero(Acc& c) {
#pragma unroll
    for (int i = 0; i < 8; ++i) c.v[i] = 0.0f;
  }

  __device__ static __forceinline__ void load(Acc& c, const float* p, int ld) {
#pragma unroll
    for (int i = 0; i < 8; ++i) c.v[i] = p[row() * ld + col() + i];
  }

  __device__ static __forceinline__ void store(float* p, int ld, const Acc& c) {
#pragma unroll
    for (int i = 0; i < 8; ++i) p[row() * ld + col() + i] = c.v[i];
  }

  __device__ static __forceinline__ void store_rounded(T* p, int ld, const Acc& c) {
#pragma unroll
    for (int i = 0; i < 8; ++i) p[row() * ld + col() + i] = from_float<T>(c.v[i]);
  }

  template <bool A_ROW, bool B_ROW>
  __device__ static __forceinline__ void product(Acc& c, const T* a, int lda, int i0, const T* b, int ldb, int j0,
                                                 int kdim) {
    const int r = i0 + row(), c0 = j0 + col();
#pragma unroll 4
    for (int k = 0; k < kdim; ++k) {
      const float av = to_float(A_ROW ? a[r * lda + k] : a[k * lda + r]);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float bv = to_float(B_ROW ? b[k * ldb + c0 + i] : b[(c0 + i) * ldb + k]);
        c.v[i] = fmaf(av, bv, c.v[i]);
      }
    }
  }
};

// bf16 MMA needs sm_80; device passes for older GPUs (TORCH_CUDA_ARCH_LIST) run every dtype on FmaMma.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
// Tensor cores by PTX (mma.sync m16n8k16, operands by ldmatrix), whose register layouts the PTX ISA documents, so a
// tile is rounded and stored from registers. WMMA's fragments are opaque: its version went through a fp32 scratch
// tile per rounded tile, and the kernels were bound by shared-memory traffic (ncu at 14c5da5: L1 throughput ~70%,
// DRAM 13-19%).
template <typename T>
struct TensorMma {
  // A 16 x 16 fp32 tile as two m16n8 accumulators: v[4 h + 2 e + c] is (row g + 8 e, column 8 h + 2 t + c) for lane
  // 4 g + t.
  struct Acc {
    float v[8];
  };

  __device__ static __forceinline__ int lane() { return static_cast<int>(threadIdx.x) & 31; }

  __device__ static __forceinline__ void zero(Acc& c) {
#pragma unroll
    for (int i = 0; i < 8; ++i) c.v[i] = 0.0f;
  }

  __device__ static __forceinline__ void load(Acc& c, const float* p, int ld) {
    const int g = lane() >> 2, t = lane() & 3;
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // i = 2 h + e
      const float2 f = *reinterpret_cast<const float2*>(p + (g + 8 * (i & 1)) * ld + 8 * (i >> 1) + 2 * t);
      c.v[2 * i] = f.x;
      c.v[2 * i + 1] = f.y;
    }
  }

  __device__ static __forceinline__ void store(float* p, int ld, const Acc& c) {
    const int g = lane() >> 2, t = lane() & 3;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      *reinterpret_cast<float2*>(p + (g + 8 * (i & 1)) * ld + 8 * (i >> 1) + 2 * t) =
          make_float2(c.v[2 * i], c.v[2 * i + 1]);
    }
  }

  // Each lane rounds its own pairs and stores them as 4 bytes (p's rows have an even number of elements).
  __device__ static __forceinline__ void store_rounded(T* p, int ld, const Acc& c) {
    const int g = lane() >> 2, t = lane() & 3;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      T pair[2] = {from_float<T>(c.v[2 * i]), from_float<T>(c.v[2 * i + 1])};
      uint32_t raw;
      memcpy(&raw, pair, 4);
      *reinterpret_cast<uint32_t*>(p + (g + 8 * (i & 1)) * ld + 8 * (i >> 1) + 2 * t) = raw;
    }
  }

  // Four 8 x 8 matrices of 16-bit elements from shared memory, lane l giving the address of row l % 8 of matrix
  // l / 8 (rows 16-byte aligned); register q of every lane gets row lane / 4, columns 2 (lane % 4) + {0, 1} of matrix
  // q, or of its transpose with TRANS.
  template <bool TRANS>
  __device__ static __forceinline__ void ldmatrix4(uint32_t (&r)[4], const T* row) {
    const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
    if constexpr (TRANS) {
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
    } else {
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
    }
  }

  // d (m16n8, fp32) += a (m16k16) b (k16n8) for 16-bit T.
  __device__ static __forceinline__ void mma(float* d, const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    if constexpr (std::is_same_v<T, __half>) {
      asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                   "{%8, %9}, {%0, %1, %2, %3};\n"
                   : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
      asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                   "{%8, %9}, {%0, %1, %2, %3};\n"
                   : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
  }

  // The A operand's registers are its 8 x 8 blocks (rows 0-7 | 8-15) x (k 0-7 | 8-15) in the order (0, 0), (1, 0),
  // (0, 1), (1, 1); B's are, per 8-column half h, its k blocks 0-7 and 8-15. Lane l addresses row l % 8 of block
  // q = l / 8: stored with the needed rows as memory rows, ldmatrix takes them as they are; stored transposed (A
  // column-major, B row-major as K x N), .trans transposes each block on the way.
  template <bool A_ROW, bool B_ROW>
  __device__ static __forceinline__ void product(Acc& c, const T* a, int lda, int i0, const T* b, int ldb, int j0,
                                                 int kdim) {
    const int q = lane() >> 3, r = lane() & 7;
    const T* a_row = A_ROW ? a + (i0 + r + 8 * (q & 1)) * lda + 8 * (q >> 1)
                           : a + (r + 8 * (q >> 1)) * lda + i0 + 8 * (q & 1);
    const T* b_row = B_ROW ? b + (r + 8 * (q & 1)) * ldb + j0 + 8 * (q >> 1)
                           : b + (j0 + r + 8 * (q >> 1)) * ldb + 8 * (q & 1);
    const int a_step = A_ROW ? 16 : 16 * lda, b_step = B_ROW ? 16 * ldb : 16;
    for (int k0 = 0; k0 < kdim; k0 += 16) {
      uint32_t fa[4], fb[4];
      ldmatrix4<!A_ROW>(fa, a_row);
      ldmatrix4<B_ROW>(fb, b_row);
      mma(c.v, fa, fb[0], fb[1]);
      mma(c.v + 4, fa, fb[2], fb[3]);
      a_row += a_step;
      b_row += b_step;
    }
  }
};

template <typename T>
using Mma = std::conditional_t<std::is_same_v<T, float>, FmaMma<T>, TensorMma<T>>;
#else
template <typename T>
using Mma = FmaMma<T>;
#endif

// --------------------------------------------------------------------------------------- shared-memory layouts
// Every operand is a row-major matrix of padded dimensions (multiples of 16) whose rows are 16 bytes longer than
// its columns: rows stay 16-byte aligned for vector stores and for ldmatrix, whose eight row addresses of a block
// then fall in different banks. Regions start 128-byte aligned. The whole layout is zeroed once per block: the padding
// stays zero, so padded rows and columns add nothing to any product.

int64_t pad16(int64_t d) { return (d + 15) / 16 * 16; }

int64_t elem_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

struct Carver {
  int64_t at = 0;
  int64_t take(int64_t bytes) {
    const int64_t off = at;
    at = (at + bytes + 127) / 128 * 128;
    return off;
  }
};

// out (r1 x r2) = sum_t L_t (r1 x c1) Z (c1 x c2) R_t^T (r2 x c2).
struct TermPlan {
  int r1, c1, r2, c2, terms;
  int r1p, c1p, r2p, c2p;
  int ldl, ldr, ldz, ldp, ldo;
  int stages;  // 2: the next token's row is fetched into a second buffer while this one's products run
  int64_t l_off, r_off, z_off, z_next_off, p_off, o_off, scratch_off, bytes;
};

TermPlan plan_term(int64_t esize, int64_t r1, int64_t c1, int64_t r2, int64_t c2, int64_t terms, int stages) {
  const int64_t r1p = pad16(r1), c1p = pad16(c1), r2p = pad16(r2), c2p = pad16(c2), pad = 16 / esize;
  const int64_t ldl = c1p + pad, ldr = c2p + pad, ldz = c2p + pad, ldp = r2p + pad, ldo = r2p + 4;
  TermPlan p{};
  Carver c;
  p.l_off = c.take(terms * r1p * ldl * esize);
  p.r_off = c.take(terms * r2p * ldr * esize);
  p.z_off = c.take(c1p * ldz * esize);
  p.z_next_off = stages == 2 ? c.take(c1p * ldz * esize) : p.z_off;
  p.stages = stages;
  p.p_off = c.take(c1p * ldp * esize);
  p.o_off = c.take(r1p * ldo * 4);
  // nothing reads this since the products moved to mma.sync (010702a); kept because it sets the blocks an SM: branch
  // krona-cuda-smem dropped it (four blocks an SM at bf16 64 x 64 instead of three) and timed slower (NOTES-krona.md)
  p.scratch_off = c.take(kWarps * 16 * kScratchLd * 4);
  p.bytes = c.at;
  if (p.bytes > (int64_t{1} << 30)) return p;  // never launched (far past any GPU's shared memory): no int casts
  p.r1 = static_cast<int>(r1), p.c1 = static_cast<int>(c1), p.r2 = static_cast<int>(r2), p.c2 = static_cast<int>(c2);
  p.terms = static_cast<int>(terms);
  p.r1p = static_cast<int>(r1p), p.c1p = static_cast<int>(c1p), p.r2p = static_cast<int>(r2p);
  p.c2p = static_cast<int>(c2p);
  p.ldl = static_cast<int>(ldl), p.ldr = static_cast<int>(ldr), p.ldz = static_cast<int>(ldz);
  p.ldp = static_cast<int>(ldp), p.ldo = static_cast<int>(ldo);
  return p;
}

// The backward's buffers: factors A, B; a token's X (k1 x k2) and G (n1 x n2); P = X B^T (k1 x n2), V = A X and
// U = G B (n1 x k2), rounded to x's dtype; fp32 accumulators dA (T, n1, k1), dB (T, n2, k2) and the dx term's
// (k1 x k2). U and the dx accumulator only with_dx; dA and dB in shared memory only where they do not fit in the
// warps' registers (reg_acc: kRegTiles).
struct GradPlan {
  int n1, k1, n2, k2, terms;
  int n1p, k1p, n2p, k2p;
  int lda, ldb, ldx, ldg, ldp, ldv, lddA, lddB, lddx;
  bool with_dx, reg_acc;
  int stages;  // as TermPlan's, for X and G
  int64_t a_off, b_off, x_off, x_next_off, g_off, g_next_off, p_off, v_off, u_off, da_off, db_off, dx_off;
  int64_t scratch_off, bytes;
};

// Whether krona_grad_kernel keeps dA and dB in registers for these padded factors (allowed: the caller's switch).
bool grad_reg_acc(int64_t n1, int64_t k1, int64_t n2, int64_t k2, int64_t terms, bool allowed) {
  const int64_t tiles = terms * (pad16(n1) / 16 * (pad16(k1) / 16) + pad16(n2) / 16 * (pad16(k2) / 16));
  return allowed && tiles <= int64_t{kWarps} * kRegTiles;
}

GradPlan plan_grad(int64_t esize, int64_t n1, int64_t k1, int64_t n2, int64_t k2, int64_t terms, bool with_dx,
                   bool reg_acc, int stages) {
  const int64_t n1p = pad16(n1), k1p = pad16(k1), n2p = pad16(n2), k2p = pad16(k2), pad = 16 / esize;
  const int64_t lda = k1p + pad, ldb = k2p + pad, ldx = k2p + pad, ldg = n2p + pad, ldp = n2p + pad, ldv = k2p + pad;
  const int64_t lddA = k1p + 4, lddB = k2p + 4, lddx = k2p + 4;
  GradPlan p{};
  Carver c;
  p.a_off = c.take(terms * n1p * lda * esize);
  p.b_off = c.take(terms * n2p * ldb * esize);
  p.x_off = c.take(k1p * ldx * esize);
  p.g_off = c.take(n1p * ldg * esize);
  p.x_next_off = stages == 2 ? c.take(k1p * ldx * esize) : p.x_off;
  p.g_next_off = stages == 2 ? c.take(n1p * ldg * esize) : p.g_off;
  p.stages = stages;
  p.p_off = c.take(k1p * ldp * esize);
  p.v_off = c.take(n1p * ldv * esize);
  p.u_off = with_dx ? c.take(n1p * ldv * esize) : 0;
  p.da_off = reg_acc ? 0 : c.take(terms * n1p * lddA * 4);
  p.db_off = reg_acc ? 0 : c.take(terms * n2p * lddB * 4);
  p.dx_off = with_dx ? c.take(k1p * lddx * 4) : 0;
  p.scratch_off = c.take(kWarps * 16 * kScratchLd * 4);
  p.bytes = c.at;
  p.with_dx = with_dx;
  p.reg_acc = reg_acc;
  if (p.bytes > (int64_t{1} << 30)) return p;
  p.n1 = static_cast<int>(n1), p.k1 = static_cast<int>(k1), p.n2 = static_cast<int>(n2), p.k2 = static_cast<int>(k2);
  p.terms = static_cast<int>(terms);
  p.n1p = static_cast<int>(n1p), p.k1p = static_cast<int>(k1p), p.n2p = static_cast<int>(n2p);
  p.k2p = static_cast<int>(k2p);
  p.lda = static_cast<int>(lda), p.ldb = static_cast<int>(ldb), p.ldx = static_cast<int>(ldx);
  p.ldg = static_cast<int>(ldg), p.ldp = static_cast<int>(ldp), p.ldv = static_cast<int>(ldv);
  p.lddA = static_cast<int>(lddA), p.lddB = static_cast<int>(lddB), p.lddx = static_cast<int>(lddx);
  return p;
}

// ------------------------------------------------------------------------------------------------ staging

__device__ __forceinline__ void zero_shared(unsigned char* smem, int64_t bytes) {
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * 16; i < bytes; i += kThreads * 16)
    *reinterpret_cast<uint4*>(smem + i) = make_uint4(0u, 0u, 0u, 0u);
}

// Every term of a factor into s[t][i][j] (rows_p padded rows of ld elements per term), rounded to TS. Consecutive
// threads walk the unit-stride dimension, so the loads coalesce for a factor and for its transposed view alike.
template <typename TS>
__device__ __forceinline__ void stage_factor(TS* s, int ld, int rows_p, const KronaFactor& f, int terms) {
  const int rows = static_cast<int>(f.rows), cols = static_cast<int>(f.cols), per = rows * cols;
  const bool rows_fast = f.stride_r == 1 && f.stride_c != 1;
  for (int e = static_cast<int>(threadIdx.x); e < per * terms; e += kThreads) {
    const int t = e / per, q = e - t * per;
    const int i = rows_fast ? q % rows : q / cols, j = rows_fast ? q / rows : q % cols;
    const float v = load_any(f.data, f.dtype, t * f.stride_t + i * f.stride_r + j * f.stride_c);
    s[(t * rows_p + i) * ld + j] = from_float<TS>(v);
  }
}

// A token's row z (length rows * cols, unit stride) into the row-major (rows x cols) matrix s: asynchronous 16-byte
// copies (cp.async) where vec (z's row and cols allow whole vectors that stay inside one matrix row), which the
// caller commits and waits for; plain loads and stores otherwise.
template <typename T>
__device__ __forceinline__ void fetch_token(T* s, int ld, const T* __restrict__ z, int rows, int cols, bool vec) {
  const int n = rows * cols;
  if (vec) {
    constexpr int VEC = 16 / static_cast<int>(sizeof(T));
    for (int v = static_cast<int>(threadIdx.x); v < n / VEC; v += kThreads) {
      const int e = v * VEC, i = e / cols, j = e - i * cols;
      __pipeline_memcpy_async(s + i * ld + j, z + e, 16);
    }
    return;
  }
  for (int e = static_cast<int>(threadIdx.x); e < n; e += kThreads) {
    const int i = e / cols, j = e - i * cols;
    s[i * ld + j] = z[e];
  }
}

// out[e] = scale * acc[i][j] + bias[e] for e = i cols + j of the token's (rows x cols) result, one rounding.
template <typename T>
__device__ __forceinline__ void store_token(T* __restrict__ out, const float* acc, int ld, int rows, int cols,
                                            float scale, const T* __restrict__ bias, bool vec) {
  const int n = rows * cols;
  if (vec) {
    constexpr int VEC = 16 / static_cast<int>(sizeof(T));
    for (int v = static_cast<int>(threadIdx.x); v < n / VEC; v += kThreads) {
      const int e = v * VEC, i = e / cols, j = e - i * cols;
      T vals[VEC];
#pragma unroll
      for (int q = 0; q < VEC; ++q) {
        const float b = bias != nullptr ? to_float(bias[e + q]) : 0.0f;
        vals[q] = from_float<T>(scale * acc[i * ld + j + q] + b);
      }
      uint4 raw;
      memcpy(&raw, vals, 16);
      *reinterpret_cast<uint4*>(out + e) = raw;
    }
    return;
  }
  for (int e = static_cast<int>(threadIdx.x); e < n; e += kThreads) {
    const int i = e / cols, j = e - i * cols;
    const float b = bias != nullptr ? to_float(bias[e]) : 0.0f;
    out[e] = from_float<T>(scale * acc[i * ld + j] + b);
  }
}

__device__ __forceinline__ void tile_origin(int tile, int tiles_j, int& i0, int& j0) {
  i0 = (tile / tiles_j) * 16;
  j0 = (tile % tiles_j) * 16;
}

// c (an fp32 16 x 16 tile at row stride ldc) = (first ? 0 : c) + the product of Op's A and B tiles (Op::product's).
template <typename Op, bool A_ROW, bool B_ROW, typename T>
__device__ __forceinline__ void accumulate_tile(float* c, int ldc, bool first, const T* a, int lda, int i0,
                                                const T* b, int ldb, int j0, int kdim) {
  typename Op::Acc acc;
  if (first) {
    Op::zero(acc);
  } else {
    Op::load(acc, c, ldc);
  }
  Op::template product<A_ROW, B_ROW>(acc, a, lda, i0, b, ldb, j0, kdim);
  Op::store(c, ldc, acc);
}

template <typename T>
__device__ __forceinline__ T* region(unsigned char* smem, int64_t offset) {
  return reinterpret_cast<T*>(smem + offset);
}

// A block's start: its shared memory zeroed (the padding must stay zero), then both factors' terms staged into it.
template <typename T>
__device__ __forceinline__ void stage_block(unsigned char* smem, int64_t bytes, T* first, int ld_first,
                                            int rows_first, const KronaFactor& f_first, T* second, int ld_second,
                                            int rows_second, const KronaFactor& f_second, int terms) {
  zero_shared(smem, bytes);
  __syncthreads();
  stage_factor(first, ld_first, rows_first, f_first, terms);
  stage_factor(second, ld_second, rows_second, f_second, terms);
}

// The block's run of tokens [begin, end).
struct TokenRun {
  int64_t begin, end;
};

__device__ __forceinline__ TokenRun block_tokens(int64_t M, int64_t rows_per_block) {
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  return {begin, begin + rows_per_block < M ? begin + rows_per_block : M};
}

// ---------------------------------------------------------------------------------------------------- kernels

// out[m] = scale * sum_t vec(L_t Z_m R_t^T) (+ bias) for this block's rows_per_block tokens, one token a step:
// P = Z R_t^T (rounded to T), then O += L_t P (fp32) for each term, then the epilogue writes the row once.
template <typename T>
__global__ void __launch_bounds__(kThreads) krona_term_kernel(
    const T* __restrict__ z, int64_t M, int64_t ldz, bool z_vec, KronaFactor L, KronaFactor R, TermPlan p,
    const T* __restrict__ bias, float scale, T* __restrict__ out, int64_t ld_out, bool out_vec,
    int64_t rows_per_block) {
  using Op = Mma<T>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* ls = region<T>(smem, p.l_off);
  T* rs = region<T>(smem, p.r_off);
  T* const z_first = region<T>(smem, p.z_off);
  T* const z_second = region<T>(smem, p.z_next_off);
  T* ps = region<T>(smem, p.p_off);
  float* os = region<float>(smem, p.o_off);
  const int warp = static_cast<int>(threadIdx.x) / 32;
  stage_block(smem, p.bytes, ls, p.ldl, p.r1p, L, rs, p.ldr, p.r2p, R, p.terms);
  const int p_cols = p.r2p / 16, p_tiles = (p.c1p / 16) * p_cols;
  const int o_tiles = (p.r1p / 16) * p_cols;  // O (r1 x r2) has P's columns
  const TokenRun run = block_tokens(M, rows_per_block);
  int cur = 0;
  if (run.begin < run.end) fetch_token(z_first, p.ldz, z + run.begin * ldz, p.c1, p.c2, z_vec);
  __pipeline_commit();
  for (int64_t m = run.begin; m < run.end; ++m) {
    __pipeline_wait_prior(0);
    __syncthreads();
    const T* zs = cur ? z_second : z_first;  // selects, not an indexed array: no local memory
    // The other buffer held the previous token, whose last reads came before the barrier that closed its products.
    if (p.stages == 2 && m + 1 < run.end) {
      fetch_token(cur ? z_first : z_second, p.ldz, z + (m + 1) * ldz, p.c1, p.c2, z_vec);
    }
    __pipeline_commit();
    for (int t = 0; t < p.terms; ++t) {
      const T* lt = ls + t * p.r1p * p.ldl;
      const T* rt = rs + t * p.r2p * p.ldr;
      for (int tile = warp; tile < p_tiles; tile += kWarps) {
        int i0, j0;
        tile_origin(tile, p_cols, i0, j0);
        typename Op::Acc acc;
        Op::zero(acc);
        Op::template product<true, false>(acc, zs, p.ldz, i0, rt, p.ldr, j0, p.c2p);
        Op::store_rounded(ps + i0 * p.ldp + j0, p.ldp, acc);
      }
      __syncthreads();
      for (int tile = warp; tile < o_tiles; tile += kWarps) {
        int i0, j0;
        tile_origin(tile, p_cols, i0, j0);
        accumulate_tile<Op, true, true>(os + i0 * p.ldo + j0, p.ldo, t == 0, lt, p.ldl, i0, ps, p.ldp, j0, p.c1p);
      }
      __syncthreads();
    }
    // One buffer: the next token's row comes in while this one's epilogue runs (the products are done with zs).
    if (p.stages == 1 && m + 1 < run.end) fetch_token(z_first, p.ldz, z + (m + 1) * ldz, p.c1, p.c2, z_vec);
    __pipeline_commit();
    cur ^= p.stages - 1;
    // The next token's writes to os come after its first barrier, which every thread reaches past this epilogue.
    store_token(out + m * ld_out, os, p.ldo, p.r1, p.r2, scale, bias, out_vec);
  }
}

// One pass over this block's tokens of dy and x: for each token and term,
//   phase 1: P = X B_t^T, V = A_t X and (with_dx) U = G B_t, rounded to T;
//   phase 2: dA_t += G P^T, dB_t += G^T V and (with_dx) D += A_t^T U, fp32 (D in shared memory; dA and dB in
//   shared memory, or with REG in the registers of the warp that owns each tile: warp w owns tiles w + i kWarps of
//   the terms' dA and dB tiles in order, i < kRegTiles);
// then (with_dx) the token's dx term scale * D is written once. At the end the block's dA and dB sums go to its row
// of part (unscaled; krona_reduce_kernel adds the rows in order and scales). REG frees the shared memory of the fp32
// dA and dB, so more blocks share an SM, and spares each token the accumulators' loads and stores.
template <typename T, bool REG>
__global__ void __launch_bounds__(kThreads, REG ? 2 : 0) krona_grad_kernel(
    const T* __restrict__ dy, int64_t ldg, bool g_vec, const T* __restrict__ x, int64_t ldx, bool x_vec, int64_t M,
    KronaFactor A, KronaFactor B, GradPlan p, float scale, T* __restrict__ dx, int64_t ld_dx, bool dx_vec,
    float* __restrict__ part, int64_t width, int64_t rows_per_block) {
  using Op = Mma<T>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* as = region<T>(smem, p.a_off);
  T* bs = region<T>(smem, p.b_off);
  T* const x_first = region<T>(smem, p.x_off);
  T* const x_second = region<T>(smem, p.x_next_off);
  T* const g_first = region<T>(smem, p.g_off);
  T* const g_second = region<T>(smem, p.g_next_off);
  T* ps = region<T>(smem, p.p_off);
  T* vs = region<T>(smem, p.v_off);
  T* us = region<T>(smem, p.u_off);
  float* das = region<float>(smem, p.da_off);
  float* dbs = region<float>(smem, p.db_off);
  float* dxs = region<float>(smem, p.dx_off);
  const int warp = static_cast<int>(threadIdx.x) / 32;
  float* scratch = region<float>(smem, p.scratch_off) + warp * 16 * kScratchLd;
  stage_block(smem, p.bytes, as, p.lda, p.n1p, A, bs, p.ldb, p.n2p, B, p.terms);
  // tile grids: P (k1 x n2), V and U (n1 x k2), dA (n1 x k1), dB (n2 x k2), D (k1 x k2)
  const int p_cols = p.n2p / 16, p_tiles = (p.k1p / 16) * p_cols;
  const int v_cols = p.k2p / 16, v_tiles = (p.n1p / 16) * v_cols;
  const int u_tiles = p.with_dx ? v_tiles : 0;
  const int da_cols = p.k1p / 16, da_tiles = (p.n1p / 16) * da_cols;
  const int db_cols = p.k2p / 16, db_tiles = (p.n2p / 16) * db_cols;
  const int d_cols = p.k2p / 16, d_tiles = p.with_dx ? (p.k1p / 16) * d_cols : 0;
  const int ab_tiles = da_tiles + db_tiles;  // one term's
  typename Op::Acc owned[REG ? kRegTiles : 1];
  if constexpr (REG) {
#pragma unroll
    for (int i = 0; i < kRegTiles; ++i) Op::zero(owned[i]);
  }
  const TokenRun run = block_tokens(M, rows_per_block);
  // The next token's X and G come in as krona_term_kernel's Z does: beside this token's products (two buffers) or
  // its epilogue (one).
  const auto fetch = [&](int buf, int64_t m) {
    fetch_token(buf ? x_second : x_first, p.ldx, x + m * ldx, p.k1, p.k2, x_vec);
    fetch_token(buf ? g_second : g_first, p.ldg, dy + m * ldg, p.n1, p.n2, g_vec);
  };
  int cur = 0;
  if (run.begin < run.end) fetch(0, run.begin);
  __pipeline_commit();
  for (int64_t m = run.begin; m < run.end; ++m) {
    __pipeline_wait_prior(0);
    __syncthreads();
    const T* xs = cur ? x_second : x_first;
    const T* gs = cur ? g_second : g_first;
    if (p.stages == 2 && m + 1 < run.end) fetch(cur ^ 1, m + 1);
    __pipeline_commit();
    for (int t = 0; t < p.terms; ++t) {
      const T* at = as + t * p.n1p * p.lda;
      const T* bt = bs + t * p.n2p * p.ldb;
      for (int tile = warp; tile < p_tiles + v_tiles + u_tiles; tile += kWarps) {
        int i0, j0;
        typename Op::Acc acc;
        Op::zero(acc);
        if (tile < p_tiles) {
          tile_origin(tile, p_cols, i0, j0);
          Op::template product<true, false>(acc, xs, p.ldx, i0, bt, p.ldb, j0, p.k2p);
          Op::store_rounded(ps + i0 * p.ldp + j0, p.ldp, acc);
        } else if (tile < p_tiles + v_tiles) {
          tile_origin(tile - p_tiles, v_cols, i0, j0);
          Op::template product<true, true>(acc, at, p.lda, i0, xs, p.ldx, j0, p.k1p);
          Op::store_rounded(vs + i0 * p.ldv + j0, p.ldv, acc);
        } else {
          tile_origin(tile - p_tiles - v_tiles, v_cols, i0, j0);
          Op::template product<true, true>(acc, gs, p.ldg, i0, bt, p.ldb, j0, p.n2p);
          Op::store_rounded(us + i0 * p.ldv + j0, p.ldv, acc);
        }
      }
      __syncthreads();
      float* da_t = das + t * p.n1p * p.lddA;
      float* db_t = dbs + t * p.n2p * p.lddB;
      if constexpr (REG) {
#pragma unroll
        for (int i = 0; i < kRegTiles; ++i) {
          const int q = warp + i * kWarps - t * ab_tiles;  // this slot's tile among term t's
          if (q < 0 || q >= ab_tiles) continue;
          int i0, j0;
          if (q < da_tiles) {
            tile_origin(q, da_cols, i0, j0);
            Op::template product<true, false>(owned[i], gs, p.ldg, i0, ps, p.ldp, j0, p.n2p);
          } else {
            tile_origin(q - da_tiles, db_cols, i0, j0);
            Op::template product<false, true>(owned[i], gs, p.ldg, i0, vs, p.ldv, j0, p.n1p);
          }
        }
      }
      // with REG the loop below takes the D tiles alone (tile from ab_tiles on)
      for (int tile = warp + (REG ? ab_tiles : 0); tile < ab_tiles + d_tiles; tile += kWarps) {
        int i0, j0;
        if (tile < da_tiles) {
          tile_origin(tile, da_cols, i0, j0);
          accumulate_tile<Op, true, false>(da_t + i0 * p.lddA + j0, p.lddA, false, gs, p.ldg, i0, ps, p.ldp, j0,
                                           p.n2p);
        } else if (tile < da_tiles + db_tiles) {
          tile_origin(tile - da_tiles, db_cols, i0, j0);
          accumulate_tile<Op, false, true>(db_t + i0 * p.lddB + j0, p.lddB, false, gs, p.ldg, i0, vs, p.ldv, j0,
                                           p.n1p);
        } else {
          tile_origin(tile - da_tiles - db_tiles, d_cols, i0, j0);
          accumulate_tile<Op, false, true>(dxs + i0 * p.lddx + j0, p.lddx, t == 0, at, p.lda, i0, us, p.ldv, j0,
                                           p.n1p);
        }
      }
      __syncthreads();
    }
    if (p.stages == 1 && m + 1 < run.end) fetch(0, m + 1);
    __pipeline_commit();
    cur ^= p.stages - 1;
    if (p.with_dx) store_token<T>(dx + m * ld_dx, dxs, p.lddx, p.k1, p.k2, scale, nullptr, dx_vec);
  }
  float* row = part + static_cast<int64_t>(blockIdx.x) * width;
  const int a_size = p.n1 * p.k1, b_size = p.n2 * p.k2;
  if constexpr (REG) {
    // each owned tile through the warp's scratch tile into the row, its padding left out
    const int lane = static_cast<int>(threadIdx.x) & 31;
#pragma unroll
    for (int i = 0; i < kRegTiles; ++i) {
      const int e = warp + i * kWarps, t = e / ab_tiles, q = e - t * ab_tiles;
      if (t >= p.terms) continue;
      int i0, j0;
      const bool is_a = q < da_tiles;
      if (is_a) {
        tile_origin(q, da_cols, i0, j0);
      } else {
        tile_origin(q - da_tiles, db_cols, i0, j0);
      }
      Op::store(scratch, kScratchLd, owned[i]);
      __syncwarp();
      const int rows_valid = is_a ? p.n1 : p.n2, cols_valid = is_a ? p.k1 : p.k2;
      float* dst = is_a ? row + t * a_size : row + p.terms * a_size + t * b_size;
      for (int v = lane; v < 256; v += 32) {
        const int r = i0 + v / 16, c = j0 + v % 16;
        if (r < rows_valid && c < cols_valid) dst[r * cols_valid + c] = scratch[(v / 16) * kScratchLd + v % 16];
      }
      __syncwarp();
    }
  } else {
    for (int e = static_cast<int>(threadIdx.x); e < p.terms * (a_size + b_size); e += kThreads) {
      if (e < p.terms * a_size) {
        const int t = e / a_size, q = e - t * a_size, i = q / p.k1, j = q - i * p.k1;
        row[e] = das[(t * p.n1p + i) * p.lddA + j];
      } else {
        const int f = e - p.terms * a_size, t = f / b_size, q = f - t * b_size, i = q / p.k2, j = q - i * p.k2;
        row[e] = dbs[(t * p.n2p + i) * p.lddB + j];
      }
    }
  }
}

// out[i] = scale * sum over the rows s of part[s, i], in row order (deterministic). kReduceBatch rows' loads are
// issued before their adds: one thread's sum was a chain of ~260 dependent loads at M = 8192 (264 blocks), 31 us on an
// H100 for 8192 sums (ncu, 14c5da5).
constexpr int kReduceBatch = 16;

__global__ void krona_reduce_kernel(const float* __restrict__ part, int64_t rows, int64_t width, float scale,
                                    float* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < width;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float sum = 0.0f;
    int64_t s = 0;
    for (; s + kReduceBatch <= rows; s += kReduceBatch) {
      float v[kReduceBatch];
#pragma unroll
      for (int q = 0; q < kReduceBatch; ++q) v[q] = part[(s + q) * width + i];
#pragma unroll
      for (int q = 0; q < kReduceBatch; ++q) sum += v[q];
    }
    for (; s < rows; ++s) sum += part[s * width + i];
    out[i] = scale * sum;
  }
}

// w[i, j] += alpha * sum_t A_t[i / n2, j / k2] B_t[i % n2, j % k2]; consecutive threads take consecutive columns.
template <typename TW>
__global__ void krona_merge_kernel(TW* __restrict__ w, int64_t N, int64_t K, int64_t stride_row, int64_t stride_col,
                                   KronaFactor A, KronaFactor B, int64_t terms, float alpha) {
  const int64_t n2 = B.rows, k2 = B.cols, total = N * K;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / K, j = e - i * K;
    const int64_t i1 = i / n2, i2 = i - i1 * n2, j1 = j / k2, j2 = j - j1 * k2;
    float acc = 0.0f;
    for (int64_t t = 0; t < terms; ++t) {
      const float a = load_any(A.data, A.dtype, t * A.stride_t + i1 * A.stride_r + j1 * A.stride_c);
      const float b = load_any(B.data, B.dtype, t * B.stride_t + i2 * B.stride_r + j2 * B.stride_c);
      acc = fmaf(a, b, acc);
    }
    TW* p = w + i * stride_row + j * stride_col;
    *p = from_float<TW>(to_float(*p) + alpha * acc);
  }
}

// --------------------------------------------------------------------------------------------------- launchers

// A token's row moves in 16-byte vectors when the base and the row stride keep every row 16-byte aligned and a
// vector never straddles two rows of the token's matrix (cols whole vectors).
bool rows_vectorizable(const void* p, int64_t ld, int64_t M, int64_t cols, int64_t esize) {
  return aligned16(p) && (M <= 1 || (ld * esize) % 16 == 0) && (cols * esize) % 16 == 0;
}

// Opts the kernel in to `bytes` of dynamic shared memory and says how many blocks of it an SM holds.
cudaError_t blocks_per_sm(const void* kernel, int64_t bytes, int* out) {
  *out = 0;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess) return err;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(out, kernel, kThreads, static_cast<size_t>(bytes));
}

// The plan with the next token fetched into a second buffer (make(2)) where that fits and keeps as many blocks on an
// SM as one buffer (make(1)) does, else one buffer; per_sm: blocks of it an SM holds (at least 1). The kernel is left
// opted in to the larger plan's bytes, so either launches. cudaErrorInvalidValue where one buffer passes max_smem.
template <typename Plan, typename MakePlan>
cudaError_t choose_plan(const void* kernel, const MakePlan& make, int64_t max_smem, Plan* plan, int* per_sm) {
  const Plan one = make(1), two = make(2);
  if (one.bytes > max_smem) return cudaErrorInvalidValue;
  int one_sm = 0, two_sm = 0;
  cudaError_t err = blocks_per_sm(kernel, one.bytes, &one_sm);
  if (err != cudaSuccess) return err;
  *plan = one;
  *per_sm = one_sm > 1 ? one_sm : 1;
  if (two.bytes > max_smem) return cudaSuccess;
  err = blocks_per_sm(kernel, two.bytes, &two_sm);
  if (err != cudaSuccess) return err;
  if (two_sm >= 1 && two_sm >= one_sm) {
    *plan = two;
    *per_sm = two_sm;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_term(const void* z, int64_t M, int64_t ldz, const KronaFactor& L, const KronaFactor& R,
                        int64_t terms, const void* bias, float scale, void* out, int64_t ld_out, int sm_count,
                        int64_t max_smem, cudaStream_t stream) {
  const int64_t esize = sizeof(T);
  const auto make = [&](int stages) { return plan_term(esize, L.rows, L.cols, R.rows, R.cols, terms, stages); };
  TermPlan p{};
  int per_sm = 1;
  cudaError_t err = choose_plan(reinterpret_cast<const void*>(&krona_term_kernel<T>), make, max_smem, &p, &per_sm);
  if (err != cudaSuccess) return err;
  const int64_t want = static_cast<int64_t>(per_sm) * sm_count;
  const int64_t rows = ceil_div(M, want < M ? want : M), grid = ceil_div(M, rows);
  krona_term_kernel<T><<<static_cast<unsigned>(grid), kThreads, static_cast<size_t>(p.bytes), stream>>>(
      static_cast<const T*>(z), M, ldz, rows_vectorizable(z, ldz, M, p.c2, esize), L, R, p,
      static_cast<const T*>(bias), scale, static_cast<T*>(out), ld_out,
      rows_vectorizable(out, ld_out, M, p.r2, esize), rows);
  return cudaGetLastError();
}

template <bool REG>
const void* grad_kernel(DType dtype) {
  switch (dtype) {
    case DType::kFloat16: return reinterpret_cast<const void*>(&krona_grad_kernel<__half, REG>);
    case DType::kBFloat16: return reinterpret_cast<const void*>(&krona_grad_kernel<__nv_bfloat16, REG>);
    default: return reinterpret_cast<const void*>(&krona_grad_kernel<float, REG>);
  }
}

// krona_grad_kernel's plan for these factors (choose_plan's); reg_acc: dA and dB may stay in registers.
cudaError_t choose_grad_plan(DType dtype, int64_t n1, int64_t k1, int64_t n2, int64_t k2, int64_t terms, bool with_dx,
                             bool reg_acc, int64_t max_smem, GradPlan* plan, int* per_sm) {
  const bool reg = grad_reg_acc(n1, k1, n2, k2, terms, reg_acc);
  const auto make = [&](int stages) {
    return plan_grad(elem_size(dtype), n1, k1, n2, k2, terms, with_dx, reg, stages);
  };
  return choose_plan(reg ? grad_kernel<true>(dtype) : grad_kernel<false>(dtype), make, max_smem, plan, per_sm);
}

template <typename T, bool REG>
cudaError_t launch_grad_as(const GradPlan& p, const void* dy, const void* x, int64_t M, int64_t ldg, int64_t ldx,
                           const KronaFactor& A, const KronaFactor& B, float scale, int64_t rows, void* dx,
                           int64_t ld_dx, float* part, int64_t width, cudaStream_t stream) {
  const int64_t esize = sizeof(T), grid = ceil_div(M, rows);
  krona_grad_kernel<T, REG><<<static_cast<unsigned>(grid), kThreads, static_cast<size_t>(p.bytes), stream>>>(
      static_cast<const T*>(dy), ldg, rows_vectorizable(dy, ldg, M, p.n2, esize), static_cast<const T*>(x), ldx,
      rows_vectorizable(x, ldx, M, p.k2, esize), M, A, B, p, scale, static_cast<T*>(dx), ld_dx,
      dx != nullptr && rows_vectorizable(dx, ld_dx, M, p.k2, esize), part, width, rows);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_grad(const GradPlan& p, const void* dy, const void* x, int64_t M, int64_t ldg, int64_t ldx,
                        const KronaFactor& A, const KronaFactor& B, float scale, int64_t rows, void* dx,
                        int64_t ld_dx, float* part, int64_t width, cudaStream_t stream) {
  if (p.reg_acc) {
    return launch_grad_as<T, true>(p, dy, x, M, ldg, ldx, A, B, scale, rows, dx, ld_dx, part, width, stream);
  }
  return launch_grad_as<T, false>(p, dy, x, M, ldg, ldx, A, B, scale, rows, dx, ld_dx, part, width, stream);
}

template <typename TW>
cudaError_t launch_merge(void* w, int64_t N, int64_t K, int64_t stride_row, int64_t stride_col, const KronaFactor& A,
                         const KronaFactor& B, int64_t terms, float alpha, int sm_count, cudaStream_t stream) {
  const int64_t blocks = ceil_div(N * K, kMergeThreads), cap = static_cast<int64_t>(sm_count) * 32;
  krona_merge_kernel<TW><<<static_cast<unsigned>(blocks < cap ? blocks : cap), kMergeThreads, 0, stream>>>(
      static_cast<TW*>(w), N, K, stride_row, stride_col, A, B, terms, alpha);
  return cudaGetLastError();
}

}  // namespace

int64_t krona_term_smem(DType z_dtype, int64_t r1, int64_t c1, int64_t r2, int64_t c2, int64_t terms) {
  return plan_term(elem_size(z_dtype), r1, c1, r2, c2, terms, 1).bytes;
}

cudaError_t krona_term(const void* z, DType z_dtype, int64_t M, int64_t ldz, const KronaFactor& L,
                       const KronaFactor& R, int64_t terms, const void* bias, float scale, void* out, int64_t ld_out,
                       int sm_count, int64_t max_smem, cudaStream_t stream) {
  if (M <= 0 || terms <= 0 || L.rows <= 0 || R.rows <= 0) return cudaSuccess;
  if (L.cols <= 0 || R.cols <= 0) return cudaErrorInvalidValue;
  switch (z_dtype) {
    case DType::kFloat32:
      return launch_term<float>(z, M, ldz, L, R, terms, bias, scale, out, ld_out, sm_count, max_smem, stream);
    case DType::kFloat16:
      return launch_term<__half>(z, M, ldz, L, R, terms, bias, scale, out, ld_out, sm_count, max_smem, stream);
    case DType::kBFloat16:
      return launch_term<__nv_bfloat16>(z, M, ldz, L, R, terms, bias, scale, out, ld_out, sm_count, max_smem,
                                        stream);
    default:
      return cudaErrorInvalidValue;
  }
}

int64_t krona_grad_width(int64_t n1, int64_t k1, int64_t n2, int64_t k2, int64_t terms) {
  return terms * (n1 * k1 + n2 * k2);
}

int64_t krona_grad_rows(DType dtype, int64_t M, int64_t n1, int64_t k1, int64_t n2, int64_t k2, int64_t terms,
                        bool with_dx, int sm_count, int64_t max_smem, bool reg_acc) {
  if (M <= 0 || dtype == DType::kFloat64) return 0;
  GradPlan p{};
  int per_sm = 1;
  if (choose_grad_plan(dtype, n1, k1, n2, k2, terms, with_dx, reg_acc, max_smem, &p, &per_sm) != cudaSuccess) return 0;
  const int64_t want = static_cast<int64_t>(per_sm) * sm_count;
  return ceil_div(M, want < M ? want : M);
}

cudaError_t krona_grad(const void* dy, const void* x, DType dtype, int64_t M, int64_t ldg, int64_t ldx,
                       const KronaFactor& A, const KronaFactor& B, int64_t terms, float scale, int64_t rows,
                       void* dx, int64_t ld_dx, float* dAB, float* workspace, int64_t max_smem, cudaStream_t stream,
                       bool reg_acc) {
  if (M <= 0 || terms <= 0) return cudaSuccess;
  if (rows <= 0) return cudaErrorInvalidValue;
  GradPlan p{};
  int per_sm = 1;
  cudaError_t err = choose_grad_plan(dtype, A.rows, A.cols, B.rows, B.cols, terms, dx != nullptr, reg_acc, max_smem,
                                     &p, &per_sm);
  if (err != cudaSuccess) return err;
  const int64_t width = krona_grad_width(A.rows, A.cols, B.rows, B.cols, terms);
  err = cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      err = launch_grad<float>(p, dy, x, M, ldg, ldx, A, B, scale, rows, dx, ld_dx, workspace, width, stream);
      break;
    case DType::kFloat16:
      err = launch_grad<__half>(p, dy, x, M, ldg, ldx, A, B, scale, rows, dx, ld_dx, workspace, width, stream);
      break;
    case DType::kBFloat16:
      err = launch_grad<__nv_bfloat16>(p, dy, x, M, ldg, ldx, A, B, scale, rows, dx, ld_dx, workspace, width,
                                       stream);
      break;
    default:
      break;
  }
  if (err != cudaSuccess) return err;
  const int64_t blocks = ceil_div(width, kReduceThreads);
  krona_reduce_kernel<<<static_cast<unsigned>(blocks < 4096 ? blocks : 4096), kReduceThreads, 0, stream>>>(
      workspace, ceil_div(M, rows), width, scale, dAB);
  return cudaGetLastError();
}

cudaError_t krona_merge(void* w, DType w_dtype, int64_t N, int64_t K, int64_t stride_row, int64_t stride_col,
                        const KronaFactor& A, const KronaFactor& B, int64_t terms, float alpha, int sm_count,
                        cudaStream_t stream) {
  if (N <= 0 || K <= 0 || terms <= 0) return cudaSuccess;
  switch (w_dtype) {
    case DType::kFloat32:
      return launch_merge<float>(w, N, K, stride_row, stride_col, A, B, terms, alpha, sm_count, stream);
    case DType::kFloat16:
      return launch_merge<__half>(w, N, K, stride_row, stride_col, A, B, terms, alpha, sm_count, stream);
    case DType::kBFloat16:
      return launch_merge<__nv_bfloat16>(w, N, K, stride_row, stride_col, A, B, terms, alpha, sm_count, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace peftkern

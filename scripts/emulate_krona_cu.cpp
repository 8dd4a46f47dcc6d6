// Host emulation of csrc/krona.cu's kernels without a GPU (scripts/emulate_krona_cu.py builds and runs it): the
// kernels' text with the CUDA-core products (FmaMma) for every dtype, each block's threads as std::threads meeting at
// a std::barrier for __syncthreads, cp.async as a plain copy, the occupancy calculator as shared memory alone (an
// H100's 228 KB an SM). Shared memory is poisoned between blocks and outputs start as NaN; every result is compared
// with a float64 computation of the same math. It checks indexing, layouts, staging, epilogues, the split reduction
// and the merge; not the tensor-core path's register layouts (mma.sync, ldmatrix), timing or memory ordering.
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cuda_runtime_api.h>
#include <vector_functions.h>
#include <vector_types.h>

namespace emu {
thread_local uint3 tid, bid;
thread_local dim3 bdim, gdim;
std::barrier<>* bar = nullptr;
thread_local std::barrier<>* warp_bar = nullptr;  // the thread's warp's, for __syncwarp
void poison();
long launches = 0;
template <typename F, typename... Args>
void launch(unsigned grid, int threads, size_t smem_bytes, cudaStream_t, F kernel, Args... args) {
  if (smem_bytes > (1u << 19)) { fprintf(stderr, "smem too big\n"); abort(); }
  ++launches;
  for (unsigned b = 0; b < grid; ++b) {
    poison();
    std::barrier<> barrier(threads);
    bar = &barrier;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    for (int w = 0; w * 32 < threads; ++w)
      warps.push_back(std::make_unique<std::barrier<>>(std::min(32, threads - w * 32)));
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; ++t)
      ts.emplace_back([=, &warps] {
        warp_bar = warps[t / 32].get();
        tid = make_uint3(t, 0, 0);
        bid = make_uint3(b, 0, 0);
        bdim = dim3(threads);
        gdim = dim3(grid);
        kernel(args...);
      });
    for (auto& th : ts) th.join();
  }
}
}  // namespace emu
#define __launch_bounds__(...)
#define threadIdx emu::tid
#define blockIdx emu::bid
#define blockDim emu::bdim
#define gridDim emu::gdim
#define __syncthreads() emu::bar->arrive_and_wait()
#define __syncwarp() emu::warp_bar->arrive_and_wait()
#define cudaFuncSetAttribute(...) cudaSuccess
#define cudaOccupancyMaxActiveBlocksPerMultiprocessor(out, kernel, threads, bytes) \
  ((*(out) = std::min(8, static_cast<int>(233472 / ((bytes) + 1024)))), cudaSuccess)
inline void __pipeline_memcpy_async(void* dst, const void* src, size_t bytes) { memcpy(dst, src, bytes); }
inline void __pipeline_commit() {}
inline void __pipeline_wait_prior(size_t) {}
#define cudaGetLastError() cudaSuccess
#include "krona_host.inc"  // csrc/krona.cu as emulate_krona_cu.py rewrites it
void emu::poison() { memset(peftkern::smem, 0x7f, sizeof(peftkern::smem)); }

using peftkern::DType;
using peftkern::KronaFactor;

constexpr int kSms = 1;  // one SM: several tokens a block, so the next token's fetch runs
std::mt19937 rng(1234);
float rnd() { return std::normal_distribution<float>(0.f, 1.f)(rng); }

template <typename T> DType dtype_of();
template <> DType dtype_of<float>() { return DType::kFloat32; }
template <> DType dtype_of<__half>() { return DType::kFloat16; }
template <> DType dtype_of<__nv_bfloat16>() { return DType::kBFloat16; }
template <typename T> T cvt(float v);
template <> float cvt<float>(float v) { return v; }
template <> __half cvt<__half>(float v) { return __float2half_rn(v); }
template <> __nv_bfloat16 cvt<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
float back(float v) { return v; }
float back(__half v) { return __half2float(v); }
float back(__nv_bfloat16 v) { return __bfloat162float(v); }

// A stacked factor (T, rows, cols) stored in `store` (float) with strides; transposed: stored (T, cols, rows).
struct HostFactor {
  std::vector<float> data;
  int64_t T, rows, cols;
  bool transposed;
  float at(int64_t t, int64_t i, int64_t j) const {
    return transposed ? data[(t * cols + j) * rows + i] : data[(t * rows + i) * cols + j];
  }
  KronaFactor view() const {
    if (transposed) return KronaFactor{data.data(), DType::kFloat32, rows, cols, rows * cols, 1, rows};
    return KronaFactor{data.data(), DType::kFloat32, rows, cols, rows * cols, cols, 1};
  }
};
HostFactor make_factor(int64_t T, int64_t rows, int64_t cols, bool transposed) {
  HostFactor f{std::vector<float>(T * rows * cols), T, rows, cols, transposed};
  for (auto& v : f.data) v = rnd() / std::sqrt(static_cast<float>(cols));
  return f;
}

double rel_err(const std::vector<double>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1e-300));
}

int failures = 0;
void report(const char* what, double err, double tol) {
  const bool ok = err <= tol;
  if (!ok) ++failures;
  printf("%-70s rel err %.3e %s\n", what, err, ok ? "ok" : "FAIL");
}

template <typename T>
double tol() { return std::is_same_v<T, float> ? 1e-5 : (std::is_same_v<T, __half> ? 5e-3 : 2e-2); }

// out = scale * sum_t L_t Z R_t^T + bias through krona_term, against doubles.
template <typename T>
void term_case(int64_t M, int64_t r1, int64_t c1, int64_t r2, int64_t c2, int64_t terms, int64_t extra, bool bias,
               bool transposed) {
  const int64_t Kin = c1 * c2, Nout = r1 * r2, ldz = Kin + extra, ldo = Nout + extra;
  std::vector<T> z(M * ldz), out(M * ldo, cvt<T>(NAN)), b(Nout);
  std::vector<float> zf(M * Kin), bf(Nout);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < Kin; ++k) { z[m * ldz + k] = cvt<T>(rnd()); zf[m * Kin + k] = back(z[m * ldz + k]); }
  for (int64_t n = 0; n < Nout; ++n) { b[n] = cvt<T>(rnd()); bf[n] = back(b[n]); }
  HostFactor L = make_factor(terms, r1, c1, transposed), R = make_factor(terms, r2, c2, !transposed);
  const float scale = 0.7f;
  const void* bias_ptr = bias ? b.data() : nullptr;
  const cudaError_t err = peftkern::krona_term(z.data(), dtype_of<T>(), M, ldz, L.view(), R.view(), terms, bias_ptr,
                                               scale, out.data(), ldo, kSms, 232448, nullptr);
  if (err != cudaSuccess) { printf("launch error %d\n", err); ++failures; return; }
  std::vector<double> got(M * Nout), want(M * Nout, 0.0);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < Nout; ++n) got[m * Nout + n] = back(out[m * ldo + n]);
    for (int64_t t = 0; t < terms; ++t)
      for (int64_t i = 0; i < r1; ++i)
        for (int64_t j = 0; j < r2; ++j) {
          double acc = 0;
          for (int64_t p = 0; p < c1; ++p)
            for (int64_t q = 0; q < c2; ++q) acc += L.at(t, i, p) * (double)zf[m * Kin + p * c2 + q] * R.at(t, j, q);
          want[m * Nout + i * r2 + j] += scale * acc;
        }
    if (bias)
      for (int64_t n = 0; n < Nout; ++n) want[m * Nout + n] += bf[n];
  }
  char what[200];
  snprintf(what, sizeof what, "term %s M%ld L%ldx%ld R%ldx%ld T%ld extra%ld bias%d tr%d", typeid(T).name(), M, r1,
           c1, r2, c2, terms, extra, bias, transposed);
  report(what, rel_err(got, want), tol<T>());
}

// dAB and the dx term through krona_grad, against doubles.
template <typename T>
void grad_case(int64_t M, int64_t n1, int64_t k1, int64_t n2, int64_t k2, int64_t terms, int64_t extra, bool with_dx,
               bool reg = true, int64_t rows_override = 0) {
  const int64_t N = n1 * n2, K = k1 * k2, ldg = N + extra, ldx = K + extra, ldd = K + extra;
  std::vector<T> g(M * ldg), x(M * ldx), dx(M * ldd, cvt<T>(NAN));
  std::vector<float> gf(M * N), xf(M * K);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) { g[m * ldg + n] = cvt<T>(rnd()); gf[m * N + n] = back(g[m * ldg + n]); }
    for (int64_t k = 0; k < K; ++k) { x[m * ldx + k] = cvt<T>(rnd()); xf[m * K + k] = back(x[m * ldx + k]); }
  }
  HostFactor A = make_factor(terms, n1, k1, false), B = make_factor(terms, n2, k2, false);
  const float scale = 0.6f;
  const int64_t fit = peftkern::krona_grad_rows(dtype_of<T>(), M, n1, k1, n2, k2, terms, with_dx, kSms, 232448, reg);
  if (fit <= 0) { printf("grad does not fit\n"); return; }
  const int64_t rows = rows_override > 0 ? rows_override : fit;  // any rows a block is valid: more partial-sum rows
  const int64_t width = peftkern::krona_grad_width(n1, k1, n2, k2, terms), blocks = (M + rows - 1) / rows;
  std::vector<float> ws(blocks * width, NAN), dab(width, NAN);
  const cudaError_t err = peftkern::krona_grad(g.data(), x.data(), dtype_of<T>(), M, ldg, ldx, A.view(), B.view(),
                                               terms, scale, rows, with_dx ? dx.data() : nullptr, ldd, dab.data(),
                                               ws.data(), 232448, nullptr, reg);
  if (err != cudaSuccess) { printf("launch error %d\n", err); ++failures; return; }
  std::vector<double> da(terms * n1 * k1, 0.0), db(terms * n2 * k2, 0.0), dxw(M * K, 0.0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t t = 0; t < terms; ++t) {
      // dA[i1, j1] += sum_{i2, j2} G[i1, i2] B[i2, j2] X[j1, j2]; dB[i2, j2] += sum G[i1, i2] A[i1, j1] X[j1, j2]
      for (int64_t i1 = 0; i1 < n1; ++i1)
        for (int64_t i2 = 0; i2 < n2; ++i2) {
          const double gv = gf[m * N + i1 * n2 + i2];
          for (int64_t j1 = 0; j1 < k1; ++j1)
            for (int64_t j2 = 0; j2 < k2; ++j2) {
              const double xv = xf[m * K + j1 * k2 + j2];
              da[(t * n1 + i1) * k1 + j1] += scale * gv * B.at(t, i2, j2) * xv;
              db[(t * n2 + i2) * k2 + j2] += scale * gv * A.at(t, i1, j1) * xv;
              dxw[m * K + j1 * k2 + j2] += scale * A.at(t, i1, j1) * gv * B.at(t, i2, j2);
            }
        }
    }
  std::vector<double> got_a(da.size()), got_b(db.size()), got_dx(M * K);
  for (size_t i = 0; i < da.size(); ++i) got_a[i] = dab[i];
  for (size_t i = 0; i < db.size(); ++i) got_b[i] = dab[da.size() + i];
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) got_dx[m * K + k] = back(dx[m * ldd + k]);
  char what[200];
  snprintf(what, sizeof what, "grad %s M%ld A%ldx%ld B%ldx%ld T%ld extra%ld dx%d reg%d (rows %ld)", typeid(T).name(), M,
           n1, k1, n2, k2, terms, extra, with_dx, reg, rows);
  const double t = tol<T>();
  report((std::string(what) + " dA").c_str(), rel_err(got_a, da), t);
  report((std::string(what) + " dB").c_str(), rel_err(got_b, db), t);
  if (with_dx) report((std::string(what) + " dx").c_str(), rel_err(got_dx, dxw), t);
}

template <typename T>
void merge_case(int64_t n1, int64_t k1, int64_t n2, int64_t k2, int64_t terms, bool transposed_w) {
  const int64_t N = n1 * n2, K = k1 * k2;
  std::vector<T> w(N * K);
  std::vector<double> want(N * K);
  for (auto& v : w) v = cvt<T>(rnd());
  HostFactor A = make_factor(terms, n1, k1, false), B = make_factor(terms, n2, k2, true);
  const int64_t sr = transposed_w ? 1 : K, sc = transposed_w ? N : 1;
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < K; ++j) {
      double acc = 0;
      for (int64_t t = 0; t < terms; ++t) acc += A.at(t, i / n2, j / k2) * B.at(t, i % n2, j % k2);
      want[i * K + j] = back(w[i * sr + j * sc]) - 0.5 * acc;
    }
  peftkern::krona_merge(w.data(), dtype_of<T>(), N, K, sr, sc, A.view(), B.view(), terms, -0.5f, kSms, nullptr);
  std::vector<double> got(N * K);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < K; ++j) got[i * K + j] = back(w[i * sr + j * sc]);
  char what[200];
  snprintf(what, sizeof what, "merge %s A%ldx%ld B%ldx%ld T%ld wT%d", typeid(T).name(), n1, k1, n2, k2, terms,
           transposed_w);
  report(what, rel_err(got, want), std::is_same_v<T, float> ? 1e-6 : 5e-3);
}

template <typename T>
void all_cases() {
  term_case<T>(37, 16, 16, 16, 16, 1, 0, true, false);
  term_case<T>(29, 20, 17, 24, 13, 2, 0, true, false);
  term_case<T>(23, 20, 17, 24, 16, 2, 3, false, true);
  term_case<T>(17, 1, 127, 37, 3, 3, 0, true, false);
  term_case<T>(11, 64, 64, 64, 64, 1, 0, true, false);
  term_case<T>(5, 86, 64, 128, 64, 1, 0, false, false);
  term_case<T>(19, 33, 40, 8, 24, 4, 8, true, true);
  grad_case<T>(37, 16, 16, 16, 16, 1, 0, true);
  grad_case<T>(29, 20, 17, 24, 13, 2, 0, true);
  grad_case<T>(29, 20, 17, 24, 13, 2, 3, false);
  grad_case<T>(23, 5, 17, 16, 32, 4, 0, true);
  grad_case<T>(7, 64, 64, 64, 64, 1, 0, true);
  grad_case<T>(7, 64, 64, 64, 64, 1, 0, true, false);  // dA and dB in shared memory where registers would hold them
  grad_case<T>(29, 20, 17, 24, 13, 2, 0, true, false);
  grad_case<T>(37, 16, 16, 16, 16, 1, 0, true, true, 1);  // 37 blocks: the reduction's batches of rows and its tail
  grad_case<T>(5, 86, 64, 128, 64, 1, 0, true);
  grad_case<T>(13, 1, 127, 37, 3, 3, 5, true);
  merge_case<T>(5, 6, 8, 4, 3, false);
  merge_case<T>(3, 7, 5, 2, 1, true);
}

int main() {
  all_cases<float>();
  all_cases<__half>();
  all_cases<__nv_bfloat16>();
  printf("%d failure(s), %ld launches\n", failures, emu::launches);
  return failures != 0;
}

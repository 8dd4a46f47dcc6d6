// peftkern._C's KronA functions: argument checks (peftkern/ops/krona.py validated the user's input, so a failure
// here is a bug in peftkern, reported with the shapes), outputs and workspaces on the caching allocator, the frozen
// GEMMs in cuBLAS through ATen, krona.cu's kernels on the current stream with a check after each launch.
//
// Factors come dense and stacked, (T, n1, k1) and (T, n2, k2), in any float dtype and any strides (kernels/cuda.py
// multiplies low-rank pairs out). Where the whole factors do not fit in one block's shared memory the factor
// gradients take one pass per term if a term's fit, else the term and the factor gradients run as cuBLAS GEMMs on
// reshaped views in float32 (as everywhere when the caller forces it: `gemms`, for tests).

#include <optional>
#include <string>
#include <tuple>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "krona.h"

namespace {

using peftkern::DType;
using peftkern::KronaFactor;
using MaybeTensor = std::optional<at::Tensor>;

DType element_type(const at::Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
              "peftkern._C: unsupported dtype ", st);
  if (st == at::kHalf) return DType::kFloat16;
  if (st == at::kBFloat16) return DType::kBFloat16;
  return st == at::kDouble ? DType::kFloat64 : DType::kFloat32;
}

bool big_operand_dtype(const at::Tensor& t) {
  const auto st = t.scalar_type();
  return st == at::kFloat || st == at::kHalf || st == at::kBFloat16;
}

void require_on(const char* op, const char* name, const at::Tensor& t, int64_t dims, const at::Device& device) {
  TORCH_CHECK(t.is_cuda() && t.device() == device && t.dim() == dims && t.is_floating_point(), "peftkern._C.", op,
              ": ", name, " must be a floating ", dims, "-D tensor on ", device, ", got shape ", t.sizes(), " ",
              t.scalar_type(), " on ", t.device());
}

// big (x, or the weight a merge rewrites): a 2-D CUDA tensor in float32/float16/bfloat16; A and B: 3-D floating
// tensors on its device.
void check_operands(const char* op, const char* name, const at::Tensor& big, const at::Tensor& A,
                    const at::Tensor& B) {
  TORCH_CHECK(big.is_cuda(), "peftkern._C.", op, ": ", name, " must be a CUDA tensor, got one on ", big.device());
  require_on(op, name, big, 2, big.device());
  TORCH_CHECK(big_operand_dtype(big), "peftkern._C.", op, ": ", name, " must be float32, float16 or bfloat16, got ",
              big.scalar_type());
  require_on(op, "A", A, 3, big.device());
  require_on(op, "B", B, 3, big.device());
}

struct KronaSizes {
  int64_t M, K, N, T, n1, k1, n2, k2;
};

// x (M, K) on a GPU in float32/float16/bfloat16, weight (N, K) in x's dtype, A (T, n1, k1) and B (T, n2, k2) in any
// float dtype with n1 n2 = N, k1 k2 = K and T >= 1, all on x's device.
KronaSizes check_krona(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
                       const at::Tensor& B) {
  check_operands(op, "x", x, A, B);
  require_on(op, "weight", weight, 2, x.device());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "peftkern._C.", op, ": weight must share x's dtype ",
              x.scalar_type(), ", got ", weight.scalar_type());
  const KronaSizes s{x.size(0), x.size(1), weight.size(0), A.size(0), A.size(1), A.size(2), B.size(1), B.size(2)};
  TORCH_CHECK(weight.size(1) == s.K && s.T >= 1 && B.size(0) == s.T && s.n1 * s.n2 == s.N && s.k1 * s.k2 == s.K,
              "peftkern._C.", op, ": need x (M, K), weight (N, K), A (T, n1, k1), B (T, n2, k2) with n1 n2 = N and "
              "k1 k2 = K; got x ", x.sizes(), ", weight ", weight.sizes(), ", A ", A.sizes(), ", B ", B.sizes());
  return s;
}

void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "peftkern._C.", op, ": ", name, " must share x's dtype ",
              x.scalar_type(), ", got ", t.scalar_type());
}

void check_launch(cudaError_t err, const char* op, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "peftkern._C.", op, ": launching ", what, " failed: ", cudaGetErrorString(err));
}

// The terms of f (T, rows, cols) as the kernels read them; transposed: each term's (cols, rows) transpose.
KronaFactor factor_of(const at::Tensor& f, bool transposed) {
  return KronaFactor{f.data_ptr(), element_type(f), transposed ? f.size(2) : f.size(1),
                     transposed ? f.size(1) : f.size(2), f.stride(0), transposed ? f.stride(2) : f.stride(1),
                     transposed ? f.stride(1) : f.stride(2)};
}

// The kernels walk token rows with unit stride; anything else is copied once.
at::Tensor rows_of(const at::Tensor& t) { return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous(); }

struct Gpu {
  int sms;
  int64_t max_smem;  // the opt-in maximum of dynamic shared memory per block
};

Gpu gpu_of(const at::Tensor& t) {
  const auto* props = at::cuda::getDeviceProperties(t.get_device());
  return Gpu{props->multiProcessorCount, static_cast<int64_t>(props->sharedMemPerBlockOptin)};
}

// scale * sum_t vec(L_t Z_m R_t^T) for every row of z (M, c1 c2), float32 (M, r1 r2), by cuBLAS on reshaped views:
// L (T, r1, c1), R (T, r2, c2), any float dtype and strides (the dx term passes transposed views).
at::Tensor term_by_gemms(const at::Tensor& z, const at::Tensor& L, const at::Tensor& R, double scale) {
  const int64_t M = z.size(0), r1 = L.size(1), c1 = L.size(2), r2 = R.size(1), c2 = R.size(2);
  const at::Tensor Z = z.to(at::kFloat).reshape({M, c1, c2});
  at::Tensor acc;
  for (int64_t t = 0; t < L.size(0); ++t) {
    const at::Tensor P = at::matmul(Z, R[t].to(at::kFloat).t());  // (M, c1, r2)
    const at::Tensor Q = at::matmul(L[t].to(at::kFloat), P);      // (M, r1, r2)
    acc = t == 0 ? Q : acc.add_(Q);
  }
  return acc.reshape({M, r1 * r2}).mul_(scale);
}

// The term C (M, r1 r2) in z's dtype, + bias if given: the kernel where whole factors fit, else cuBLAS.
at::Tensor kron_term(const char* op, const at::Tensor& z, const at::Tensor& L, const at::Tensor& R, bool transposed,
                     double scale, const at::Tensor& bias, bool gemms, const Gpu& dev, cudaStream_t stream) {
  const KronaFactor l = factor_of(L, transposed), r = factor_of(R, transposed);
  const int64_t M = z.size(0), T = L.size(0);
  if (!gemms && peftkern::krona_term_smem(element_type(z), l.rows, l.cols, r.rows, r.cols, T) <= dev.max_smem) {
    at::Tensor out = at::empty({M, l.rows * r.rows}, z.options());
    check_launch(peftkern::krona_term(z.data_ptr(), element_type(z), M, z.stride(0), l, r, T,
                                      bias.defined() ? bias.data_ptr() : nullptr, static_cast<float>(scale),
                                      out.data_ptr(), out.stride(0), dev.sms, dev.max_smem, stream),
                 op, "krona_term (s sum_t vec(L_t Z R_t^T) + b)");
    return out;
  }
  const at::Tensor Lt = transposed ? L.transpose(1, 2) : L, Rt = transposed ? R.transpose(1, 2) : R;
  at::Tensor out = term_by_gemms(z, Lt, Rt, scale);
  if (bias.defined()) out.add_(bias.to(at::kFloat));
  return out.to(z.scalar_type());
}

// (dA, dB) float32 = scale * (sum_m G_m (X_m B_t^T)^T, sum_m G_m^T A_t X_m) per term by cuBLAS; undefined where not
// needed.
std::tuple<at::Tensor, at::Tensor> factor_grads_by_gemms(const at::Tensor& dy, const at::Tensor& x,
                                                         const at::Tensor& A, const at::Tensor& B, double scale,
                                                         bool need_a, bool need_b) {
  const int64_t M = x.size(0), T = A.size(0), n1 = A.size(1), k1 = A.size(2), n2 = B.size(1), k2 = B.size(2);
  const at::Tensor G = dy.to(at::kFloat).reshape({M, n1, n2});
  const at::Tensor X = x.to(at::kFloat).reshape({M, k1, k2});
  const at::Tensor Af = A.to(at::kFloat), Bf = B.to(at::kFloat);
  at::Tensor dA = need_a ? at::empty({T, n1, k1}, x.options().dtype(at::kFloat)) : at::Tensor();
  at::Tensor dB = need_b ? at::empty({T, n2, k2}, x.options().dtype(at::kFloat)) : at::Tensor();
  for (int64_t t = 0; t < T; ++t) {
    if (need_a) dA[t].copy_(at::tensordot(G, at::matmul(X, Bf[t].t()), {0, 2}, {0, 2}));  // G (M,n1,n2), P (M,k1,n2)
    if (need_b) dB[t].copy_(at::tensordot(G, at::matmul(Af[t], X), {0, 1}, {0, 1}));      // G, V = A X (M,n1,k2)
  }
  if (need_a) dA.mul_(scale);
  if (need_b) dB.mul_(scale);
  return {dA, dB};
}

// (dA, dB) float32 = scale * (sum_m G_m (X_m B_t^T)^T, sum_m G_m^T A_t X_m) for the terms of A and B in one pass of
// krona_grad_kernel over dy and x (rows tokens a block: krona_grad_rows), as (T, n1, k1) and (T, n2, k2) views of one
// buffer; dx_term (M, K) in x's dtype, if defined, gets s sum_t vec(A_t^T G_m B_t) in the same pass.
std::tuple<at::Tensor, at::Tensor> factor_grads_by_kernel(const char* op, const at::Tensor& dy, const at::Tensor& xs,
                                                          const at::Tensor& A, const at::Tensor& B, double scale,
                                                          int64_t rows, const at::Tensor& dx_term, const Gpu& dev,
                                                          cudaStream_t stream, bool reg_acc) {
  const int64_t M = xs.size(0), T = A.size(0), n1 = A.size(1), k1 = A.size(2), n2 = B.size(1), k2 = B.size(2);
  const int64_t width = peftkern::krona_grad_width(n1, k1, n2, k2, T), a_size = T * n1 * k1;
  at::Tensor ws = at::empty({(M + rows - 1) / rows * width}, xs.options().dtype(at::kFloat));
  at::Tensor dAB = at::empty({width}, xs.options().dtype(at::kFloat));
  const bool with_dx = dx_term.defined();
  check_launch(peftkern::krona_grad(dy.data_ptr(), xs.data_ptr(), element_type(xs), M, dy.stride(0), xs.stride(0),
                                    factor_of(A, false), factor_of(B, false), T, static_cast<float>(scale), rows,
                                    with_dx ? dx_term.data_ptr() : nullptr, with_dx ? dx_term.stride(0) : 0,
                                    dAB.data_ptr<float>(), ws.data_ptr<float>(), dev.max_smem, stream, reg_acc),
               op, "krona_grad (dA, dB and the dx term in one pass)");
  return {dAB.narrow(0, 0, a_size).view({T, n1, k1}), dAB.narrow(0, a_size, width - a_size).view({T, n2, k2})};
}

// y = x W^T + b + s sum_t vec(A_t X_m B_t^T) (M, N) in x's dtype: the term C = s term + b written once (kernel),
// then cuBLAS adds x W^T into it (beta = 1).
at::Tensor krona_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B,
                         double scaling, const MaybeTensor& bias, bool gemms) {
  constexpr const char* op = "krona_forward";
  const KronaSizes s = check_krona(op, x, weight, A, B);
  at::Tensor b;
  if (bias.has_value()) {
    require_on(op, "bias", *bias, 1, x.device());
    TORCH_CHECK(bias->size(0) == s.N, "peftkern._C.", op, ": bias must be (N,) = (", s.N, "), got ", bias->sizes());
    check_same_dtype(op, "bias", *bias, x);
    b = bias->contiguous();
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xs = rows_of(x);
  at::Tensor y = kron_term(op, xs, A, B, false, scaling, b, gemms, gpu_of(x), at::cuda::getCurrentCUDAStream());
  y.addmm_(xs, weight.t());
  return y;
}

// (dx, dA, dB, dbias, dweight) with dA (T, n1, k1) and dB (T, n2, k2) float32 for the dense factors (the caller
// applies a low-rank pair's chain rule and the factors' dtypes), dbias and dweight float32; None where not needed.
std::tuple<MaybeTensor, MaybeTensor, MaybeTensor, MaybeTensor, MaybeTensor> krona_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, double scaling, bool need_x, bool need_a, bool need_b, bool need_bias, bool need_w,
    bool gemms, bool reg_acc) {
  constexpr const char* op = "krona_backward";
  const KronaSizes s = check_krona(op, x, weight, A, B);
  require_on(op, "grad_y", grad_y, 2, x.device());
  check_same_dtype(op, "grad_y", grad_y, x);
  TORCH_CHECK(grad_y.size(0) == s.M && grad_y.size(1) == s.N, "peftkern._C.", op, ": grad_y must be (M, N) = (",
              s.M, ", ", s.N, "), got ", grad_y.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Gpu dev = gpu_of(x);
  const at::Tensor dy = rows_of(grad_y);
  const at::Tensor xs = rows_of(x);
  MaybeTensor dx, dA, dB, dbias, dw;
  at::Tensor dx_term;
  if (need_a || need_b) {
    const DType dt = element_type(xs);
    const auto rows_for = [&](int64_t terms, bool with_dx) {
      return peftkern::krona_grad_rows(dt, s.M, s.n1, s.k1, s.n2, s.k2, terms, with_dx, dev.sms, dev.max_smem,
                                       reg_acc);
    };
    // The dx term rides along the pass over dy and x where its buffers fit beside the factor gradients' too; a sum
    // whose terms do not fit together takes one pass per term where one term's factors fit.
    int64_t rows = 0, rows_dx = 0, rows_per_term = 0;
    if (!gemms) {
      rows_dx = need_x ? rows_for(s.T, true) : 0;
      rows = rows_dx > 0 ? rows_dx : rows_for(s.T, false);
      rows_per_term = rows == 0 && s.T > 1 ? rows_for(1, false) : 0;
    }
    at::Tensor ga, gb;
    if (rows > 0) {
      if (rows_dx > 0) dx_term = at::empty({s.M, s.K}, xs.options());
      std::tie(ga, gb) = factor_grads_by_kernel(op, dy, xs, A, B, scaling, rows, dx_term, dev, stream, reg_acc);
    } else if (rows_per_term > 0) {
      ga = at::empty({s.T, s.n1, s.k1}, xs.options().dtype(at::kFloat));
      gb = at::empty({s.T, s.n2, s.k2}, xs.options().dtype(at::kFloat));
      for (int64_t t = 0; t < s.T; ++t) {
        const auto [ga_t, gb_t] = factor_grads_by_kernel(op, dy, xs, A.narrow(0, t, 1), B.narrow(0, t, 1), scaling,
                                                         rows_per_term, at::Tensor(), dev, stream, reg_acc);
        ga[t].copy_(ga_t[0]);
        gb[t].copy_(gb_t[0]);
      }
    } else {
      std::tie(ga, gb) = factor_grads_by_gemms(dy, xs, A, B, scaling, need_a, need_b);
    }
    if (need_a) dA = ga;
    if (need_b) dB = gb;
  }
  if (need_x) {
    // s sum_t vec(A_t^T G_m B_t): the term with the factors transposed, on dy; then cuBLAS adds dy W (beta = 1).
    if (!dx_term.defined()) dx_term = kron_term(op, dy, A, B, true, scaling, at::Tensor(), gemms, dev, stream);
    dx = dx_term.addmm_(dy, weight);
  }
  if (need_bias) dbias = at::sum(dy, {0}, false, at::kFloat);
  if (need_w) dw = at::mm(dy.t(), xs).to(at::kFloat);
  return {dx, dA, dB, dbias, dw};
}

// weight (N, K) += sign * scaling * sum_t A_t (x) B_t in place, each element computed directly; returns weight.
at::Tensor krona_merge_(at::Tensor weight, const at::Tensor& A, const at::Tensor& B, double scaling, double sign) {
  constexpr const char* op = "krona_merge_";
  check_operands(op, "weight", weight, A, B);
  const int64_t N = weight.size(0), K = weight.size(1), T = A.size(0);
  TORCH_CHECK(T >= 1 && B.size(0) == T && A.size(1) * B.size(1) == N && A.size(2) * B.size(2) == K, "peftkern._C.",
              op, ": need A (T, n1, k1), B (T, n2, k2) with n1 n2 = N and k1 k2 = K for weight ", weight.sizes(),
              "; got A ", A.sizes(), ", B ", B.sizes());
  const c10::cuda::CUDAGuard guard(weight.device());
  check_launch(peftkern::krona_merge(weight.data_ptr(), element_type(weight), N, K, weight.stride(0), weight.stride(1),
                                     factor_of(A, false), factor_of(B, false), T, static_cast<float>(sign * scaling),
                                     gpu_of(weight).sms, at::cuda::getCurrentCUDAStream()),
               op, "krona_merge (W += sign s sum_t A_t (x) B_t)");
  return weight;
}

// Whether krona.cu's kernels take these factors (whole factors in one block's shared memory) on GPU `device` for x of
// element_size bytes: "term" (the forward and the dx term), "grad" (dA and dB in one pass) or "grad_dx" (and the dx
// term in the same pass).
bool krona_fits(int64_t device, int64_t element_size, int64_t n1, int64_t k1, int64_t n2, int64_t k2, int64_t terms,
                const std::string& kernel) {
  TORCH_CHECK(element_size == 2 || element_size == 4, "peftkern._C.krona_fits: element_size must be 2 or 4, got ",
              element_size);
  TORCH_CHECK(kernel == "term" || kernel == "grad" || kernel == "grad_dx",
              "peftkern._C.krona_fits: kernel must be term, grad or grad_dx, got ", kernel);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const auto* props = at::cuda::getDeviceProperties(static_cast<c10::DeviceIndex>(device));
  const int64_t max_smem = static_cast<int64_t>(props->sharedMemPerBlockOptin);
  const DType dt = element_size == 4 ? DType::kFloat32 : DType::kBFloat16;
  if (kernel == "term") return peftkern::krona_term_smem(dt, n1, k1, n2, k2, terms) <= max_smem;
  return peftkern::krona_grad_rows(dt, 1, n1, k1, n2, k2, terms, kernel == "grad_dx", props->multiProcessorCount,
                                   max_smem) > 0;
}

}  // namespace

void register_krona(pybind11::module_& m) {
  m.def("krona_forward", &krona_forward, "y = x W^T + b + s sum_t x (A_t (x) B_t)^T for dense stacked factors",
        py::arg("x"), py::arg("weight"), py::arg("A"), py::arg("B"), py::arg("scaling"), py::arg("bias"),
        py::arg("gemms"));
  m.def("krona_backward", &krona_backward, "(dx, dA, dB, dbias, dweight), dA and dB float32; None where not needed",
        py::arg("grad_y"), py::arg("x"), py::arg("weight"), py::arg("A"), py::arg("B"), py::arg("scaling"),
        py::arg("need_x"), py::arg("need_a"), py::arg("need_b"), py::arg("need_bias"), py::arg("need_w"),
        py::arg("gemms"), py::arg("reg_acc") = true);
  m.def("krona_merge_", &krona_merge_, "weight += sign * scaling * sum_t A_t (x) B_t in place", py::arg("weight"),
        py::arg("A"), py::arg("B"), py::arg("scaling"), py::arg("sign"));
  m.def("krona_fits", &krona_fits, "whether the KronA kernels hold these factors whole on a GPU", py::arg("device"),
        py::arg("element_size"), py::arg("n1"), py::arg("k1"), py::arg("n2"), py::arg("k2"), py::arg("terms"),
        py::arg("kernel"));
}

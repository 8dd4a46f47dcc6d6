// peftkern._C: the torch side of the CUDA backend. Checks the tensors it is handed (peftkern/ops already
// validated the user's input, so a failure here is a bug in peftkern, reported with the shapes), allocates
// outputs and workspaces on the caching allocator, runs the frozen GEMMs in cuBLAS through ATen and the
// kernels of lora.cu on the current stream, and checks every launch. peftkern/kernels/cuda.py calls these.

#include <algorithm>
#include <optional>
#include <tuple>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "peftkern.h"

namespace peftkern {
void bind_launcher(pybind11::module& m);  // launch.cpp
void register_adapter(pybind11::module& m);  // adapter_bindings.cpp
}  // namespace peftkern
void register_krona(pybind11::module_& m);  // krona_bindings.cpp

namespace {

using peftkern::DType;
using OptionalTensor = std::optional<at::Tensor>;

bool is_kernel_dtype(const at::Tensor& t) {
  const auto st = t.scalar_type();
  return st == at::kFloat || st == at::kHalf || st == at::kBFloat16;
}

DType dtype_of(const at::Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK(is_kernel_dtype(t) || st == at::kDouble, "peftkern._C: unsupported dtype ", st);
  if (st == at::kHalf) return DType::kFloat16;
  if (st == at::kBFloat16) return DType::kBFloat16;
  if (st == at::kDouble) return DType::kFloat64;
  return DType::kFloat32;
}

// A floating CUDA tensor with `dims` dimensions on x's device.
void check_tensor(const char* op, const char* name, const at::Tensor& t, int64_t dims, const at::Device& device) {
  TORCH_CHECK(t.is_cuda() && t.device() == device, "peftkern._C.", op, ": ", name, " must be on ", device,
              " (x's device), got ", t.device());
  TORCH_CHECK(t.dim() == dims, "peftkern._C.", op, ": ", name, " must have ", dims, " dimension(s), got shape ",
              t.sizes());
  TORCH_CHECK(t.is_floating_point(), "peftkern._C.", op, ": ", name, " must be floating, got ", t.scalar_type());
}

void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, "peftkern._C.", op, ": ", name, " must have shape ", expected, ", got ",
              t.sizes());
}

void check_launch(cudaError_t err, const char* op, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "peftkern._C.", op, ": launching ", what, " failed: ", cudaGetErrorString(err));
}

struct LoraShapes {
  int64_t M, K, N, R;
};

// x (M, K) in a kernel dtype and the frozen weight (N, K), or (K, N) with weight_transposed, in x's dtype, both on x's
// device: {M, K, N}.
std::tuple<int64_t, int64_t, int64_t> check_x_weight(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                                     bool weight_transposed) {
  TORCH_CHECK(x.is_cuda(), "peftkern._C.", op, ": x must be a CUDA tensor, got one on ", x.device());
  check_tensor(op, "x", x, 2, x.device());
  TORCH_CHECK(is_kernel_dtype(x), "peftkern._C.", op, ": x must be float32, float16 or bfloat16, got ",
              x.scalar_type());
  check_tensor(op, "weight", weight, 2, x.device());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "peftkern._C.", op, ": weight must share x's dtype ",
              x.scalar_type(), ", got ", weight.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = weight_transposed ? weight.size(1) : weight.size(0);
  if (weight_transposed) {
    check_shape(op, "weight (K, N)", weight, {K, N});
  } else {
    check_shape(op, "weight (N, K)", weight, {N, K});
  }
  return {M, K, N};
}

// x and weight as check_x_weight, lora_A (R, K), lora_B (N, R) in any float dtype on x's device.
LoraShapes check_lora(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                      const at::Tensor& lora_B, bool weight_transposed) {
  const auto [M, K, N] = check_x_weight(op, x, weight, weight_transposed);
  check_tensor(op, "lora_A", lora_A, 2, x.device());
  check_tensor(op, "lora_B", lora_B, 2, x.device());
  const LoraShapes s{M, K, N, lora_A.size(0)};
  TORCH_CHECK(s.R >= 1, "peftkern._C.", op, ": the rank must be at least 1, got lora_A of shape ", lora_A.sizes());
  check_shape(op, "lora_A (r, K)", lora_A, {s.R, s.K});
  check_shape(op, "lora_B (N, r)", lora_B, {s.N, s.R});
  return s;
}

void check_dropout(const char* op, double dropout_p) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "peftkern._C.", op, ": dropout_p must be in [0, 1), got ",
              dropout_p);
}

// The kernels read big operands along rows with unit stride; anything else is copied once.
at::Tensor unit_column_stride(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

at::Tensor weight_nk(const at::Tensor& weight, bool weight_transposed) {
  return weight_transposed ? weight.t() : weight;
}

int sm_count(const at::Tensor& t) {
  return at::cuda::getDeviceProperties(t.get_device())->multiProcessorCount;
}

at::Tensor workspace(const at::Tensor& like, int64_t floats) {
  return at::empty({floats}, like.options().dtype(at::kFloat));
}

const void* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// (y, xa): y = x W^T + b + s xa B^T with xa = drop(x) A^T (M, r) float32, saved for backward.
std::tuple<at::Tensor, at::Tensor> lora_forward(const at::Tensor& x, const at::Tensor& weight,
                                                const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                                                const OptionalTensor& bias, double dropout_p, int64_t seed,
                                                bool weight_transposed) {
  constexpr const char* op = "lora_forward";
  const LoraShapes s = check_lora(op, x, weight, lora_A, lora_B, weight_transposed);
  check_dropout(op, dropout_p);
  at::Tensor b;
  if (bias.has_value()) {
    check_tensor(op, "bias", *bias, 1, x.device());
    check_shape(op, "bias (N,)", *bias, {s.N});
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "peftkern._C.", op, ": bias must share x's dtype ",
                x.scalar_type(), ", got ", bias->scalar_type());
    b = bias->contiguous();
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int sms = sm_count(x);
  const at::Tensor xs = unit_column_stride(x);

  at::Tensor xa = at::empty({s.M, s.R}, x.options().dtype(at::kFloat));
  at::Tensor ws = workspace(x, peftkern::lora_down_workspace(s.M, s.K, s.R, sms));
  check_launch(peftkern::lora_down(xs.data_ptr(), dtype_of(xs), s.M, s.K, xs.stride(0), lora_A.data_ptr(),
                                   dtype_of(lora_A), s.R, lora_A.stride(0), lora_A.stride(1),
                                   static_cast<float>(dropout_p), static_cast<uint64_t>(seed), xa.data_ptr<float>(),
                                   s.R, ws.data_ptr<float>(), sms, stream),
               op, "lora_down (xa = drop(x) A^T)");

  // C = s xa B^T + b is written first, so cuBLAS adds x W^T in its epilogue (beta = 1) while it is
  // compute-bound instead of a separate pass over y.
  at::Tensor y = at::empty({s.M, s.N}, x.options());
  check_launch(peftkern::lora_up(xa.data_ptr<float>(), s.M, s.R, s.R, lora_B.data_ptr(), dtype_of(lora_B), s.N,
                                 lora_B.stride(0), lora_B.stride(1), data_or_null(b), static_cast<float>(scaling),
                                 0.0f, 0, y.data_ptr(), dtype_of(y), s.N, stream),
               op, "lora_up (y = s xa B^T + b)");
  y.addmm_(xs, weight_nk(weight, weight_transposed).t());
  return {y, xa};
}

// (dx, dA, dB, dbias, dweight) as reference.lora_backward; None where `need_*` is false.
std::tuple<OptionalTensor, OptionalTensor, OptionalTensor, OptionalTensor, OptionalTensor> lora_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scaling, double dropout_p, int64_t seed,
    bool weight_transposed, bool need_x, bool need_a, bool need_b, bool need_bias, bool need_w) {
  constexpr const char* op = "lora_backward";
  const LoraShapes s = check_lora(op, x, weight, lora_A, lora_B, weight_transposed);
  check_dropout(op, dropout_p);
  check_tensor(op, "grad_y", grad_y, 2, x.device());
  check_shape(op, "grad_y (M, N)", grad_y, {s.M, s.N});
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), "peftkern._C.", op, ": grad_y must share x's dtype ",
              x.scalar_type(), ", got ", grad_y.scalar_type());
  check_tensor(op, "xa", xa, 2, x.device());
  check_shape(op, "xa (M, r)", xa, {s.M, s.R});
  TORCH_CHECK(xa.scalar_type() == at::kFloat, "peftkern._C.", op, ": xa must be float32, got ", xa.scalar_type());

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int sms = sm_count(x);
  const float p = static_cast<float>(dropout_p), scale = static_cast<float>(scaling);
  const uint64_t key = static_cast<uint64_t>(seed);
  const at::Tensor dy = unit_column_stride(grad_y);
  const at::Tensor xs = unit_column_stride(x);
  const at::Tensor xa_rows = unit_column_stride(xa);
  // One workspace, reused by each reduction in stream order.
  int64_t ws_floats = 0;
  if (need_x || need_a) ws_floats = std::max(ws_floats, peftkern::lora_down_workspace(s.M, s.N, s.R, sms));
  if (need_a) ws_floats = std::max(ws_floats, peftkern::lora_grad_workspace(s.M, s.K, s.R, false, sms));
  if (need_b || need_bias) ws_floats = std::max(ws_floats, peftkern::lora_grad_workspace(s.M, s.N, s.R, need_bias, sms));
  at::Tensor ws = workspace(x, ws_floats);

  OptionalTensor dx, da, db, dbias, dw;
  at::Tensor dyb;
  if (need_x || need_a) {
    // dyb = dy B: the down kernel with w = B^T, i.e. (r, N) at strides (B.stride(1), B.stride(0)).
    dyb = at::empty({s.M, s.R}, x.options().dtype(at::kFloat));
    check_launch(peftkern::lora_down(dy.data_ptr(), dtype_of(dy), s.M, s.N, dy.stride(0), lora_B.data_ptr(),
                                     dtype_of(lora_B), s.R, lora_B.stride(1), lora_B.stride(0), 0.0f, 0,
                                     dyb.data_ptr<float>(), s.R, ws.data_ptr<float>(), sms, stream),
                 op, "lora_down (dyb = dy B)");
  }
  if (need_x) {
    // dx = s drop'(dyb A) first (up = A^T: (K, r) at strides (A.stride(1), A.stride(0))), then cuBLAS adds dy W.
    at::Tensor out = at::empty({s.M, s.K}, x.options());
    check_launch(peftkern::lora_up(dyb.data_ptr<float>(), s.M, s.R, s.R, lora_A.data_ptr(), dtype_of(lora_A), s.K,
                                   lora_A.stride(1), lora_A.stride(0), nullptr, scale, p, key, out.data_ptr(),
                                   dtype_of(out), s.K, stream),
                 op, "lora_up (dx = s drop'(dyb A))");
    out.addmm_(dy, weight_nk(weight, weight_transposed));
    dx = out;
  }
  if (need_a) {
    // dA^T (K, r) = s drop(x)^T dyb, written straight into dA (r, K): strides (1, K).
    at::Tensor out = at::empty({s.R, s.K}, lora_A.options());
    check_launch(peftkern::lora_grad(xs.data_ptr(), dtype_of(xs), s.M, s.K, xs.stride(0), dyb.data_ptr<float>(),
                                     s.R, s.R, p, key, scale, out.data_ptr(), dtype_of(out), 1, s.K, nullptr,
                                     ws.data_ptr<float>(), sms, stream),
                 op, "lora_grad (dA = s dyb^T drop(x))");
    da = out;
  }
  if (need_b || need_bias) {
    // dB (N, r) = s dy^T xa and dbias = sum_m dy in one pass over dy.
    at::Tensor out_b = need_b ? at::empty({s.N, s.R}, lora_B.options()) : at::Tensor();
    at::Tensor out_bias = need_bias ? at::empty({s.N}, x.options().dtype(at::kFloat)) : at::Tensor();
    check_launch(peftkern::lora_grad(dy.data_ptr(), dtype_of(dy), s.M, s.N, dy.stride(0), xa_rows.data_ptr<float>(),
                                     s.R, xa_rows.stride(0), 0.0f, 0, scale,
                                     need_b ? out_b.data_ptr() : nullptr, dtype_of(lora_B), s.R, 1,
                                     need_bias ? out_bias.data_ptr<float>() : nullptr, ws.data_ptr<float>(), sms,
                                     stream),
                 op, "lora_grad (dB = s dy^T xa, dbias = sum_m dy)");
    if (need_b) db = out_b;
    if (need_bias) dbias = out_bias;
  }
  if (need_w) {
    // Only when the user unfroze the weight: cuBLAS, returned in float32 like the other backends.
    at::Tensor g = at::mm(dy.t(), xs).to(at::kFloat);
    dw = weight_transposed ? g.t() : g;
  }
  return {dx, da, db, dbias, dw};
}

// The weight a merge rewrites in place: a floating CUDA tensor of 2 dimensions in a kernel dtype; {N, K} of its
// (N, K) view.
std::tuple<int64_t, int64_t> check_merge_weight(const char* op, const at::Tensor& weight, bool weight_transposed) {
  TORCH_CHECK(weight.is_cuda(), "peftkern._C.", op, ": weight must be a CUDA tensor, got one on ", weight.device());
  check_tensor(op, "weight", weight, 2, weight.device());
  TORCH_CHECK(is_kernel_dtype(weight), "peftkern._C.", op, ": weight must be float32, float16 or bfloat16, got ",
              weight.scalar_type());
  return {weight_transposed ? weight.size(1) : weight.size(0), weight_transposed ? weight.size(0) : weight.size(1)};
}

// weight += sign * scaling * B A in place (weight (N, K), or (K, N) with weight_transposed); returns weight.
at::Tensor lora_merge_(at::Tensor weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                       double sign, bool weight_transposed) {
  constexpr const char* op = "lora_merge_";
  const auto [N, K] = check_merge_weight(op, weight, weight_transposed);
  check_tensor(op, "lora_A", lora_A, 2, weight.device());
  check_tensor(op, "lora_B", lora_B, 2, weight.device());
  const int64_t R = lora_A.size(0);
  check_shape(op, "lora_A (r, K)", lora_A, {R, K});
  check_shape(op, "lora_B (N, r)", lora_B, {N, R});
  const c10::cuda::CUDAGuard guard(weight.device());
  // The kernel runs along the stored weight's rows: W (N, K) += B A, or W^T (K, N) += A^T B^T.
  const at::Tensor u = weight_transposed ? lora_A.t() : lora_B;
  const at::Tensor v = weight_transposed ? lora_B.t() : lora_A;
  check_launch(peftkern::lora_merge(weight.data_ptr(), dtype_of(weight), weight.size(0), weight.size(1),
                                    weight.stride(0), weight.stride(1), u.data_ptr(), dtype_of(u), u.stride(0),
                                    u.stride(1), v.data_ptr(), dtype_of(v), v.stride(0), v.stride(1), R,
                                    static_cast<float>(sign * scaling), at::cuda::getCurrentCUDAStream()),
               op, "lora_merge (W += sign s B A)");
  return weight;
}

// Fills keep (M, K) bool with the dropout keep-mask of (seed, p) that the kernels above draw.
void dropout_mask_(at::Tensor keep, int64_t seed, double dropout_p) {
  constexpr const char* op = "dropout_mask_";
  TORCH_CHECK(keep.is_cuda() && keep.dim() == 2 && keep.scalar_type() == at::kBool && keep.is_contiguous(),
              "peftkern._C.", op, ": keep must be a contiguous 2-D bool CUDA tensor, got ", keep.sizes(), " ",
              keep.scalar_type(), " on ", keep.device());
  check_dropout(op, dropout_p);
  const c10::cuda::CUDAGuard guard(keep.device());
  check_launch(peftkern::lora_dropout_mask(reinterpret_cast<uint8_t*>(keep.data_ptr<bool>()), keep.size(0),
                                           keep.size(1), static_cast<float>(dropout_p), static_cast<uint64_t>(seed),
                                           at::cuda::getCurrentCUDAStream()),
               op, "lora_dropout_mask");
}

// ---------------------------------------------------------------------------------------------------- IA3
struct Ia3Shapes {
  int64_t M, K, N;
};

// x and weight as check_x_weight, the bias (N,) in x's dtype, the vector l (K,) for the input form or (N,) for the
// output form in any float dtype, all on x's device.
Ia3Shapes check_ia3(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                    const OptionalTensor& bias, bool scale_input, bool weight_transposed) {
  const auto [M, K, N] = check_x_weight(op, x, weight, weight_transposed);
  const Ia3Shapes s{M, K, N};
  check_tensor(op, "scale", scale, 1, x.device());
  check_shape(op, scale_input ? "scale (K,)" : "scale (N,)", scale, {scale_input ? s.K : s.N});
  if (bias.has_value()) {
    check_tensor(op, "bias", *bias, 1, x.device());
    check_shape(op, "bias (N,)", *bias, {s.N});
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "peftkern._C.", op, ": bias must share x's dtype ",
                x.scalar_type(), ", got ", bias->scalar_type());
  }
  return s;
}

// t (rows, cols) * l along its columns (scale_cols) or rows, into a new row-major tensor (or in place into t when
// `in_place`, which needs unit column stride).
at::Tensor ia3_scaled(const char* op, const at::Tensor& t, const at::Tensor& scale, bool scale_cols, bool in_place) {
  const at::Tensor src = unit_column_stride(t);
  TORCH_CHECK(!in_place || src.is_same(t), "peftkern._C.", op, ": in-place scaling needs unit column stride");
  at::Tensor out = in_place ? src : at::empty(src.sizes(), src.options());
  check_launch(peftkern::ia3_scale(src.data_ptr(), dtype_of(src), src.stride(0), scale.data_ptr(), dtype_of(scale),
                                   src.size(0), src.size(1), scale_cols, out.data_ptr(), out.stride(0),
                                   at::cuda::getCurrentCUDAStream()),
               op, "ia3_scale");
  return out;
}

// The (N, K) view of the weight times l along K (along_k) or along N, scaled in its stored layout (no copy of a
// Conv1D (K, N) weight first).
at::Tensor ia3_scaled_weight_nk(const char* op, const at::Tensor& weight, const at::Tensor& scale, bool along_k,
                                bool weight_transposed) {
  if (!weight_transposed) return ia3_scaled(op, weight, scale, along_k, false);
  return ia3_scaled(op, weight, scale, !along_k, false).t();
}

// (y, z) as reference.ia3_forward: z = x W^T + b for the output form, an empty tensor for the input form.
std::tuple<at::Tensor, at::Tensor> ia3_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                                               const OptionalTensor& bias, bool scale_input, bool weight_transposed) {
  constexpr const char* op = "ia3_forward";
  const Ia3Shapes s = check_ia3(op, x, weight, scale, bias, scale_input, weight_transposed);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor l = scale.contiguous();
  const at::Tensor xs = unit_column_stride(x);
  const auto gemm = [&](const at::Tensor& a, const at::Tensor& w_nk) {
    return bias.has_value() ? at::addmm(*bias, a, w_nk.t()) : at::mm(a, w_nk.t());
  };
  if (scale_input) {
    // l folded into whichever operand is smaller: W' = W * l (an N x K pass) when M > N, else x' = x * l.
    const at::Tensor y = s.M > s.N ? gemm(xs, ia3_scaled_weight_nk(op, weight, l, true, weight_transposed))
                                   : gemm(ia3_scaled(op, xs, l, true, false), weight_nk(weight, weight_transposed));
    return {y, at::empty({0}, x.options())};
  }
  at::Tensor z = gemm(xs, weight_nk(weight, weight_transposed));
  return {ia3_scaled(op, z, l, true, false), z};
}

// (dx, dl, dbias, dweight) as reference.ia3_backward; None where `need_*` is false. dl in l's dtype, dbias and dweight
// in float32.
std::tuple<OptionalTensor, OptionalTensor, OptionalTensor, OptionalTensor> ia3_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
    const at::Tensor& z, bool scale_input, bool weight_transposed, bool need_x, bool need_l, bool need_bias,
    bool need_w) {
  constexpr const char* op = "ia3_backward";
  const Ia3Shapes s = check_ia3(op, x, weight, scale, std::nullopt, scale_input, weight_transposed);
  check_tensor(op, "grad_y", grad_y, 2, x.device());
  check_shape(op, "grad_y (M, N)", grad_y, {s.M, s.N});
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), "peftkern._C.", op, ": grad_y must share x's dtype ",
              x.scalar_type(), ", got ", grad_y.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int sms = sm_count(x);
  const at::Tensor l = scale.contiguous();
  const at::Tensor dy = unit_column_stride(grad_y);
  const at::Tensor xs = unit_column_stride(x);
  const at::Tensor w_nk = weight_nk(weight, weight_transposed);
  OptionalTensor dx, dl, dbias, dw;
  if (scale_input) {
    if (need_x || need_l) {
      // G = dy W by cuBLAS, then one pass over G and x: dx = G * l and dl = sum_m G * x.
      const at::Tensor g = at::mm(dy, w_nk);
      at::Tensor out = need_x ? at::empty({s.M, s.K}, x.options()) : at::Tensor();
      at::Tensor dl_f = need_l ? at::empty({s.K}, x.options().dtype(at::kFloat)) : at::Tensor();
      at::Tensor ws = workspace(x, peftkern::ia3_scale_reduce_workspace(s.M, s.K, sms));
      // x is read only for dl
      check_launch(peftkern::ia3_scale_reduce(g.data_ptr(), dtype_of(g), g.stride(0), need_l ? xs.data_ptr() : nullptr,
                                              need_l ? xs.stride(0) : 0,
                                              l.data_ptr(), dtype_of(l), s.M, s.K, need_x ? out.data_ptr() : nullptr,
                                              s.K, need_l ? dl_f.data_ptr<float>() : nullptr, nullptr,
                                              ws.data_ptr<float>(), sms, stream),
                   op, "ia3_scale_reduce (dx = (dy W) * l, dl = sum_m x * dy W)");
      if (need_x) dx = out;
      if (need_l) dl = dl_f.to(scale.scalar_type());
    }
    if (need_bias) dbias = at::sum(dy, {0}, false, at::kFloat);
    if (need_w) {
      const at::Tensor g = at::mm(dy.t(), ia3_scaled(op, xs, l, true, false)).to(at::kFloat);
      dw = weight_transposed ? g.t() : g;
    }
    return {dx, dl, dbias, dw};
  }
  // Output form: one pass over dy (and z, for dl) writes g = dy * l where dx or dweight need it, and sums
  // dl = sum_m dy * z and dbias = sum_m dy * l; then cuBLAS dx = g W.
  if (need_l) {
    check_tensor(op, "z", z, 2, x.device());
    check_shape(op, "z (M, N)", z, {s.M, s.N});
    TORCH_CHECK(z.scalar_type() == x.scalar_type(), "peftkern._C.", op, ": z must share x's dtype ", x.scalar_type(),
                ", got ", z.scalar_type());
  }
  const bool need_g = need_x || need_w;
  if (need_g || need_l || need_bias) {
    const at::Tensor zs = need_l ? unit_column_stride(z) : at::Tensor();
    at::Tensor g = need_g ? at::empty({s.M, s.N}, x.options()) : at::Tensor();
    at::Tensor dl_f = need_l ? at::empty({s.N}, x.options().dtype(at::kFloat)) : at::Tensor();
    at::Tensor db_f = need_bias ? at::empty({s.N}, x.options().dtype(at::kFloat)) : at::Tensor();
    at::Tensor ws = workspace(x, peftkern::ia3_scale_reduce_workspace(s.M, s.N, sms));
    check_launch(peftkern::ia3_scale_reduce(dy.data_ptr(), dtype_of(dy), dy.stride(0),
                                            need_l ? zs.data_ptr() : nullptr, need_l ? zs.stride(0) : 0,
                                            l.data_ptr(), dtype_of(l), s.M, s.N, need_g ? g.data_ptr() : nullptr,
                                            s.N, need_l ? dl_f.data_ptr<float>() : nullptr,
                                            need_bias ? db_f.data_ptr<float>() : nullptr, ws.data_ptr<float>(), sms,
                                            stream),
                 op, "ia3_scale_reduce (g = dy * l, dl = sum_m dy * z, dbias = sum_m dy * l)");
    if (need_x) dx = at::mm(g, w_nk);
    if (need_w) {
      const at::Tensor gw = at::mm(g.t(), xs).to(at::kFloat);
      dw = weight_transposed ? gw.t() : gw;
    }
    if (need_l) dl = dl_f.to(scale.scalar_type());
    if (need_bias) dbias = db_f;
  }
  return {dx, dl, dbias, dw};
}

// In place: W <- W * factor (rows of the (N, K) view for the output form, columns for the input form) and, for the
// output form, b <- b * factor; factor is l (merge) or 1 / l (unmerge, made by the caller). Returns weight.
at::Tensor ia3_merge_(at::Tensor weight, const at::Tensor& factor, const OptionalTensor& bias, bool scale_input,
                      bool weight_transposed) {
  constexpr const char* op = "ia3_merge_";
  const auto [N, K] = check_merge_weight(op, weight, weight_transposed);
  check_tensor(op, "factor", factor, 1, weight.device());
  check_shape(op, scale_input ? "factor (K,)" : "factor (N,)", factor, {scale_input ? K : N});
  if (bias.has_value() && !scale_input) {  // before the weight is written: a bad bias left it scaled
    check_tensor(op, "bias", *bias, 1, weight.device());
    check_shape(op, "bias (N,)", *bias, {N});
  }
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor f = factor.contiguous();
  // Along K of the (N, K) view is along the stored weight's columns, or its rows when stored (K, N).
  const bool scale_cols = scale_input != weight_transposed;
  if (weight.size(1) <= 1 || weight.stride(1) == 1) {
    ia3_scaled(op, weight, f, scale_cols, true);
  } else {
    weight.copy_(ia3_scaled(op, weight, f, scale_cols, false));
  }
  if (bias.has_value() && !scale_input) {
    at::Tensor b = *bias;
    if (b.is_contiguous() && is_kernel_dtype(b)) {
      ia3_scaled(op, b.view({1, N}), f, true, true);
    } else {
      b.copy_(b.to(at::kFloat) * f.to(at::kFloat));
    }
  }
  return weight;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "peftkern's CUDA backend: LoRA and IA3 kernels around cuBLAS (built from csrc/)";
  m.def("lora_forward", &lora_forward, "(y, xa) of y = x W^T + b + s (drop(x) A^T) B^T", py::arg("x"),
        py::arg("weight"), py::arg("lora_A"), py::arg("lora_B"), py::arg("scaling"), py::arg("bias"),
        py::arg("dropout_p"), py::arg("seed"), py::arg("weight_transposed"));
  m.def("lora_backward", &lora_backward, "(dx, dA, dB, dbias, dweight), None where not needed", py::arg("grad_y"),
        py::arg("x"), py::arg("weight"), py::arg("lora_A"), py::arg("lora_B"), py::arg("xa"), py::arg("scaling"),
        py::arg("dropout_p"), py::arg("seed"), py::arg("weight_transposed"), py::arg("need_x"), py::arg("need_a"),
        py::arg("need_b"), py::arg("need_bias"), py::arg("need_w"));
  m.def("lora_merge_", &lora_merge_, "weight += sign * scaling * B A in place", py::arg("weight"), py::arg("lora_A"),
        py::arg("lora_B"), py::arg("scaling"), py::arg("sign"), py::arg("weight_transposed"));
  m.def("ia3_forward", &ia3_forward, "(y, z) of y = (x W^T + b) * l, or (x * l) W^T + b with z empty",
        py::arg("x"), py::arg("weight"), py::arg("scale"), py::arg("bias"), py::arg("scale_input"),
        py::arg("weight_transposed"));
  m.def("ia3_backward", &ia3_backward, "(dx, dl, dbias, dweight), None where not needed", py::arg("grad_y"),
        py::arg("x"), py::arg("weight"), py::arg("scale"), py::arg("z"), py::arg("scale_input"),
        py::arg("weight_transposed"), py::arg("need_x"), py::arg("need_l"), py::arg("need_bias"), py::arg("need_w"));
  m.def("ia3_merge_", &ia3_merge_, "weight (and the output form's bias) times factor in place", py::arg("weight"),
        py::arg("factor"), py::arg("bias"), py::arg("scale_input"), py::arg("weight_transposed"));
  m.def("dropout_mask_", &dropout_mask_, "fill keep (M, K) bool with the kernels' dropout keep-mask",
        py::arg("keep"), py::arg("seed"), py::arg("dropout_p"));
  register_krona(m);
  peftkern::bind_launcher(m);
  peftkern::register_adapter(m);
}

// peftkern._C's bottleneck adapter: the torch side of adapter.cu. Checks the tensors it is handed (peftkern/ops
// validated the user's input, so a failure here is a bug in peftkern, reported with the shapes), allocates outputs
// and workspaces on the caching allocator, runs the skinny products in cuBLAS through ATen and the kernels of
// adapter.cu on the current stream, and checks every launch. peftkern/kernels/cuda.py calls these with
// reference.adapter_forward's and reference.adapter_backward's arguments and return conventions.

#include <optional>
#include <string>
#include <tuple>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "adapter.h"

namespace {

using peftkern::AdapterActivation;
using peftkern::DType;
using OptionalTensor = std::optional<at::Tensor>;

// The checked operands of one call, in the layouts the kernels take: h with unit column stride, the vectors (biases,
// LN's gamma and beta, the learned scale) contiguous or undefined where absent.
struct Operands {
  const char* op;
  int64_t M, D, B;
  DType dtype;
  at::Tensor h, down_bias, up_bias, scale, ln_weight, ln_bias;
  AdapterActivation activation;

  // A float dtype a launcher reads (h's dtypes, and float64 for the vectors).
  DType dtype_of(const at::Tensor& t) const {
    switch (t.scalar_type()) {
      case at::kFloat: return DType::kFloat32;
      case at::kHalf: return DType::kFloat16;
      case at::kBFloat16: return DType::kBFloat16;
      case at::kDouble: return DType::kFloat64;
      default: TORCH_CHECK(false, "peftkern._C.", op, ": unsupported dtype ", t.scalar_type());
    }
  }

  // t on h's device, floating, of exactly this shape; `what` names it with its expected shape.
  void expect(const at::Tensor& t, const char* what, at::IntArrayRef shape) const {
    TORCH_CHECK(t.is_cuda() && t.device() == h.device(), "peftkern._C.", op, ": ", what, " must be on ", h.device(),
                " (h's device), got ", t.device());
    TORCH_CHECK(t.is_floating_point(), "peftkern._C.", op, ": ", what, " must be floating, got ", t.scalar_type());
    TORCH_CHECK(t.sizes() == shape, "peftkern._C.", op, ": ", what, " must have shape ", shape, ", got ", t.sizes());
  }

  // An (M, D) or (M, B) operand in h's dtype (or float32), with unit column stride.
  at::Tensor rows(const at::Tensor& t, const char* what, int64_t width, at::ScalarType dtype) const {
    expect(t, what, {M, width});
    TORCH_CHECK(t.scalar_type() == dtype, "peftkern._C.", op, ": ", what, " must be ", dtype, ", got ",
                t.scalar_type());
    return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
  }

  at::Tensor vector(const OptionalTensor& t, const char* what, int64_t n) const {
    if (!t.has_value()) return at::Tensor();
    expect(*t, what, {n});
    dtype_of(*t);
    return t->contiguous();
  }

  void launched(cudaError_t err, const char* what) const {
    TORCH_CHECK(err == cudaSuccess, "peftkern._C.", op, ": launching ", what, " failed: ", cudaGetErrorString(err));
  }

  at::TensorOptions floats() const { return h.options().dtype(at::kFloat); }
};

// An optional operand's data, or null where it is absent (undefined).
void* pointer(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }
float* float_pointer(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

DType vector_dtype(const Operands& o, const at::Tensor& t) {
  return t.defined() ? o.dtype_of(t) : DType::kFloat32;
}

AdapterActivation activation_id(const char* op, const std::string& name) {
  if (name == "relu") return AdapterActivation::kRelu;
  if (name == "gelu") return AdapterActivation::kGelu;
  if (name == "gelu_tanh") return AdapterActivation::kGeluTanh;
  TORCH_CHECK(name == "silu", "peftkern._C.", op, ": activation must be relu, gelu, gelu_tanh or silu, got ", name);
  return AdapterActivation::kSilu;
}

Operands check_operands(const char* op, const at::Tensor& h, const at::Tensor& down_weight,
                        const OptionalTensor& down_bias, const at::Tensor& up_weight, const OptionalTensor& up_bias,
                        const OptionalTensor& scale, const OptionalTensor& ln_weight, const OptionalTensor& ln_bias,
                        const std::string& activation) {
  TORCH_CHECK(h.is_cuda() && h.dim() == 2, "peftkern._C.", op, ": h must be a 2-D CUDA tensor, got shape ", h.sizes(),
              " on ", h.device());
  const auto st = h.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, "peftkern._C.", op,
              ": h must be float32, float16 or bfloat16, got ", st);
  Operands o{op, h.size(0), h.size(1), down_weight.dim() == 2 ? down_weight.size(0) : -1, DType::kFloat32, h};
  o.dtype = o.dtype_of(h);
  o.h = o.rows(h, "h", o.D, st);
  TORCH_CHECK(o.B >= 1, "peftkern._C.", op, ": down_weight must be (b, d) with b >= 1, got shape ", down_weight.sizes());
  o.expect(down_weight, "down_weight (b, d)", {o.B, o.D});
  o.expect(up_weight, "up_weight (d, b)", {o.D, o.B});
  o.down_bias = o.vector(down_bias, "down_bias (b,)", o.B);
  o.up_bias = o.vector(up_bias, "up_bias (d,)", o.D);
  o.ln_weight = o.vector(ln_weight, "layer_norm weight (d,)", o.D);
  o.ln_bias = o.vector(ln_bias, "layer_norm bias (d,)", o.D);
  if (scale.has_value()) {
    TORCH_CHECK(scale->numel() == 1, "peftkern._C.", op, ": scale must hold one value, got shape ", scale->sizes());
    o.scale = o.vector(scale->reshape({1}), "scale", 1);
  }
  o.activation = activation_id(op, activation);
  return o;
}

// a b with a float32 result: for 16-bit operands cuBLAS's float32 accumulator is written as it is (mm's out_dtype).
at::Tensor mm_float32(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == at::kFloat ? at::mm(a, b) : at::mm(a, b, at::kFloat);
}

// The down weight the products read, in h's dtype: W' = Wd gamma with c1 = W' 1 and c2 = Wd beta (float32) under LN,
// else Wd itself.
struct DownWeight {
  at::Tensor weight, c1, c2;
};

DownWeight down_weight_for(const Operands& o, const at::Tensor& down_weight, bool layer_norm, cudaStream_t stream) {
  if (!layer_norm) return {down_weight.to(o.h.scalar_type()), at::Tensor(), at::Tensor()};
  DownWeight w{at::empty({o.B, o.D}, o.h.options()), at::empty({o.B}, o.floats()), at::empty({o.B}, o.floats())};
  o.launched(peftkern::adapter_fold_ln(down_weight.data_ptr(), o.dtype_of(down_weight), o.B, o.D,
                                       down_weight.stride(0), down_weight.stride(1), pointer(o.ln_weight),
                                       vector_dtype(o, o.ln_weight), pointer(o.ln_bias), vector_dtype(o, o.ln_bias),
                                       w.weight.data_ptr(), o.dtype, w.c1.data_ptr<float>(), w.c2.data_ptr<float>(),
                                       stream),
             "adapter_fold_ln (W' = Wd gamma, c1 = W' 1, c2 = Wd beta)");
  return w;
}

// (out, z, stats) as reference.adapter_forward: out (M, d) in h's dtype, z = LN(h) Wd^T + bd (M, b) float32,
// stats (M, 2) float32 = each row's (mean, rstd) under LN, else an empty tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> adapter_forward(
    const at::Tensor& h, const at::Tensor& down_weight, const OptionalTensor& down_bias, const at::Tensor& up_weight,
    const OptionalTensor& up_bias, const OptionalTensor& scale, const OptionalTensor& residual,
    const OptionalTensor& ln_weight, const OptionalTensor& ln_bias, const std::string& activation, double scaling,
    bool layer_norm, double ln_eps) {
  const Operands o = check_operands("adapter_forward", h, down_weight, down_bias, up_weight, up_bias, scale, ln_weight,
                                    ln_bias, activation);
  const at::Tensor r = residual.has_value() ? o.rows(*residual, "residual (M, d)", o.D, h.scalar_type()) : o.h;
  const c10::cuda::CUDAGuard guard(h.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  at::Tensor stats = layer_norm ? at::empty({o.M, 2}, o.floats()) : at::empty({0}, o.floats());
  if (layer_norm) {
    o.launched(peftkern::adapter_row_stats(o.h.data_ptr(), o.dtype, o.M, o.D, o.h.stride(0),
                                           static_cast<float>(ln_eps), stats.data_ptr<float>(), stream),
               "adapter_row_stats (LN's mean and rstd)");
  }
  const DownWeight w = down_weight_for(o, down_weight, layer_norm, stream);
  // cuBLAS's float32 h W'^T becomes z in place: LN's correction, bd
  at::Tensor z = mm_float32(o.h, w.weight.t()).contiguous();
  at::Tensor a = at::empty({o.M, o.B}, h.options());
  o.launched(peftkern::adapter_forward_rows(z.data_ptr<float>(), o.M, o.B, o.B,
                                            layer_norm ? stats.data_ptr<float>() : nullptr, float_pointer(w.c1),
                                            float_pointer(w.c2), pointer(o.down_bias),
                                            vector_dtype(o, o.down_bias), pointer(o.scale), vector_dtype(o, o.scale),
                                            o.activation, a.data_ptr(), o.dtype, o.B, stream),
             "adapter_forward_rows (z, a = act(z))");
  // out = r + s bu first, so that cuBLAS adds scaling a Wu^T in its epilogue (beta = 1) instead of a pass of its own
  at::Tensor out = at::empty({o.M, o.D}, h.options());
  o.launched(peftkern::adapter_residual(r.data_ptr(), o.dtype, o.M, o.D, r.stride(0), pointer(o.up_bias),
                                        vector_dtype(o, o.up_bias), pointer(o.scale), vector_dtype(o, o.scale),
                                        static_cast<float>(scaling), out.data_ptr(), o.D, stream),
             "adapter_residual (out = r + s bu)");
  out.addmm_(a, up_weight.to(h.scalar_type()).t(), 1.0, scaling);
  return {out, z, stats};
}

using Grads = std::tuple<OptionalTensor, OptionalTensor, OptionalTensor, OptionalTensor, OptionalTensor,
                         OptionalTensor, OptionalTensor, OptionalTensor>;

// (dh, dWd, dbd, dWu, dbu, dscale, dgamma, dbeta) as reference.adapter_backward, None where not asked for: dh in h's
// dtype, the others in their tensors' dtypes.
Grads adapter_backward(const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& down_weight,
                       const OptionalTensor& down_bias, const at::Tensor& up_weight, const OptionalTensor& up_bias,
                       const OptionalTensor& scale, const at::Tensor& z, const at::Tensor& stats,
                       const OptionalTensor& ln_weight, const OptionalTensor& ln_bias, const std::string& activation,
                       double scaling, bool sequential, bool layer_norm, bool need_h, bool need_dw, bool need_db,
                       bool need_uw, bool need_ub, bool need_scale, bool need_lnw, bool need_lnb) {
  const Operands o = check_operands("adapter_backward", h, down_weight, down_bias, up_weight, up_bias, scale,
                                    ln_weight, ln_bias, activation);
  const at::Tensor g = o.rows(grad_out, "grad_out (M, d)", o.D, h.scalar_type());
  const at::Tensor zs = o.rows(z, "z (M, b)", o.B, at::kFloat);
  if (layer_norm) o.rows(stats, "stats (M, 2)", 2, at::kFloat);
  const at::Tensor st = layer_norm ? stats.contiguous() : at::Tensor();
  TORCH_CHECK((!need_db || o.down_bias.defined()) && (!need_ub || o.up_bias.defined()) &&
                  (!need_scale || o.scale.defined()) && (!need_lnw || (layer_norm && o.ln_weight.defined())) &&
                  (!need_lnb || (layer_norm && o.ln_bias.defined())),
              "peftkern._C.adapter_backward: a gradient was asked for a tensor that is absent");
  const c10::cuda::CUDAGuard guard(h.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int sms = at::cuda::getDeviceProperties(h.get_device())->multiProcessorCount;
  const at::ScalarType dt = h.scalar_type();

  const bool need_a = need_uw || need_ub;
  const bool need_dz = need_h || need_dw || need_db || need_scale || need_lnw || need_lnb;
  const bool ln_products = layer_norm && (need_dw || need_lnw);  // (dz rstd)^T h and its centring term
  const DownWeight w = need_h ? down_weight_for(o, down_weight, layer_norm, stream) : DownWeight{};

  // gu = g [Wu, bu]: the extra column gives each row's g . bu, which the learned scale's gradient needs
  at::Tensor gu;
  const bool bias_dot = need_scale && o.up_bias.defined();
  if (need_dz) {
    const at::Tensor wu = up_weight.to(dt);
    gu = mm_float32(g, bias_dot ? at::cat({wu, o.up_bias.to(dt).unsqueeze(1)}, 1) : wu);
  }
  const auto maybe = [](bool wanted, at::IntArrayRef shape, const at::TensorOptions& options) {
    return wanted ? at::empty(shape, options) : at::Tensor();
  };
  const int64_t a_width = (o.B + 1 + 7) / 8 * 8;  // a's row stride stays 16-byte aligned for cuBLAS
  at::Tensor dz = maybe(need_h || (need_dw && !layer_norm), {o.M, o.B}, h.options());
  at::Tensor a_ext = maybe(need_a, {o.M, a_width}, h.options());
  at::Tensor dz_rstd = maybe(ln_products, {o.M, o.B}, h.options());
  at::Tensor ln_rows = maybe(layer_norm && need_h, {o.M, 2}, o.floats());
  at::Tensor dz_colsum = maybe(need_db || (layer_norm && (need_dw || need_lnb)), {o.B}, o.floats());
  at::Tensor dz_rstd_mean = maybe(ln_products, {o.B}, o.floats());
  at::Tensor scale_sum = maybe(need_scale, {1}, o.floats());
  if (need_dz || need_a) {
    peftkern::AdapterBackwardRows p{};
    p.M = o.M;
    p.B = o.B;
    p.D = o.D;
    p.dtype = o.dtype;
    p.activation = o.activation;
    p.z = zs.data_ptr<float>();
    p.ldz = zs.stride(0);
    p.gu = float_pointer(gu);
    p.ldgu = gu.defined() ? gu.stride(0) : 0;
    p.gu_bias_dot = bias_dot;
    p.stats = float_pointer(st);
    p.c1 = float_pointer(w.c1);
    p.c2 = float_pointer(w.c2);
    p.down_bias = pointer(o.down_bias);
    p.down_bias_dtype = vector_dtype(o, o.down_bias);
    p.scale = pointer(o.scale);
    p.scale_dtype = vector_dtype(o, o.scale);
    p.scaling = static_cast<float>(scaling);
    p.dz = pointer(dz);
    p.lddz = o.B;
    p.a_ext = pointer(a_ext);
    p.lda = a_width;
    p.dz_rstd = pointer(dz_rstd);
    p.lddz_rstd = o.B;
    p.ln_rows = float_pointer(ln_rows);
    p.dz_colsum = float_pointer(dz_colsum);
    p.dz_rstd_mean = float_pointer(dz_rstd_mean);
    p.scale_grad_sum = float_pointer(scale_sum);
    at::Tensor ws = at::empty({peftkern::adapter_backward_rows_workspace(o.M, o.B, sms)}, o.floats());
    o.launched(peftkern::adapter_backward_rows(p, ws.data_ptr<float>(), sms, stream),
               "adapter_backward_rows (dz = s act'(z) g Wu, a = [act(z), 1], LN's row terms, sums over M)");
  }

  OptionalTensor dh, d_dw, d_db, d_uw, d_ub, d_scale, d_lnw, d_lnb;
  if (need_h && !layer_norm) {
    dh = sequential ? at::addmm(g, dz, w.weight) : at::mm(dz, w.weight);  // + g through cuBLAS's beta = 1
  } else if (need_h) {
    // dz W' in float32: the LN backward subtracts its row means, which must cancel against what the GEMM summed
    const at::Tensor dx = mm_float32(dz, w.weight);
    at::Tensor out = at::empty({o.M, o.D}, h.options());
    o.launched(peftkern::adapter_ln_backward(dx.data_ptr<float>(), o.M, o.D, dx.stride(0), o.h.data_ptr(), o.dtype,
                                             o.h.stride(0), st.data_ptr<float>(), ln_rows.data_ptr<float>(),
                                             sequential ? g.data_ptr() : nullptr, g.stride(0), out.data_ptr(), o.D,
                                             stream),
               "adapter_ln_backward (dh = rstd (dz W' - r1 - xhat r2) [+ g])");
    dh = out;
  }
  if (need_a) {
    // g^T [a, 1]: dWu and sum_m g in one product; s multiplies them after (a learned scale is a tensor on the device)
    const at::Tensor prod = mm_float32(g.t(), a_ext);
    const at::Tensor s = o.scale.defined() ? o.scale.to(at::kFloat).reshape({}) * scaling : at::Tensor();
    const auto scaled = [&](const at::Tensor& t) { return s.defined() ? t * s : t * scaling; };
    if (need_uw) d_uw = scaled(prod.narrow(1, 0, o.B)).to(up_weight.scalar_type());
    if (need_ub) d_ub = scaled(prod.select(1, o.B)).to(o.up_bias.scalar_type());
  }
  if (need_db) d_db = dz_colsum.to(o.down_bias.scalar_type());
  if (need_dw && !layer_norm) d_dw = mm_float32(dz.t(), o.h).to(down_weight.scalar_type());
  if (ln_products) {
    // dz^T xhat = (dz rstd)^T h - (dz rstd)^T mean: the product runs on h itself, never on a normalised copy
    const at::Tensor dz_xhat = mm_float32(dz_rstd.t(), o.h) - dz_rstd_mean.unsqueeze(1);
    if (need_dw) {
      at::Tensor grad = o.ln_weight.defined() ? dz_xhat * o.ln_weight.to(at::kFloat) : dz_xhat;
      if (o.ln_bias.defined()) grad = grad + dz_colsum.unsqueeze(1) * o.ln_bias.to(at::kFloat).unsqueeze(0);
      d_dw = grad.to(down_weight.scalar_type());
    }
    if (need_lnw) d_lnw = (dz_xhat * down_weight.to(at::kFloat)).sum(0).to(o.ln_weight.scalar_type());
  }
  if (need_lnb) d_lnb = at::matmul(dz_colsum, down_weight.to(at::kFloat)).to(o.ln_bias.scalar_type());
  if (need_scale) d_scale = (scale_sum * scaling).reshape(scale->sizes()).to(scale->scalar_type());
  return {dh, d_dw, d_db, d_uw, d_ub, d_scale, d_lnw, d_lnb};
}

}  // namespace

namespace peftkern {

void register_adapter(pybind11::module& m) {
  m.def("adapter_forward", &adapter_forward,
        "(out, z, stats) of out = r + s (act(LN(h) Wd^T + bd) Wu^T + bu), as reference.adapter_forward",
        py::arg("h"), py::arg("down_weight"), py::arg("down_bias"), py::arg("up_weight"), py::arg("up_bias"),
        py::arg("scale"), py::arg("residual"), py::arg("ln_weight"), py::arg("ln_bias"), py::arg("activation"),
        py::arg("scaling"), py::arg("layer_norm"), py::arg("ln_eps"));
  m.def("adapter_backward", &adapter_backward,
        "(dh, dWd, dbd, dWu, dbu, dscale, dgamma, dbeta), None where not needed, as reference.adapter_backward",
        py::arg("grad_out"), py::arg("h"), py::arg("down_weight"), py::arg("down_bias"), py::arg("up_weight"),
        py::arg("up_bias"), py::arg("scale"), py::arg("z"), py::arg("stats"), py::arg("ln_weight"),
        py::arg("ln_bias"), py::arg("activation"), py::arg("scaling"), py::arg("sequential"), py::arg("layer_norm"),
        py::arg("need_h"), py::arg("need_dw"), py::arg("need_db"), py::arg("need_uw"), py::arg("need_ub"),
        py::arg("need_scale"), py::arg("need_lnw"), py::arg("need_lnb"));
}

}  // namespace peftkern

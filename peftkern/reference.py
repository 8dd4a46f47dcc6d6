"""Plain-PyTorch definitions of every peftkern op, forward and backward.

This file is the specification: the CPU path (the "torch" backend) and what every test compares against.
Everything is computed in float32 (float64 when the input is float64) and cast back to the input's
dtype, so it is obviously right rather than fast.

Shapes follow torch.nn.Linear: x (M, K), weight (N, K) (or (K, N) with weight_transposed, GPT-2's Conv1D),
output (M, N). Adapters may have their own dtype (PEFT keeps them in float32 beside a bf16 base); their
gradients come back in their own dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _up(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


def _weight_nk(weight: Tensor, weight_transposed: bool) -> Tensor:
    return weight.t() if weight_transposed else weight


# ----------------------------------------------------------------------------------------------- dropout
def dropout_mask(seed: int, shape: tuple, p: float, device: torch.device) -> Tensor:
    """The keep-mask (bool) of the torch backend: a function of (seed, shape, p) alone. On the meta device, which
    holds no values and has no generator, a meta tensor of the mask's shape (torch.Generator(device="meta") raised
    "META device type not an accelerator": a LoRA layer with dropout could not run a meta forward in training, as
    nn.Dropout can; a review, 2026-12-05)."""
    if torch.device(device).type == "meta":
        return torch.empty(shape, dtype=torch.bool, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return torch.rand(shape, generator=gen, device=device) >= p


def apply_dropout(x: Tensor, keep: Optional[Tensor], p: float) -> Tensor:
    if keep is None or p == 0.0:
        return x
    return torch.where(keep, x / (1.0 - p), torch.zeros((), dtype=x.dtype, device=x.device))


# -------------------------------------------------------------------------------------------------- LoRA
def lora_linear(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    bias: Optional[Tensor] = None,
    keep: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    weight_transposed: bool = False,
) -> Tensor:
    """y = x W^T + b + scaling * (dropout(x) A^T) B^T.

    x (M, K); weight (N, K) or (K, N) if weight_transposed; lora_A (r, K); lora_B (N, r); bias (N,);
    keep: the dropout keep-mask of x's shape (None: no dropout). Returns (M, N) in x.dtype.
    """
    dt = compute_dtype(x)
    xc = x.to(dt)
    y = xc @ _weight_nk(weight, weight_transposed).to(dt).t()
    if bias is not None:
        y = y + bias.to(dt)
    xa = apply_dropout(xc, keep, dropout_p) @ lora_A.to(dt).t()
    y = y + scaling * (xa @ lora_B.to(dt).t())
    return y.to(x.dtype)


def lora_xa_dtype(x_dtype: torch.dtype, dropout_p: float) -> torch.dtype:
    """The dtype of the xa that lora_forward returns: float32 (float64 for float64), whatever x's dtype."""
    return torch.float64 if x_dtype == torch.float64 else torch.float32


def xa_made_apart(M: int, N: int, R: int, device: torch.device) -> bool:
    """lora_forward here always makes xa by a product of its own (the Triton backend's says where it does)."""
    return True


def lora_down(x, lora_A, dropout_p, seed):
    """xa = dropout(x) A^T in float32 (float64 for float64), as lora_forward makes it."""
    keep = dropout_mask(seed, tuple(x.shape), dropout_p, x.device) if dropout_p > 0 else None
    dt = compute_dtype(x)
    xa = apply_dropout(x.to(dt), keep, dropout_p) @ lora_A.to(dt).t()
    return xa.to(torch.float32 if dt != torch.float64 else dt)


def lora_forward(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed, weight_transposed, xa=None):
    """The torch backend's forward: returns (y, xa) with xa = dropout(x) A^T in float32, saved for backward; a given
    xa (lora_down's) is used as it is."""
    dt = compute_dtype(x)
    xc = x.to(dt)
    xa = lora_down(xc, lora_A, dropout_p, seed) if xa is None else xa  # xc: x is cast once
    y = xc @ _weight_nk(weight, weight_transposed).to(dt).t() + scaling * (xa.to(dt) @ lora_B.to(dt).t())
    if bias is not None:
        y = y + bias.to(dt)
    return y.to(x.dtype), xa


def lora_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    xa: Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
    weight_transposed: bool,
    needs: tuple,
):
    """Gradients (dx, dA, dB, dbias, dweight) of lora_linear; needs says which ones (5 bools).

    dx = dy W + scaling * mask/(1-p) * ((dy B) A);  dA = scaling * (dy B)^T dropout(x);
    dB = scaling * dy^T (dropout(x) A^T);  dbias = sum_m dy;  dweight = dy^T x (only if the user unfroze it).
    """
    need_x, need_a, need_b, need_bias, need_w = needs
    dt = compute_dtype(grad_y)
    dy = grad_y.to(dt)
    keep = dropout_mask(seed, tuple(x.shape), dropout_p, x.device) if dropout_p > 0 else None
    dyb = dy @ lora_B.to(dt)
    dx = da = db = dbias = dw = None
    if need_x:
        w = _weight_nk(weight, weight_transposed).to(dt)
        dx = (dy @ w + apply_dropout(scaling * (dyb @ lora_A.to(dt)), keep, dropout_p)).to(x.dtype)
    if need_a:
        da = (scaling * dyb.t() @ apply_dropout(x.to(dt), keep, dropout_p)).to(lora_A.dtype)
    if need_b:
        db = (scaling * dy.t() @ xa.to(dt)).to(lora_B.dtype)
    if need_bias:
        dbias = dy.sum(0)
    if need_w:
        dw = dy.t() @ x.to(dt)
        dw = dw.t() if weight_transposed else dw
    return dx, da, db, dbias, dw


def lora_delta_weight(lora_A: Tensor, lora_B: Tensor, scaling: float, weight_transposed: bool = False,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """scaling * B A (N, K), or its transpose for a (K, N) weight, in float32 (or `dtype`)."""
    delta = scaling * (lora_B.to(dtype) @ lora_A.to(dtype))
    return delta.t() if weight_transposed else delta


def lora_merge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, sign: float,
                weight_transposed: bool = False) -> Tensor:
    """weight += sign * scaling * B A, in place, rounded once to weight.dtype."""
    dt = compute_dtype(weight)
    delta = lora_delta_weight(lora_A, lora_B, scaling, weight_transposed, dt)
    weight.copy_((weight.to(dt) + sign * delta).to(weight.dtype))
    return weight


# --------------------------------------------------------------------------------------------------- IA3
def ia3_linear(x: Tensor, weight: Tensor, scale: Tensor, bias: Optional[Tensor] = None, scale_input: bool = False,
               weight_transposed: bool = False) -> Tensor:
    """Output form y = (x W^T + b) * l (l: (N,)); input form (scale_input) y = (x * l) W^T + b (l: (K,)).
    Returns x.dtype, the base layer's dtype, whatever l's dtype."""
    dt = compute_dtype(x)
    w = _weight_nk(weight, weight_transposed).to(dt)
    b = _up(bias, dt)
    l_ = scale.to(dt)
    if scale_input:
        y = (x.to(dt) * l_) @ w.t()
        return (y if b is None else y + b).to(x.dtype)
    z = x.to(dt) @ w.t()
    z = z if b is None else z + b
    return (z * l_).to(x.dtype)


def ia3_forward(x, weight, scale, bias, scale_input, weight_transposed):
    """The torch backend's forward: (y, z) with z = x W^T + b (output form: saved for dl, since y / l would
    divide by zero where l is 0) or an empty tensor (input form: x itself is what backward needs)."""
    if scale_input:
        return ia3_linear(x, weight, scale, bias, scale_input, weight_transposed), x.new_empty((0,))
    dt = compute_dtype(x)
    z = x.to(dt) @ _weight_nk(weight, weight_transposed).to(dt).t()
    z = z if bias is None else z + bias.to(dt)
    return (z * scale.to(dt)).to(x.dtype), z.to(x.dtype)


def ia3_backward(grad_y, x, weight, scale, z, scale_input, weight_transposed, needs):
    """(dx, dl, dbias, dweight) of ia3_linear; needs says which (4 bools).

    output form: dx = (dy * l) W, dl = sum_m dy * z, dbias = sum_m dy * l, dweight = (dy * l)^T x;
    input form:  dx = l * (dy W), dl = sum_m x * (dy W), dbias = sum_m dy, dweight = dy^T (x * l).
    """
    need_x, need_l, need_bias, need_w = needs
    dt = compute_dtype(grad_y)
    dy, w, l_ = grad_y.to(dt), _weight_nk(weight, weight_transposed).to(dt), scale.to(dt)
    dx = dl = dbias = dw = None
    if scale_input:
        dyw = dy @ w
        dx = (dyw * l_).to(x.dtype) if need_x else None
        dl = (x.to(dt) * dyw).sum(0).to(scale.dtype) if need_l else None
        dbias = dy.sum(0) if need_bias else None
        dw = dy.t() @ (x.to(dt) * l_) if need_w else None
    else:
        g = dy * l_
        dx = (g @ w).to(x.dtype) if need_x else None
        dl = (dy * z.to(dt)).sum(0).to(scale.dtype) if need_l else None
        dbias = g.sum(0) if need_bias else None
        dw = g.t() @ x.to(dt) if need_w else None
    if dw is not None and weight_transposed:
        dw = dw.t()
    return dx, dl, dbias, dw


def ia3_merge_(weight: Tensor, scale: Tensor, bias: Optional[Tensor], scale_input: bool, inverse: bool = False,
               weight_transposed: bool = False) -> Tensor:
    """Fold l into the frozen layer in place: W <- W * l (rows for the output form, columns for the input
    form), b <- b * l (output form). inverse=True divides (by l, not times a rounded 1 / l, whose error would
    compound over merge / unmerge cycles): defined only where l != 0 (the caller checks)."""
    dt = compute_dtype(weight)
    l_ = scale.to(dt)
    apply = torch.div if inverse else torch.mul
    w = _weight_nk(weight, weight_transposed)
    w.copy_(apply(w.to(dt), l_[None, :] if scale_input else l_[:, None]).to(weight.dtype))
    if bias is not None and not scale_input:
        bias.copy_(apply(bias.to(dt), l_).to(bias.dtype))
    return weight


# ------------------------------------------------------------------------------------------------- KronA
# Layout (torch.kron's, and PEFT LoKr's with A = lokr_w1, B = lokr_w2): for A (n1, k1) and B (n2, k2),
# (A (x) B)[i1 * n2 + i2, j1 * k2 + j2] = A[i1, j1] * B[i2, j2]. Factors come stacked over the T terms of a sum
# (T = 1 for KronA and LoKr, Compacter's PHM sums several): a (T, n1, k1), or a low-rank pair a (T, n1, r) and
# a2 (T, r, k1) with A = a @ a2; likewise b (T, n2, k2), or b (T, n2, r) and b2 (T, r, k2).
# Per token, with X = x reshaped (k1, k2) row-major, (A (x) B) x = vec(A X B^T), an (n1, n2) matrix.


def krona_factor(f: Tensor, f2: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """The dense (T, n, k) factor: f itself, or the product f @ f2 of a low-rank pair."""
    return f.to(dtype) if f2 is None else f.to(dtype) @ f2.to(dtype)


def krona_dense_factor(f: Tensor, f2: Optional[Tensor]) -> Tensor:
    """A stacked factor as one (T, n, k) tensor for the kernels: f itself, or a low-rank pair multiplied out in
    float32 (it is n x k, small)."""
    return f if f2 is None else torch.bmm(f.float(), f2.float())


def krona_lowrank_grads(dF: Optional[Tensor], f: Tensor, f2: Optional[Tensor], need: bool, need2: bool):
    """(df, df2) of a factor F = f @ f2 (or F = f) from its float32 gradient dF, each in its own factor's dtype: the
    chain rule the kernels' backends apply to the dense factor's gradient; (None, None) where dF is None."""
    if dF is None:
        return None, None
    if f2 is None:
        return (dF.to(f.dtype) if need else None), None
    df = torch.bmm(dF, f2.float().transpose(1, 2)).to(f.dtype) if need else None
    df2 = torch.bmm(f.float().transpose(1, 2), dF).to(f2.dtype) if need2 else None
    return df, df2


def krona_delta_weight(a: Tensor, a2: Optional[Tensor], b: Tensor, b2: Optional[Tensor], scaling: float,
                       dtype: torch.dtype = torch.float32) -> Tensor:
    """scaling * sum_t kron(A_t, B_t): the dense (N, K) delta. For merging and tests only."""
    A, B = krona_factor(a, a2, dtype), krona_factor(b, b2, dtype)
    (T, n1, k1), (_, n2, k2) = A.shape, B.shape
    # The product by broadcasting, not torch.kron, whose view fails (torch 2.13) on a factor whose strides are
    # not row-major: a transposed (n, 1) factor, which .contiguous() does not copy, as it counts as contiguous.
    kron = (A[t, :, None, :, None] * B[t, None, :, None, :] for t in range(T))
    return scaling * sum(kron).reshape(n1 * n2, k1 * k2)


def krona_linear(x: Tensor, weight: Tensor, a: Tensor, a2: Optional[Tensor], b: Tensor, b2: Optional[Tensor],
                 scaling: float, bias: Optional[Tensor] = None) -> Tensor:
    """The specification, through the dense delta: y = x (W + scaling sum_t A_t (x) B_t)^T + b.
    x (M, K), weight (N, K), factors as above; returns (M, N) in x.dtype."""
    dt = compute_dtype(x)
    w = weight.to(dt) + krona_delta_weight(a, a2, b, b2, scaling, dt)
    y = x.to(dt) @ w.t()
    return (y if bias is None else y + bias.to(dt)).to(x.dtype)


def krona_term(x: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """scaling * sum_t (A_t (x) B_t) x_m for every row of x (M, K), as vec(A_t X_m B_t^T): never N x K.
    A (T, n1, k1), B (T, n2, k2) dense, all in one float dtype; returns (M, n1 n2)."""
    n1, k1 = A.shape[1:]
    n2, k2 = B.shape[1:]
    X = x.reshape(x.shape[0], 1, k1, k2)
    return scaling * (A @ X @ B.transpose(1, 2)).sum(1).reshape(x.shape[0], n1 * n2)


def krona_forward(x, weight, a, a2, b, b2, scaling, bias):
    """The torch backend's forward: y = x W^T + b + krona_term(x), computed in float32."""
    dt = compute_dtype(x)
    xc = x.to(dt)
    y = xc @ weight.to(dt).t() + krona_term(xc, krona_factor(a, a2, dt), krona_factor(b, b2, dt), scaling)
    return (y if bias is None else y + bias.to(dt)).to(x.dtype)


def krona_backward(grad_y: Tensor, x: Tensor, weight: Tensor, a: Tensor, a2: Optional[Tensor], b: Tensor,
                   b2: Optional[Tensor], scaling: float, needs: tuple):
    """Gradients (dx, da, da2, db, db2, dbias, dweight) of krona_linear; needs says which ones (7 bools).

    With G_m = dy_m as (n1, n2) and X_m = x_m as (k1, k2):
    dx_m = W^T dy_m + s sum_t vec(A_t^T G_m B_t);  dA_t = s sum_m G_m B_t X_m^T;  dB_t = s sum_m G_m^T A_t X_m;
    a low-rank A = a a2 gets da = dA a2^T, da2 = a^T dA (B likewise); dbias = sum_m dy_m; dweight = dy^T x.
    """
    need_x, need_a, need_a2, need_b, need_b2, need_bias, need_w = needs
    dt = compute_dtype(grad_y)
    A, B = krona_factor(a, a2, dt), krona_factor(b, b2, dt)
    M = grad_y.shape[0]
    G = grad_y.to(dt).reshape(M, A.shape[1], B.shape[1])
    X = x.to(dt).reshape(M, A.shape[2], B.shape[2])
    dx = da = da2 = db = db2 = dbias = dw = None
    if need_x:
        term = torch.einsum("tij,mik,tkl->mjl", A, G, B).reshape(M, x.shape[1])
        dx = (grad_y.to(dt) @ weight.to(dt) + scaling * term).to(x.dtype)
    if need_a or need_a2:
        dA = scaling * torch.einsum("mik,tkl,mjl->tij", G, B, X)
        da, da2 = (dA, None) if a2 is None else (dA @ a2.to(dt).transpose(1, 2), a.to(dt).transpose(1, 2) @ dA)
        da, da2 = (da.to(a.dtype) if need_a else None), (da2.to(a2.dtype) if need_a2 and a2 is not None else None)
    if need_b or need_b2:
        dB = scaling * torch.einsum("mik,tij,mjl->tkl", G, A, X)
        db, db2 = (dB, None) if b2 is None else (dB @ b2.to(dt).transpose(1, 2), b.to(dt).transpose(1, 2) @ dB)
        db, db2 = (db.to(b.dtype) if need_b else None), (db2.to(b2.dtype) if need_b2 and b2 is not None else None)
    if need_bias:
        dbias = grad_y.to(dt).sum(0)
    if need_w:
        dw = grad_y.to(dt).t() @ x.to(dt)
    return dx, da, da2, db, db2, dbias, dw


def krona_merge_(weight: Tensor, a: Tensor, a2: Optional[Tensor], b: Tensor, b2: Optional[Tensor], scaling: float,
                 sign: float) -> Tensor:
    """weight += sign * scaling * sum_t A_t (x) B_t, in place, rounded once to weight.dtype."""
    dt = compute_dtype(weight)
    weight.copy_((weight.to(dt) + sign * krona_delta_weight(a, a2, b, b2, scaling, dt)).to(weight.dtype))
    return weight


# ------------------------------------------------------------------------------------- bottleneck adapter
ADAPTER_ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
_SQRT_2_OVER_PI = 0.7978845608028654


def adapter_activation(z: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    """(act(z), act'(z)) for relu, gelu (exact, erf), gelu_tanh (tanh approximation) and silu (swish)."""
    if activation == "relu":
        return z.clamp_min(0), (z > 0).to(z.dtype)
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * 0.5**0.5))
        pdf = torch.exp(-0.5 * z * z) * (2.0 * torch.pi) ** -0.5
        return z * cdf, cdf + z * pdf
    if activation == "gelu_tanh":
        # 0.5 (1 + tanh(u)) = sigmoid(2u), u = sqrt(2/pi) (z + 0.044715 z^3)
        sig = torch.sigmoid(2.0 * _SQRT_2_OVER_PI * (z + 0.044715 * z**3))
        du = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * z * z)
        return z * sig, sig + z * 2.0 * sig * (1.0 - sig) * du
    if activation == "silu":
        sig = torch.sigmoid(z)
        return z * sig, sig * (1.0 + z * (1.0 - sig))
    raise ValueError(f"activation must be one of {ADAPTER_ACTIVATIONS}, got {activation!r}")


def _adapter_scale(scaling: float, scale: Optional[Tensor], dt: torch.dtype):
    return scaling if scale is None else scaling * scale.to(dt).reshape(())


def bottleneck_adapter(h: Tensor, down_weight: Tensor, down_bias: Optional[Tensor], up_weight: Tensor,
                       up_bias: Optional[Tensor], activation: str = "relu", scaling: float = 1.0,
                       scale: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                       ln_weight: Optional[Tensor] = None, ln_bias: Optional[Tensor] = None,
                       layer_norm: bool = False, ln_eps: float = 1e-5) -> Tensor:
    """out = r + s * (act(LN(h) Wd^T + bd) Wu^T + bu), differentiable by autograd: what tests compare with.

    h (..., d); down_weight Wd (b, d); up_weight Wu (d, b); r = h (sequential) or `residual` (parallel: the
    block's output beside which the adapter runs); s = scaling (* scale, a learned scalar, if given);
    LN = layer_norm over d with ln_weight / ln_bias (None: no affine) when layer_norm. Returns h.dtype.
    """
    dt = compute_dtype(h)
    x = h.to(dt)
    if layer_norm:
        x = torch.nn.functional.layer_norm(x, x.shape[-1:], _up(ln_weight, dt), _up(ln_bias, dt), ln_eps)
    z = torch.nn.functional.linear(x, down_weight.to(dt), _up(down_bias, dt))
    u = torch.nn.functional.linear(adapter_activation(z, activation)[0], up_weight.to(dt), _up(up_bias, dt))
    r = h if residual is None else residual
    return (r.to(dt) + _adapter_scale(scaling, scale, dt) * u).to(h.dtype)


def _layer_norm_stats(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    mean = x.mean(-1)
    return mean, torch.rsqrt(x.var(-1, unbiased=False) + eps)


def adapter_forward(h, down_weight, down_bias, up_weight, up_bias, scale, residual, ln_weight, ln_bias,
                    activation, scaling, layer_norm, ln_eps):
    """The torch backend's forward over 2-D h (M, d): (out, z, stats).

    z = LN(h) Wd^T + bd (M, b), the pre-activation, float32 (float64 for float64 h): saved for backward.
    stats (M, 2) = (mean, rstd) of each row of h when layer_norm, else an empty tensor.
    """
    dt = compute_dtype(h)
    x = h.to(dt)
    stats_dt = torch.float32 if dt != torch.float64 else dt
    stats = h.new_empty((0,), dtype=stats_dt)
    if layer_norm:
        mean, rstd = _layer_norm_stats(x, ln_eps)
        stats = torch.stack([mean, rstd], 1).to(stats_dt)
        x = torch.nn.functional.layer_norm(x, x.shape[-1:], _up(ln_weight, dt), _up(ln_bias, dt), ln_eps)
    z = torch.nn.functional.linear(x, down_weight.to(dt), _up(down_bias, dt))
    u = torch.nn.functional.linear(adapter_activation(z, activation)[0], up_weight.to(dt), _up(up_bias, dt))
    r = h if residual is None else residual
    out = r.to(dt) + _adapter_scale(scaling, scale, dt) * u
    return out.to(h.dtype), z.to(stats_dt), stats


def adapter_backward(grad_out, h, down_weight, down_bias, up_weight, up_bias, scale, z, stats, ln_weight,
                     ln_bias, activation, scaling, sequential, layer_norm, needs):
    """Gradients (dh, dWd, dbd, dWu, dbu, dscale, dgamma, dbeta) of adapter_forward; needs: 8 bools.

    g = dout, a = act(z), x = LN(h), s = scaling * scale:
        dWu = s g^T a     dbu = s sum_m g     dscale = scaling * sum(g * (a Wu^T + bu))
        dz = s act'(z) * (g Wu)                 dWd = dz^T x     dbd = sum_m dz
        dx = dz Wd;   with LN: dgamma = sum_m dx * xhat,  dbeta = sum_m dx,
                      dh = rstd (gamma dx - mean_d(gamma dx) - xhat mean_d(gamma dx xhat)); without: dh = dx
        dh += g for the sequential form (r = h); the parallel form's dr = g is the caller's.
    """
    need_h, need_dw, need_db, need_uw, need_ub, need_scale, need_lnw, need_lnb = needs
    dt = compute_dtype(grad_out)
    g, zc = grad_out.to(dt), z.to(dt)
    wd, wu = down_weight.to(dt), up_weight.to(dt)
    s = _adapter_scale(scaling, scale, dt)
    a, act_grad = adapter_activation(zc, activation)
    x = h.to(dt)
    if layer_norm:
        mean, rstd = stats[:, 0].to(dt), stats[:, 1].to(dt)
        xhat = (x - mean[:, None]) * rstd[:, None]
        gamma = _up(ln_weight, dt) if ln_weight is not None else x.new_ones(x.shape[-1])
        beta = _up(ln_bias, dt) if ln_bias is not None else x.new_zeros(x.shape[-1])
        x = xhat * gamma + beta
    dz = s * act_grad * (g @ wu)
    grads = [None] * 8
    if need_uw:
        grads[3] = (s * (g.t() @ a)).to(up_weight.dtype)
    if need_ub:
        grads[4] = (s * g.sum(0)).to(up_bias.dtype)
    if need_scale:
        u = a @ wu.t() + (0.0 if up_bias is None else up_bias.to(dt))
        grads[5] = (scaling * (g * u).sum()).reshape(scale.shape).to(scale.dtype)
    if need_dw:
        grads[1] = (dz.t() @ x).to(down_weight.dtype)
    if need_db:
        grads[2] = dz.sum(0).to(down_bias.dtype)
    dx = dz @ wd
    if layer_norm:
        if need_lnw:
            grads[6] = (dx * xhat).sum(0).to(ln_weight.dtype)
        if need_lnb:
            grads[7] = dx.sum(0).to(ln_bias.dtype)
        gdx = gamma * dx
        dx = rstd[:, None] * (gdx - gdx.mean(-1, keepdim=True) - xhat * (gdx * xhat).mean(-1, keepdim=True))
    if need_h:
        grads[0] = (dx + g if sequential else dx).to(h.dtype)
    return tuple(grads)

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
    """The keep-mask (bool) of the torch backend: a function of (seed, shape, p) alone."""
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


def lora_forward(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed, weight_transposed):
    """The torch backend's forward: returns (y, xa) with xa = dropout(x) A^T in float32, saved for backward."""
    keep = dropout_mask(seed, tuple(x.shape), dropout_p, x.device) if dropout_p > 0 else None
    dt = compute_dtype(x)
    xc = x.to(dt)
    xa = apply_dropout(xc, keep, dropout_p) @ lora_A.to(dt).t()
    y = xc @ _weight_nk(weight, weight_transposed).to(dt).t() + scaling * (xa @ lora_B.to(dt).t())
    if bias is not None:
        y = y + bias.to(dt)
    return y.to(x.dtype), xa.to(torch.float32 if dt != torch.float64 else dt)


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
    form), b <- b * l (output form). inverse=True divides: exact only where l != 0 (the caller checks)."""
    dt = compute_dtype(weight)
    l_ = scale.to(dt)
    factor = 1.0 / l_ if inverse else l_
    w = _weight_nk(weight, weight_transposed)
    scaled = w.to(dt) * (factor[None, :] if scale_input else factor[:, None])
    w.copy_(scaled.to(weight.dtype))
    if bias is not None and not scale_input:
        bias.copy_((bias.to(dt) * factor).to(bias.dtype))
    return weight

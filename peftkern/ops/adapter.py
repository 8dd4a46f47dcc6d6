"""Bottleneck adapter: out = r + s * up(act(down(LN(h)))), fused forward and backward.

`bottleneck_adapter` checks its inputs once, applies autocast, picks a backend and calls
`BottleneckAdapterFunction`, whose forward and backward are registered custom ops (peftkern::adapter_fwd,
peftkern::adapter_bwd) so that torch.compile traces them without graph breaks.

Saved for backward: h (the caller holds it anyway), the adapter tensors, z = LN(h) Wd^T + bd (M x b float32:
1/8 of h's bytes at d/b = 16 in bf16) and, under LN, each row's mean and rstd -- never act(z), a normalised copy
of h or the up projection. The parallel form's residual gets the output gradient itself: no copy, no kernel.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from .. import reference
from ._common import (
    apply_by_rows,
    autocast_inputs,
    backend_module,
    check_same_device,
    check_scalar,
    check_tensor,
    define_op,
    empty_like_none,
    first_order,
    no_autocast,
    on_device,
    op_autograd,
    op_range,
    pick_backend,
    plain_torch,
    rows_backend,
    save_with_parameters,
    saved_with_parameters,
    traced_subclass,
    vector,
)

# Names accepted for each activation (AdapterHub's and transformers' spellings included).
ACTIVATION_ALIASES = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                      "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu", "swish": "silu"}


def _stats_dtype(h: Tensor) -> torch.dtype:
    return torch.float64 if h.dtype == torch.float64 else torch.float32


def _adapter_fwd(
    h: Tensor, down_weight: Tensor, down_bias: Optional[Tensor], up_weight: Tensor, up_bias: Optional[Tensor],
    scale: Optional[Tensor], residual: Optional[Tensor], ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
    activation: str, scaling: float, layer_norm: bool, ln_eps: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out (M, d), z (M, b) float32, stats (M, 2) float32 or empty) for a 2-D h (M, d)."""
    # The body computes in h's dtype and float32 by design: autocast must not recast its small products.
    with op_range("peftkern::adapter_fwd"), no_autocast(h.device), on_device(h):
        out, z, stats = backend_module(rows_backend(backend, h), "adapter").adapter_forward(
            h, down_weight, down_bias, up_weight, up_bias, scale, residual, ln_weight, ln_bias, activation,
            scaling, layer_norm, ln_eps)
    return out.contiguous(), z.contiguous(), stats.contiguous()


adapter_fwd = define_op("peftkern::adapter_fwd", _adapter_fwd)


@adapter_fwd.register_fake
def _(h, down_weight, down_bias, up_weight, up_bias, scale, residual, ln_weight, ln_bias, activation, scaling,
      layer_norm, ln_eps, backend):
    M = h.shape[0]
    dt = _stats_dtype(h)
    return (h.new_empty(h.shape), h.new_empty((M, down_weight.shape[0]), dtype=dt),
            h.new_empty((M, 2) if layer_norm else (0,), dtype=dt))


def _adapter_bwd(
    grad_out: Tensor, h: Tensor, down_weight: Tensor, down_bias: Optional[Tensor], up_weight: Tensor,
    up_bias: Optional[Tensor], scale: Optional[Tensor], z: Tensor, stats: Tensor, ln_weight: Optional[Tensor],
    ln_bias: Optional[Tensor], activation: str, scaling: float, sequential: bool, layer_norm: bool, backend: str,
    need_h: bool, need_dw: bool, need_db: bool, need_uw: bool, need_ub: bool, need_scale: bool, need_lnw: bool,
    need_lnb: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dh, dWd, dbd, dWu, dbu, dscale, dgamma, dbeta); an empty tensor where a gradient was not asked for."""
    needs = (need_h, need_dw, need_db, need_uw, need_ub, need_scale, need_lnw, need_lnb)
    with op_range("peftkern::adapter_bwd"), no_autocast(h.device):  # autograd runs it on h's device
        grads = backend_module(rows_backend(backend, h), "adapter").adapter_backward(
            grad_out, h, down_weight, down_bias, up_weight, up_bias, scale, z, stats, ln_weight, ln_bias,
            activation, scaling, sequential, layer_norm, needs)
    refs = (h, down_weight, down_weight, up_weight, up_weight, h, h, h)
    return tuple(empty_like_none(g, r).contiguous() for g, r in zip(grads, refs))


adapter_bwd = define_op("peftkern::adapter_bwd", _adapter_bwd)


@adapter_bwd.register_fake
def _(grad_out, h, down_weight, down_bias, up_weight, up_bias, scale, z, stats, ln_weight, ln_bias, activation,
      scaling, sequential, layer_norm, backend, need_h, need_dw, need_db, need_uw, need_ub, need_scale, need_lnw,
      need_lnb):
    def maybe(flag, like, ref):  # a gradient not asked for: empty, in the dtype _adapter_bwd's refs give it
        return like.new_empty(like.shape) if flag else ref.new_empty((0,))

    return (maybe(need_h, h, h), maybe(need_dw, down_weight, down_weight), maybe(need_db, down_bias, down_weight),
            maybe(need_uw, up_weight, up_weight), maybe(need_ub, up_bias, up_weight), maybe(need_scale, scale, h),
            maybe(need_lnw, ln_weight, h), maybe(need_lnb, ln_bias, h))


class BottleneckAdapterFunction(torch.autograd.Function):
    """Autograd for bottleneck_adapter over 2-D h (M, d). Eager calls run the op bodies directly (no
    dispatcher overhead); under torch.compile the registered custom ops are called, so the graph holds them."""

    @staticmethod
    def forward(ctx, h, down_weight, down_bias, up_weight, up_bias, scale, residual, ln_weight, ln_bias,
                activation, scaling, layer_norm, ln_eps, backend):
        fwd = torch.ops.peftkern.adapter_fwd if torch.compiler.is_compiling() else _adapter_fwd
        inputs = (h, down_weight, down_bias, up_weight, up_bias, scale, residual, ln_weight, ln_bias, activation,
                  scaling, layer_norm, ln_eps, backend)
        outputs = fwd(*inputs)
        _adapter_save(ctx, inputs, outputs)
        return outputs[0]

    @staticmethod
    @first_order
    def backward(ctx, grad_out):
        bwd = torch.ops.peftkern.adapter_bwd if torch.compiler.is_compiling() else _adapter_bwd
        return _adapter_backward(ctx, grad_out, bwd)


def _adapter_save(ctx, inputs: tuple, output: tuple) -> None:
    h, down_weight, down_bias, up_weight, up_bias, scale, residual, ln_weight, ln_bias = inputs[:9]
    activation, scaling, layer_norm, _ln_eps, backend = inputs[9:]
    save_with_parameters(ctx, (h, output[1], output[2]),
                         (down_weight, down_bias, up_weight, up_bias, scale, ln_weight, ln_bias))
    ctx.activation, ctx.scaling, ctx.layer_norm, ctx.backend = activation, scaling, layer_norm, backend
    ctx.sequential = residual is None


def _adapter_backward(ctx, grad_out, bwd) -> tuple:
    (h, z, stats), (down_weight, down_bias, up_weight, up_bias, scale, ln_weight, ln_bias) = saved_with_parameters(
        ctx, "bottleneck_adapter")
    n = ctx.needs_input_grad
    needs = (n[0], n[1], n[2] and down_bias is not None, n[3], n[4] and up_bias is not None,
             n[5] and scale is not None, n[7] and ln_weight is not None, n[8] and ln_bias is not None)
    grads = bwd(grad_out, h, down_weight, down_bias, up_weight, up_bias, scale, z, stats, ln_weight, ln_bias,
                ctx.activation, ctx.scaling, ctx.sequential, ctx.layer_norm, ctx.backend, *needs)
    dh, d_dw, d_db, d_uw, d_ub, d_scale, d_lnw, d_lnb = (g if need else None for g, need in zip(grads, needs))
    d_res = grad_out if (n[6] and not ctx.sequential) else None
    return dh, d_dw, d_db, d_uw, d_ub, d_scale, d_res, d_lnw, d_lnb, None, None, None, None, None


def _adapter_fwd_setup(ctx, inputs, output) -> None:
    """Autograd of adapter_fwd called by itself (COMPILED_OP_AUTOGRAD, under torch.compile)."""
    ctx.mark_non_differentiable(output[1], output[2])
    _adapter_save(ctx, inputs, output)


adapter_fwd.register_autograd(
    lambda ctx, grad_out, _grad_z, _grad_stats: _adapter_backward(ctx, grad_out, torch.ops.peftkern.adapter_bwd),
    setup_context=_adapter_fwd_setup)


def _adapter_compiled(*inputs) -> Tensor:
    return torch.ops.peftkern.adapter_fwd(*inputs)[0]


LayerNormArg = Union[None, bool, torch.nn.LayerNorm, tuple]


def _layer_norm_args(layer_norm: LayerNormArg) -> tuple[bool, Optional[Tensor], Optional[Tensor], float]:
    """(enabled, weight, bias, eps) from None/False, True (no affine, eps 1e-5), an nn.LayerNorm or a tuple
    (weight, bias[, eps])."""
    if layer_norm is None or layer_norm is False:
        return False, None, None, 1e-5
    if layer_norm is True:
        return True, None, None, 1e-5
    if isinstance(layer_norm, torch.nn.LayerNorm):
        if len(layer_norm.normalized_shape) != 1:
            raise ValueError(f"layer_norm must normalise the last dimension only, got normalized_shape "
                             f"{tuple(layer_norm.normalized_shape)}")
        return True, layer_norm.weight, layer_norm.bias, float(layer_norm.eps)
    if isinstance(layer_norm, tuple) and len(layer_norm) in (2, 3):
        eps = check_scalar("layer_norm eps", layer_norm[2], 0.0) if len(layer_norm) == 3 else 1e-5
        return True, layer_norm[0], layer_norm[1], eps
    raise TypeError(f"layer_norm must be None, a bool, an nn.LayerNorm or a tuple (weight, bias[, eps]), got "
                    f"{type(layer_norm).__name__}")


def _scaling_args(scaling) -> tuple[float, Optional[Tensor]]:
    """A number, or a one-element tensor (a learned scale: it gets a gradient if it requires one). A tensor is
    read by the kernels on the device: no host sync, no graph break."""
    if isinstance(scaling, Tensor):
        check_tensor("scaling", scaling)
        if scaling.numel() != 1:
            raise ValueError(f"a learned scaling must hold one value, got shape {tuple(scaling.shape)}")
        return 1.0, scaling
    return check_scalar("scaling", scaling), None


def check_adapter_inputs(h, down_weight, down_bias, up_weight, up_bias, residual, ln_weight, ln_bias,
                         scale=None) -> int:
    """Validate shapes, dtypes and devices; returns the bottleneck size b."""
    check_tensor("h", h, strided=True)
    check_tensor("down_weight", down_weight, dims=2)
    check_tensor("up_weight", up_weight, dims=2)
    check_tensor("down_bias", down_bias, dims=1, optional=True)
    check_tensor("up_bias", up_bias, dims=1, optional=True)
    check_tensor("residual", residual, optional=True, strided=True)
    check_tensor("layer_norm weight", ln_weight, dims=1, optional=True)
    check_tensor("layer_norm bias", ln_bias, dims=1, optional=True)
    if h.dim() < 1:
        raise ValueError("h must have at least one dimension (..., d), got a scalar")
    d = h.shape[-1]
    b = down_weight.shape[0]
    if b == 0:
        raise ValueError(f"the bottleneck size must be at least 1, got down_weight of shape {tuple(down_weight.shape)}")
    if down_weight.shape[1] != d:
        raise ValueError(f"down_weight must be (b, d) with d = h's last dimension: h {tuple(h.shape)}, down_weight "
                         f"{tuple(down_weight.shape)}")
    if tuple(up_weight.shape) != (d, b):
        raise ValueError(f"up_weight must be (d, b) = ({d}, {b}) for h {tuple(h.shape)} and down_weight "
                         f"{tuple(down_weight.shape)}, got {tuple(up_weight.shape)}")
    for name, t, n in (("down_bias", down_bias, b), ("up_bias", up_bias, d), ("layer_norm weight", ln_weight, d),
                       ("layer_norm bias", ln_bias, d)):
        if t is not None and t.shape[0] != n:
            raise ValueError(f"{name} must be ({n},), got {tuple(t.shape)}")
    if residual is not None and residual.shape != h.shape:
        raise ValueError(f"residual must have h's shape: h {tuple(h.shape)}, residual {tuple(residual.shape)}")
    check_same_device(h=h, down_weight=down_weight, down_bias=down_bias, up_weight=up_weight, up_bias=up_bias,
                      residual=residual, ln_weight=ln_weight, ln_bias=ln_bias, scaling=scale)
    return b


def bottleneck_adapter(
    h: Tensor,
    down_weight: Tensor,
    down_bias: Optional[Tensor],
    up_weight: Tensor,
    up_bias: Optional[Tensor],
    activation: str = "relu",
    scaling: Union[float, Tensor] = 1.0,
    residual: Optional[Tensor] = None,
    layer_norm: LayerNormArg = None,
) -> Tensor:
    """out = r + scaling * (act(LN(h) Wd^T + bd) Wu^T + bu), fused.

    h: (..., d), any leading shape and strides. down_weight Wd: (b, d), down_bias: (b,) or None; up_weight Wu:
    (d, b), up_bias: (d,) or None -- nn.Linear's layouts, in any float dtype (float32 adapters beside a bf16
    model are read in h's dtype, their gradients come back in their own). activation: relu, gelu (exact),
    gelu_tanh (alias gelu_new), silu (alias swish). scaling: a number, or a one-element tensor that requires grad
    (a learned scale). residual: None for the sequential form (r = h: the adapter sits after a block, on its
    output), or the block's output for the parallel form (h is the block's input; r gets the output gradient).
    layer_norm: an LN of the adapter's input only (r stays h): None, True (no affine), an nn.LayerNorm or
    (weight, bias[, eps]). Returns (..., d) in h's dtype (the autocast dtype under torch.autocast).
    """
    if not isinstance(activation, str) or activation.lower() not in ACTIVATION_ALIASES:
        raise ValueError(f"activation must be one of {sorted(ACTIVATION_ALIASES)}, got {activation!r}")
    activation = ACTIVATION_ALIASES[activation.lower()]
    scaling_f, scale = _scaling_args(scaling)
    use_ln, ln_weight, ln_bias, ln_eps = _layer_norm_args(layer_norm)
    if isinstance(layer_norm, torch.nn.LayerNorm) and isinstance(h, Tensor) and h.dim() >= 1 \
            and layer_norm.normalized_shape[0] != h.shape[-1]:
        raise ValueError(f"layer_norm normalises {tuple(layer_norm.normalized_shape)}, but h's last dimension is "
                         f"{h.shape[-1]}: h {tuple(h.shape)}")
    check_adapter_inputs(h, down_weight, down_bias, up_weight, up_bias, residual, ln_weight, ln_bias, scale)
    h, (residual,) = autocast_inputs(h, (residual,))
    if residual is not None and residual.dtype != h.dtype:
        raise TypeError(f"h and residual must share a dtype (use torch.autocast to mix): h {h.dtype}, residual "
                        f"{residual.dtype}")
    d = h.shape[-1]
    rows = math.prod(h.shape[:-1])  # reshape's -1 is ambiguous when d = 0
    h2d = h.reshape(rows, d)
    operands = (down_weight, down_bias, up_weight, up_bias, scale, residual, ln_weight, ln_bias)
    backend = pick_backend("adapter", h2d, *operands)  # first: a subclass under compile warns as the other ops do
    if plain_torch(h2d, d, down_weight.shape[0]) or traced_subclass(h2d, *operands):
        return reference.bottleneck_adapter(h, down_weight, down_bias, up_weight, up_bias, activation, scaling_f,
                                            scale, residual, ln_weight, ln_bias, use_ln, ln_eps)
    down_bias, up_bias = vector(down_bias), vector(up_bias)
    r2d = residual.reshape(rows, d) if residual is not None else None
    fn = _adapter_compiled if op_autograd() else BottleneckAdapterFunction.apply
    out = apply_by_rows(lambda hs, rs: fn(hs, down_weight, down_bias, up_weight, up_bias, scale, rs, ln_weight, ln_bias,
                                          activation, scaling_f, use_ln, ln_eps, backend), (h2d, r2d), d)
    return out.reshape(h.shape)

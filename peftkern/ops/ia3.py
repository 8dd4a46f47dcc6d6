"""IA3 linear: y = (x W^T + b) * l (output form) or y = (x * l) W^T + b (input form), fused around the GEMM.

`ia3_linear` checks its inputs once, applies autocast, picks a backend and calls `IA3LinearFunction`, whose
forward and backward are registered custom ops (peftkern::ia3_fwd / ia3_bwd) for torch.compile.
Saved for backward: x (the caller holds it; a product a * b such as the MLP's down projection input is multiplied
again in backward instead, ops/_common.product_source), the frozen weight (a reference), l, and for the output form
z = x W^T + b (what eager PyTorch saves too; y / l cannot replace it where l is 0).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ._common import (
    apply_by_rows,
    backend_module,
    check_flag,
    check_same_device,
    check_tensor,
    check_writable,
    define_op,
    empty_like_none,
    first_order,
    input_link,
    no_autocast,
    on_device,
    op_autograd,
    op_range,
    pick_backend,
    plain_torch,
    prepare_linear,
    product_source,
    recompute_product,
    rows_backend,
    rows_of,
    save_with_parameters,
    saved_with_parameters,
    traced_subclass,
    vector,
    weight_backend,
    written_in_place,
)


def _ia3_fwd(x: Tensor, weight: Tensor, scale: Tensor, bias: Optional[Tensor], scale_input: bool,
             weight_transposed: bool, backend: str) -> tuple[Tensor, Tensor]:
    """(y (M, N), z (M, N) or empty) for a 2-D x (M, K)."""
    with op_range("peftkern::ia3_fwd"), no_autocast(x.device), on_device(x):
        y, z = backend_module(rows_backend(backend, x), "ia3").ia3_forward(x, weight, scale, bias, scale_input,
                                                                         weight_transposed)
    return y.contiguous(), z.contiguous()


ia3_fwd = define_op("peftkern::ia3_fwd", _ia3_fwd)


@ia3_fwd.register_fake
def _(x, weight, scale, bias, scale_input, weight_transposed, backend):
    N = weight.shape[1] if weight_transposed else weight.shape[0]
    y = x.new_empty((x.shape[0], N))
    return y, (x.new_empty((0,)) if scale_input else x.new_empty((x.shape[0], N)))


def _ia3_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, scale: Tensor, z: Tensor, scale_input: bool,
             weight_transposed: bool, backend: str, need_x: bool, need_l: bool, need_bias: bool,
             need_w: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dl, dbias, dweight); an empty tensor where that gradient was not asked for. x may be one row standing for
    all of grad_y's (the output form's backward without the weight's gradient reads x's dtype and width only)."""
    x = rows_of(x, grad_y)
    # no on_device: autograd runs a backward on its tensors' device
    with op_range("peftkern::ia3_bwd"), no_autocast(grad_y.device):
        grads = backend_module(rows_backend(backend, x), "ia3").ia3_backward(
            grad_y, x, weight, scale, z, scale_input, weight_transposed, (need_x, need_l, need_bias, need_w))
    return tuple(empty_like_none(g, r).contiguous() for g, r in zip(grads, (x, scale, grad_y, weight)))


ia3_bwd = define_op("peftkern::ia3_bwd", _ia3_bwd)


@ia3_bwd.register_fake
def _(grad_y, x, weight, scale, z, scale_input, weight_transposed, backend, need_x, need_l, need_bias, need_w):
    f32 = torch.float64 if grad_y.dtype == torch.float64 else torch.float32
    return (x.new_empty((grad_y.shape[0], x.shape[1]) if need_x else (0,)),
            scale.new_empty(scale.shape if need_l else (0,)),
            grad_y.new_empty((grad_y.shape[1],), dtype=f32) if need_bias else grad_y.new_empty((0,)),
            weight.new_empty(weight.shape, dtype=f32) if need_w else weight.new_empty((0,)))


class IA3LinearFunction(torch.autograd.Function):
    """Autograd for ia3_linear over 2-D x (M, K). Eager calls run the op bodies directly (no dispatcher);
    torch.compile sees the registered custom ops."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias, scale_input, weight_transposed, backend):
        fwd = torch.ops.peftkern.ia3_fwd if torch.compiler.is_compiling() else _ia3_fwd
        y, z = fwd(x, weight, scale, bias, scale_input, weight_transposed, backend)
        _ia3_save(ctx, (x, weight, scale, bias, scale_input, weight_transposed, backend), z, True)
        return y

    @staticmethod
    @first_order
    def backward(ctx, grad_y):
        bwd = torch.ops.peftkern.ia3_bwd if torch.compiler.is_compiling() else _ia3_bwd
        return _ia3_backward(ctx, grad_y, bwd)


def _ia3_save(ctx, inputs: tuple, z: Tensor, recompute_input: bool) -> None:
    x, weight, scale, bias, scale_input, weight_transposed, backend = inputs
    # The output form's backward reads x only for the weight's gradient: with the weight frozen, x is not kept (as
    # eager F.linear(x, W) * l keeps none; the k / v projections' input would be held by nothing else).
    ctx.keep_x = scale_input or ctx.needs_input_grad[1]
    # x = a * b (the MLP's down projection, IA3's feed-forward place) is multiplied again in backward, not saved
    ctx.x_source = product_source(x) if recompute_input and ctx.keep_x else None
    ctx.x_shape = x.shape
    kept = x if ctx.keep_x and ctx.x_source is None else None
    # dl = sum(dy z) depends on x and the bias through z, which backward reads but autograd does not tie to them: links
    # for first_order's second-order error, on dl alone (the bias a Parameter or a vector: nothing to free; the eager
    # Function's backward only)
    if not scale_input and ctx.needs_input_grad[2] and recompute_input:
        ctx.links_of = {2: (None if ctx.keep_x else input_link(x), bias)}
    save_with_parameters(ctx, (kept, z), (weight, scale))
    ctx.scale_input, ctx.weight_transposed, ctx.backend = scale_input, weight_transposed, backend
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _ia3_backward(ctx, grad_y, bwd) -> tuple:
    (x, z), (weight, scale) = saved_with_parameters(ctx, "ia3_linear")
    if ctx.x_source is not None:
        x = recompute_product(ctx.x_source, ctx.x_shape)
    elif not ctx.keep_x:
        # the backends read x's shape and dtype only: a stand-in of one row, which the op expands to grad_y's rows (unit
        # column stride). Expanded here, it was under torch.compile with a row count that depends on data a buffer of
        # (u, K) with strides (0, 1), whose storage inductor (torch 2.13) counts as K elements even for u = 0: it gave
        # an expert without tokens' empty buffer to the next expert's stand-in, whose zeros it wrote out of bounds
        # (a segfault of the compiled backward)
        x = grad_y.new_zeros(1, ctx.x_shape[1])
    need_x, need_w, need_l, need_bias = ctx.needs_input_grad[:4]
    need_bias = need_bias and ctx.bias_dtype is not None
    dx, dl, dbias, dw = bwd(grad_y, x, weight, scale, z, ctx.scale_input, ctx.weight_transposed, ctx.backend,
                            need_x, need_l, need_bias, need_w)
    return (dx if need_x else None, dw.to(weight.dtype) if need_w else None, dl if need_l else None,
            dbias.to(ctx.bias_dtype) if need_bias else None, None, None, None)


def _ia3_fwd_setup(ctx, inputs, output) -> None:
    """Autograd of ia3_fwd called by itself (COMPILED_OP_AUTOGRAD, under torch.compile)."""
    ctx.mark_non_differentiable(output[1])
    _ia3_save(ctx, inputs, output[1], False)


ia3_fwd.register_autograd(lambda ctx, grad_y, _grad_z: _ia3_backward(ctx, grad_y, torch.ops.peftkern.ia3_bwd),
                          setup_context=_ia3_fwd_setup)


def _ia3_compiled(x, weight, scale, bias, scale_input, weight_transposed, backend) -> Tensor:
    return torch.ops.peftkern.ia3_fwd(x, weight, scale, bias, scale_input, weight_transposed, backend)[0]


def _holds_as_vector(scale: Tensor, want: int) -> bool:
    """Whether scale holds `want` values along one dimension, every other of size 1: a vector, or PEFT's (N, 1) /
    (1, K). Written without max(shape, default=...), which torch.compile(dynamic=True, fullgraph=True) could not
    trace where the scale is a plain tensor (its sizes symbolic; a review, 2026-12-06)."""
    return scale.numel() == want and all(d == 1 or d == want for d in scale.shape)


def ia3_linear(x: Tensor, weight: Tensor, scale: Tensor, bias: Optional[Tensor] = None, scale_input: bool = False,
               weight_transposed: bool = False) -> Tensor:
    """IA3: y = (x W^T + b) * l, or with scale_input=True y = (x * l) W^T + b, fused.

    x: (..., K); weight: (N, K), or (K, N) with weight_transposed (GPT-2's Conv1D); scale (l): (N,) for the
    output form, (K,) for the input form (PEFT's (N, 1) / (1, K) shapes are accepted too), any float dtype
    (PEFT keeps it in float32). Exact for any l, zeros included. Returns x's dtype -- the base layer's -- as
    PEFT 0.21 does with its default float32 l (it scales a float32 copy and casts back; this op scales in float32
    inside the GEMM and rounds once).
    """
    check_tensor("x", x, strided=True)
    check_tensor("weight", weight, dims=2)
    check_tensor("scale", scale)
    check_tensor("bias", bias, dims=1, optional=True)
    if isinstance(scale_input, Tensor) or not isinstance(scale_input, bool):
        raise TypeError(f"scale_input must be a bool, got {type(scale_input).__name__}")
    check_flag("weight_transposed", weight_transposed)
    N, K = (weight.shape[1], weight.shape[0]) if weight_transposed else tuple(weight.shape)
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x's last dimension must match weight ({'K, N' if weight_transposed else 'N, K'}): "
                         f"x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    want = K if scale_input else N
    if not _holds_as_vector(scale, want):
        form = "input form: (K,)" if scale_input else "output form: (N,)"
        raise ValueError(f"scale must hold {want} values ({form}) for weight {tuple(weight.shape)}, got shape "
                         f"{tuple(scale.shape)}")
    if bias is not None and bias.shape[0] != N:
        raise ValueError(f"bias must be (N,) = ({N},), got {tuple(bias.shape)}")
    check_same_device(x=x, weight=weight, scale=scale, bias=bias)
    x2d, weight, bias, lead, backend = prepare_linear("ia3", x, weight, bias, K, (scale,))
    # no tokens (l gets a zero gradient), a width of 0, a torch.func transform, or a subclass under compile
    if plain_torch(x2d, N, K) or traced_subclass(x2d, weight, scale, bias):
        y = reference.ia3_linear(x2d, weight, scale.reshape(-1), bias, scale_input, weight_transposed)
        return y.reshape(*lead, N)
    fn = _ia3_compiled if op_autograd() else IA3LinearFunction.apply
    scale = vector(scale.reshape(-1))
    y = apply_by_rows(lambda xs: fn(xs, weight, scale, bias, scale_input, weight_transposed, backend),
                      (x2d,), max(K, N))
    return y.reshape(*lead, N)


def ia3_merge_(weight: Tensor, scale: Tensor, bias: Optional[Tensor] = None, scale_input: bool = False,
               inverse: bool = False, weight_transposed: bool = False) -> Tensor:
    """Fold l into the frozen layer in place (a kernel on the GPU); inverse=True takes it out again, which needs
    l != 0 everywhere (ValueError otherwise, as PEFT cannot unmerge there either)."""
    check_flag("scale_input", scale_input)
    check_flag("inverse", inverse)  # a truthy "no" divided the weight by l
    check_flag("weight_transposed", weight_transposed)
    check_tensor("weight", weight, dims=2)
    check_tensor("scale", scale)
    N, K = (weight.shape[1], weight.shape[0]) if weight_transposed else tuple(weight.shape)
    want = K if scale_input else N
    # as ia3_linear: a vector, or PEFT's (N, 1) / (1, K); a (2, 5) matrix of N = 10 values was merged as one
    if not _holds_as_vector(scale, want):
        raise ValueError(f"scale of shape {tuple(scale.shape)} does not fit weight {tuple(weight.shape)}: it must "
                         f"hold {want} values ({'input form: (K,)' if scale_input else 'output form: (N,)'})")
    check_tensor("bias", bias, dims=1, optional=True)
    if bias is not None and bias.shape[0] != N:
        raise ValueError(f"bias of shape {tuple(bias.shape)} does not fit weight {tuple(weight.shape)} (N={N})")
    check_same_device(weight=weight, scale=scale, bias=bias)
    check_writable("weight", weight)
    if bias is not None and not scale_input:
        check_writable("bias", bias)
    if inverse and scale.device.type != "meta" and bool((scale == 0).any()):  # meta holds no values (no .item())
        raise ValueError("cannot unmerge an IA3 vector with zeros: W * 0 / 0 is lost")
    backend = weight_backend("ia3", weight, pick_backend("ia3", weight, scale, bias))
    with torch.no_grad(), on_device(weight):
        backend_module(backend, "ia3").ia3_merge_(weight, vector(scale.reshape(-1)), bias, scale_input, inverse,
                                                  weight_transposed)
    return written_in_place(weight, None if scale_input else bias)

"""KronA linear: y = x W^T + b + scaling * x (sum_t A_t (x) B_t)^T, fused forward and backward.

`krona_linear` checks its inputs once, brings the factors to one stacked form (below), applies autocast, picks a
backend and calls `KronALinearFunction`, whose forward and backward are registered custom ops
(peftkern::krona_fwd / krona_bwd) so torch.compile traces them without graph breaks.

Layout (torch.kron's; PEFT LoKr's with A = lokr_w1, B = lokr_w2): for A (n1, k1) and B (n2, k2),
(A (x) B)[i1 * n2 + i2, j1 * k2 + j2] = A[i1, j1] * B[i2, j2], with n1 n2 = N and k1 k2 = K.
Stacked form: a factor is a (T, n, k) tensor over the T terms of a sum, or a low-rank pair of (T, n, r) and
(T, r, k) tensors; lists of terms are concatenated by torch.cat outside the Function, so their gradients flow back
through it.

Saved for backward: x (the caller holds it), the frozen weight (a reference, never a copy) and the factors:
nothing of size M x N and never the N x K delta.

Low-rank sums go through the LoRA op. Every factor F (n, k) is a product F = F_a F_b in three ways: (I_n, F) of
rank n, (F, I_k) of rank k, or its own low-rank pair. By the mixed-product property
    sum_t (A_a,t A_b,t) (x) (B_a,t B_b,t) = sum_t (A_a,t (x) B_a,t) (A_b,t (x) B_b,t) = L R,
with L (N, rank) and R (rank, K) of rank T r_A r_B (the smallest r_A and r_B per factor). Compacter's PHM layer
(4 terms, 4 x 4 A_i, rank-4 1024 x 1024 B_i) is rank 64: y = x W^T + b + s (x R^T) L^T is then the fused LoRA
layer at rank 64 (kernels/triton/NOTES-krona.md), where the Kronecker kernels would run tiny MMAs. L and R are
built by autograd-tracked broadcast products (N x rank and rank x K: small), so the factors' gradients come
from the LoRA op's through the chain rule. Up to rank 64, and up to LORA_ROUTE_MAX_RANK (the persistent LoRA kernel's
largest rank) where the Kronecker kernels cannot hold whole factors (_take_lora_route); PEFTKERN_KRONA_LORA_RANK=0
keeps every call on the Kronecker kernels. The cuda backend takes the same route on the LoRA op's CUDA kernels (a
dense 1024 x 1024 B of Compacter's layer is past its Kronecker kernels' shared memory, where they run cuBLAS GEMMs on
reshaped views instead); neither choice was measured against the other on a GPU for cuda yet.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch
from torch import Tensor

from .. import reference
from ._common import (
    apply_by_rows,
    backend_module,
    check_same_device,
    check_scalar,
    check_scaling,
    check_tensor,
    check_writable,
    define_op,
    empty_like_none,
    first_order,
    fold_scaling,
    no_autocast,
    on_device,
    op_autograd,
    op_range,
    pick_backend,
    plain_torch,
    prepare_linear,
    rows_backend,
    save_with_parameters,
    saved_with_parameters,
    traced_subclass,
    weight_backend,
    written_in_place,
)
from .lora import lora_function

Factor = Union[Tensor, tuple, list]

LORA_ROUTE_MAX_RANK = [int(os.environ.get("PEFTKERN_KRONA_LORA_RANK", "128"))]  # a list: tests flip it


def _krona_fwd(x: Tensor, weight: Tensor, a: Tensor, a2: Optional[Tensor], b: Tensor, b2: Optional[Tensor],
               bias: Optional[Tensor], scaling: float, backend: str) -> Tensor:
    """y (M, N) for a 2-D x (M, K)."""
    with op_range("peftkern::krona_fwd"), no_autocast(x.device), on_device(x):
        y = backend_module(rows_backend(backend, x), "krona").krona_forward(x, weight, a, a2, b, b2, scaling,
                                                                            bias)
    return y.contiguous()


krona_fwd = define_op("peftkern::krona_fwd", _krona_fwd)


@krona_fwd.register_fake
def _(x, weight, a, a2, b, b2, bias, scaling, backend):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _krona_bwd(
    grad_y: Tensor, x: Tensor, weight: Tensor, a: Tensor, a2: Optional[Tensor], b: Tensor, b2: Optional[Tensor],
    scaling: float, backend: str, need_x: bool, need_a: bool, need_a2: bool, need_b: bool, need_b2: bool,
    need_bias: bool, need_w: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, da, da2, db, db2, dbias, dweight); an empty tensor where that gradient was not asked for."""
    needs = (need_x, need_a, need_a2 and a2 is not None, need_b, need_b2 and b2 is not None, need_bias, need_w)
    # no on_device: autograd runs a backward on its tensors' device
    with op_range("peftkern::krona_bwd"), no_autocast(grad_y.device):
        grads = backend_module(rows_backend(backend, x), "krona").krona_backward(grad_y, x, weight, a, a2, b, b2,
                                                                                scaling, needs)
    refs = (x, a, a2 if a2 is not None else a, b, b2 if b2 is not None else b, grad_y, weight)
    return tuple(empty_like_none(g, r).contiguous() for g, r in zip(grads, refs))


krona_bwd = define_op("peftkern::krona_bwd", _krona_bwd)


@krona_bwd.register_fake
def _(grad_y, x, weight, a, a2, b, b2, scaling, backend, need_x, need_a, need_a2, need_b, need_b2, need_bias,
      need_w):
    f32 = torch.float64 if grad_y.dtype == torch.float64 else torch.float32

    def maybe(flag, like, shape=None, dtype=None):
        return like.new_empty(like.shape if shape is None else shape, dtype=dtype) if flag else like.new_empty((0,))

    # as the real op: no gradient for a factor that is not there, whatever need_a2 / need_b2 say
    need_a2, need_b2 = need_a2 and a2 is not None, need_b2 and b2 is not None
    a2, b2 = (a2 if a2 is not None else a), (b2 if b2 is not None else b)
    return (maybe(need_x, x), maybe(need_a, a), maybe(need_a2, a2), maybe(need_b, b), maybe(need_b2, b2),
            maybe(need_bias, grad_y, (grad_y.shape[1],), f32), maybe(need_w, weight, dtype=f32))


class KronALinearFunction(torch.autograd.Function):
    """Autograd for krona_linear over 2-D x (M, K) and stacked factors; krona_linear reshapes (..., K) inputs.
    Eager calls run the op bodies directly (no dispatcher); torch.compile sees the registered custom ops."""

    @staticmethod
    def forward(ctx, x, weight, a, a2, b, b2, bias, scaling, backend):
        fwd = torch.ops.peftkern.krona_fwd if torch.compiler.is_compiling() else _krona_fwd
        y = fwd(x, weight, a, a2, b, b2, bias, scaling, backend)
        _krona_save(ctx, (x, weight, a, a2, b, b2, bias, scaling, backend), y)
        return y

    @staticmethod
    @first_order
    def backward(ctx, grad_y):
        bwd = torch.ops.peftkern.krona_bwd if torch.compiler.is_compiling() else _krona_bwd
        return _krona_backward(ctx, grad_y, bwd)


def _krona_save(ctx, inputs: tuple, output) -> None:
    x, weight, a, a2, b, b2, bias, scaling, backend = inputs
    save_with_parameters(ctx, (x,), (weight, a, a2, b, b2))
    ctx.scaling, ctx.backend = scaling, backend
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _krona_backward(ctx, grad_y, bwd) -> tuple:
    (x,), (weight, a, a2, b, b2) = saved_with_parameters(ctx, "krona_linear")
    need_x, need_w, need_a, need_a2, need_b, need_b2, need_bias = ctx.needs_input_grad[:7]
    need_bias = need_bias and ctx.bias_dtype is not None
    dx, da, da2, db, db2, dbias, dw = bwd(
        grad_y, x, weight, a, a2, b, b2, ctx.scaling, ctx.backend,
        need_x, need_a, need_a2 and a2 is not None, need_b, need_b2 and b2 is not None, need_bias, need_w)
    return (
        dx if need_x else None,
        dw.to(weight.dtype) if need_w else None,
        da if need_a else None,
        da2 if (need_a2 and a2 is not None) else None,
        db if need_b else None,
        db2 if (need_b2 and b2 is not None) else None,
        dbias.to(ctx.bias_dtype) if need_bias else None,
        None, None,
    )


# Autograd of krona_fwd called by itself (COMPILED_OP_AUTOGRAD, under torch.compile)
krona_fwd.register_autograd(lambda ctx, grad_y: _krona_backward(ctx, grad_y, torch.ops.peftkern.krona_bwd),
                            setup_context=_krona_save)


def _krona_compiled(x, weight, a, a2, b, b2, bias, scaling, backend) -> Tensor:
    return torch.ops.peftkern.krona_fwd(x, weight, a, a2, b, b2, bias, scaling, backend)


def _one_term(name: str, f) -> tuple[Tensor, Optional[Tensor]]:
    """One term's factor as (1, n, k) [, None] or a low-rank pair (1, n, r), (1, r, k); or a stacked 3-D tensor."""
    if isinstance(f, Tensor):
        check_tensor(name, f)
        if f.dim() not in (2, 3):
            raise ValueError(f"{name} must be 2-D (n, k) or stacked 3-D (T, n, k), got shape {tuple(f.shape)}")
        if f.dim() == 3 and f.shape[0] == 0:  # as an empty list: the reference and the torch merge raised inside
            raise ValueError(f"{name} must hold at least one term, got a stacked factor of shape {tuple(f.shape)}")
        return (f.unsqueeze(0) if f.dim() == 2 else f), None
    if isinstance(f, tuple):
        if len(f) != 2:
            raise ValueError(f"a low-rank {name} is a pair (factor (n, r), factor (r, k)), got {len(f)} items")
        f1, f2 = f
        check_tensor(f"{name}[0]", f1)
        check_tensor(f"{name}[1]", f2)
        if f1.dim() != f2.dim() or f1.dim() not in (2, 3):
            raise ValueError(f"the low-rank pair {name} must be two 2-D (or two stacked 3-D) tensors, got shapes "
                             f"{tuple(f1.shape)} and {tuple(f2.shape)}")
        if f1.shape[-1] != f2.shape[-2] or f1.shape[-1] == 0 or f1.shape[:-2] != f2.shape[:-2]:
            raise ValueError(f"the low-rank pair {name} must be (n, r) and (r, k) with r >= 1, got "
                             f"{tuple(f1.shape)} and {tuple(f2.shape)}")
        if f1.dim() == 3 and f1.shape[0] == 0:
            raise ValueError(f"{name} must hold at least one term, got a stacked pair of shapes {tuple(f1.shape)} "
                             f"and {tuple(f2.shape)}")
        if f1.dim() == 2:
            return f1.unsqueeze(0), f2.unsqueeze(0)
        return f1, f2
    raise TypeError(f"{name} must be a tensor, a low-rank (factor, factor) tuple or a list of those, got "
                    f"{type(f).__name__}")


def stack_factor(name: str, f: Factor) -> tuple[Tensor, Optional[Tensor]]:
    """A factor in its stacked form: (f (T, n, k), None) or a low-rank pair (f (T, n, r), f2 (T, r, k)).

    f: a tensor (n, k) (one term) or (T, n, k) (T terms); a tuple (f (n, r), f2 (r, k)) for a low-rank factor
    (or of stacked 3-D tensors); or a list of terms, each a 2-D tensor or a tuple, all alike.
    """
    if not isinstance(f, list):
        return _one_term(name, f)
    if not f:
        raise ValueError(f"{name} must hold at least one term, got an empty list")
    terms = []
    for i, item in enumerate(f):
        if isinstance(item, Tensor) and item.dim() != 2:
            raise ValueError(f"each term {name}[{i}] of a list must be 2-D (n, k), got shape {tuple(item.shape)}")
        terms.append(_one_term(f"{name}[{i}]", item))
    first = terms[0]
    for i, term in enumerate(terms[1:], 1):
        if (term[1] is None) != (first[1] is None):
            raise ValueError(f"the terms of {name} must all be dense or all low-rank pairs: {name}[0] and "
                             f"{name}[{i}] differ")
        for part, ref in zip(term, first):
            if part is not None and part.shape != ref.shape:
                raise ValueError(f"the terms of {name} must share their shapes: {name}[0] {tuple(ref.shape[1:])}, "
                                 f"{name}[{i}] {tuple(part.shape[1:])}")
            if part is not None and part.dtype != ref.dtype:
                raise TypeError(f"the terms of {name} must share a dtype: {name}[0] {ref.dtype}, "
                                f"{name}[{i}] {part.dtype}")
            # checked before torch.cat, whose RuntimeError ("Expected all tensors to be on the same device") was
            # what terms on two devices got (a review, 2026-12-06)
            if part is not None and part.device != ref.device:
                raise ValueError(f"the terms of {name} must be on one device: {name}[0] on {ref.device}, "
                                 f"{name}[{i}] on {part.device}")
    f1 = torch.cat([t[0] for t in terms])
    return f1, (torch.cat([t[1] for t in terms]) if first[1] is not None else None)


def factor_shape(f: Tensor, f2: Optional[Tensor]) -> tuple[int, int, int]:
    """(T, n, k) of a stacked factor."""
    return f.shape[0], f.shape[1], (f.shape[2] if f2 is None else f2.shape[2])


def check_krona_factors(weight_shape: tuple, a, a2, b, b2) -> None:
    """The factors' Kronecker product must be the weight's (N, K), with as many terms in A as in B."""
    Ta, n1, k1 = factor_shape(a, a2)
    Tb, n2, k2 = factor_shape(b, b2)
    N, K = weight_shape
    if Ta != Tb:
        raise ValueError(f"A and B must have the same number of terms, got {Ta} and {Tb}")
    if (n1 * n2, k1 * k2) != (N, K):
        raise ValueError(f"A ({n1}, {k1}) (x) B ({n2}, {k2}) is ({n1 * n2}, {k1 * k2}), but weight is (N, K) = "
                         f"({N}, {K}): need n1 n2 = N and k1 k2 = K")


def _split(f: Tensor, f2: Optional[Tensor]) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The cheapest F = F_a F_b of one stacked factor (T, n, k): its low-rank pair (f, f2) where its rank is the
    smallest, else (None, F) for (I_n, F) or (F, None) for (F, I_k), whichever identity is smaller."""
    T, n, k = factor_shape(f, f2)
    if f2 is not None and f.shape[2] <= min(n, k):
        return f, f2
    dense = f if f2 is None else torch.bmm(*(t.to(torch.promote_types(t.dtype, torch.float32)) for t in (f, f2)))
    return (None, dense) if n <= k else (dense, None)


def lora_route_rank(a: Tensor, a2: Optional[Tensor], b: Tensor, b2: Optional[Tensor]) -> int:
    """The rank of sum_t A_t (x) B_t as a product L R built from the factors (module docstring)."""
    T, n1, k1 = factor_shape(a, a2)
    _, n2, k2 = factor_shape(b, b2)
    ra = min(n1, k1, a.shape[2] if a2 is not None else n1)
    rb = min(n2, k2, b.shape[2] if b2 is not None else n2)
    return T * ra * rb


_EYES: dict = {}  # (n, device, dtype) -> I_n, made once: the route's identities are constants


def _eye(n: int, like: Tensor) -> Tensor:
    if torch.compiler.is_compiling():  # no cache in a graph: inside a checkpointed layer dynamo refuses the store
        return torch.eye(n, device=like.device, dtype=like.dtype)
    key = (n, like.device, like.dtype)
    if key not in _EYES:
        with torch.inference_mode(False):  # a first call under inference_mode must not cache an inference tensor
            _EYES[key] = torch.eye(n, device=like.device, dtype=like.dtype)
    return _EYES[key]


def lora_route_factors(a: Tensor, a2: Optional[Tensor], b: Tensor, b2: Optional[Tensor],
                       dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """(R (rank, K), L (N, rank)) with L R = sum_t A_t (x) B_t, tracked by autograd, in `dtype` (default: the
    factors' promoted dtype). Each is one broadcast product of two factors, no sum: every entry is one product,
    rounded once, and the backward's reductions run in float32 inside torch (a few small kernels a call)."""
    if dtype is None:
        dtype = a.dtype
        for f in (a2, b, b2):
            dtype = torch.promote_types(dtype, f.dtype) if f is not None else dtype
    T, n1, k1 = factor_shape(a, a2)
    _, n2, k2 = factor_shape(b, b2)
    aa, ab = _split(a, a2)
    ba, bb = _split(b, b2)
    like = a.new_empty((), dtype=dtype)
    aa = _eye(n1, like).expand(T, n1, n1) if aa is None else aa.to(dtype)
    ab = _eye(k1, like).expand(T, k1, k1) if ab is None else ab.to(dtype)
    ba = _eye(n2, like).expand(T, n2, n2) if ba is None else ba.to(dtype)
    bb = _eye(k2, like).expand(T, k2, k2) if bb is None else bb.to(dtype)
    # L[(i1, i2), (t, p, q)] = A_a[t, i1, p] B_a[t, i2, q];  R[(t, p, q), (j1, j2)] = A_b[t, p, j1] B_b[t, q, j2]
    lmat = aa.permute(1, 0, 2)[:, None, :, :, None] * ba.permute(1, 0, 2)[None, :, :, None, :]
    rmat = ab[:, :, None, :, None] * bb[:, None, :, None, :]
    return rmat.reshape(-1, k1 * k2), lmat.reshape(n1 * n2, -1)


def _take_lora_route(a: Tensor, a2: Optional[Tensor], b: Tensor, b2: Optional[Tensor], x: Tensor,
                     backend: str = "triton") -> bool:
    """Up to rank 64 always (Compacter's rank-64 PHM layer: 1.14x through the LoRA op against 8.5x on the Kronecker
    kernels, H200, Triton); up to LORA_ROUTE_MAX_RANK only where the backend's Kronecker kernels cannot hold whole
    dense factors (at rank 128 a 64 x 64 term beside a rank-2 B took 1.202x through the LoRA op and 1.176x on them,
    Triton). The cuda backend's thresholds are Triton's, unmeasured for its own kernels."""
    rank = lora_route_rank(a, a2, b, b2)
    if rank > LORA_ROUTE_MAX_RANK[0]:
        return False
    if rank <= 64:
        return True
    T, n1, k1 = factor_shape(a, a2)
    _, n2, k2 = factor_shape(b, b2)
    if backend == "cuda":
        from ..kernels.cuda import krona_kernels_fit

        return not krona_kernels_fit(x.get_device(), x.element_size(), n1, k1, n2, k2, T)
    from ..kernels.triton.krona import whole_factors_fit

    return not whole_factors_fit(n1, k1, n2, k2, x.dtype)


def krona_linear(x: Tensor, weight: Tensor, A: Factor, B: Factor, scaling: float,
                 bias: Optional[Tensor] = None) -> Tensor:
    """y = x W^T + b + scaling * x (sum_t A_t (x) B_t)^T, fused, never forming an N x K matrix.

    x: (..., K), any leading shape and strides. weight: (N, K), frozen in spirit (it gets a gradient only if it
    requires one). A: (n1, k1) and B: (n2, k2) with n1 n2 = N and k1 k2 = K, in torch.kron's layout (module
    docstring); each may be a tensor, a stacked (T, n, k) tensor of T terms, a low-rank tuple (F (n, r), G (r, k))
    standing for F @ G, or a list of terms (all tensors or all tuples); A and B hold as many terms, and the result sums
    A_t (x) B_t over them (Compacter's PHM layer). Factors may have their own float dtype (float32 beside a bf16
    base); their gradients come back in it. bias: (N,) or None. Returns (..., N) in x's dtype (the autocast
    dtype under torch.autocast).
    """
    scaling = check_scaling(scaling)
    check_tensor("x", x, strided=True)
    check_tensor("weight", weight, dims=2)
    check_tensor("bias", bias, dims=1, optional=True)
    a, a2 = stack_factor("A", A)
    b, b2 = stack_factor("B", B)
    N, K = weight.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x's last dimension must match weight (N, K): x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    check_krona_factors(tuple(weight.shape), a, a2, b, b2)
    if bias is not None and bias.shape[0] != N:
        raise ValueError(f"bias must be (N,) = ({N},), got {tuple(bias.shape)}")
    check_same_device(x=x, weight=weight, A=a, A2=a2, B=b, B2=b2, bias=bias)
    scaling, a = fold_scaling(scaling, a)  # a tensor scaling under torch.compile: s A (a low-rank A's first factor)
    x2d, weight, bias, lead, backend = prepare_linear("krona", x, weight, bias, K, (a, a2, b, b2))
    # no tokens (the factors get zero gradients, as in PEFT), a torch.func transform, or a subclass under compile
    if plain_torch(x2d, N, K) or traced_subclass(x2d, weight, a, a2, b, b2, bias):
        return reference.krona_forward(x2d, weight, a, a2, b, b2, scaling, bias).reshape(*lead, N)
    if backend in ("triton", "cuda") and _take_lora_route(a, a2, b, b2, x2d, backend):
        # the LoRA op's Function on the inputs checked and prepared here (lora_linear would check and autocast them
        # again on every call), on KronA's backend: the LoRA op's Triton or CUDA kernels, whichever KronA resolved to
        rmat, lmat = lora_route_factors(a, a2, b, b2)
        lora = lora_function()
        y = apply_by_rows(lambda xs: lora(xs, weight, rmat, lmat, bias, scaling, 0.0, False, backend), (x2d,),
                          max(K, N))
        return y.reshape(*lead, N)
    fn = _krona_compiled if op_autograd() else KronALinearFunction.apply
    y = apply_by_rows(lambda xs: fn(xs, weight, a, a2, b, b2, bias, scaling, backend), (x2d,), max(K, N))
    return y.reshape(*lead, N)


def krona_merge_(weight: Tensor, A: Factor, B: Factor, scaling: float, sign: float = 1.0) -> Tensor:
    """weight += sign * scaling * sum_t A_t (x) B_t in place (a kernel on the GPU), rounded once to weight's
    dtype. A and B as in krona_linear."""
    scaling = check_scalar("scaling", scaling)  # as krona_linear: float() took True, "0.5" and nan
    sign = check_scalar("sign", sign)
    check_tensor("weight", weight, dims=2)
    a, a2 = stack_factor("A", A)
    b, b2 = stack_factor("B", B)
    check_krona_factors(tuple(weight.shape), a, a2, b, b2)
    check_same_device(weight=weight, A=a, A2=a2, B=b, B2=b2)
    check_writable("weight", weight)
    backend = weight_backend("krona", weight, pick_backend("krona", weight, a, a2, b, b2))
    with torch.no_grad(), on_device(weight):
        backend_module(backend, "krona").krona_merge_(weight, a, a2, b, b2, scaling, sign)
    return written_in_place(weight)

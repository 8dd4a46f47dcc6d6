"""LoRA linear: y = x W^T + b + scaling * (dropout(x) A^T) B^T, fused forward and backward.

`lora_linear` checks its inputs once, applies autocast, picks a backend and calls `LoRALinearFunction`.
The Function's forward and backward are two registered custom ops (peftkern::lora_fwd, peftkern::lora_bwd)
so torch.compile traces them without graph breaks. The dropout seed is drawn beside them (torch.randint on the
CPU generator), so that under torch.compile it is a random op the partitioner replays when a checkpoint
recomputes the forward; compiled dropout then draws from inductor's generator, as nn.Dropout does
(`torch._inductor.config.fallback_random = True` gives eager's masks).

Kept for backward: x (the caller holds it anyway; a product a * b, as the MLP's down projection gets, is not saved
but multiplied again in backward from the a and b autograd keeps for it), the frozen weight (a reference, never a copy),
the adapters (the weight and adapters by reference on ctx where they are nn.Parameters: _common.save_with_parameters),
xa = dropout(x) A^T (M x r: small; in the dtype the backend's lora_xa_dtype names, x's own on the Triton backend
without dropout) and the dropout seed -- never a mask or a dropped copy of x.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from . import _compile_passes
from ._common import (
    apply_by_rows,
    backend_module,
    check_flag,
    check_same_device,
    check_scalar,
    check_scaling,
    check_tensor,
    check_writable,
    define_op,
    draw_seed,
    empty_like_none,
    first_order,
    fold_scaling,
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
    saved_tensor_hooks_set,
    saved_with_parameters,
    traced_subclass,
    weight_backend,
    written_in_place,
)


def _seed(seed: Optional[Tensor]) -> int:
    return int(seed) if seed is not None else 0


def _lora_fwd(
    x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor], seed: Optional[Tensor],
    scaling: float, dropout_p: float, weight_transposed: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    """(y (M, N), xa (M, r) in the backend's lora_xa_dtype) for a 2-D x (M, K); seed is the dropout's (a CPU int64
    scalar), None without dropout."""
    runs = rows_backend(backend, x)
    with op_range("peftkern::lora_fwd"), no_autocast(x.device), on_device(x):
        y, xa = backend_module(runs, "lora").lora_forward(
            x, weight, lora_A, lora_B, scaling, bias, dropout_p, _seed(seed), weight_transposed)
    if runs != backend:  # no rows: the reference's xa, in the dtype the fake and the backend's backward give it
        xa = xa.to(backend_module(backend, "lora").lora_xa_dtype(x.dtype, dropout_p))
    return y.contiguous(), xa.contiguous()


lora_fwd = define_op("peftkern::lora_fwd", _lora_fwd)


@lora_fwd.register_fake
def _(x, weight, lora_A, lora_B, bias, seed, scaling, dropout_p, weight_transposed, backend):
    N = weight.shape[1] if weight_transposed else weight.shape[0]
    xa_dtype = backend_module(backend, "lora").lora_xa_dtype(x.dtype, dropout_p)
    return x.new_empty((x.shape[0], N)), x.new_empty((x.shape[0], lora_A.shape[0]), dtype=xa_dtype)


def _lora_bwd(
    grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, xa: Tensor, seed: Optional[Tensor],
    scaling: float, dropout_p: float, weight_transposed: bool, backend: str,
    need_x: bool, need_a: bool, need_b: bool, need_bias: bool, need_w: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dbias, dweight); an empty tensor where that gradient was not asked for."""
    grads = _lora_bwd_eager(grad_y, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p, weight_transposed,
                            backend, need_x, need_a, need_b, need_bias, need_w)
    refs = (x, lora_A, lora_B, grad_y, weight)
    return tuple(empty_like_none(g, r).contiguous() for g, r in zip(grads, refs))


def _lora_bwd_eager(grad_y, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p, weight_transposed, backend,
                    need_x, need_a, need_b, need_bias, need_w) -> tuple:
    """The backward as eager mode calls it: None where a gradient was not asked for (no empty tensors to allocate). x
    may be _lora_save's one-row stand-in (rows_of): reference.py's dropout mask, skinny_grads without dA and the
    extension's checks read its shape, dtype and device only."""
    x = rows_of(x, grad_y)
    # no on_device: autograd runs a backward on its tensors' device
    with op_range("peftkern::lora_bwd"), no_autocast(grad_y.device):
        return backend_module(rows_backend(backend, x), "lora").lora_backward(
            grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, _seed(seed), weight_transposed,
            (need_x, need_a, need_b, need_bias, need_w))


lora_bwd = define_op("peftkern::lora_bwd", _lora_bwd)


@lora_bwd.register_fake
def _(grad_y, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p, weight_transposed, backend,
      need_x, need_a, need_b, need_bias, need_w):
    def maybe(flag, shape, like, dtype=None):  # a gradient not asked for: empty, in its reference's dtype
        return like.new_empty(shape, dtype=dtype) if flag else like.new_empty((0,))

    return (maybe(need_x, (grad_y.shape[0], x.shape[1]), x), maybe(need_a, lora_A.shape, lora_A),
            maybe(need_b, lora_B.shape, lora_B),
            maybe(need_bias, (grad_y.shape[1],), grad_y, torch.float32 if grad_y.dtype != torch.float64 else None),
            maybe(need_w, weight.shape, weight, torch.float32 if weight.dtype != torch.float64 else None))


class LoRALinearFunction(torch.autograd.Function):
    """Autograd for lora_linear over 2-D x (M, K); lora_linear reshapes (..., K) inputs.

    Under torch.compile the registered custom ops are called, so the graph holds them whole; in eager mode
    their Python bodies are called directly, which skips the dispatcher's overhead (~40 us per layer and step,
    measured on the CPU) -- the same code either way.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, scaling, dropout_p, weight_transposed, backend):
        # The seed is drawn here, outside lora_fwd: under torch.compile it is then a random op of the graph, which
        # the partitioner knows how to replay when activation checkpointing recomputes the forward in backward.
        # Drawn inside the opaque lora_fwd, the recomputation drew a new seed: the backward's mask differed from
        # the forward's and the adapter gradients were wrong (seen on the CPU, torch 2.13).
        # Without dropout there is no seed at all: no CPU tensor in a compiled graph, one op less on the host.
        seed = draw_seed() if dropout_p > 0.0 else None
        fwd = torch.ops.peftkern.lora_fwd if torch.compiler.is_compiling() else _lora_fwd
        inputs = (x, weight, lora_A, lora_B, bias, seed, scaling, dropout_p, weight_transposed, backend)
        y, xa = fwd(*inputs)
        _lora_save(ctx, inputs, xa, True)
        return y

    @staticmethod
    @first_order
    def backward(ctx, grad_y):
        bwd = torch.ops.peftkern.lora_bwd if torch.compiler.is_compiling() else _lora_bwd_eager
        return (*_lora_backward(ctx, grad_y, bwd), None, None, None, None)


def _lora_save(ctx, inputs: tuple, xa: Tensor, recompute_input: bool) -> None:
    """What lora_bwd reads, on ctx; inputs are lora_fwd's."""
    x, weight, lora_A, lora_B, bias, seed, scaling, dropout_p, weight_transposed, backend = inputs
    # Backward reads x for dA and a trainable weight's gradient only. A layer whose A and weight are frozen (LoRA-FA's
    # A, create_lorafa_optimizer; an adapter loaded frozen) keeps no x, as PEFT's graph keeps none: it kept the whole
    # input, 128 MiB against PEFT's 6 (an exploratory test, 2026-12-07). backward passes one empty row of x's width and
    # dtype in its place (rows_of).
    ctx.x_unread = not (ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
    if ctx.x_unread and ctx.needs_input_grad[3] and recompute_input:  # dB depends on x all the same: first_order's
        ctx.links_of = {3: input_link(x)}  # second-order error (the eager Function's backward only)
    # x = a * b (the MLP's down projection) is not saved: backward multiplies a and b again (product_source)
    ctx.x_source = product_source(x) if recompute_input and not ctx.x_unread else None
    ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
    kept_x = None if ctx.x_source is not None or ctx.x_unread else x
    save_with_parameters(ctx, (kept_x, xa, seed), (weight, lora_A, lora_B))
    _lora_settings(ctx, bias, scaling, dropout_p, weight_transposed, backend)


def _lora_settings(ctx, bias, scaling, dropout_p, weight_transposed, backend) -> None:
    """The non-tensor facts lora_bwd's caller reads on ctx."""
    ctx.scaling, ctx.dropout_p, ctx.weight_transposed, ctx.backend = scaling, dropout_p, weight_transposed, backend
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _lora_backward(ctx, grad_y, bwd) -> tuple:
    """The gradients of x, weight, lora_A, lora_B and bias (None where not needed) by bwd (lora_bwd or its body)."""
    (x, xa, seed), (weight, lora_A, lora_B) = saved_with_parameters(ctx, "lora_linear")
    if ctx.x_source is not None:
        x = recompute_product(ctx.x_source, ctx.x_shape)
    elif ctx.x_unread:  # neither dA nor the weight's gradient is asked for: x's width, dtype and device, no data
        x = grad_y.new_empty((1, ctx.x_shape[-1]), dtype=ctx.x_dtype)
    return _lora_grads(ctx, grad_y, bwd, x, xa, seed, weight, lora_A, lora_B)


def _lora_grads(ctx, grad_y, bwd, x, xa, seed, weight, lora_A, lora_B) -> tuple:
    need_x, need_w, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
    need_bias = need_bias and ctx.has_bias
    dx, da, db, dbias, dw = bwd(
        grad_y, x, weight, lora_A, lora_B, xa, seed, ctx.scaling, ctx.dropout_p, ctx.weight_transposed,
        ctx.backend, need_x, need_a, need_b, need_bias, need_w)
    return (dx if need_x else None, dw.to(weight.dtype) if need_w else None, da if need_a else None,
            db if need_b else None, dbias.to(ctx.bias_dtype) if need_bias else None)


def _lora_fwd_setup(ctx, inputs, output) -> None:
    """Autograd of lora_fwd called by itself (COMPILED_OP_AUTOGRAD, under torch.compile)."""
    ctx.mark_non_differentiable(output[1])
    _lora_save(ctx, inputs, output[1], False)


lora_fwd.register_autograd(
    lambda ctx, grad_y, _grad_xa: (*_lora_backward(ctx, grad_y, torch.ops.peftkern.lora_bwd), None, None, None,
                                   None, None),
    setup_context=_lora_fwd_setup)


def _lora_xa(x: Tensor, lora_A: Tensor, seed: Optional[Tensor], dropout_p: float, backend: str) -> Tensor:
    """xa = drop(x) A^T (M, r) in the backend's lora_xa_dtype, as lora_fwd makes it (SPLIT_BACKENDS only)."""
    runs = rows_backend(backend, x)
    with op_range("peftkern::lora_xa"), no_autocast(x.device), on_device(x):
        xa = backend_module(runs, "lora").lora_down(x, lora_A, dropout_p, _seed(seed))
    if runs != backend:  # no rows: the reference's xa, in the dtype the fake and the backend's backward give it
        xa = xa.to(backend_module(backend, "lora").lora_xa_dtype(x.dtype, dropout_p))
    return xa.contiguous()


lora_xa = define_op("peftkern::lora_xa", _lora_xa)


@lora_xa.register_fake
def _(x, lora_A, seed, dropout_p, backend):
    _compile_passes.install()  # dynamo traces lora_xa here first: Inductor's passes for it (_compile_passes.py)
    xa_dtype = backend_module(backend, "lora").lora_xa_dtype(x.dtype, dropout_p)
    return x.new_empty((x.shape[0], lora_A.shape[0]), dtype=xa_dtype)


def _lora_fwd_xa(
    x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor], xa: Tensor,
    seed: Optional[Tensor], scaling: float, dropout_p: float, weight_transposed: bool, backend: str,
) -> Tensor:
    """y (M, N) of lora_fwd from a given xa (lora_xa's); lora_A is an input for its gradient only."""
    with op_range("peftkern::lora_fwd_xa"), no_autocast(x.device), on_device(x):
        y, _ = backend_module(rows_backend(backend, x), "lora").lora_forward(
            x, weight, lora_A, lora_B, scaling, bias, dropout_p, _seed(seed), weight_transposed, xa=xa)
    return y.contiguous()


lora_fwd_xa = define_op("peftkern::lora_fwd_xa", _lora_fwd_xa)


@lora_fwd_xa.register_fake
def _(x, weight, lora_A, lora_B, bias, xa, seed, scaling, dropout_p, weight_transposed, backend):
    return x.new_empty((x.shape[0], weight.shape[1] if weight_transposed else weight.shape[0]))


def _lora_fwd_xa_setup(ctx, inputs, output) -> None:
    x, weight, lora_A, lora_B, bias, xa, *rest = inputs
    _lora_save(ctx, (x, weight, lora_A, lora_B, bias, *rest), xa, False)


# The gradients of x, weight, lora_A, lora_B and bias are all lora_bwd's (xa was made from detached x and lora_A).
lora_fwd_xa.register_autograd(
    lambda ctx, grad_y: (*_lora_backward(ctx, grad_y, torch.ops.peftkern.lora_bwd), None, None, None, None, None,
                         None),
    setup_context=_lora_fwd_xa_setup)

# Under torch.compile, where the backend has lora_down, xa is an op of its own (lora_xa) and the layer's product takes
# it (lora_fwd_xa). Activation checkpointing recomputes the forward in backward, but the partitioner recomputes only
# what backward reads. The frozen model's down projection is not recomputed in 7 of 8 layers (its output reaches
# backward only through the next layer's checkpointed input), while lora_fwd, whose xa backward reads, was recomputed
# whole. Split, those layers recompute xa alone. On an H100 (1a1fa7a, scripts/step_ab.py --compile, one process)
# the checkpointed 1b step went from 0.873x to 0.908x the compiled frozen step; without checkpointing the split costs
# ~0.2 ms a step (0.927x against 0.930x): where the persistent kernel's workers made xa, cuBLAS makes it now.
# PEFTKERN_LORA_COMPILED_SPLIT=0 calls lora_fwd as before.
COMPILED_SPLIT = [os.environ.get("PEFTKERN_LORA_COMPILED_SPLIT", "1") != "0"]
SPLIT_BACKENDS = ("torch", "triton")


def _lora_compiled(x, weight, lora_A, lora_B, bias, scaling, dropout_p, weight_transposed, backend) -> Tensor:
    """lora_linear's call under torch.compile with COMPILED_OP_AUTOGRAD: the registered ops and their own autograd."""
    seed = draw_seed() if dropout_p > 0.0 else None  # outside the op, as in LoRALinearFunction.forward
    # not where no gradient is to come (inference, decode): there lora_fwd's one launch, or its xa workers, serve best
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                 for t in (x, weight, lora_A, lora_B, bias))
    if COMPILED_SPLIT[0] and backend in SPLIT_BACKENDS and wants_grad:
        # the joint passes' switches, read at trace time so that dynamo guards on them and a switch compiles again
        if _compile_passes.SAVE_XA[0]:
            pass
        if _compile_passes.REJOIN_XA[0]:
            pass
        if _compile_passes.GROUP_XA[0]:
            pass
        xa = torch.ops.peftkern.lora_xa(x.detach(), lora_A.detach(), seed, dropout_p, backend)
        return torch.ops.peftkern.lora_fwd_xa(x, weight, lora_A, lora_B, bias, xa, seed, scaling, dropout_p,
                                              weight_transposed, backend)
    return torch.ops.peftkern.lora_fwd(x, weight, lora_A, lora_B, bias, seed, scaling, dropout_p, weight_transposed,
                                       backend)[0]


class _XaSaver(torch.autograd.Function):
    """xa = drop(x) A^T, made before the layer's product, which keeps x and xa here for its backward (EAGER_SPLIT).
    The product's backward gives every gradient, and a zero one (no memory) for xa, so that autograd runs this node
    after it and frees what it saved, as it frees a node's saved tensors once its backward has run."""

    @staticmethod
    def forward(ctx, x, lora_A, seed, dropout_p, backend, holder, keep_x):
        xa = _lora_xa(x, lora_A, seed, dropout_p, backend)
        ctx.save_for_backward(x if keep_x else None, xa)  # x for dA and the weight's gradient only, as _lora_save
        ctx.x_dtype = x.dtype
        holder.append(ctx)
        return xa

    @staticmethod
    def backward(ctx, _grad_xa):  # the product's backward gave x's and A's gradients whole
        return None, None, None, None, None, None, None


class LoRALinearSplitFunction(torch.autograd.Function):
    """LoRALinearFunction with x and xa saved by _XaSaver (saver) before the product runs, and nothing saved here
    where the weight and adapters are Parameters (kept on ctx). Under eager activation checkpointing the recomputation
    stops at the region's last saved tensor: a layer whose output backward does not read (the down projection) then
    recomputes xa alone, not its product."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, xa, saver, seed, scaling, dropout_p, weight_transposed, backend):
        y = _lora_fwd_xa(x, weight, lora_A, lora_B, bias, xa, seed, scaling, dropout_p, weight_transposed, backend)
        ctx.saver, ctx.seed = saver, seed
        save_with_parameters(ctx, (), (weight, lora_A, lora_B))
        _lora_settings(ctx, bias, scaling, dropout_p, weight_transposed, backend)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        ctx.x_xa = ctx.saver.saved_tensors  # once (a checkpoint refuses a second unpack); first_order reads it on ctx
        try:
            grads = _split_backward(ctx, grad_y)
            zero_xa = ctx.x_xa[1].new_zeros(()).expand_as(ctx.x_xa[1])  # the saver runs after this, and frees x, xa
        finally:
            ctx.x_xa = None  # not held past this backward (the ctx lives as long as the graph)
        return (*grads, zero_xa, None, None, None, None, None, None)


@first_order
def _split_backward(ctx, grad_y) -> tuple:
    _, (weight, lora_A, lora_B) = saved_with_parameters(ctx, "lora_linear")
    x, xa = ctx.x_xa
    if x is None:  # not kept (frozen A and weight): x's shape, dtype and device for the backend, no data
        x = xa.new_empty((1, lora_A.shape[1]), dtype=ctx.saver.x_dtype)
    return _lora_grads(ctx, grad_y, _lora_bwd_eager, x, xa, ctx.seed, weight, lora_A, lora_B)


# Eager activation checkpointing has the compiled path's gap (COMPILED_SPLIT): on the CPU, a tiny Llama of 8 layers
# recomputed 49 of the frozen model's 56 matmuls in backward and all 56 fused forwards. The recomputation stops at the
# region's last saved tensor, and the fused down projection saved x and xa after its product. Where saved-tensor hooks
# are set (checkpointing, offloading), LoRALinearSplitFunction runs instead and the count is 48. On an H100
# (2026-12-07), the 1b step checkpointed: 0.943x the frozen step against 0.927x unsplit in one process
# (scripts/step_ab.py --checkpointing --settings default eager-split), bench e2e 0.938-0.940x against 0.921x. The
# second Function's host cost (~11 us a call on the CI host) did not show there.
# PEFTKERN_LORA_EAGER_SPLIT=0 turns it off.
EAGER_SPLIT = [os.environ.get("PEFTKERN_LORA_EAGER_SPLIT", "1") == "1"]


def lora_function():
    """What runs LoRA on 2-D inputs, (x, weight, lora_A, lora_B, bias, scaling, dropout_p, weight_transposed, backend)
    -> y: LoRALinearFunction.apply, or under torch.compile the op with its own autograd (COMPILED_OP_AUTOGRAD), or
    under saved-tensor hooks with EAGER_SPLIT LoRALinearSplitFunction.apply."""
    if op_autograd():
        return _lora_compiled
    if EAGER_SPLIT[0] and not torch.compiler.is_compiling() and torch.is_grad_enabled() and saved_tensor_hooks_set():
        return _lora_eager_split
    return LoRALinearFunction.apply


def _lora_eager_split(x, weight, lora_A, lora_B, bias, scaling, dropout_p, weight_transposed, backend) -> Tensor:
    # the saver is a node of the graph only where x or A needs a gradient (else LoRA-FA's frozen A beside an input
    # without one would leave it nothing saved)
    if backend not in SPLIT_BACKENDS or not (x.requires_grad or lora_A.requires_grad):
        return LoRALinearFunction.apply(x, weight, lora_A, lora_B, bias, scaling, dropout_p, weight_transposed, backend)
    # the saver runs here, not inside the product's forward, where grad mode is off and it would make no node
    seed = draw_seed() if dropout_p > 0.0 else None  # the same draw on recomputation (checkpoint keeps the RNG)
    holder: list = []
    xa = _XaSaver.apply(x, lora_A, seed, dropout_p, backend, holder, lora_A.requires_grad or weight.requires_grad)
    return LoRALinearSplitFunction.apply(x, weight, lora_A, lora_B, bias, xa, holder[0], seed, scaling, dropout_p,
                                         weight_transposed, backend)


def check_lora_inputs(x, weight, lora_A, lora_B, bias, weight_transposed) -> tuple[int, int, int]:
    """Validate shapes, dtypes and devices; returns (N, K, r)."""
    check_tensor("x", x, strided=True)
    check_tensor("weight", weight, dims=2)
    check_tensor("lora_A", lora_A, dims=2)
    check_tensor("lora_B", lora_B, dims=2)
    check_tensor("bias", bias, dims=1, optional=True)
    check_flag("weight_transposed", weight_transposed)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., K), got a scalar")
    N, K = (weight.shape[1], weight.shape[0]) if weight_transposed else tuple(weight.shape)
    layout = "(K, N) with weight_transposed=True" if weight_transposed else "(N, K)"
    if x.shape[-1] != K:
        raise ValueError(f"x's last dimension must match weight {layout}: x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    r = lora_A.shape[0]
    if r == 0:
        raise ValueError(f"the LoRA rank must be at least 1, got lora_A of shape {tuple(lora_A.shape)}")
    if lora_A.shape[1] != K:
        raise ValueError(f"lora_A must be (r, K) = (r, {K}), got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_B must be (N, r) = ({N}, {r}) for weight {tuple(weight.shape)} and lora_A "
                         f"{tuple(lora_A.shape)}, got {tuple(lora_B.shape)}")
    if bias is not None and bias.shape[0] != N:
        raise ValueError(f"bias must be (N,) = ({N},), got {tuple(bias.shape)}")
    check_same_device(x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, bias=bias)
    return N, K, r



def lora_linear(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    bias: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    training: bool = True,
    weight_transposed: bool = False,
) -> Tensor:
    """y = x W^T + b + scaling * (dropout(x) A^T) B^T, fused.

    x: (..., K), any leading shape and strides. weight: (N, K), or (K, N) with weight_transposed
    (GPT-2's Conv1D); it is frozen in spirit: it gets a gradient only if it requires one. lora_A: (r, K),
    lora_B: (N, r), in any float dtype (PEFT keeps them in float32 beside a bf16 base). bias: (N,) or None.
    Dropout (p = dropout_p, only when training) acts on the adapter's input; its mask is regenerated from
    a seed in backward. Returns (..., N) in x's dtype (the autocast dtype under torch.autocast).
    """
    scaling = check_scaling(scaling)
    dropout_p = check_scalar("dropout_p", dropout_p, 0.0, 1.0, high_inclusive=False)
    check_flag("training", training)
    N, K, _ = check_lora_inputs(x, weight, lora_A, lora_B, bias, weight_transposed)
    scaling, lora_B = fold_scaling(scaling, lora_B)  # a tensor scaling under torch.compile: s B, scaled by 1
    x2d, weight, bias, lead, backend = prepare_linear("lora", x, weight, bias, K, (lora_A, lora_B))
    p = dropout_p if training else 0.0
    # no tokens (the adapter gets zero gradients, as in PEFT), a torch.func transform, or a subclass under compile
    if plain_torch(x2d, N, K) or traced_subclass(x2d, weight, lora_A, lora_B, bias):
        # a torch.func transform's dropout: torch's random ops, under the transform's randomness rule (vmap's)
        keep = torch.rand(x2d.shape, device=x2d.device) >= p if p > 0.0 and x2d.shape[0] else None
        return reference.lora_linear(x2d, weight, lora_A, lora_B, scaling, bias, keep, p,
                                     weight_transposed).reshape(*lead, N)
    fn = lora_function()
    y = apply_by_rows(lambda xs: fn(xs, weight, lora_A, lora_B, bias, scaling, p, weight_transposed, backend),
                      (x2d,), max(K, N))
    return y.reshape(*lead, N)


def lora_merge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, sign: float = 1.0,
                weight_transposed: bool = False) -> Tensor:
    """weight += sign * scaling * B A in place (a kernel on the GPU), rounded once to weight's dtype."""
    # checked as lora_linear checks them: float() took True, "0.5", nan and a tensor that requires grad
    scaling = check_scalar("scaling", scaling)
    sign = check_scalar("sign", sign)
    check_flag("weight_transposed", weight_transposed)
    check_tensor("weight", weight, dims=2)
    check_tensor("lora_A", lora_A, dims=2)
    check_tensor("lora_B", lora_B, dims=2)
    N, K = (weight.shape[1], weight.shape[0]) if weight_transposed else tuple(weight.shape)
    if lora_A.shape[0] == 0:
        raise ValueError(f"the LoRA rank must be at least 1, got lora_A of shape {tuple(lora_A.shape)}")
    if lora_A.shape[1] != K or tuple(lora_B.shape) != (N, lora_A.shape[0]):
        raise ValueError(f"cannot merge lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} into "
                         f"weight {tuple(weight.shape)} (N={N}, K={K})")
    check_same_device(weight=weight, lora_A=lora_A, lora_B=lora_B)
    check_writable("weight", weight)
    backend = weight_backend("lora", weight, pick_backend("lora", weight, lora_A, lora_B))
    with torch.no_grad(), on_device(weight):
        backend_module(backend, "lora").lora_merge_(weight, lora_A, lora_B, scaling, sign, weight_transposed)
    return written_in_place(weight)


def lora_dropout_mask(seed: int, shape: tuple, p: float, device, backend: Optional[str] = None) -> Tensor:
    """The (M, K) keep-mask that `backend` draws for `seed`: what dropout(x) keeps. For tests."""
    device = torch.device(device)
    backend = backend or pick_backend("lora", torch.empty(0, device=device))
    return backend_module(backend, "lora").dropout_mask(seed, tuple(shape), p, device)

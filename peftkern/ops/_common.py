"""Shared pieces of the autograd layer: input checks, autocast, seeds, backend modules, fallbacks."""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import numbers
import os
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.autograd import forward_ad
from torch.fx.experimental.symbolic_shapes import guard_or_false, guard_or_true

from .. import _backend

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _desc(t: Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"


def check_tensor(name: str, t, dims: Optional[int] = None, optional: bool = False, strided: bool = False) -> None:
    """A floating tensor (TypeError otherwise) with `dims` dimensions (ValueError otherwise); with `strided`, a
    dense one (the activations, which the ops reshape: a sparse x raised "reshape is not implemented for sparse
    tensors", 2026-12-08; sparse weights go to the reference)."""
    if t is None:
        if optional:
            return
        raise TypeError(f"{name} must be a tensor, got None")
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32, float64), got {_desc(t)}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimension(s), got shape {tuple(t.shape)}")
    if strided and (t.layout != torch.strided or t.is_nested):
        if t.is_nested:  # jagged or strided: the ops take the rows of one (..., K) tensor (a review, 2026-12-08)
            raise TypeError(f"{name} must be a dense tensor, got a nested tensor (its .values() are its rows)")
        raise TypeError(f"{name} must be a dense tensor, got layout {t.layout} ({name}.to_dense() makes one)")


def check_same_device(**tensors) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k}: {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_scalar(name: str, value, low: Optional[float] = None, high: Optional[float] = None,
                 high_inclusive: bool = True) -> float:
    if isinstance(value, Tensor):
        value = _check_scalar_tensor(name, value).item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    # value != value is NaN's test: math.isnan cannot be traced for the SymFloat that torch.compile(dynamic=True) makes
    # of a module's float (LoRALinear's dropout: a graph break in every layer, an error under fullgraph=True)
    if (low is not None or high is not None) and value != value:
        raise ValueError(f"{name} must be a number in range, got nan")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and (value > high or (not high_inclusive and value >= high)):
        raise ValueError(f"{name} must be {'<=' if high_inclusive else '<'} {high}, got {value}")
    return value


def _check_scalar_tensor(name: str, value: Tensor) -> Tensor:
    """value, a tensor given for a number: one element, and no gradient wanted (read as a number, it would get none:
    say so rather than drop it)."""
    if value.numel() != 1:
        raise ValueError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
    if value.requires_grad:
        raise TypeError(f"{name} must be a number; a tensor that requires grad would get no gradient here")
    return value


def check_scaling(value):
    """check_scalar("scaling", value); under dynamo a one-element tensor that needs no grad stays a 0-dim tensor, for
    the caller to fold into a factor (traced, .item() made an unbacked SymFloat, which the ops' float argument
    refused: torch.compile(fullgraph=True) of lora_linear / krona_linear with scaling=torch.tensor(0.5) failed in the
    fake-tensor call, where eager mode reads the number; a review, 2026-12-06)."""
    if not (isinstance(value, Tensor) and torch.compiler.is_dynamo_compiling()):
        return check_scalar("scaling", value)
    _check_scalar_tensor("scaling", value)
    if value.dtype == torch.bool or value.dtype.is_complex:  # as check_scalar refuses the .item() of such a tensor
        raise TypeError(f"scaling must be a number, got a {value.dtype} tensor")
    return value.reshape(())


def fold_scaling(scaling, factor: Tensor) -> tuple:
    """(scaling, factor) as they are for a number; for check_scaling's tensor (traced), (1.0, factor * scaling): the
    same product, the op scaling by 1."""
    if not isinstance(scaling, Tensor):
        return scaling, factor
    return 1.0, factor * scaling.to(factor.dtype)


def check_flag(name: str, value) -> bool:
    """A bool (TypeError otherwise): a flag that is a string or a tensor was read by its truthiness ("False" is true),
    and a square weight silently ran transposed or an IA3 merge divided."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_writable(name: str, t: Tensor) -> None:
    """A merge target whose elements do not share memory (ValueError otherwise): an expanded weight (stride 0) was
    refused by the reference's in-place add (a RuntimeError) and written over silently by the Triton merge kernels."""
    if any(st == 0 and n > 1 for n, st in zip(t.shape, t.stride())):
        raise ValueError(f"{name} must not be an expanded view (its elements share memory; clone() it first), got "
                         f"shape {tuple(t.shape)} with strides {tuple(t.stride())}")


def autocast_inputs(x: Tensor, frozen: Sequence[Optional[Tensor]]) -> tuple[Tensor, list]:
    """Under torch.autocast, cast x and the frozen base tensors to the autocast dtype (as F.linear would).

    The adapters keep their own dtype: the kernels read them in any float dtype without copies of x.
    """
    dtype = _autocast_target(x)
    if dtype is None:
        return x, list(frozen)
    cast = [t.to(dtype) if _autocast_eligible(t) else t for t in frozen]
    return (x.to(dtype) if _autocast_eligible(x) else x), cast


def _autocast_target(x: Tensor) -> Optional[torch.dtype]:
    """The dtype torch.autocast casts to on x's device, or None where it is off (or the device has none)."""
    device_type = x.device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_dtype(x: Tensor) -> torch.dtype:
    """The dtype autocast_inputs gives x, without casting it."""
    dtype = _autocast_target(x)
    return dtype if dtype is not None and _autocast_eligible(x) else x.dtype


def _autocast_eligible(t: Optional[Tensor]) -> bool:
    """Whether autocast casts t: a floating tensor other than float64, which torch's autocast leaves alone."""
    return t is not None and t.is_floating_point() and t.dtype != torch.float64


# The kernels index an (M, width) operand with 32-bit offsets (row * row stride + column: Triton's integers are int32
# unless an argument is too large for one). So an op whose row operands hold 2^31 elements or more (M = 524288 tokens at
# 4096 features; 195084 at 11008) runs as several calls on row blocks below that, whose outputs are concatenated.
MAX_OFFSET = [2**31 - 1]  # a list: tests lower it to exercise the split on small tensors


def prepare_linear(op: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], K: int,
                   operands: tuple = ()):
    """After the shape checks: apply autocast to x and the frozen tensors, check that x and weight share a
    dtype, match the bias to it, flatten x to (M, K) and pick the backend. Returns (x2d, weight, bias, lead
    shape, backend)."""
    x, (weight, bias) = autocast_inputs(x, (weight, bias))
    if x.dtype != weight.dtype:
        raise TypeError(f"x and weight must share a dtype (use torch.autocast to mix): x {x.dtype}, "
                        f"weight {weight.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    x2d = x.reshape(math.prod(x.shape[:-1]), K)  # -1 is ambiguous when K = 0
    bias = vector(bias)
    return x2d, weight, bias, x.shape[:-1], weight_backend(op, weight, pick_backend(op, x2d, weight, bias, *operands))


def plain_torch(rows: Tensor, *widths: int) -> bool:
    """Whether an op runs the reference's torch ops instead of its autograd.Function: with no rows or a width of 0 (no
    kernel to launch; the adapters get zero gradients), or under a torch.func transform (grad, vmap, jacrev:
    per-sample gradients), which cannot transform a Function whose forward takes ctx and whose kernels have no batching
    rule. Under torch.compile a row count that depends on data (an unbacked size: the tokens routed to one expert of a
    mixture of experts, captured with capture_dynamic_output_shape_ops) cannot be tested: such a call takes the op,
    whose bodies run the reference where they find no rows (rows_backend); the test raised "Could not guard on
    data-dependent expression", a graph break, or an error under fullgraph=True, where F.linear traces. Inside
    torch.autograd.forward_ad.dual_level() the reference's ops carry the tangents that the Functions (no jvp) refused
    with torch's "You must implement the jvp function" (an exploratory test, 2026-12-07)."""
    n = rows.shape[0]
    if symbolic(n):  # guard where a size is known, take the op where it depends on data
        empty = guard_or_false(n == 0) or any(guard_or_false(w == 0) for w in widths)
    else:
        empty = n == 0 or 0 in widths
    return empty or torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


def symbolic(size) -> bool:
    """Whether a size may be symbolic: traced by dynamo (which shows a SymInt to type() as an int) or by make_fx / a
    non-strict export (a SymInt object). Eager mode pays a call that returns at once and a type test."""
    return torch.compiler.is_dynamo_compiling() or type(size) is not int


def rows_backend(backend: str, rows: Tensor) -> str:
    """backend, or the reference for a call with no rows, which the kernels' launchers do not take (their grids and
    block counts divide by M). Eager calls without rows never get here (plain_torch); a graph compiled for a row count
    that depends on data (plain_torch) runs the op's body with whatever count the data gives, 0 included."""
    return "torch" if rows.shape[0] == 0 else backend


def on_device(t: Tensor):
    """torch.cuda.device(t's GPU) where that is not the current device, else nothing. Triton and the C++ launcher
    launch on the current device and its current stream: a layer on cuda:1 called while cuda:0 is current (a model
    split over GPUs by device_map="auto") ran its kernels on cuda:0, unordered with cuda:1's stream."""
    if t.is_cuda and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.get_device())
    return contextlib.nullcontext()


def no_autocast(device: torch.device):
    """torch.autocast(device, enabled=False) where autocast is on for the device; nothing where it is off (no context
    to enter on every call) or the device has none (meta). The ops' bodies run in it: their operands were cast as
    F.linear's would be already (autocast_inputs), and autocast left on recast the bodies' float32 products (xa, the
    reference's x W^T) to 16 bits in eager calls, where the compiled op, opaque to autocast, kept them float32: eager
    and compiled LoRA, IA3 and KronA differed by about one bf16 rounding (an exploratory test, 2026-12-08)."""
    if _has_autocast(device.type) and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _has_autocast(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type)


def vector(t: Optional[Tensor]) -> Optional[Tensor]:
    """A 1-D operand (a bias, IA3's l) with unit stride: the kernels index vectors as pointer + column, so a strided
    or expanded view (a column of a table, ones(1).expand(N)) is copied (differentiably); a contiguous one is itself."""
    return t if t is None else t.contiguous()


class _SecondOrderError(torch.autograd.Function):
    """The gradients of a first-order backward, tied to that backward's grad outputs and to the op's saved tensors
    that require grad, so that any gradient of them (.backward(), autograd.grad naming the op's inputs, hessian)
    reaches this node and raises."""

    @staticmethod
    def forward(ctx, count, *tensors):
        return tuple(t.clone() for t in tensors[:count])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("peftkern's fused ops are once_differentiable: their backward has no graph, so a gradient "
                           "of a gradient (create_graph=True, a gradient penalty, a Hessian) is not available; "
                           "torch.func transforms (torch.func.grad, torch.func.hessian) run the differentiable "
                           "reference (peftkern.set_backend('torch') does not: its backward is first-order too)")


def _tensors_in(value) -> list:
    """The tensors in nested tuples / lists."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors_in(v)]
    return []


class _SavedOnce:
    """An autograd ctx whose saved_tensors were unpacked already (the rest is the ctx's own)."""

    def __init__(self, ctx, saved: tuple) -> None:
        object.__setattr__(self, "_ctx", ctx)
        object.__setattr__(self, "saved_tensors", saved)

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    def __setattr__(self, name, value) -> None:
        setattr(self._ctx, name, value)


def first_order(backward):
    """An autograd.Function's backward that is not itself differentiable. Under create_graph=True (grad mode on in
    the backward) its gradients come out tied to the grad outputs and to the op's tensors that require grad (saved,
    or kept on ctx in eager mode: the weights) through a node that raises when differentiated. torch's
    once_differentiable tied them to detached copies only, so .backward() raised but autograd.grad(gx.sum(), x) and
    autograd.functional.hessian saw no path to x and returned None / zeros, and a penalty on the adapters' own
    gradients lost its second-order term (reviews, 2026-12-05). Otherwise it runs as it is, without a no_grad
    context. The ctx's saved tensors are unpacked once (non-reentrant checkpointing refuses a second unpack).
    ctx.links_of, where set, maps the index of one returned gradient to tensors that it alone depends on (input_link's):
    those are tied to that gradient only, so that a second-order gradient of the others (dx, which does not depend on
    x) still comes back where it did before."""

    @functools.wraps(backward)
    def run(ctx, *grads):
        if not torch.is_grad_enabled():
            return backward(ctx, *grads)
        saved = ctx.saved_tensors  # once: non-reentrant checkpointing refuses a second unpack
        only = getattr(ctx, "links_of", None) or {}  # a dict: _tensors_in leaves it out of the shared links below
        state = tuple(vars(ctx).values()) + product_operands(getattr(ctx, "x_source", None))
        links = [t for t in _tensors_in((grads, saved, state)) if t.requires_grad]
        with torch.no_grad():
            out = backward(_SavedOnce(ctx, saved), *grads)
        single = not isinstance(out, tuple)
        outs = list((out,) if single else out)
        if links:
            tensors = [t for t in outs if isinstance(t, Tensor)]
            tied = iter(_SecondOrderError.apply(len(tensors), *tensors, *links))
            outs = [next(tied) if isinstance(t, Tensor) else t for t in outs]
        # after the shared node, not before: one gradient's own links among the shared node's inputs tied every
        # gradient to them through it
        for i, extra in only.items():
            extra = [t for t in _tensors_in(extra) if t.requires_grad]
            if extra and isinstance(outs[i], Tensor):
                outs[i] = _SecondOrderError.apply(1, outs[i], *extra)[0]
        return outs[0] if single else tuple(outs)

    return run


def weight_backend(op: str, weight: Tensor, backend: str) -> str:
    """backend, or the reference (with one warning) for a weight of 2^31 elements or more, which the kernels' 32-bit
    offsets cannot index (a vocabulary-sized head of the largest models: 256000 x 18432). Activations past that run in
    row blocks instead (apply_by_rows); a weight cannot be split so."""
    if backend == "torch" or weight.numel() <= MAX_OFFSET[0]:
        return backend
    warn_once(f"{op}-weight-offsets", f"peftkern {op}: a weight of {tuple(weight.shape)} ({weight.numel()} elements, "
                                      "past 32-bit offsets) runs on the reference path")
    return "torch"


def written_in_place(weight: Tensor, *others: Optional[Tensor]) -> Tensor:
    """Mark tensors a merge kernel wrote through their pointers as modified in place, as torch's in-place ops
    do: a backward that saved the weight before the merge then raises instead of using the merged weight
    (Triton's lora_merge_ and krona_merge_ left the version alone, and such a backward counted the delta
    twice: dx 86 off). Returns weight."""
    torch.autograd.graph.increment_version([t for t in (weight, *others) if t is not None])
    return weight


def apply_by_rows(call, rows: Sequence[Optional[Tensor]], width: int) -> Tensor:
    """call(*rows) (an autograd Function's apply on the op's per-row tensors, the rest bound in call), on blocks of
    rows where M * the widest row (width, or a row stride) would overflow a 32-bit offset; the outputs concatenated.
    Gradients of the shared tensors add up over the blocks through autograd. A row tensor whose columns are strided
    (x = t.t(), column-major) is copied to rows first where its offsets pass the limit: blocks of rows do not shorten
    a column stride (its blocks each reached M * K, a review, 2026-12-05)."""
    rows = [t.contiguous() if t is not None and t.dim() == 2 and t.stride(1) != 1 and
            sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n) > MAX_OFFSET[0] else t for t in rows]
    M = rows[0].shape[0]
    for t in rows:
        if t is not None and t.stride(0) > width:
            width = t.stride(0)
    step = max(1, MAX_OFFSET[0] // max(width, 1))
    if not symbolic(M):
        if M <= step:
            return call(*rows)
    elif guard_or_true(M <= step):  # symbolic: a row count that depends on data runs as one block, checked when it runs
        # without a message: a strict torch.export put the message function in its graph and failed on it ("'function'
        # object has no attribute 'is_quantized'", torch 2.13), and under dynamo the lambda could not be pickled into
        # the AOTAutograd cache key, which every checkpointed compile then skipped with a logged traceback (an
        # exploratory test, 2026-12-07; dynamo takes no module function there: "Can't extract message")
        torch._check(M <= step)
        return call(*rows)
    return torch.cat([call(*(t if t is None else t[i:i + step] for t in rows)) for i in range(0, M, step)])


# A layer's input that is a product a * b (the down projection's act(gate) * up in a Llama-style MLP, the layer's
# largest activation) need not be saved: autograd keeps a and b for the product's own backward, which runs after the
# layer's, so the layer's backward can multiply them again. A frozen nn.Linear saves no input at all; this keeps a fused
# layer at that footprint (-M * 5632 * 2 bytes a decoder layer at Llama 1b shapes, 92 MB for 8192 tokens), for one
# elementwise product in backward. PEFTKERN_RECOMPUTE_PRODUCT_INPUT=0 saves the input as it is.
RECOMPUTE_PRODUCT_INPUT = os.environ.get("PEFTKERN_RECOMPUTE_PRODUCT_INPUT", "1") != "0"
_VIEW_NODES = ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0")


def saved_tensor_hooks_set() -> Optional[bool]:
    """Whether saved-tensor hooks decide what autograd saves here (activation checkpointing, offloading); None where
    this torch cannot tell."""
    top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return None if top_hooks is None else top_hooks(False) is not None


def product_source(x: Tensor):
    """The autograd node of a product a * b of which x is a view of the same size, unchanged since (version 0), when
    that node keeps both a and b and nothing else decides what autograd saves (saved-tensor hooks, as activation
    checkpointing and offloading install, around the op or around the product alone, or a graph being compiled):
    then `recompute_product` gives x back in backward. Else None."""
    if not RECOMPUTE_PRODUCT_INPUT or not x.requires_grad or torch.compiler.is_compiling():
        return None
    if saved_tensor_hooks_set() is not False:
        return None
    if x._version != 0:  # changed in place since (under no_grad, or a product made by mul_): not what a * b gives
        return None
    node = x.grad_fn
    while node is not None and type(node).__name__ in _VIEW_NODES:
        node = node.next_functions[0][0]
    if node is None or type(node).__name__ != "MulBackward0":
        return None
    for raw in (getattr(node, "_raw_saved_self", None), getattr(node, "_raw_saved_other", None)):
        # the product's own operands under saved-tensor hooks (the product alone checkpointed, or offloaded): they
        # are the hooks' to unpack, once, in the product's backward (a checkpoint refuses a second unpack)
        if raw is None or getattr(raw, "unpack_hook", True) is not None:
            return None
    try:
        a, b = node._saved_self, node._saved_other
    except (AttributeError, RuntimeError):
        return None
    if a is None or b is None or a.dtype != x.dtype or b.dtype != x.dtype:
        return None
    if torch.broadcast_shapes(a.shape, b.shape).numel() != x.numel():
        return None
    return node


def input_link(x: Tensor) -> Optional[Tensor]:
    """For a backward that keeps no x: a tensor of no elements that autograd makes from x (a copy, so it holds none of
    x's memory), for first_order to tie the one gradient that depends on x to (ctx.links_of). Differentiating that
    gradient with respect to x, or to what x was made from, then raises instead of giving None / zeros: LoRA with A and
    the weight frozen and IA3's output form keep no x, and autograd.grad of dB or dl with respect to x was None,
    jacobian zeros (an exploratory test, 2026-12-07). Tied to every gradient, it made a penalty on dx raise, which does
    not depend on x and came back right before (a review of the change). None where x needs no gradient, or under
    torch.compile, whose backward runs no first_order. ~2.5 us of host time a call."""
    if not x.requires_grad or torch.compiler.is_compiling():
        return None
    with torch.enable_grad():  # inside an autograd.Function's forward grad mode is off
        return torch.narrow_copy(x, 0, 0, 0)


def product_operands(node) -> tuple:
    """The operands a product's node keeps (none for None). A backward that multiplies them again depends on them,
    which a second-order gradient must see (first_order)."""
    if node is None:
        return ()
    try:
        return node._saved_self, node._saved_other
    except RuntimeError as err:  # an operand changed in place since, or the product's backward freed them already
        raise RuntimeError(
            "peftkern: the layer's input was a product a * b, which the op does not save but multiplies again in "
            "backward from the operands autograd keeps for the product; those can no longer be read (" + str(err)
            + "). Set PEFTKERN_RECOMPUTE_PRODUCT_INPUT=0 to save the input instead.") from err


def recompute_product(node, shape: torch.Size) -> Tensor:
    """The product product_source found, from the operands its node keeps, in the saved input's shape."""
    a, b = product_operands(node)
    return (a * b).reshape(shape)


# A Function's nn.Parameter inputs (the frozen weight, the adapters) are kept for backward on ctx by reference, not
# through save_for_backward: every saved tensor goes through the saved-tensor hooks installed at the time, and under
# activation checkpointing (non-reentrant: transformers' gradient_checkpointing_enable, torch.utils.checkpoint) those
# are Python functions, two when the forward runs and again when it is recomputed, and one more in backward. For a
# module's own parameters they only cost the host: the module holds them anyway, and what the checkpoint recomputes
# is the same tensor. Their version counters are recorded and checked in backward (parameters_back), as
# save_for_backward's would be, so an in-place change between forward and backward still raises. Under torch.compile,
# and where any input is not a Parameter (a cast copy under autocast, a view), everything goes through
# save_for_backward as before. PEFTKERN_PARAMS_ON_CTX=0 saves them all.
PARAMS_ON_CTX = [os.environ.get("PEFTKERN_PARAMS_ON_CTX", "1") != "0"]  # a list: scripts/step_ab.py switches it


def keep_parameters(*params: Tensor) -> Optional[tuple]:
    """(params, their versions) to keep on a Function's ctx where every one is an nn.Parameter or None, eager; else
    None: the caller saves them with save_for_backward."""
    if not PARAMS_ON_CTX[0] or torch.compiler.is_compiling():
        return None
    for p in params:
        if p is not None and not isinstance(p, torch.nn.Parameter):
            return None
    return params, tuple(None if p is None else p._version for p in params)


def parameters_back(kept: tuple, op: str) -> tuple:
    """keep_parameters' tensors in backward, after the check that none was modified in place since the forward."""
    params, versions = kept
    for i, p in enumerate(params):
        if p is not None and p._version != versions[i]:
            raise RuntimeError(
                f"{op}: one of the variables needed for gradient computation has been modified by an inplace "
                f"operation: a Parameter of shape {tuple(p.shape)} is at version {p._version}; expected version "
                f"{versions[i]} instead (it was changed between the forward and the backward)")
    return params


def save_with_parameters(ctx, tensors: tuple, params: tuple) -> None:
    """ctx.save_for_backward(*tensors, *params), with params kept on ctx instead where keep_parameters takes them."""
    ctx.kept_params = keep_parameters(*params)
    ctx.saved_count = len(tensors)
    if ctx.kept_params is None:
        ctx.save_for_backward(*tensors, *params)
    else:
        ctx.save_for_backward(*tensors)


def saved_with_parameters(ctx, op: str) -> tuple:
    """(tensors, params) as save_with_parameters stored them; params kept on ctx are version-checked first."""
    saved = ctx.saved_tensors
    if ctx.kept_params is None:
        return saved[:ctx.saved_count], saved[ctx.saved_count:]
    return saved, parameters_back(ctx.kept_params, op)


def draw_seed() -> Tensor:
    """A dropout seed from torch's default generator: reproducible under torch.manual_seed, and the same
    on activation-checkpointing recomputation (which restores the RNG state)."""
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64)


_BACKEND_MODULES = {
    "triton": "peftkern.kernels.triton.{op}",
    "cuda": "peftkern.kernels.cuda",
    "torch": "peftkern.reference",
}


def backend_module(backend: str, op: str):
    """The module implementing `op` on `backend` (kernels.triton.<op>, kernels.cuda or reference)."""
    module = _modules.get((backend, op))
    if module is None:  # imported once: import_module and the name's formatting cost ~1.5 us a call
        module = _modules[backend, op] = importlib.import_module(_BACKEND_MODULES[backend].format(op=op))
    return module


_modules: dict = {}


_nvtx_enabled = os.environ.get("PEFTKERN_NVTX", "0") == "1"


def set_nvtx(enabled: bool) -> bool:
    """Wrap every peftkern op in an NVTX range named after it (peftkern::lora_fwd, ...), for Nsight Systems.
    Off by default; PEFTKERN_NVTX=1 turns it on at import. Returns the setting it replaced."""
    global _nvtx_enabled
    previous, _nvtx_enabled = _nvtx_enabled, bool(enabled)
    return previous


@contextlib.contextmanager
def _nvtx_and_profiler_range(name: str):
    with torch.cuda.nvtx.range(name), torch.profiler.record_function(name):
        yield


def op_range(name: str):
    """Name an op's body for the tools: an NVTX range when set_nvtx(True) (Nsight Systems), a profiler range
    while torch.profiler runs (peftkern.profile attributes the kernels inside to peftkern), both where both are on
    (the NVTX range alone hid the op from peftkern.profile, whose default turns NVTX on), else nothing."""
    profiling = torch.autograd.profiler._is_profiler_enabled
    if _nvtx_enabled and torch.cuda.is_available():
        return _nvtx_and_profiler_range(name) if profiling else torch.cuda.nvtx.range(name)
    if profiling:
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


warn_once = _backend.warn_once


def pick_backend(op: str, x: Tensor, *operands: Optional[Tensor]) -> str:
    """The backend for this call, falling back to the reference (with one warning per cause) where the
    fast path's conditions do not hold: x of a dtype the kernels lack, or x or one of the other tensor operands
    (None where absent) a tensor subclass or not strided (sparse). The kernels read every operand through its data
    pointer: a wrapper subclass (a quantised weight's) has none, and a weight, adapter or vector of one crashed
    inside the launch where only x was checked (a review, 2026-12-05)."""
    backend = _backend.resolve(op, x.device)
    if backend == "torch":
        return backend
    if x.dtype not in KERNEL_DTYPES:
        warn_once(f"{op}-dtype-{x.dtype}", f"peftkern {op}: {x.dtype} inputs run on the reference path")
        return "torch"
    # one pass over the operands (the eager hot path): a subclass anywhere is the cause named, else the first
    # operand that is not strided
    plain = _TRACED_PLAIN_TYPES if torch.compiler.is_compiling() else _PLAIN_TYPES
    unstrided = None
    for t in (x, *operands):
        if t is None:
            continue
        if type(t) not in plain:
            warn_once(f"{op}-subclass-{type(t).__name__}",
                      f"peftkern {op}: tensor subclass {type(t).__name__} runs on the reference path")
            return "torch"
        if unstrided is None and t.layout != torch.strided:
            unstrided = t
    if unstrided is not None:
        warn_once(f"{op}-layout-{unstrided.layout}",
                  f"peftkern {op}: {unstrided.layout} tensors run on the reference path")
        return "torch"
    return backend


# A plain operand's class. Traced by make_fx or a non-strict torch.export, a plain operand is a FakeTensor or a
# functional wrapper; dynamo shows each operand's own class, a subclass's (a DTensor, a quantised weight) included.
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)
_TRACED_PLAIN_TYPES = (*_PLAIN_TYPES, FakeTensor, FunctionalTensor)


def subclass_operand(*operands: Optional[Tensor]) -> Optional[Tensor]:
    """The first of the tensor operands (None where absent) that is a tensor subclass, or None."""
    plain = _TRACED_PLAIN_TYPES if torch.compiler.is_compiling() else _PLAIN_TYPES
    for t in operands:
        if t is not None and type(t) not in plain:
            return t
    return None


def traced_subclass(*operands: Optional[Tensor]) -> bool:
    """Whether a call under torch.compile has a tensor subclass among its operands (None where absent): it then runs
    the reference's torch ops, which the subclass traces as it traces F.linear. A registered op reached the subclass's
    __torch_dispatch__, which knows aten's operators only (a DTensor, a quantised weight): compiling failed
    ("NotImplementedError when running FX node") on every backend, where eager mode fell back (a review, 2026-12-06).
    Dynamo's test, which eager mode pays nothing for (torch.compiler.is_compiling took ~75 ns a call on this CPU)."""
    return torch.compiler.is_dynamo_compiling() and subclass_operand(*operands) is not None


class _Op:
    """An operator `ns::name` whose CPU and CUDA kernel is a Python function, for torch.compile: the graph holds the
    call whole (no graph break) and its fake implementation (`register_fake`) gives the outputs' shapes.

    The same as torch.library.custom_op(qualname, fn, mutates_args=()) for what peftkern needs, without its Python
    layers around every call: custom_op routes a call through an autograd kernel, a redispatch and an aliasing check,
    all in Python (13-23 us a call on the CI host, against 4-5 us for an operator defined here). A compiled training
    step calls two of them per fused layer, and the compiled fused step was bound by its host (NOTES-lora.md,
    thirteenth session). What that drops, peftkern does not use: the ops never carry autograd themselves (the
    autograd.Functions of ops/ call them and hold the backward; a call that needs a gradient through the op itself
    meets autograd's not-implemented fallback), and their outputs are new tensors (opcheck's test_schema checks it).
    """

    def __init__(self, qualname: str, fn) -> None:
        ns, name = qualname.split("::")
        lib = _libraries.get(ns)
        if lib is None:
            lib = _libraries[ns] = torch.library.Library(ns, "FRAGMENT")
        lib.define(name + torch.library.infer_schema(fn, mutates_args=()), tags=(torch.Tag.pt2_compliant_tag,))
        lib.impl(name, fn, "CompositeExplicitAutograd")
        self.qualname = qualname

    def register_fake(self, fake):
        """Register the fake (meta) implementation; a decorator, as custom_op's."""
        torch.library.register_fake(self.qualname)(fake)
        return fake

    def register_autograd(self, backward, *, setup_context) -> None:
        """Give the op its own autograd (torch.library.register_autograd), for graphs that call it outside an
        autograd.Function (COMPILED_OP_AUTOGRAD)."""
        torch.library.register_autograd(self.qualname, backward, setup_context=setup_context)


_libraries: dict = {}


def define_op(qualname: str, fn):
    """The registered operator `qualname` (e.g. "peftkern::lora_fwd") running fn; see _Op. With
    PEFTKERN_TORCH_CUSTOM_OP=1 at import, torch.library.custom_op's operator instead (what peftkern used before; kept
    for an A/B of the compiled step's host time on the GPU, which this session could not run)."""
    if os.environ.get("PEFTKERN_TORCH_CUSTOM_OP", "0") == "1":
        return torch.library.custom_op(qualname, fn, mutates_args=())
    return _Op(qualname, fn)


# Under torch.compile an op's forward custom op is called by itself, with autograd registered on it, instead of inside
# the op's autograd.Function. Activation checkpointing under compile tags every op of a checkpointed region to be
# recomputed in backward, and torch 2.11's tagging skipped the ops inside an autograd.Function: the partitioner then
# kept every fused layer's outputs for backward (bench e2e's compiled checkpointed LoRA step on an H200: 5073 MB at
# peak against PEFT's 2917; torch 2.13 tags them, scripts/diag_compiled_ckpt.py). Read at trace time; 0 turns it off.
COMPILED_OP_AUTOGRAD = [os.environ.get("PEFTKERN_COMPILED_OP_AUTOGRAD", "1") != "0"]


def op_autograd() -> bool:
    """Whether this call takes an op's forward custom op with its own autograd (COMPILED_OP_AUTOGRAD)."""
    return torch.compiler.is_compiling() and COMPILED_OP_AUTOGRAD[0]


def rows_of(x: Tensor, grad_y: Tensor) -> Tensor:
    """x, or a backward's stand-in for an x it does not read (one row of x's width and dtype, saved in place of x where
    no gradient needs x's data) broadcast to grad_y's rows with strides (0, 1): the backends read its shape, dtype and
    device only. It is passed as one row and broadcast in the op's body, so that a compiled graph holds no tensor of
    x's size (ops/ia3.py's _ia3_backward tells what such a broadcast buffer did under Inductor)."""
    return x.expand(grad_y.shape[0], x.shape[1]) if x.shape[0] != grad_y.shape[0] else x


def empty_like_none(t: Optional[Tensor], ref: Tensor) -> Tensor:
    """Custom ops cannot return None: an empty tensor stands for 'no gradient'."""
    return t if t is not None else ref.new_empty((0,))

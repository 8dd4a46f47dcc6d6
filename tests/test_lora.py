"""LoRA: every backend against reference.py, forward and backward, with fresh random inputs."""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    DEVICE,
    HAS_CUDA,
    INTERPRET,
    TOLERANCE,
    assert_close,
    backend_params,
    dtypes_for,
    rel_err,
    run_seed,
)

import peftkern
from peftkern import reference
from peftkern.nn import LoRALinear
from peftkern.ops._common import draw_seed

# (lead shape of x, K, N, r): M = 1, odd sizes that are multiples of no tile, 3-D inputs, ranks below and
# above the in-GEMM limit (r > 32 takes the separate down-projection path).
SHAPES = [((1,), 64, 48, 8), ((37,), 72, 40, 5), ((2, 9), 48, 80, 16), ((19,), 40, 36, 40)]
if HAS_CUDA:
    SHAPES += [((3, 129), 520, 264, 16), ((300,), 256, 1000, 64), ((16,), 4096, 4096, 16)]


def make_inputs(lead, K, N, r, dtype, *, bias=True, transposed=False, adapter_dtype=None, noncontig=False):
    g = torch.Generator().manual_seed(torch.randint(0, 2**31 - 1, ()).item())
    def rnd(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dt)
    if noncontig:
        x = rnd(*lead, 2 * K)[..., ::2]
    else:
        x = rnd(*lead, K)
    w = rnd(K, N, scale=K ** -0.5) if transposed else rnd(N, K, scale=K ** -0.5)
    adt = adapter_dtype or dtype
    A = rnd(r, K, dt=adt, scale=K ** -0.5)
    B = rnd(N, r, dt=adt, scale=r ** -0.5)
    b = rnd(N) if bias else None
    return x, w, A, B, b


def run_both(backend, x, w, A, B, b, scaling, transposed, dropout_p=0.0, grad_w=False):
    """The op on `backend` and reference.lora_linear (with the backend's dropout mask), with gradients."""
    leaves = [t.detach().clone().requires_grad_(t is not None) if t is not None else None for t in (x, A, B, b)]
    xr, Ar, Br, br = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, A, B, b)]
    xk, Ak, Bk, bk = leaves
    wk = w.detach().clone().requires_grad_(grad_w)
    wr = w.detach().clone().requires_grad_(grad_w)
    torch.manual_seed(run_seed(1234))
    y = peftkern.lora_linear(xk, wk, Ak, Bk, scaling, bk, dropout_p=dropout_p, weight_transposed=transposed)
    keep = None
    if dropout_p > 0:
        torch.manual_seed(run_seed(1234))
        seed = int(draw_seed())
        K = x.shape[-1]
        keep = peftkern.ops.lora_dropout_mask(seed, (x.numel() // K, K), dropout_p, x.device, backend)
        keep = keep.reshape(x.shape)
    y_ref = reference.lora_linear(xr, wr, Ar, Br, scaling, br, keep, dropout_p, transposed)
    dy = torch.randn_like(y_ref)
    y.backward(dy)
    y_ref.backward(dy)
    got = {"y": y, "dx": xk.grad, "dA": Ak.grad, "dB": Bk.grad}
    ref = {"y": y_ref, "dx": xr.grad, "dA": Ar.grad, "dB": Br.grad}
    if b is not None:
        got["dbias"], ref["dbias"] = bk.grad, br.grad
    if grad_w:
        got["dweight"], ref["dweight"] = wk.grad, wr.grad
    return got, ref


@pytest.mark.parametrize("backend", backend_params(), indirect=True)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}->{s[2]}r{s[3]}")
@pytest.mark.parametrize("variant", ["plain", "bias", "transposed", "noncontig"])
def test_matches_reference(backend, shape, variant, poison_empty):
    lead, K, N, r = shape
    for dtype in dtypes_for(backend):
        x, w, A, B, b = make_inputs(lead, K, N, r, dtype, bias=variant == "bias",
                                    transposed=variant == "transposed", noncontig=variant == "noncontig")
        got, ref = run_both(backend, x, w, A, B, b, 1.7, variant == "transposed")
        for name in ref:
            assert got[name].dtype == ref[name].dtype, f"{name}: dtype {got[name].dtype} != {ref[name].dtype}"
            assert_close(got[name], ref[name], dtype, f"{backend} {dtype} {name}")


@pytest.mark.parametrize("backend", backend_params(), indirect=True)
def test_fp32_adapters_beside_16bit_base(backend):
    dtype = torch.bfloat16 if HAS_CUDA else torch.float16
    if dtype not in dtypes_for(backend):
        pytest.skip(f"{dtype} not testable on {backend} here")
    x, w, A, B, b = make_inputs((2, 21), 64, 48, 8, dtype, adapter_dtype=torch.float32)
    got, ref = run_both(backend, x, w, A, B, b, 2.0, False)
    assert got["y"].dtype == dtype
    assert got["dA"].dtype == torch.float32 and got["dB"].dtype == torch.float32
    for name in ref:
        assert_close(got[name], ref[name], dtype, name)


# Rows that reach each forward path: decode (M <= 16), the fused Triton GEMM, and on a GPU cuBLAS's add mode and
# the persistent kernel (from 512 rows).
XA_ROWS = [3, 40] + ([300, 1024] if HAS_CUDA else [])


@pytest.mark.parametrize("backend", backend_params(), indirect=True)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("adapter_dtype", [None, torch.float32], ids=["same", "fp32-adapters"])
def test_saved_xa_has_the_dtype_the_fake_promises(backend, dropout_p, adapter_dtype):
    """xa, which the forward saves, comes in the backend's lora_xa_dtype on every forward path (x's own on Triton
    without dropout), and the custom op's fake implementation says the same (opcheck compares them), so
    torch.compile's graph and the eager op agree. Its values are x A^T's, to the rounding of that dtype."""
    module = peftkern.ops._common.backend_module(backend, "lora")
    for dtype in dtypes_for(backend):
        for M in XA_ROWS:
            x, w, A, B, _ = make_inputs((M,), 256, 128, 16, dtype, bias=False, adapter_dtype=adapter_dtype)
            seed = torch.tensor(7) if dropout_p > 0 else None
            args = (x, w, A, B, None, seed, 0.5, dropout_p, False, backend)
            torch.library.opcheck(torch.ops.peftkern.lora_fwd, args, test_utils=("test_schema", "test_faketensor"))
            _, xa = torch.ops.peftkern.lora_fwd(*args)
            assert xa.dtype == module.lora_xa_dtype(dtype, dropout_p), f"{backend} {dtype} M={M} p={dropout_p}"
            if backend == "triton" and dropout_p == 0.0 and dtype != torch.float32:
                assert xa.dtype == dtype, f"triton keeps a 16-bit xa in x's dtype, got {xa.dtype}"
            if dropout_p == 0.0:
                xa_ref = x.double() @ A.double().t()
                assert_close(xa, xa_ref, dtype, f"xa {backend} {dtype} M={M}")


@pytest.mark.parametrize("backend", backend_params(), indirect=True)
@pytest.mark.parametrize("r", [8, 40])
def test_dropout_matches_reference_with_the_same_mask(backend, r):
    dtype = torch.float32
    x, w, A, B, b = make_inputs((45,), 64, 56, r, dtype)
    got, ref = run_both(backend, x, w, A, B, b, 0.5, False, dropout_p=0.3)
    for name in ref:
        assert_close(got[name], ref[name], dtype, name)


@pytest.mark.parametrize("backend", backend_params(), indirect=True)
def test_dropout_mask_has_no_structure(backend):
    """Rows, columns and seeds draw independently: a mask that repeats across rows or tiles (a hash that ignores the
    row) passed every other dropout test, which build their references from the backend's own mask. Bounds ~6 sigma."""
    M, K, p = 256, 192, 0.5
    seed = run_seed()
    keep = peftkern.ops.lora_dropout_mask(seed, (M, K), p, DEVICE, backend).cpu().float()
    rows, cols = keep.mean(1), keep.mean(0)
    assert 0.025 < rows.std().item() < 0.05, f"row kept fractions' spread {rows.std():.4f}, binomial 0.036"
    assert 0.02 < cols.std().item() < 0.045, f"column kept fractions' spread {cols.std():.4f}, binomial 0.031"
    for lag in (1, 2, 16, 32, 64, 128):  # rows this far apart agree half the time, as independent draws do
        agree = (keep[lag:] == keep[:-lag]).float().mean().item()
        assert abs(agree - 0.5) < 0.02, f"rows {lag} apart agree in {agree:.4f} of the columns"
    for lag in (1, 2, 16, 32, 64):
        agree = (keep[:, lag:] == keep[:, :-lag]).float().mean().item()
        assert abs(agree - 0.5) < 0.02, f"columns {lag} apart agree in {agree:.4f} of the rows"
    # every bit of the seed (draw_seed's 31) counts: a kernel that took seed % 2**16 gave one mask to s and s + 2**16,
    # and these tests passed with it (an audit of the tests, 2026-12-05)
    for another in (seed ^ 1, seed ^ 2**16, seed ^ 2**30):
        other = peftkern.ops.lora_dropout_mask(another, (M, K), p, DEVICE, backend).cpu().float()
        agree = (keep == other).float().mean().item()
        assert abs(agree - 0.5) < 0.015, f"the masks of seeds {seed} and {another} agree in {agree:.4f}"


@pytest.mark.parametrize("backend", backend_params(), indirect=True)
def test_dropout_mask_statistics_and_reproducibility(backend):
    p = 0.25
    keep = peftkern.ops.lora_dropout_mask(77, (128, 96), p, DEVICE, backend)
    frac = keep.float().mean().item()
    # 12288 Bernoulli(0.75) draws: the std of the mean is 0.004.
    assert abs(frac - (1 - p)) < 0.02, f"kept fraction {frac:.4f}, expected {1 - p}"
    again = peftkern.ops.lora_dropout_mask(77, (128, 96), p, DEVICE, backend)
    assert torch.equal(keep, again), "the same seed must give the same mask"
    other = peftkern.ops.lora_dropout_mask(78, (128, 96), p, DEVICE, backend)
    assert not torch.equal(keep, other), "another seed must give another mask"
    x, w, A, B, _ = make_inputs((33,), 64, 40, 8, torch.float32)
    outs = []
    for _ in range(2):
        torch.manual_seed(run_seed(5))
        outs.append(peftkern.lora_linear(x, w, A, B, 1.0, dropout_p=p))
    assert torch.equal(outs[0], outs[1]), "dropout must be reproducible under torch.manual_seed"
    assert torch.equal(peftkern.lora_linear(x, w, A, B, 1.0, dropout_p=p, training=False),
                       peftkern.lora_linear(x, w, A, B, 1.0)), "eval mode must not drop"


@pytest.mark.parametrize("eager_split", [False, True], ids=["whole", "split"])
@pytest.mark.parametrize("backend", backend_params(), indirect=True)
def test_dropout_under_activation_checkpointing(backend, eager_split, monkeypatch):
    """With EAGER_SPLIT too (ops/lora.py), where the adapters here, plain tensors, are saved by the product."""
    from torch.utils.checkpoint import checkpoint

    from peftkern.ops import lora as lora_ops

    monkeypatch.setattr(lora_ops, "EAGER_SPLIT", [eager_split])
    x, w, A, B, b = make_inputs((40,), 64, 48, 8, torch.float32)
    grads = []
    for use_ckpt in (False, True):
        Ai = A.detach().clone().requires_grad_()
        xi = x.detach().clone().requires_grad_()
        torch.manual_seed(run_seed(11))
        fn = lambda inp: torch.tanh(peftkern.lora_linear(inp, w, Ai, B, 1.0, b, dropout_p=0.4))
        y = checkpoint(fn, xi, use_reentrant=False) if use_ckpt else fn(xi)
        y.square().sum().backward()
        grads.append((xi.grad, Ai.grad))
    assert torch.allclose(grads[0][0], grads[1][0]) and torch.allclose(grads[0][1], grads[1][1]), \
        "checkpoint recomputation must redraw the same dropout mask"


def _module_grads(layer, x, use_ckpt):
    from torch.utils.checkpoint import checkpoint

    layer.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_()
    packed = []

    def pack(t):
        packed.append(t)
        return t

    fn = lambda inp: torch.tanh(layer(inp))  # noqa: E731
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = checkpoint(fn, xi, use_reentrant=False) if use_ckpt else fn(xi)
    y.square().sum().backward()
    return (xi.grad, layer.lora_A.grad, layer.lora_B.grad), len(packed)


@pytest.mark.parametrize("backend", backend_params(), indirect=True)
@pytest.mark.parametrize("use_ckpt", [False, True], ids=["plain", "checkpointed"])
def test_parameters_kept_on_ctx_give_the_saved_gradients(backend, use_ckpt, monkeypatch):
    """A module's Parameters ride on ctx (ops._common.keep_parameters): same gradients as with every input saved,
    fewer tensors through the saved-tensor hooks (those checkpointing installs are Python)."""
    from peftkern.ops import _common

    dtype = dtypes_for(backend)[-1]
    layer = LoRALinear(64, 48, r=8, bias=True, device=DEVICE, dtype=dtype)
    torch.nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(2, 20, 64, device=DEVICE, dtype=dtype)
    kept, n_kept = _module_grads(layer, x, use_ckpt)
    monkeypatch.setattr(_common, "PARAMS_ON_CTX", [False])
    saved, n_saved = _module_grads(layer, x, use_ckpt)
    for got, ref, name in zip(kept, saved, ("dx", "dA", "dB")):
        assert torch.equal(got, ref), f"{name}: the Parameters kept on ctx gave another gradient"
    if not use_ckpt:  # (a checkpoint's own hooks take every save inside it: the outer ones see its input only)
        assert n_kept == n_saved - 3, f"the weight, A and B should skip the hooks: {n_kept} vs {n_saved} packed"


@pytest.mark.parametrize("backend", backend_params(), indirect=True)
@pytest.mark.parametrize("on_ctx", [True, False], ids=["on-ctx", "saved"])
def test_parameter_changed_in_place_before_backward_raises(backend, on_ctx, monkeypatch):
    from peftkern.ops import _common

    monkeypatch.setattr(_common, "PARAMS_ON_CTX", [on_ctx])
    layer = LoRALinear(32, 24, r=4, device=DEVICE)
    y = layer(torch.randn(5, 32, device=DEVICE, requires_grad=True))
    with torch.no_grad():
        layer.lora_A.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def _op_node(y):
    """The LoRA Function's node (its ctx) behind the output y, through the reshape lora_linear ends with."""
    node = y.grad_fn
    while type(node).__name__ != "LoRALinearFunctionBackward":
        node = node.next_functions[0][0]
    return node


@pytest.mark.parametrize("backend", backend_params(), indirect=True)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_a_product_input_is_recomputed_not_saved(backend, dropout_p, monkeypatch):
    """The MLP's down projection gets h = act(gate) * up, whose operands autograd keeps for the product's backward: the
    op saves no copy of h (a frozen linear saves none either) and multiplies again in backward, with the gradients of
    the saved path exactly. Not where the product keeps one operand (a frozen factor, as RMSNorm's weight), nor under
    saved-tensor hooks (activation checkpointing decides there). The one Function's path: EAGER_SPLIT off."""
    from torch.utils.checkpoint import checkpoint

    from peftkern.ops import _common
    from peftkern.ops import lora as lora_ops

    monkeypatch.setattr(lora_ops, "EAGER_SPLIT", [False])
    dtype = dtypes_for(backend)[-1]
    g0 = torch.randn(3, 29, 72).to(DEVICE, dtype)
    u0 = torch.randn(3, 29, 72).to(DEVICE, dtype)
    _, w, A, B, b = make_inputs((1,), 72, 40, 8, dtype)

    def run(recompute, frozen_up=False, ckpt=False):
        monkeypatch.setattr(_common, "RECOMPUTE_PRODUCT_INPUT", recompute)
        g, u = g0.clone().requires_grad_(), u0.clone().requires_grad_(not frozen_up)
        Ai, Bi = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
        torch.manual_seed(run_seed(5))
        saved = []

        def layer(g, u):
            h = torch.nn.functional.silu(g) * u
            y = peftkern.lora_linear(h, w, Ai, Bi, 0.8, b, dropout_p=dropout_p)
            node = _op_node(y)
            kept = ckpt or any(t is not None and t.data_ptr() == h.data_ptr() for t in node.saved_tensors)
            assert kept == (node.x_source is None), "the op saves x exactly when it cannot recompute it"
            saved.append(node.x_source is None)
            return y

        y = checkpoint(layer, g, u, use_reentrant=False) if ckpt else layer(g, u)
        y.square().sum().backward()
        return saved[0], [t.grad for t in (g, u, Ai, Bi) if t.grad is not None]

    saved_plain, grads_plain = run(False)
    assert saved_plain, "without the recomputation the op saves its input"
    saved, grads = run(True)
    assert not saved, "the product's storage is saved by the op"
    assert len(grads) == len(grads_plain) == 4
    for got, ref in zip(grads, grads_plain):
        assert torch.equal(got, ref), "the recomputed input must give the saved path's gradients exactly"
    saved, grads = run(True, frozen_up=True)
    assert saved and len(grads) == 3, "a product that keeps one operand only: the input is saved"
    saved, grads = run(True, ckpt=True)
    assert saved, "under checkpointing's saved-tensor hooks the op saves as usual"
    for got, ref in zip(grads, grads_plain):
        assert_close(got, ref, dtype, "checkpointed")


@pytest.mark.parametrize("backend", backend_params(), indirect=True)
def test_a_product_input_is_saved_where_recomputing_it_would_go_wrong(backend):
    """Where a * b is not what the op read, or its operands are not the op's to unpack, the op saves its input and
    gives torch's gradients (a review found each of these, 2026-12-05): the product changed in place under no_grad
    (dA used the old product: 55 off), the product alone checkpointed (non-reentrant: the forward unpacked its
    operands and backward raised CheckpointError), a second-order gradient through the recomputed product (None for
    the factors instead of the once-differentiable error), and an operand changed after the forward (a clear error)."""
    from torch.utils.checkpoint import checkpoint

    dtype = dtypes_for(backend)[-1]
    g0, u0 = (torch.randn(3, 11, 48).to(DEVICE, dtype) for _ in range(2))
    _, w, A0, B0, b = make_inputs((1,), 48, 40, 8, dtype)

    def grads(edit, fused):
        g, u = g0.clone().requires_grad_(), u0.clone().requires_grad_()
        A, B = A0.clone().requires_grad_(), B0.clone().requires_grad_()
        if edit == "checkpointed":
            h = checkpoint(lambda g, u: torch.nn.functional.silu(g) * u, g, u, use_reentrant=False)
        else:
            h = torch.nn.functional.silu(g) * u
        if edit == "in-place":
            with torch.no_grad():
                h.mul_(3.0).clamp_(-1.0, 1.0)
        y = (peftkern.lora_linear(h, w, A, B, 0.7, b) if fused
             else reference.lora_linear(h, w, A, B, 0.7, b))
        y.square().sum().backward()
        return [t.grad for t in (g, u, A, B)]

    for edit in ("in-place", "checkpointed"):
        for got, ref in zip(grads(edit, True), grads(edit, False)):
            assert_close(got, ref, dtype, edit)

    g, u = g0.clone().requires_grad_(), u0.clone().requires_grad_()
    A = A0.clone().requires_grad_()
    y = peftkern.lora_linear(torch.nn.functional.silu(g) * u, w, A, B0, 0.7, b)
    (dA,) = torch.autograd.grad(y.sum(), A, create_graph=True)  # a constant grad output: no path to g through it
    with pytest.raises(RuntimeError, match="once_differentiable"):
        torch.autograd.grad(dA.sum(), g, allow_unused=True)

    g, u = g0.clone().requires_grad_(), u0.clone().requires_grad_()
    A, B = A0.clone().requires_grad_(), B0.clone().requires_grad_()
    y = peftkern.lora_linear(g * u, w, A, B, 0.7, b)
    with torch.no_grad():
        u.add_(1.0)
    with pytest.raises(RuntimeError, match="PEFTKERN_RECOMPUTE_PRODUCT_INPUT=0"):
        torch.autograd.grad(y.sum(), A)
    # with A frozen backward reads no x (test_frozen_a_keeps_no_copy_of_the_input): nothing is multiplied again, and
    # dB = s dy^T xa is the forward's
    y = peftkern.lora_linear(g * u, w, A0, B, 0.7, b)
    expected = reference.lora_linear(g * u, w, A0, B, 0.7, b)
    with torch.no_grad():
        u.add_(1.0)
    assert_close(torch.autograd.grad(y.sum(), B)[0], torch.autograd.grad(expected.sum(), B)[0], dtype, "dB, A frozen")


@pytest.mark.parametrize("backend", backend_params(), indirect=True)
def test_unfrozen_weight_gets_its_gradient(backend):
    x, w, A, B, b = make_inputs((30,), 48, 40, 8, torch.float32, transposed=True)
    got, ref = run_both(backend, x, w, A, B, b, 1.0, True, grad_w=True)
    assert_close(got["dweight"], ref["dweight"], torch.float32, "dweight")


@pytest.mark.parametrize("backend", backend_params(), indirect=True)
@pytest.mark.parametrize("transposed", [False, True])
def test_merge_unmerge(backend, transposed):
    for dtype in dtypes_for(backend):
        x, w, A, B, b = make_inputs((17,), 64, 40, 8, dtype, transposed=transposed)
        w0 = w.clone()
        delta = 0.9 * (B.double() @ A.double())  # (N, K), in float64 here (the torch backend's merge is reference.py's)
        expected = w0.double() + (delta.t() if transposed else delta)
        peftkern.lora_merge_(w, A, B, 0.9, 1.0, transposed)
        assert_close(w, expected, dtype, "merged weight")
        peftkern.lora_merge_(w, A, B, 0.9, -1.0, transposed)
        # merge then unmerge rounds twice to the weight's dtype: within a few ulps of the original.
        assert_close(w, w0, dtype, "unmerged weight", scale=0.5)


def test_layer_from_linear_merge_and_properties():
    torch.manual_seed(run_seed(0))
    dtype = torch.float32
    lin = torch.nn.Linear(64, 48).to(DEVICE, dtype)
    layer = LoRALinear.from_linear(lin, r=8, alpha=16, dropout=0.1)
    assert layer.weight is lin.weight and not layer.weight.requires_grad, "the frozen weight is shared, not copied"
    assert layer.scaling == 2.0
    assert torch.count_nonzero(layer.lora_B) == 0, "B starts at zero (PEFT's init)"
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in=64
    assert layer.lora_A.abs().max() <= bound + 1e-6 and layer.lora_A.std() > bound / 4
    x = torch.randn(5, 7, 64, device=DEVICE, dtype=dtype)
    layer.eval()
    assert torch.allclose(layer(x), lin(x), atol=1e-5), "a fresh adapter leaves the output unchanged"
    with torch.no_grad():
        layer.lora_B.normal_()
    y = layer(x)
    layer.merge()
    assert layer.merged
    assert rel_err(layer(x), y) < TOLERANCE[dtype] * 10
    layer.unmerge()
    assert rel_err(layer(x), y) < TOLERANCE[dtype] * 10
    props = layer.peft_ref.as_dict()
    assert props["insertion_form"].startswith("parallel") and "scaled addition" in props["integration_form"]
    assert set(p.shape for p in layer.parameters() if p.requires_grad) == {(8, 64), (48, 8)}


def test_layer_from_gpt2_conv1d():
    """GPT-2's Conv1D stores W as (K, N): the layer starts as the Conv1D, and with a trained B it computes
    conv(x) + s x A^T B^T, forward and gradients."""
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(48, 64).to(DEVICE)
    torch.nn.init.normal_(conv.weight, std=0.02)
    torch.nn.init.normal_(conv.bias)
    layer = LoRALinear.from_linear(conv, r=4, alpha=8)
    assert layer.weight_transposed and layer.weight is conv.weight
    x = torch.randn(3, 64, device=DEVICE)
    assert_close(layer(x), conv(x), torch.float32, "at init")
    torch.nn.init.normal_(layer.lora_B)
    dy = torch.randn(3, 48, device=DEVICE)
    layer(x).backward(dy)
    A, B = (t.detach().clone().requires_grad_() for t in (layer.lora_A, layer.lora_B))
    expected = conv(x) + 2.0 * (x @ A.t()) @ B.t()
    expected.backward(dy)
    assert_close(layer(x), expected, torch.float32, "trained")
    assert_close(layer.lora_A.grad, A.grad, torch.float32, "dA")
    assert_close(layer.lora_B.grad, B.grad, torch.float32, "dB")


BAD = [
    (dict(x=torch.randn(4, 10)), ValueError, "x's last dimension"),
    (dict(lora_A=torch.randn(0, 8)), ValueError, "rank must be at least 1"),
    (dict(lora_A=torch.randn(4, 9)), ValueError, "lora_A must be"),
    (dict(lora_B=torch.randn(6, 3)), ValueError, "lora_B must be"),
    (dict(bias=torch.randn(5)), ValueError, "bias must be"),
    (dict(x=torch.randint(0, 3, (4, 8))), TypeError, "x must be a floating tensor"),
    (dict(weight=torch.randn(6, 8, dtype=torch.float64)), TypeError, "share a dtype"),
    (dict(lora_A=torch.randn(4, 8, 2)), ValueError, "lora_A must have 2"),
    (dict(scaling="2"), TypeError, "scaling must be a number"),
    (dict(dropout_p=1.0), ValueError, "dropout_p must be < 1"),
]


@pytest.mark.parametrize("backend", backend_params(), indirect=True)
@pytest.mark.parametrize("override,exc,message", BAD, ids=[b[2] for b in BAD])
def test_bad_input_is_named(backend, override, exc, message):
    args = dict(x=torch.randn(4, 8), weight=torch.randn(6, 8), lora_A=torch.randn(4, 8),
                lora_B=torch.randn(6, 4), scaling=1.0, bias=torch.randn(6), dropout_p=0.0)
    args.update(override)
    args = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    with pytest.raises(exc, match=message):
        peftkern.lora_linear(**args)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device to mix devices")
def test_mixed_devices_are_named():
    with pytest.raises(ValueError, match="one device"):
        peftkern.lora_linear(torch.randn(4, 8, device="cuda"), torch.randn(6, 8, device="cuda"),
                             torch.randn(2, 8), torch.randn(6, 2, device="cuda"), 1.0)


def test_reference_gradcheck_float64():
    g = torch.Generator().manual_seed(run_seed(3))
    x = torch.randn(5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64, generator=g)
    A = torch.randn(3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    B = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    peftkern.set_backend("torch")
    try:
        assert torch.autograd.gradcheck(lambda *t: peftkern.lora_linear(t[0], w, t[1], t[2], 0.8, t[3]),
                                        (x, A, B, b))
    finally:
        peftkern.set_backend(None)


def test_reference_backward_formulas_match_autograd():
    g = torch.Generator().manual_seed(run_seed(4))
    x = torch.randn(7, 6, dtype=torch.float64, generator=g)
    w = torch.randn(6, 5, dtype=torch.float64, generator=g)
    A = torch.randn(3, 6, dtype=torch.float64, generator=g)
    B = torch.randn(5, 3, dtype=torch.float64, generator=g)
    leaves = [t.clone().requires_grad_() for t in (x, w, A, B)]
    keep = reference.dropout_mask(9, (7, 6), 0.3, x.device)
    y = reference.lora_linear(leaves[0], leaves[1], leaves[2], leaves[3], 0.6, None, keep, 0.3, True)
    dy = torch.randn(7, 5, dtype=torch.float64, generator=g)
    y.backward(dy)
    _, xa = reference.lora_forward(x, w, A, B, 0.6, None, 0.3, 9, True)
    dx, da, db, _, dw = reference.lora_backward(dy, x, w, A, B, xa, 0.6, 0.3, 9, True, (1, 1, 1, 0, 1))
    for name, got, leaf in (("dx", dx, leaves[0]), ("dw", dw, leaves[1]), ("dA", da, leaves[2]),
                            ("dB", db, leaves[3])):
        assert torch.allclose(got, leaf.grad, atol=1e-12), name


@pytest.mark.skipif(not (HAS_CUDA or __import__("os").environ.get("TRITON_INTERPRET") == "1"),
                    reason="needs a GPU or the Triton interpreter")
@pytest.mark.parametrize("w_layout", ["k-major", "n-major"])
@pytest.mark.parametrize("rank", [8, 16, 24, 72, 128])
@pytest.mark.parametrize("epilogue", ["whole-rank", "slices", "xa-inside"])
def test_persistent_forward_matches_reference(w_layout, rank, epilogue, poison_empty):
    """The persistent forward kernel (low-rank epilogue inside the GEMM, x A^T from cuBLAS or inside): y and xa, with
    and without bias, on shapes that fill no tile, with more tiles than programs, and through lora_forward's
    mode="persistent" (which falls back where the kernel does not apply: dropout). Unflattened, the epilogue adds
    the whole rank at once (the default above 64); flattened, ranks above 64 are added in a loop over slices of 64
    (72: a full slice and a partial one); xa made inside the kernel refuses them."""
    from peftkern.kernels.triton import lora as kl

    cfg = kl._persistent_config(4096, rank) if HAS_CUDA and not INTERPRET else dict(
        BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, FLATTEN=False, SUBTILE=True, num_warps=4, num_stages=1)
    xa_given = epilogue != "xa-inside"
    cfg["XA_GIVEN"] = xa_given
    cfg["FLATTEN"] = epilogue == "slices" or (epilogue == "xa-inside" and cfg["FLATTEN"])
    if not xa_given and rank > 64:
        x, w, A, B = (torch.ones(s, device=DEVICE, dtype=torch.bfloat16) for s in [(64, 64), (64, 64), (rank, 64),
                                                                                  (64, rank)])
        with pytest.raises(ValueError, match="r <= 64"):
            kl.persistent_forward(x, w, A, B, 0.7, config=cfg)
        return
    shapes = [(45, 64, 48), (70, 40, 136)] if INTERPRET else [(45, 64, 48), (1000, 520, 1096), (4100, 2048, 1024)]
    for dtype in [dt for dt in dtypes_for("triton") if dt != torch.float32]:
        for M, K, N in shapes:
            g = torch.Generator().manual_seed(torch.randint(0, 2**31 - 1, ()).item())
            rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(DEVICE, dtype)
            x, A, B, bias = rnd(M, K), rnd(rank, K, scale=K**-0.5), rnd(N, rank), rnd(N)
            w = rnd(N, K, scale=K**-0.5) if w_layout == "k-major" else rnd(K, N, scale=K**-0.5).t()
            assert kl.persistent_forward_ok(x, w, A)
            for b in (bias, None):
                y, xa = kl.persistent_forward(x, w, A, B, 0.7, b, config=cfg)
                xa_ref = x.double() @ A.double().t()
                ref = x.double() @ w.double().t() + 0.7 * xa_ref @ B.double().t()
                ref = ref + bias.double() if b is not None else ref
                assert xa.dtype == torch.float32 and xa.shape == (M, rank)
                assert_close(xa, xa_ref, dtype, f"persistent xa {w_layout} r={rank} M={M}")
                assert_close(y, ref, dtype, f"persistent y {w_layout} r={rank} M={M} bias={b is not None}")
            # PEFT's float32 adapters: B is read in its own dtype, no cast beforehand
            y32, _ = kl.persistent_forward(x, w, A.float(), B.float(), 0.7, bias, config=cfg)
            ref = x.double() @ w.double().t() + 0.7 * xa_ref @ B.double().t() + bias.double()
            assert_close(y32, ref, dtype, f"persistent y, float32 adapters, {w_layout} r={rank} M={M}")
            # B stored as B^T (r, N) row-major, as the backward's dx passes A: its TMA tiles come from B^T as is
            b_view = B.t().contiguous().t()
            assert kl._tma_layout(b_view) == "col"
            y_t, _ = kl.persistent_forward(x, w, A.t().contiguous().t(), b_view, 0.7, bias, config=cfg)
            assert_close(y_t, ref, dtype, f"persistent y, B given transposed, {w_layout} r={rank} M={M}")
            if xa_given and rank in (16, 128):  # the scaling outside the epilogue: in B (forward), in xa (dx)
                y_b, xa_b = kl.persistent_forward(x, w, A, B, 0.7, bias, config=cfg, xa_dtype=dtype, prescale_b=True)
                assert xa_b.dtype == dtype
                assert_close(xa_b, xa_ref, dtype, f"persistent xa, s B, {w_layout} r={rank} M={M}")
                assert_close(y_b, ref, dtype, f"persistent y, s B, {w_layout} r={rank} M={M}")
                xa_s = (0.7 * (x.float() @ A.float().t())).to(dtype)
                y_s, _ = kl.persistent_forward(x, w, A, B, 0.7, bias, config=cfg, xa=xa_s, xa_scaled=True)
                assert_close(y_s, ref, dtype, f"persistent y, s xa given, {w_layout} r={rank} M={M}")
        wt = w_layout == "n-major"
        weight = w.t() if wt else w
        y, xa = kl.lora_forward(x, weight, A, B, 0.7, bias, 0.0, 5, wt, mode="persistent")
        y_ref, xa_ref = reference.lora_forward(x, weight, A, B, 0.7, bias, 0.0, 5, wt)
        assert_close(y, y_ref, dtype, f"lora_forward persistent {w_layout}")
        assert_close(xa, xa_ref, dtype, f"lora_forward persistent xa {w_layout}")
        # xa given (lora_down's, as the compiled path's lora_xa makes it): used as it is, the same y
        xa_own = kl.lora_down(x, A, 0.0, 5)
        assert xa_own.dtype == kl.lora_xa_dtype(x.dtype, 0.0)
        y_g, xa_g = kl.lora_forward(x, weight, A, B, 0.7, bias, 0.0, 5, wt, mode="persistent", xa=xa_own)
        assert xa_g is xa_own
        assert_close(y_g, y_ref, dtype, f"lora_forward persistent, xa given, {w_layout}")
        # xa given as a layer's columns of a product shared with other layers (the compiled path's group_xa): a view
        # whose rows are 8 + rank + 8 columns apart, read by its row stride, forward and backward
        pad = torch.zeros(8, A.shape[1], device=DEVICE, dtype=A.dtype)
        xa_view = kl.lora_down(x, torch.cat([pad + 1, A, pad - 1]), 0.0, 5)[:, 8:8 + rank]
        assert not xa_view.is_contiguous() and xa_view.data_ptr() % 16 == 0
        y_v, _ = kl.lora_forward(x, weight, A, B, 0.7, bias, 0.0, 5, wt, mode="persistent", xa=xa_view)
        assert_close(y_v, y_ref, dtype, f"lora_forward persistent, xa a view, {w_layout}")
        dy = torch.randn_like(y_ref)
        needs = (True, True, True, True, False)
        got = kl.lora_backward(dy, x, weight, A, B, xa_view, 0.7, 0.0, 5, wt, needs)
        want = reference.lora_backward(dy, x, weight, A, B, xa_ref, 0.7, 0.0, 5, wt, needs)
        for name, g_, w_ in zip(("dx", "dA", "dB", "dbias"), got, want):
            assert_close(g_, w_, dtype, f"lora_backward, xa a view, {name}, {w_layout}")
        # with dropout the op's own default path runs: the same seed gives the same answer
        y_drop, _ = kl.lora_forward(x, weight, A, B, 0.7, bias, 0.3, 5, wt, mode="persistent")
        assert torch.equal(y_drop, kl.lora_forward(x, weight, A, B, 0.7, bias, 0.3, 5, wt)[0])


@pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="needs a GPU or the Triton interpreter")
@pytest.mark.parametrize("rank", [8, 16, 64, 128])
@pytest.mark.parametrize("role", ["forward", "dx"])
@pytest.mark.parametrize("mode", ["workers", "helpers"])
def test_persistent_xa_workers_match_reference(rank, role, mode, poison_empty, monkeypatch):
    """xa made inside the persistent kernel, and the GEMM programs waiting for each row block's flag before their
    epilogue reads it. workers (XA_WORKERS): the first programs make xa and walk no tile; helpers (XA_HELPERS): the
    programs the walk gives a tile fewer make xa first, two row blocks at a time (an odd count included), then walk
    their tiles. forward: xa = x A^T (saved, unscaled);
    dx: dyb = s dy B from B^T, a column-major view, as the backward passes it. Shapes where the plan picks the mode
    (checked), with more row blocks than makers; xa's buffer starts as NaN (poison_empty), so a tile that read its row
    block before the flag would show. Workers stop at XA_WORKERS_MAX_RANK, where cuBLAS makes xa as before."""
    from peftkern.kernels.triton import lora as kl

    monkeypatch.setattr(kl, "XA_WORKERS", True)
    monkeypatch.setattr(kl, "XA_HELPERS", mode == "helpers")
    gpu = HAS_CUDA and not INTERPRET
    if not gpu:  # four programs and a few row blocks: let each helper make as many as the shape needs
        monkeypatch.setattr(kl, "XA_HELPER_MAX_BLOCKS", 64)
    dev = torch.device(DEVICE)
    assert kl.xa_workers(8192, 4096, kl.XA_WORKERS_MAX_RANK + 8, dev) == 0
    if mode == "workers" and rank > kl.XA_WORKERS_MAX_RANK:
        assert kl.xa_plan(8192, 4096, rank, dev) == (0, 0)
        return
    if mode == "helpers":  # the plan takes workers first where they apply
        monkeypatch.setattr(kl, "XA_WORKERS_MAX_RANK", 0)
    if gpu:
        shapes = [(3000, 256, 4096), (1000, 520, 1096)] if mode == "workers" else [(3000, 4096, 4096),
                                                                                 (1400, 4000, 4000)]
    else:
        shapes = [(45, 64, 48), (144, 32, 32)]
    for dtype in [dt for dt in dtypes_for("triton") if dt != torch.float32]:
        for M, K, N in shapes:
            cfg = kl._persistent_config(M, rank) if gpu else dict(
                BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, FLATTEN=False, SUBTILE=True, num_warps=4, num_stages=1)
            g = torch.Generator().manual_seed(torch.randint(0, 2**31 - 1, ()).item())
            rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(DEVICE, dtype)
            x, W, A, B, bias = rnd(M, K), rnd(N, K, scale=K**-0.5), rnd(rank, K, scale=K**-0.5), rnd(N, rank), rnd(N)
            what = f"{mode} {role} r={rank} M={M} K={K} N={N} {dtype}"
            workers, helpers = kl.xa_plan(M, N if role == "forward" else K, rank, x.device, cfg)
            makers = workers if mode == "workers" else helpers
            assert 0 < makers and (workers == 0 or helpers == 0), f"{what}: plan {workers, helpers}"
            assert mode == "helpers" or makers <= math.ceil(M / cfg["BLOCK_M"]), what
            if role == "forward":
                y, xa = kl.persistent_forward(x, W, A, B, 0.7, bias, config=cfg, xa_dtype=dtype, workers=True)
                xa_ref = x.double() @ A.double().t()
                ref = x.double() @ W.double().t() + 0.7 * xa_ref @ B.double().t() + bias.double()
                assert_close(xa, xa_ref, dtype, f"{what}: xa")
                assert_close(y, ref, dtype, f"{what}: y")
            else:
                dy = rnd(M, N)
                dx, dyb = kl.persistent_forward(dy, W.t(), B.t(), A.t(), 0.7, config=cfg, xa_dtype=dtype,
                                                xa_scaled=True, workers=True)
                dyb_ref = 0.7 * dy.double() @ B.double()
                assert_close(dyb, dyb_ref, dtype, f"{what}: s dy B")
                assert_close(dx, dy.double() @ W.double() + dyb_ref @ A.double(), dtype, f"{what}: dx")
    with pytest.raises(ValueError, match="workers make xa"):
        kl.persistent_forward(x, W, A, B, 0.7, workers=True, xa=x @ A.t())


def test_xa_workers_only_where_they_keep_up(monkeypatch):
    """The workers' rule on an H200's 132 SMs (no GPU needed): blocks per worker x XA_WORKER_COLUMNS_PER_BLOCK within
    the walk's rounds x BLOCK_N. The 1b step's 2048-wide forwards (M = 8192) took 158 us with workers against 98
    without; 4096^2 and 2048 -> 5632 kept them. The plan is memoised: switching the workers off is seen at once."""
    from peftkern.kernels.triton import lora as kl

    monkeypatch.setattr(kl, "triton_interpret", lambda: False)
    monkeypatch.setattr(kl, "_sm_count", lambda device: 132)
    monkeypatch.setattr(kl, "XA_WORKERS", True)
    monkeypatch.setattr(kl, "_xa_plans", {})  # plans memoised with this machine's SM count stay out
    dev = torch.device("cuda", 0)
    assert kl.xa_plan(8192, 4096, 16, dev) == (4, 0)       # 16 blocks a worker, 8 rounds of 256 columns: equal
    assert kl.xa_plan(8192, 5632, 16, dev) == (4, 0)       # 11 rounds
    assert kl.xa_plan(2048, 4096, 16, dev) == (4, 0)       # 4 blocks, 2 rounds
    assert kl.xa_plan(8192, 2048, 16, dev) == (0, 0)       # 16 blocks, 4 rounds: cuBLAS makes xa
    assert kl.xa_workers(8192, 2048, 16, dev) == 0
    monkeypatch.setattr(kl, "XA_WORKER_COLUMNS_PER_BLOCK", 64)
    assert kl.xa_plan(8192, 2048, 16, dev) == (4, 0)
    monkeypatch.setattr(kl, "XA_WORKERS", False)
    assert kl.xa_plan(8192, 4096, 16, dev) == (0, 0)


def test_persistent_group_m_switch_is_seen_between_calls(monkeypatch):
    """PERSISTENT_GROUP_M (PEFTKERN_LORA_GROUP_M; scripts/step_ab.py's group-m-4) is part of the memoised config's
    key: set between calls in one process, the next config has it (no GPU needed: the GPU's config is pure Python)."""
    from peftkern.kernels.triton import lora as kl

    monkeypatch.setattr(kl, "triton_interpret", lambda: False)
    monkeypatch.setattr(kl, "_persistent_configs", {})
    monkeypatch.setattr(kl, "PERSISTENT_GROUP_M", 8)
    assert kl._persistent_config(8192, 16)["GROUP_M"] == 8
    monkeypatch.setattr(kl, "PERSISTENT_GROUP_M", 4)
    assert kl._persistent_config(8192, 16)["GROUP_M"] == 4
    assert kl._persistent_config(512, 16)["GROUP_M"] == 8  # below 1024 rows the 128 x 128 config keeps its own
    monkeypatch.setattr(kl, "PERSISTENT_GROUP_M", 8)
    assert kl._persistent_config(8192, 16)["GROUP_M"] == 8


@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="the fast launch path needs a GPU")
def test_persistent_forward_launches_by_its_memoised_plan():
    """From the second call of a class, persistent_forward launches through _launch's fast path by its plan's key, and
    gives the reference's answer with new tensors of the same shapes (a memoised plan holds no tensor)."""
    from peftkern.kernels.triton import _launch
    from peftkern.kernels.triton import lora as kl

    M, K, N, R, dt = 1024, 512, 768, 16, torch.bfloat16
    for workers in (False, True):
        for call in range(3):
            g = torch.Generator().manual_seed(torch.randint(0, 2**31 - 1, ()).item())
            rnd = lambda *s: (torch.randn(*s, generator=g) / s[-1] ** 0.5).to(DEVICE, dt)
            x, W, A, B = rnd(M, K), rnd(N, K), rnd(R, K), rnd(N, R)
            before = dict(_launch.stats)
            y, xa = kl.persistent_forward(x, W, A, B, 0.5, xa_dtype=dt, workers=workers)
            if call:
                assert _launch.stats["fast"] == before["fast"] + 1 and _launch.stats["slow"] == before["slow"]
            ref = x.double() @ W.double().t() + 0.5 * (x.double() @ A.double().t()) @ B.double().t()
            assert_close(y, ref, dt, f"workers={workers} call {call}")


@pytest.mark.parametrize("dtype,out_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float16, torch.float32), (torch.float32, torch.float32)])
def test_scaled_mm(dtype, out_dtype):
    """The backward's adapter gradients: scaling * a @ b in one call, in the adapters' dtype."""
    from peftkern.kernels.triton import lora as kl

    if DEVICE == "cpu" and dtype != torch.float32:
        pytest.skip("the CPU's 16-bit mm is not what the GPU runs")
    g = torch.Generator().manual_seed(torch.randint(0, 2**31 - 1, ()).item())
    a, b = (torch.randn(16, 300, generator=g).to(DEVICE, dtype), torch.randn(300, 72, generator=g).to(DEVICE, dtype))
    got = kl.scaled_mm(a, b, 0.37, out_dtype)
    assert got.dtype == out_dtype and got.shape == (16, 72)
    assert_close(got, 0.37 * (a.double() @ b.double()), dtype, "scaled_mm")


@pytest.mark.skipif(not (HAS_CUDA or __import__("os").environ.get("TRITON_INTERPRET") == "1"),
                    reason="needs a GPU or the Triton interpreter")
@pytest.mark.parametrize("use_tma", [False, True], ids=["pointer", "tma"])
@pytest.mark.parametrize("w_layout", ["k-major", "n-major"])
def test_fused_matmul_kernels_match_reference(use_tma, w_layout, poison_empty):
    """Both GEMM kernels (pointer loads and TMA descriptors), W read K-major (y = x W^T) or N-major
    (dx = dy W), with the low-rank epilogue, bias and the dropout-masked low-rank term."""
    from peftkern.kernels.triton import lora as kl

    M, K, N, R = 45, 64, 48, 8
    for dtype in dtypes_for("triton"):
        g = torch.Generator().manual_seed(torch.randint(0, 2**31 - 1, ()).item())
        rnd = lambda *s: torch.randn(*s, generator=g).to(DEVICE, dtype)
        a, up, bias = rnd(M, K), rnd(N, R), rnd(N)
        w = rnd(N, K) if w_layout == "k-major" else rnd(K, N).t()
        low = torch.randn(M, R, generator=g).to(DEVICE)
        for p in (0.0, 0.3):
            out = kl.fused_matmul(a, w, up, low, 0.7, bias, dropout_p=p, seed=5, use_tma=use_tma)
            lr = 0.7 * low.double() @ up.double().t()
            if p:
                keep = kl.dropout_mask(5, (M, N), p, a.device).double()
                lr = lr * keep / (1 - p)
            ref = a.double() @ w.double().t() + bias.double() + lr
            assert_close(out, ref, dtype, f"fused_matmul {w_layout} tma={use_tma} p={p}")


@pytest.mark.skipif(not (HAS_CUDA or __import__("os").environ.get("TRITON_INTERPRET") == "1"),
                    reason="needs a GPU or the Triton interpreter")
@pytest.mark.parametrize("w_layout", ["k-major", "n-major"])
@pytest.mark.parametrize("rank", [8, 24])
def test_decode_forward_matches_reference(w_layout, rank, poison_empty):
    """The one-launch forward for few rows (lora_decode_kernel, lora_gemv_kernel for one): y and xa against
    float64, with and without bias, K and N that fill no tile, several row tiles (a 16-row tile given for 40
    rows), float32 adapters beside a 16-bit x, and dropout, whose mask must be the one backward regenerates
    (dropout_mask of x's shape)."""
    from peftkern.kernels.triton import lora as kl

    for dtype in dtypes_for("triton"):
        for M, K, N in [(1, 200, 72), (5, 64, 48), (40, 136, 100)]:
            g = torch.Generator().manual_seed(torch.randint(0, 2**31 - 1, ()).item())
            rnd = lambda *s, scale=1.0, dt=dtype: (torch.randn(*s, generator=g) * scale).to(DEVICE, dt)
            x, bias = rnd(M, K), rnd(N)
            w = rnd(N, K, scale=K**-0.5) if w_layout == "k-major" else rnd(K, N, scale=K**-0.5).t()
            configs = [None]
            if M > 16 and not INTERPRET:
                configs.append(dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=2))
            if M == 1:  # one row goes to lora_gemv_kernel by default; the MMA kernel takes it too
                configs.append(dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1))
            # float32 adapters at one size: every (dtype, adapter dtype, bias, dropout, tile) pair is a compile
            # on a GPU, and the test took over a minute there with them at every size
            for adt in ([dtype, torch.float32] if M == 5 and dtype != torch.float32 else [dtype]):
                A, B = rnd(rank, K, scale=K**-0.5, dt=adt), rnd(N, rank, dt=adt)
                for b, p, cfg in [(bias, 0.0, None), (None, 0.0, None), (bias, 0.3, None)] + [
                        (bias, 0.0, c) for c in configs[1:]]:
                    y, xa = kl.decode_forward(x, w, A, B, 0.7, b, dropout_p=p, seed=11, config=cfg)
                    xd = x.double()
                    if p:
                        xd = xd * kl.dropout_mask(11, (M, K), p, x.device).double() / (1 - p)
                    xa_ref = xd @ A.double().t()
                    ref = x.double() @ w.double().t() + 0.7 * xa_ref @ B.double().t()
                    ref = ref + bias.double() if b is not None else ref
                    what = f"decode {w_layout} r={rank} M={M} {dtype} adapters {adt} bias={b is not None} p={p}"
                    assert xa.dtype == torch.float32 and xa.shape == (M, rank), what
                    assert_close(xa, xa_ref, dtype, f"{what}: xa")
                    assert_close(y, ref, dtype, f"{what}: y")
            if dtype != torch.float32:
                # lora_forward takes it for few rows on its own, and gives what the Triton GEMM path gives
                y, xa = kl.lora_forward(x, w, A, B, 0.7, bias, 0.0, 3, False)
                y_ref, xa_ref = reference.lora_forward(x, w, A, B, 0.7, bias, 0.0, 3, False)
                assert_close(y, y_ref, dtype, f"lora_forward decode {w_layout}")
                assert_close(xa, xa_ref, dtype, f"lora_forward decode xa {w_layout}")


@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="CUDA streams")
def test_overlap_side_stream_is_never_the_callers_and_gives_the_same_gradients(monkeypatch):
    """The tail's side stream came from torch's pool of 32 streams a priority, as a user's stream does: one of 32 user
    streams was the side stream itself, and under it the overlap ran serially (a review, 2026-12-05). Under every one
    of them the side stream differs, and the gradients under a user stream are those on the default stream."""
    from peftkern.kernels.triton import lora as kl

    peftkern.set_backend("triton")  # conftest's autouse fixture unforces it after the test
    dev = torch.device(DEVICE, torch.cuda.current_device())
    for _ in range(33):
        user = torch.cuda.Stream(dev)
        with torch.cuda.stream(user), kl._Overlap(dev) as ov:
            assert ov.stream.cuda_stream != user.cuda_stream, "the side stream is the caller's"
    monkeypatch.setattr(kl, "TAIL_OVERLAP", "side")
    monkeypatch.setattr(kl, "SKINNY_GRADS", False)
    monkeypatch.setattr(kl, "PERSISTENT_DX", True)
    monkeypatch.setattr(kl, "PERSISTENT_MIN_M", 1)
    monkeypatch.setattr(kl, "PERSISTENT_DX_MIN_M", 1)
    x, w, A, B, b = make_inputs((300,), 256, 320, 16, torch.bfloat16)
    plain, _ = run_both("triton", x, w, A, B, b, 0.9, False)
    user = torch.cuda.Stream(dev)
    user.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(user):
        got, ref = run_both("triton", x, w, A, B, b, 0.9, False)
    torch.cuda.current_stream(dev).wait_stream(user)
    assert torch.equal(got["y"], plain["y"]), "the forward under a user stream"
    for name in ref:
        assert_close(got[name], ref[name], torch.bfloat16, f"{name} under a user stream")


# (rank, TAIL_OVERLAP): the default ("side") at every rank, and one stream ("0", the path with dyb made inside) and the
# high-priority variant where they add code paths, not just compiles (each shard of the GPU suite compiles its own).
# Under the interpreter the tail modes do not apply (cuBLAS's products on a side stream): "0" at every rank.
# "side" runs with the dx kernel's xa workers (up to XA_WORKERS_DX_MAX_M rows, as here) and without ("side-no-workers",
# the path of larger M).
_PDX_CASES = ([(16, "0"), (16, "side"), (16, "side-no-workers"), (16, "priority"), (64, "side"), (128, "0"),
               (128, "side")] if HAS_CUDA and not INTERPRET else [(16, "0"), (64, "0"), (128, "0")])


@pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="needs a GPU or the Triton interpreter")
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("rank,tail", _PDX_CASES)
def test_persistent_dx_matches_reference(transposed, rank, tail, monkeypatch):
    """PERSISTENT_DX (on by default from PERSISTENT_DX_MIN_M rows): the backward's dx and dyb by the persistent
    forward kernel with dy, W^T, B^T and A^T for its x, w, A and B. Every gradient against the reference, with
    float32 adapters and bias, the kernel's use checked, and left alone where it does not apply (dropout).
    tail: dA, dB and the bias gradient on a side stream behind the dx kernel (TAIL_OVERLAP, cuBLAS's products: GPU);
    at these few rows "side" makes dyb in the dx kernel (XA_WORKERS), "side-no-workers" before it."""
    from peftkern.kernels.triton import lora as kl

    peftkern.set_backend("triton")
    monkeypatch.setattr(kl, "XA_WORKERS", not tail.endswith("no-workers"))
    monkeypatch.setattr(kl, "TAIL_OVERLAP", tail.removesuffix("-no-workers"))
    monkeypatch.setattr(kl, "SKINNY_GRADS", False)  # the tail modes are cuBLAS's; skinny_grads has its own test
    monkeypatch.setattr(kl, "PERSISTENT_DX", True)
    monkeypatch.setattr(kl, "PERSISTENT_MIN_M", 1)
    monkeypatch.setattr(kl, "PERSISTENT_DX_MIN_M", 1)
    calls = []
    real = kl.persistent_forward
    monkeypatch.setattr(kl, "persistent_forward", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    try:
        for dtype in [dt for dt in dtypes_for("triton") if dt != torch.float32]:
            for adapter_dtype in (None, torch.float32):
                x, w, A, B, b = make_inputs((3, 23), 96, 72 if INTERPRET else 520, rank, dtype,
                                            transposed=transposed, adapter_dtype=adapter_dtype)
                calls.clear()
                got, ref = run_both("triton", x, w, A, B, b, 0.9, transposed)
                assert (69, w.shape[1] if transposed else w.shape[0]) in calls, "the persistent dx did not run"
                for name in ref:
                    assert got[name].dtype == ref[name].dtype, name
                    assert_close(got[name], ref[name], dtype, f"persistent dx {dtype} r={rank} {name}")
            calls.clear()
            got, ref = run_both("triton", x, w, A, B, b, 0.9, transposed, dropout_p=0.25)
            assert not calls, "dropout's masked dx must not take the persistent kernel"
            for name in ref:
                assert_close(got[name], ref[name], dtype, f"persistent dx, dropout fallback, {name}")
    finally:
        peftkern.set_backend(None)


# M, K, N, r: odd sizes, M = 1, ranks below and above 32 (BLOCK_R 16 to 64); on a GPU the 1b model's q projection
SKINNY_SHAPES = [(37, 72, 130, 4), (300, 96, 64, 16), (1, 40, 33, 40)]
if HAS_CUDA:
    SKINNY_SHAPES += [(8192, 2048, 2048, 16), (4100, 520, 1000, 128)]


@pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="needs a GPU or the Triton interpreter")
@pytest.mark.parametrize("shape", SKINNY_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_skinny_grads_match_float64(shape):
    """skinny_grads (dA, dB and the bias gradient in one launch, M split and summed in a fixed order) against float64:
    every combination of what is asked for, x given as a transposed view, the adapters' dtype for the outputs, and the
    same bits on a second run."""
    from peftkern.kernels.triton import lora as kl

    M, K, N, R = shape
    for dtype in dtypes_for("triton"):
        torch.manual_seed(run_seed(M + R))
        x = torch.randn(K, M, device=DEVICE, dtype=dtype).t()  # (M, K), column-major
        dy, dyb, xa = (torch.randn(M, c, device=DEVICE, dtype=dtype) for c in (N, R, R))
        want_a = 0.5 * dyb.double().t() @ x.double()
        want_b = 2.0 * dy.double().t() @ xa.double()
        want_bias = dy.double().sum(0)
        for need in ((True, True, True), (True, False, False), (False, True, False), (False, False, True)):
            da, db, dbias = kl.skinny_grads(x, dyb, dy, xa, 0.5, 2.0, torch.float32, dtype, *need)
            for got, want, asked, out_dtype, name in ((da, want_a, need[0], torch.float32, "dA"),
                                                      (db, want_b, need[1], dtype, "dB"),
                                                      (dbias, want_bias, need[2], torch.float32, "dbias")):
                if not asked:
                    assert got is None, f"{name} was not asked for"
                    continue
                assert got.dtype == out_dtype, f"{name} {got.dtype}"
                assert_close(got, want, dtype, f"{name} {dtype} {shape} {need}")
        again = kl.skinny_grads(x, dyb, dy, xa, 0.5, 2.0, torch.float32, dtype, True, True, True)
        first = kl.skinny_grads(x, dyb, dy, xa, 0.5, 2.0, torch.float32, dtype, True, True, True)
        for a, b in zip(first, again):
            assert torch.equal(a, b), "skinny_grads gave different bits on a second run"


# M, N, r: ragged row and column blocks, r below 16, M = 1 and 0; on a GPU the op's shape and a 512-wide one
DYB_DB_SHAPES = [(37, 130, 4), (300, 64, 16), (1, 33, 8), (150, 96, 12), (0, 40, 8)]
if HAS_CUDA:
    DYB_DB_SHAPES += [(8192, 4096, 16), (8200, 512, 16)]


@pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="needs a GPU or the Triton interpreter")
@pytest.mark.parametrize("shape", DYB_DB_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dyb_db_matches_float64(shape):
    """dyb_db (dyb = dy B and dB = s dy^T xa from one read of dy, whose partial sums across programs a second launch
    adds) against float64: dy given as a transposed view, B in float32 beside a 16-bit dy, dB in the adapter's dtype,
    and the same bits on a second run."""
    from peftkern.kernels.triton import lora as kl

    M, N, R = shape
    for dtype in dtypes_for("triton"):
        for b_dtype in {dtype, torch.float32}:
            torch.manual_seed(run_seed(M + N + R))
            dy = torch.randn(N, M, device=DEVICE, dtype=dtype).t()  # (M, N), column-major
            B = (torch.randn(N, R, device=DEVICE) * R ** -0.5).to(b_dtype)
            xa = torch.randn(M, R, device=DEVICE, dtype=dtype)
            dyb, db = kl.dyb_db(dy, B, xa, 0.5, b_dtype)
            assert dyb.shape == (M, R) and dyb.dtype == dtype, (dyb.shape, dyb.dtype)
            assert db.shape == (N, R) and db.dtype == b_dtype, (db.shape, db.dtype)
            want_dyb = dy.double() @ B.to(dtype).double()
            want_db = 0.5 * dy.double().t() @ xa.double()
            assert_close(dyb, want_dyb, dtype, f"dyb {dtype} B {b_dtype} {shape}")
            assert_close(db, want_db, dtype, f"dB {dtype} B {b_dtype} {shape}")
            again = kl.dyb_db(dy, B, xa, 0.5, b_dtype)
            assert torch.equal(again[0], dyb) and torch.equal(again[1], db), "dyb_db: other bits on a second run"


# M, C, r: ragged row and column blocks, r below 16, M = 1 and 0; on a GPU the op's shape
COLUMN_GRAD_SHAPES = [(37, 130, 4), (300, 64, 16), (1, 33, 8), (150, 96, 12), (0, 40, 8)]
if HAS_CUDA:
    COLUMN_GRAD_SHAPES += [(8192, 4096, 16), (8200, 520, 16)]


@pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="needs a GPU or the Triton interpreter")
@pytest.mark.parametrize("shape", COLUMN_GRAD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_column_grad_matches_float64(shape):
    """column_grad (s small^T big by column strips of big, the backward's dA behind the dx kernel) against float64:
    big given as a transposed view, small in float32 beside a 16-bit big, the result in float32 and in big's dtype,
    and the same bits on a second run."""
    from peftkern.kernels.triton import lora as kl

    M, C, R = shape
    for dtype in dtypes_for("triton"):
        for small_dtype in {dtype, torch.float32}:
            for out_dtype in {dtype, torch.float32}:
                torch.manual_seed(run_seed(M + C + R))
                big = torch.randn(C, M, device=DEVICE, dtype=dtype).t()  # (M, C), column-major
                small = torch.randn(M, R, device=DEVICE, dtype=small_dtype)
                got = kl.column_grad(big, small, 0.5, out_dtype)
                assert got.shape == (R, C) and got.dtype == out_dtype, (got.shape, got.dtype)
                want = 0.5 * small.to(dtype).double().t() @ big.double()
                assert_close(got, want, dtype, f"column_grad {dtype} small {small_dtype} out {out_dtype} {shape}")
                again = kl.column_grad(big, small, 0.5, out_dtype)
                assert torch.equal(again, got), "column_grad: other bits on a second run"


@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="dyb_db replaces cuBLAS's dyb and skinny_grads' dB: a GPU path")
@pytest.mark.parametrize("rank", [8, 16, 32])
def test_dyb_db_in_the_backward_matches_reference(rank, monkeypatch):
    """DYB_DB (on by default up to rank DYB_DB_MAX_RANK): the backward before the persistent dx kernel takes dyb and dB
    from dyb_db, and skinny_grads makes dA and the bias gradient. Against the reference with bias, float32 adapters and
    a frozen B (dyb alone is then cuBLAS's); above DYB_DB_MAX_RANK it is not used."""
    from peftkern.kernels.triton import lora as kl

    peftkern.set_backend("triton")
    monkeypatch.setattr(kl, "SKINNY_GRADS", True)
    monkeypatch.setattr(kl, "SKINNY_SIDE", False)
    monkeypatch.setattr(kl, "PERSISTENT_MIN_M", 1)
    monkeypatch.setattr(kl, "PERSISTENT_DX_MIN_M", 1)
    monkeypatch.setattr(kl, "PERSISTENT_DX", True)
    monkeypatch.setattr(kl, "TAIL_OVERLAP", "side")
    monkeypatch.setattr(kl, "XA_WORKERS", False)
    monkeypatch.setattr(kl, "XA_HELPERS", False)
    monkeypatch.setattr(kl, "DYB_DB", True)
    calls = []
    real = kl.dyb_db
    monkeypatch.setattr(kl, "dyb_db", lambda *a, **k: calls.append(1) or real(*a, **k))
    try:
        for dtype in (torch.float16, torch.bfloat16):
            for adapter_dtype in (None, torch.float32):
                x, w, A, B, b = make_inputs((3, 230), 512, 520, rank, dtype, adapter_dtype=adapter_dtype)
                calls.clear()
                got, ref = run_both("triton", x, w, A, B, b, 0.9, False)
                assert bool(calls) == (rank <= kl.DYB_DB_MAX_RANK), f"dyb_db at r={rank}: {len(calls)} calls"
                for name in ref:
                    assert got[name].dtype == ref[name].dtype, name
                    assert_close(got[name], ref[name], dtype, f"dyb_db backward {dtype} r={rank} {name}")
            # B frozen: dB is not asked for, and dyb is cuBLAS's
            calls.clear()
            xk = x.detach().clone().requires_grad_()
            Ak = A.detach().clone().requires_grad_()
            y = peftkern.lora_linear(xk, w, Ak, B, 0.9, b)
            xr = x.detach().clone().requires_grad_()
            Ar = A.detach().clone().requires_grad_()
            y_ref = reference.lora_linear(xr, w, Ar, B, 0.9, b)
            dy = torch.randn_like(y_ref)
            y.backward(dy)
            y_ref.backward(dy)
            assert not calls, "dyb_db ran with B frozen"
            assert_close(xk.grad, xr.grad, dtype, f"frozen B {dtype} r={rank} dx")
            assert_close(Ak.grad, Ar.grad, dtype, f"frozen B {dtype} r={rank} dA")
    finally:
        peftkern.set_backend(None)


def test_dyb_db_is_left_out_where_its_partials_outgrow_dx():
    """dyb_db's float32 partials (~M N / 4 bytes) are allocated before dx (M x K): lora_backward takes it only where
    they are no larger than dx, so an lm_head-wide output keeps cuBLAS's dyb and the peak stays at the Unsloth-style
    path's. Every benchmarked shape fits."""
    from peftkern.kernels.triton import lora as kl

    cpu = torch.device("cpu")
    for M, N, K in [(8192, 4096, 4096), (8192, 11008, 4096), (8192, 4096, 11008), (2048, 4096, 4096),
                    (8192, 512, 2048)]:
        assert kl.dyb_db_fits(M, N, K, 16, 2, cpu), (M, N, K)
    for M, N, K in [(8192, 128256, 4096), (8192, 32000, 2048)]:
        assert not kl.dyb_db_fits(M, N, K, 16, 2, cpu), (M, N, K)
    assert kl.dyb_db_fits(0, 128256, 4096, 16, 2, cpu)


# x's row counts: a few rows, and on a GPU 2048 (the persistent dx kernel's and skinny_grads' path, 16-bit only)
SUBSET_ROWS = [(37,)] + ([(2, 1024)] if HAS_CUDA else [])
# under the interpreter, also with the Triton backward's GPU-only branches forced (a GPU takes them anyway)
SUBSET_BRANCHES = [False, True] if INTERPRET else [False]


@pytest.mark.parametrize("backend", backend_params(), indirect=True)
@pytest.mark.parametrize("lead", SUBSET_ROWS, ids=str)
@pytest.mark.parametrize("trainable", ["x", "A", "B", "bias", "x+bias", "x+A", "x+B", "A+B", "x+A+B+bias"])
@pytest.mark.parametrize("gpu_branches", SUBSET_BRANCHES, ids=lambda forced: "gpu-branches" if forced else "default")
def test_every_gradient_subset(backend, lead, trainable, gpu_branches, monkeypatch):
    """Only the tensors that require grad get one, and each matches the reference: frozen adapters with x's gradient
    (an adapter stacked under a trained one), a frozen layer's bias alone, the adapters without x (the first layer).
    gpu_branches: under the interpreter, the Triton backward's branches that only GPUs take (skinny_grads and its
    predicate, behind _cublas_skinny), which is where frozen adapters raised ZeroDivisionError from 5a29d28."""
    if gpu_branches:
        if backend != "triton":
            pytest.skip("the Triton backend's branches")
        from peftkern.kernels.triton import lora as kl

        monkeypatch.setattr(kl, "_cublas_skinny", lambda dropout_p, device: dropout_p == 0.0)
    dtype = torch.bfloat16 if HAS_CUDA and not INTERPRET else torch.float32
    x, w, A, B, b = make_inputs(lead, 256, 192, 16, dtype)
    leaves = {"x": x, "A": A, "B": B, "bias": b}
    wanted = trainable.split("+")
    for name in wanted:
        leaves[name].requires_grad_()
    y = peftkern.lora_linear(x, w, A, B, 0.7, b)
    dy = torch.randn_like(y)
    y.backward(dy)
    x2 = x.reshape(-1, 256)
    _, xa = reference.lora_forward(x2, w, A, B, 0.7, b, 0.0, None, False)
    refs = dict(zip(("x", "A", "B", "bias"), reference.lora_backward(
        dy.reshape(-1, 192), x2, w, A, B, xa, 0.7, 0.0, None, False, (True,) * 5)))
    for name, t in leaves.items():
        if name in wanted:
            assert_close(t.grad.reshape(refs[name].shape), refs[name], dtype, f"d{name} ({trainable})")
        else:
            assert t.grad is None, f"{name} got a gradient it did not ask for"


@pytest.mark.parametrize("backend", backend_params("lora"), indirect=True)
@pytest.mark.parametrize("hooks", [False, True], ids=["plain", "saved-tensor-hooks"])
@pytest.mark.parametrize("frozen", ["A", "A+B"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_frozen_a_keeps_no_copy_of_the_input(backend, hooks, frozen, p):
    """With A and the weight frozen (LoRA-FA's A, create_lorafa_optimizer; an adapter loaded frozen) backward reads x
    for nothing: the graph keeps xa at most, as PEFT's keeps, and the gradients are the reference's, dropout's mask
    drawn again from the stand-in's shape. It kept the whole input (128 MiB against PEFT's 6 in an exploratory test,
    2026-12-07). Under saved-tensor hooks (the eager split of checkpointing and offloading) likewise."""
    dtype = torch.bfloat16 if HAS_CUDA and not INTERPRET else torch.float32
    x, w, A, B, b = make_inputs((3, 40), 96, 80, 8, dtype, bias=True)
    x.requires_grad_()
    B.requires_grad_(frozen == "A")
    packed = []

    def pack(t):
        packed.append(t)
        return t

    torch.manual_seed(run_seed(1234))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if hooks else contextlib.nullcontext():
        y = peftkern.lora_linear(x, w, A, B, 0.7, b, dropout_p=p)
    node = y.grad_fn.next_functions[0][0]  # under y's reshape to (3, 40, 80)
    kept = packed if hooks else [t for t in node.saved_tensors if t is not None]
    assert (120, 8) in [tuple(t.shape) for t in kept], "xa is kept"
    assert not any(t.data_ptr() == x.data_ptr() or tuple(t.shape) == (120, 96) for t in kept), \
        [tuple(t.shape) for t in kept]
    keep = None
    if p > 0:
        torch.manual_seed(run_seed(1234))
        keep = peftkern.ops.lora_dropout_mask(int(draw_seed()), (120, 96), p, DEVICE, backend)
    xr, Br = x.detach().reshape(-1, 96).requires_grad_(), B.detach().clone().requires_grad_(frozen == "A")
    expected = reference.lora_linear(xr, w, A, Br, 0.7, b, keep, p, False)
    dy = torch.randn_like(y)
    y.backward(dy)
    expected.backward(dy.reshape(-1, 80))
    assert_close(y.reshape(-1, 80), expected, dtype, f"y, {frozen} frozen, p={p}")
    assert_close(x.grad.reshape(-1, 96), xr.grad, dtype, f"dx, {frozen} frozen, p={p}")
    if frozen == "A":
        assert_close(B.grad, Br.grad, dtype, f"dB, A frozen, p={p}")


def test_skinny_grads_is_left_out_where_its_partials_outgrow_dx():
    """skinny_grads' float32 partials are allocated before dx (M x K): lora_backward takes it only where they are no
    larger than dx. At a few rows they are not (one split of 0.5 MB at M = 1 and 16, 4096^2, r = 16, against dx's 8
    and 128 KB), and the fwd+bwd peak was 0.5 MB over the Unsloth-style path's there (bench lora, H200, d977eed)."""
    from peftkern.kernels.triton import lora as kl

    cpu = torch.device("cpu")
    for M in (1, 16):
        assert not kl.skinny_partials_fit(M, 4096, 4096, 16, True, True, False, 2, cpu), M
    for M, K, N, R in [(8192, 4096, 4096, 16), (8192, 4096, 11008, 64), (8192, 11008, 4096, 16),
                       (2048, 4096, 4096, 16), (8192, 2048, 2048, 16)]:
        assert kl.skinny_partials_fit(M, K, N, R, True, True, True, 2, cpu), (M, K, N, R)
    # only x requires grad: nothing to reduce, no partials (this raised ZeroDivisionError on GPUs from 5a29d28 to
    # a27ac1f, so that every backward with frozen adapters failed; found by tests/test_krona.py on an H100)
    for M in (1, 16, 8192):
        assert kl.skinny_partials_fit(M, 4096, 4096, 16, False, False, False, 2, cpu), M


@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="CUDA's allocator statistics: a GPU check")
@pytest.mark.parametrize("shape", [(8192, 4096, 4096, 16), (8192, 4096, 11008, 16), (8192, 4096, 4096, 64),
                                   (2048, 4096, 4096, 16), (16, 4096, 4096, 16), (1, 4096, 4096, 16)],
                         ids=lambda s: "x".join(map(str, s)))
def test_fwd_bwd_peak_memory_is_at_most_the_unsloth_style_paths(shape):
    """Issue 2: the op's forward + backward peaks no higher than the eager Unsloth-style LoRA of bench lora (base GEMM,
    an in-place addmm of the low-rank term, gradients by hand), measured as bench lora measures it: the peak allocated
    above what was allocated before one torch.autograd.grad of x, A and B. From 91bf7e6 to 345304b skinny_grads' float32
    partials were allocated while dx was alive, 1.25-1.5 MB over it at 4096 wide (NOTES-lora.md, thirty-ninth
    session); at M = 2048, behind the dx kernel that made dyb with its xa workers, until the fortieth session."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_lora import UnslothStyleLoRA
    from common import peak_memory_mb

    M, K, N, R = shape
    dtype = torch.bfloat16
    torch.manual_seed(run_seed(M + N + R))
    x = torch.randn(M, K, device=DEVICE, dtype=dtype, requires_grad=True)
    W = torch.randn(N, K, device=DEVICE, dtype=dtype) * K ** -0.5
    A = (torch.randn(R, K, device=DEVICE, dtype=dtype) * K ** -0.5).requires_grad_()
    B = (torch.randn(N, R, device=DEVICE, dtype=dtype) * 0.01).requires_grad_()
    dy = torch.randn(M, N, device=DEVICE, dtype=dtype)

    def peak_mb(fn):
        torch.autograd.grad(fn(), [x, A, B], dy)  # compiles and warms the allocator outside the measurement
        # bench lora's measurement, which frees garbage and record_stream'd blocks before reading the baseline.
        # Without that a whole-file run on an H200 (2026-12-06) read the Unsloth-style path at 64.5 MB (128.75
        # alone): a 64 MB block counted in the baseline was freed inside the measured call
        return peak_memory_mb(lambda: torch.autograd.grad(fn(), [x, A, B], dy), x.device)

    peftkern.set_backend("triton")
    try:
        ours = peak_mb(lambda: peftkern.lora_linear(x, W, A, B, 2.0))
    finally:
        peftkern.set_backend(None)
    unsloth = peak_mb(lambda: UnslothStyleLoRA.apply(x, W, A, B, 2.0))
    assert ours <= unsloth, f"fwd+bwd peak {ours:.3f} MB against the Unsloth-style path's {unsloth:.3f} MB at {shape}"


@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="the switch replaces cuBLAS's products: a GPU path")
@pytest.mark.parametrize("path", ["xa-workers", "side-stream", "main-stream", "no-persistent-dx"])
@pytest.mark.parametrize("rank", [16, 128])
def test_skinny_grads_switch_matches_reference(path, rank, monkeypatch):
    """PEFTKERN_LORA_SKINNY_GRADS (on by default up to rank 64; here at 128 too): the backward's dA, dB and bias
    gradient by skinny_grads, on each of lora_backward's paths (on the side stream beside the dx kernel or before it
    on the main stream, and without the persistent dx), against the reference with bias and float32 adapters. With the
    dx kernel's xa workers and helpers on ("xa-workers"), the backward still makes dyb before the dx kernel: behind a
    dx kernel that made dyb, skinny_grads' partials were allocated beside dx and raised the peak (the fortieth
    session), so no such call is made."""
    from peftkern.kernels.triton import lora as kl

    peftkern.set_backend("triton")
    monkeypatch.setattr(kl, "SKINNY_GRADS", True)
    monkeypatch.setattr(kl, "SKINNY_SIDE", path == "side-stream")
    monkeypatch.setattr(kl, "SKINNY_MAX_RANK", 128)
    # at these 69 rows its partials outgrow dx, where lora_backward leaves it out (the peak rule): the paths are asked
    monkeypatch.setattr(kl, "skinny_partials_fit", lambda *a: True)
    monkeypatch.setattr(kl, "PERSISTENT_MIN_M", 1)
    monkeypatch.setattr(kl, "PERSISTENT_DX_MIN_M", 1)
    monkeypatch.setattr(kl, "PERSISTENT_DX", path != "no-persistent-dx")
    monkeypatch.setattr(kl, "TAIL_OVERLAP", "side")
    monkeypatch.setattr(kl, "XA_WORKERS", path == "xa-workers")
    monkeypatch.setattr(kl, "XA_HELPERS", path == "xa-workers")
    calls, dx_made_dyb = [], []
    real = kl.skinny_grads
    monkeypatch.setattr(kl, "skinny_grads", lambda *a, **k: calls.append(1) or real(*a, **k))
    real_pf = kl.persistent_forward
    monkeypatch.setattr(kl, "persistent_forward",
                        lambda *a, **k: dx_made_dyb.append(k.get("xa") is None and k.get("xa_scaled", False))
                        or real_pf(*a, **k))
    try:
        for dtype in (torch.float16, torch.bfloat16):
            for adapter_dtype in (None, torch.float32):
                # the dx kernel's output is (69, K): wide enough there for its helpers to make dyb, were they asked
                K, N = (520, 96) if path == "xa-workers" else (96, 520)
                x, w, A, B, b = make_inputs((3, 23), K, N, rank, dtype, adapter_dtype=adapter_dtype)
                calls.clear()
                got, ref = run_both("triton", x, w, A, B, b, 0.9, False)
                assert calls, f"skinny_grads did not run on the {path} path"
                assert not any(dx_made_dyb), "a dx kernel made dyb ahead of skinny_grads"
                for name in ref:
                    assert got[name].dtype == ref[name].dtype, name
                    assert_close(got[name], ref[name], dtype, f"skinny grads {path} {dtype} r={rank} {name}")
    finally:
        peftkern.set_backend(None)


@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="the side stream and cuBLAS's dA: a GPU path")
@pytest.mark.parametrize("setting", ["0", "1-triton", "1-cublas"])
def test_tail_da_matches_reference(setting, monkeypatch):
    """PEFTKERN_LORA_TAIL_DA: where dyb_db made dyb and dB (r <= 16), dA on the side stream behind the dx kernel ("1",
    by column_grad or by cuBLAS: PEFTKERN_LORA_TAIL_DA_BY) or by skinny_grads before it ("0"), against the reference
    with bias and float32 adapters, and the path taken is the one asked for."""
    from peftkern.kernels.triton import lora as kl

    peftkern.set_backend("triton")
    setting, _, by = setting.partition("-")
    monkeypatch.setattr(kl, "_TAIL_DA_SETTING", setting)
    monkeypatch.setattr(kl, "TAIL_DA_BY", by or "triton")
    column_calls = []
    real_column = kl.column_grad
    monkeypatch.setattr(kl, "column_grad", lambda *a, **k: column_calls.append(1) or real_column(*a, **k))
    monkeypatch.setattr(kl, "PERSISTENT_MIN_M", 1)
    monkeypatch.setattr(kl, "PERSISTENT_DX_MIN_M", 1)
    monkeypatch.setattr(kl, "XA_WORKERS", False)
    monkeypatch.setattr(kl, "XA_HELPERS", False)
    skinny_calls, dyb_db_calls = [], []
    real_skinny, real_dyb_db = kl.skinny_grads, kl.dyb_db
    monkeypatch.setattr(kl, "skinny_grads", lambda *a, **k: skinny_calls.append(a[8]) or real_skinny(*a, **k))
    monkeypatch.setattr(kl, "dyb_db", lambda *a, **k: dyb_db_calls.append(1) or real_dyb_db(*a, **k))
    try:
        for dtype in (torch.float16, torch.bfloat16):
            for adapter_dtype in (None, torch.float32):
                # K wide against N: dyb_db's partials fit beside dx (dyb_db_fits)
                x, w, A, B, b = make_inputs((3, 43), 520, 96, 16, dtype, adapter_dtype=adapter_dtype)
                skinny_calls.clear()
                dyb_db_calls.clear()
                column_calls.clear()
                got, ref = run_both("triton", x, w, A, B, b, 0.9, False)
                assert dyb_db_calls, "dyb_db did not run"
                assert bool(column_calls) == (by == "triton"), (by, column_calls)
                # skinny_grads' need_a: dA by skinny_grads only where the tail is off
                assert (not skinny_calls) if setting == "1" else (skinny_calls and all(skinny_calls)), skinny_calls
                for name in ref:
                    assert got[name].dtype == ref[name].dtype, name
                    assert_close(got[name], ref[name], dtype, f"tail dA {setting} {dtype} {adapter_dtype} {name}")
    finally:
        peftkern.set_backend(None)


@pytest.mark.parametrize("backend", backend_params("lora"), indirect=True)
@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=["0", "2x0"])
def test_an_empty_batch_gives_zero_gradients(backend, lead):
    """No tokens (an empty batch or sequence): an empty output, and zero gradients for x, A, B and the bias, as PEFT's
    eager layer gives them (None would make DDP and the optimizer treat the adapter as unused that step)."""
    for dtype in dtypes_for(backend):
        x = torch.randn(*lead, 24, device=DEVICE, dtype=dtype, requires_grad=True)
        w = torch.randn(40, 24, device=DEVICE, dtype=dtype)
        a = torch.randn(8, 24, device=DEVICE, dtype=dtype, requires_grad=True)
        b = torch.randn(40, 8, device=DEVICE, dtype=dtype, requires_grad=True)
        bias = torch.randn(40, device=DEVICE, dtype=dtype, requires_grad=True)
        y = peftkern.lora_linear(x, w, a, b, 2.0, bias, dropout_p=0.1)
        assert y.shape == (*lead, 40) and y.dtype == dtype
        y.sum().backward()
        for name, t in (("x", x), ("lora_A", a), ("lora_B", b), ("bias", bias)):
            assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any(), name

"""Contracts every op keeps at the edges of its inputs, on every backend: strided 1-D operands, double backward,
float64 under autocast, scalar arguments, the fake implementations' outputs, and what is kept for backward.
(Found by a review of the public ops on 2026-12-04; each test failed before its fix.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DEVICE, assert_close, backend_params, run_seed
from test_modules import MAKERS
from torch._subclasses.fake_tensor import FakeTensorMode

import peftkern
from peftkern import reference

ALL_OPS = ["lora", "ia3-output", "ia3-input", "krona", "adapter"]


def _backend_for(kind: str) -> str:
    return {"ia3-output": "ia3", "ia3-input": "ia3", "krona-kron": "krona"}.get(kind, kind)


def _params(kinds=ALL_OPS):
    return [pytest.param(kind, b.values[0], id=f"{kind}-{b.id}", marks=b.marks)
            for kind in kinds for b in backend_params(_backend_for(kind))]


def _call(kind: str, x, vec, g=None, **overrides):
    """The op `kind` on x (M, 24) with vec as its 1-D operand (bias; IA3's l; the adapter's up bias); fixed random
    weights from generator g."""
    g = g or torch.Generator().manual_seed(run_seed(1))
    K = N = x.shape[-1]

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=x.device, dtype=x.dtype)

    w = rand(N, K)
    if kind == "lora":
        return peftkern.lora_linear(x, w, rand(4, K), rand(N, 4), 0.5, bias=vec)
    if kind == "ia3-output":
        return peftkern.ia3_linear(x, w, vec, rand(N))
    if kind == "ia3-input":
        return peftkern.ia3_linear(x, w, vec, rand(N), scale_input=True)
    if kind == "krona":
        return peftkern.krona_linear(x, w, rand(4, 6), rand(6, 4), 0.5, bias=vec)
    return peftkern.bottleneck_adapter(x, rand(8, K), rand(8), rand(K, 8), vec, "gelu")


@pytest.mark.parametrize("kind,backend", _params(), indirect=["backend"])
def test_strided_and_expanded_vectors(kind, backend):
    """A bias or IA3 vector that is a strided view (a column of a table) or an expanded one (ones(1).expand(N)) gives
    the contiguous vector's answer: the Triton kernels index vectors as pointer + column, and read wrong values (or
    past a 1-element storage) before the ops made them contiguous."""
    x = torch.randn(7, 24, device=DEVICE)
    table = torch.randn(24, 3, device=DEVICE)
    for vec in (table[:, 1], torch.full((1,), 0.75, device=DEVICE).expand(24)):
        assert not vec.is_contiguous()
        assert_close(_call(kind, x, vec), _call(kind, x, vec.contiguous()), torch.float32, f"{kind} output")


@pytest.mark.parametrize("kind,backend", _params(), indirect=["backend"])
def test_double_backward_raises(kind, backend):
    """create_graph=True through a fused op, then a gradient of its gradient (a gradient penalty): the backwards are
    not differentiable, so this raises rather than dropping the second-order term (every backend gave a silently
    wrong answer before)."""
    x = torch.randn(5, 24, device=DEVICE, requires_grad=True)
    vec = torch.randn(24, device=DEVICE, requires_grad=True)
    y = _call(kind, x, vec)
    gx, = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.square().sum().backward()
    # a gradient that names the op's inputs: once_differentiable's error node hung off detached copies, so
    # autograd.grad found no path to x (None with allow_unused, a misleading error without) and hessian gave zeros
    gx, = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        torch.autograd.grad(gx.square().sum(), x, allow_unused=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        torch.autograd.functional.hessian(lambda v: _call(kind, v, vec).tanh().sum(), x[:2].detach())
    # an ordinary backward is untouched
    y = _call(kind, x, vec)
    gx, gv = torch.autograd.grad(y.square().sum(), [x, vec])
    assert gx.requires_grad is False and torch.isfinite(gv).all()


@pytest.mark.parametrize("kind,backend", _params(["lora", "ia3-output"]), indirect=["backend"])
@pytest.mark.parametrize("through", ["leaf", "intermediate"])
def test_second_order_through_an_input_the_op_does_not_keep(kind, backend, through):
    """LoRA with A and the weight frozen, and IA3's output form with its weight frozen, keep no x for backward; IA3's
    output form keeps z = x W^T + b, not the bias. dB and dl depend on x (and dl on the bias) all the same, and a
    gradient of them with respect to x, to what x was made from, or to the bias came back None or zeros from
    autograd.grad(allow_unused=True) and jacobian (an exploratory test, 2026-12-07): it raises now."""
    g = torch.Generator().manual_seed(run_seed(11))
    u = torch.randn(6, 24, generator=g).to(DEVICE).requires_grad_()
    x = u * 1.5 if through == "intermediate" else u
    w, wanted = torch.randn(24, 24, generator=g).to(DEVICE), []
    if kind == "lora":  # LoRA-FA: A frozen, B trains
        B = torch.randn(24, 4, generator=g).to(DEVICE).requires_grad_()
        y = peftkern.lora_linear(x, w, torch.randn(4, 24, generator=g).to(DEVICE), B, 0.5)
        trained = [B]
    else:
        scale, bias = (torch.randn(24, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
        y = peftkern.ia3_linear(x, w, scale, bias)
        trained, wanted = [scale], [bias]
    del x  # an intermediate x is then held by nothing (the op keeps none)
    grad, = torch.autograd.grad((y * torch.randn_like(y)).sum(), trained, create_graph=True)
    for target in [u, *wanted]:
        with pytest.raises(RuntimeError, match="once_differentiable"):
            torch.autograd.grad(grad.square().sum(), target, allow_unused=True, retain_graph=True)


@pytest.mark.parametrize("kind,backend", _params(["lora", "ia3-output"]), indirect=["backend"])
@pytest.mark.parametrize("b_trains", [True, False])
def test_a_penalty_on_dx_through_a_layer_that_keeps_no_x_is_exact(kind, backend, b_trains):
    """An input-gradient penalty (double backprop) differentiated with respect to an upstream layer, through LoRA with
    A and the weight frozen (B trained or not) or IA3's output form with its weight frozen: dx does not depend on x,
    so the answer exists, and it came back exact before the second-order links above. Tied to every gradient, they
    made it raise (a review of the change, 2026-12-08)."""
    g = torch.Generator().manual_seed(run_seed(13))
    up = torch.nn.Linear(16, 24).to(DEVICE)
    inp = torch.randn(5, 16, generator=g).to(DEVICE).requires_grad_()
    w, v = torch.randn(32, 24, generator=g).to(DEVICE), torch.randn(5, 32, generator=g).to(DEVICE)
    A = torch.randn(4, 24, generator=g).to(DEVICE)
    B = torch.randn(32, 4, generator=g).to(DEVICE).requires_grad_(b_trains)
    scale = torch.rand(32, generator=g).to(DEVICE).add_(0.5).requires_grad_()

    def penalty_grad(lib):
        x = torch.tanh(up(inp))
        y = lib.lora_linear(x, w, A, B, 0.5) if kind == "lora" else lib.ia3_linear(x, w, scale)
        g_inp, = torch.autograd.grad((y * v).sum(), inp, create_graph=True)
        return torch.autograd.grad(g_inp.square().sum(), up.weight)[0]

    assert_close(penalty_grad(peftkern), penalty_grad(reference), torch.float32, f"{kind} penalty gradient")


@pytest.mark.parametrize("kind,backend", _params(["lora", "adapter"]), indirect=["backend"])
def test_a_zero_scaling_keeps_a_nan_in_the_gradients(kind, backend):
    """scaling 0 times a gradient product that holds a nan is nan, as the reference and PEFT give: the Triton path's
    addmm with alpha 0 read neither operand and gave the adapter's weight gradient 0 (an exploratory test,
    2026-12-07)."""
    g = torch.Generator().manual_seed(run_seed(12))
    x = torch.randn(6, 24, generator=g).to(DEVICE)
    x[2, 5] = float("nan")
    w = torch.randn(24, 24, generator=g).to(DEVICE)
    if kind == "lora":
        A, B = (torch.randn(*shape, generator=g).to(DEVICE).requires_grad_() for shape in ((4, 24), (24, 4)))
        peftkern.lora_linear(x, w, A, B, 0.0).sum().backward()
        ref, = torch.autograd.grad(reference.lora_linear(x, w, A, B, 0.0).sum(), B)
        got = B.grad
    else:
        up = torch.randn(24, 8, generator=g).to(DEVICE).requires_grad_()
        args = (torch.randn(8, 24, generator=g).to(DEVICE), None, up, None)
        peftkern.bottleneck_adapter(x, *args, scaling=0.0).sum().backward()
        ref, = torch.autograd.grad(reference.bottleneck_adapter(x, *args, scaling=0.0).sum(), up)
        got = up.grad
    assert ref.isnan().any()
    assert torch.equal(got.isnan(), ref.isnan())


def test_scaled_mm_at_zero_scaling_takes_a_float32_product():
    """scaling 0 times a product that overflows 16 bits but not float32 (a GradScaler's scaled gradients) is 0, as
    the reference's float32 product gives: the first version of the fix above multiplied a 16-bit inf by 0 (a review
    of the change, 2026-12-08)."""
    from peftkern.kernels.triton.lora import scaled_mm

    a = torch.full((4, 64), 60.0, dtype=torch.float16, device=DEVICE)
    b = torch.full((64, 8), 30.0, dtype=torch.float16, device=DEVICE)
    assert torch.equal(scaled_mm(a, b, 0.0, torch.float32), torch.zeros(4, 8, device=DEVICE))
    assert torch.equal(scaled_mm(a, b, 0.0, torch.float16), torch.zeros(4, 8, dtype=torch.float16, device=DEVICE))


@pytest.mark.parametrize("kind", ["lora", "ia3-output", "ia3-input", "krona"])
def test_eager_and_compiled_agree_under_autocast(kind):
    """Under autocast the op casts x and the frozen weight as F.linear would, then its body computes as it does
    without autocast. Left on in eager calls, autocast recast the body's float32 products (xa, x W^T) to bf16, and
    the compiled op, opaque to it, did not: the two differed by about one bf16 rounding (0.125 on LoRA's output;
    an exploratory test, 2026-12-08)."""
    g = torch.Generator().manual_seed(run_seed(14))

    def rand(*shape, grad=False):
        return torch.randn(*shape, generator=g).to(DEVICE).requires_grad_(grad)

    x, vec, w, bias = rand(6, 24).mul_(4.0).requires_grad_(), rand(24, grad=True), rand(24, 24), rand(24)
    first, second = (rand(4, 24, grad=True), rand(24, 4, grad=True)) if kind == "lora" else \
        (rand(4, 6, grad=True), rand(6, 4, grad=True))
    trained = [x, vec, first, second] if kind in ("lora", "krona") else [x, vec]

    def op(a):
        if kind == "lora":
            return peftkern.lora_linear(a, w, first, second, 0.5, bias=vec)
        if kind == "krona":
            return peftkern.krona_linear(a, w, first, second, 0.5, bias=vec)
        return peftkern.ia3_linear(a, w, vec, bias, scale_input=kind == "ia3-input")

    def run(fn):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            y = fn(x)
        return (y, *torch.autograd.grad((y.float() * y.float()).sum(), trained))

    eager, compiled = run(op), run(torch.compile(op, backend="aot_eager", fullgraph=True))
    for i, (e, c) in enumerate(zip(eager, compiled)):
        assert torch.equal(e, c), f"{kind} output / gradient {i}: eager and compiled differ by {(e - c).abs().max()}"


@pytest.mark.parametrize("kind", ALL_OPS)
def test_float64_is_left_alone_by_autocast(kind):
    """Autocast leaves float64 tensors alone (F.linear stays float64 under it); the ops cast them down before."""
    x = torch.randn(5, 24, dtype=torch.float64)
    vec = torch.randn(24, dtype=torch.float64)
    plain = _call(kind, x, vec)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = _call(kind, x, vec)
    assert inside.dtype == torch.float64
    assert_close(inside, plain, torch.float64, f"{kind} under autocast")


def test_scalar_arguments():
    x, w, A, B = torch.randn(3, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    # a tensor scaling that requires grad would get none (it is read as a number): TypeError
    with pytest.raises(TypeError, match="requires grad"):
        peftkern.lora_linear(x, w, A, B, torch.tensor(0.5, requires_grad=True))
    with pytest.raises(TypeError, match="requires grad"):
        peftkern.krona_linear(x, w, torch.randn(2, 2), torch.randn(3, 4), torch.tensor(0.5, requires_grad=True))
    with pytest.raises(ValueError, match="dropout_p"):
        peftkern.lora_linear(x, w, A, B, 0.5, dropout_p=float("nan"))
    # numpy scalars are numbers
    want = peftkern.lora_linear(x, w, A, B, 0.5)
    for s in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5)):
        assert_close(peftkern.lora_linear(x, w, A, B, s), want, torch.float32, f"scaling {type(s).__name__}")


def test_adapter_rejects_a_layer_norm_of_another_width():
    h = torch.randn(5, 12)
    with pytest.raises(ValueError, match="layer_norm normalises"):
        peftkern.bottleneck_adapter(h, torch.randn(4, 12), None, torch.randn(12, 4), None,
                                    layer_norm=torch.nn.LayerNorm(15, elementwise_affine=False))


@pytest.mark.parametrize("backend", backend_params("krona"), indirect=True)
def test_krona_training_after_inference_mode(backend):
    """A Compacter-style sum (rank 64) takes the LoRA route, whose identity factors are cached per shape: a first
    call under inference_mode cached an inference tensor, and every later training call of that shape raised."""
    from peftkern.ops import krona

    krona._EYES.clear()
    layer = peftkern.nn.KronALinear(256, 256, a_shape=(4, 4), terms=4, rank=4).to(DEVICE)
    x = torch.randn(2, 256, device=DEVICE)
    with torch.inference_mode():
        layer(x)
    layer(x).sum().backward()
    fresh = peftkern.nn.KronALinear(256, 256, a_shape=(4, 4), terms=4, rank=4).to(DEVICE)
    fresh(x).sum().backward()
    assert all(p.grad is not None for p in fresh.parameters() if p.requires_grad)


@pytest.mark.parametrize("backend", backend_params("krona"), indirect=True)
@pytest.mark.parametrize("k1", [2, 1])
def test_krona_merge_takes_a_column_major_factor(backend, k1):
    """A transposed factor: (3, 2), and (3, 1), which counts as contiguous with strides (1, 3), so the reference's
    .contiguous() before torch.kron copied nothing and kron's view raised (a review, 2026-12-05)."""
    w = torch.randn(9, 4 * k1, device=DEVICE)
    A, B = torch.randn(k1, 3, device=DEVICE).t(), torch.randn(3, 4, device=DEVICE)
    want = w + 0.5 * torch.tensor(np.kron(A.cpu().numpy(), B.cpu().numpy()), device=DEVICE)
    assert_close(peftkern.krona_merge_(w.clone(), A, B, 0.5), want, torch.float32, "merged weight")


def _merge_layer(kind: str) -> torch.nn.Module:
    """A layer of `kind` (test_modules.MAKERS) whose adapter changes the output (random adapter parameters, not the
    init)."""
    layer = MAKERS[kind]().to(DEVICE)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.uniform_(0.5, 1.5)
    return layer


@pytest.mark.parametrize("kind,backend", [pytest.param(k, b.values[0], id=f"{k}-{b.id}", marks=b.marks)
                                          for k in MAKERS for b in backend_params(k.split("-")[0])],
                         indirect=["backend"])
@pytest.mark.parametrize("between", ["merge", "unmerge"])
def test_backward_after_a_merge_raises(kind, backend, between):
    """merge() or unmerge() between a forward and its backward changes the weight that backward reads: it raises, as
    after any in-place change. The Triton merge kernels wrote through the weight's pointer and left its version alone,
    so LoRA's and KronA's backward silently used the merged weight beside the adapter: the delta twice (LoRA's dx 86
    off, a review, 2026-12-05)."""
    layer = _merge_layer(kind)
    x = torch.randn(5, 24, device=DEVICE, requires_grad=True)
    if between == "unmerge":
        layer.merge()
    y = layer(x)
    layer.merge() if between == "merge" else layer.unmerge()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("backend", backend_params("ia3"), indirect=True)
@pytest.mark.parametrize("bias_size", [1, 6])
def test_ia3_merge_checks_the_bias(backend, bias_size):
    """ia3_merge_ took any bias: the Triton kernel read past l for a longer one and scaled a 1-element one by l[0]."""
    w, scale, bias = (torch.randn(4, 3, device=DEVICE), torch.rand(4, device=DEVICE) + 0.5,
                      torch.randn(bias_size, device=DEVICE))
    w0, b0 = w.clone(), bias.clone()
    with pytest.raises(ValueError, match=r"bias of shape \(%d,\) does not fit weight \(4, 3\)" % bias_size):
        peftkern.ia3_merge_(w, scale, bias)
    assert torch.equal(w, w0) and torch.equal(bias, b0), "a refused merge changes nothing"


def _fake_matches_real(op, args) -> None:
    real = op(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    real, fake = (out if isinstance(out, (tuple, list)) else (out,) for out in (real, fake))
    assert len(real) == len(fake), f"{op}: {len(real)} real outputs, {len(fake)} fake ones"
    for i, (r, f) in enumerate(zip(real, fake)):
        assert (r.shape, r.dtype) == (f.shape, f.dtype), f"output {i}: real {tuple(r.shape)} {r.dtype}, fake " \
                                                         f"{tuple(f.shape)} {f.dtype}"


@pytest.mark.parametrize("backend", backend_params("lora"), indirect=True)
def test_ops_fakes_match_the_real_outputs(backend):
    """The fake implementations give every output the real op's shape and dtype, the empty 'not asked for' ones
    included (fp16 activations beside fp32 adapters, as PEFT keeps them: they differed for lora_bwd, ia3_bwd and
    adapter_bwd), on every backend that runs here. krona_bwd's fake gave da2 a shape where a2 is None and need_a2
    is set (2026-12-05; krona_linear never asks for it, a direct call of the op could)."""
    from peftkern import _backend

    ops, dev = torch.ops.peftkern, torch.device(DEVICE)
    torch.manual_seed(run_seed(0))

    def runs(op):
        return _backend.available(backend, dev, op)

    M, K, N, r = 5, 12, 10, 3
    x, w, gy = (torch.randn(*shape, device=dev).half() for shape in ((M, K), (N, K), (M, N)))
    A, B = torch.randn(r, K, device=dev), torch.randn(N, r, device=dev)
    if runs("lora"):
        _fake_matches_real(ops.lora_fwd, (x, w, A, B, None, None, 0.5, 0.0, False, backend))
        _, xa = ops.lora_fwd(x, w, A, B, None, None, 0.5, 0.0, False, backend)
        for needs in ((True, True, True, False, False), (True, False, False, True, True)):
            _fake_matches_real(ops.lora_bwd, (gy, x, w, A, B, xa, None, 0.5, 0.0, False, backend, *needs))
    if runs("ia3"):
        l_out, l_in = torch.randn(N, device=dev), torch.randn(K, device=dev)
        _fake_matches_real(ops.ia3_fwd, (x, w, l_out, None, False, False, backend))
        _fake_matches_real(ops.ia3_fwd, (x, w, l_in, None, True, False, backend))
        _, z = ops.ia3_fwd(x, w, l_out, None, False, False, backend)
        for needs in ((True, True, False, False), (False, False, True, True)):
            _fake_matches_real(ops.ia3_bwd, (gy, x, w, l_out, z, False, False, backend, *needs))
            _fake_matches_real(ops.ia3_bwd, (gy, x, w, l_in, x.new_empty((0,)), True, False, backend, *needs))
    if runs("adapter"):
        d, b = 12, 4
        h, gh = (torch.randn(M, d, device=dev).half() for _ in range(2))
        wd, bd, wu, bu = (torch.randn(*shape, device=dev) for shape in ((b, d), (b,), (d, b), (d,)))
        fwd = (h, wd, bd, wu, bu, None, None, None, None, "relu", 1.0, False, 1e-5, backend)
        _fake_matches_real(ops.adapter_fwd, fwd)
        _, z, st = ops.adapter_fwd(*fwd)
        for needs in ((True, True, False, True, False), (False, False, True, False, True)):
            _fake_matches_real(ops.adapter_bwd, (gh, h, wd, bd, wu, bu, None, z, st, None, None, "relu", 1.0, True,
                                                 False, backend, *needs, False, False, False))
    if runs("krona"):  # N = 10 = 2 x 5, K = 12 = 3 x 4, two terms; B of rank 2 in the second case
        a, b = torch.randn(2, 2, 3, device=dev), torch.randn(2, 5, 4, device=dev)
        b_lo, b_hi = torch.randn(2, 5, 2, device=dev), torch.randn(2, 2, 4, device=dev)
        for factors in ((a, None, b, None), (a, None, b_lo, b_hi)):
            _fake_matches_real(ops.krona_fwd, (x, w, *factors, None, 0.5, backend))
            for needs in ((True,) * 3 + (False,) * 4, (False,) * 3 + (True,) * 4):
                _fake_matches_real(ops.krona_bwd, (gy, x, w, *factors, 0.5, backend, *needs))


def _saved_activation_bytes(fn, params) -> int:
    """Bytes of the tensors autograd keeps for fn's backward, parameters excluded."""
    kept = []
    ids = {p.data_ptr() for p in params}

    def pack(t):
        if t.data_ptr() not in ids:
            kept.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(kept)


@pytest.mark.parametrize("backend", backend_params("ia3"), indirect=True)
def test_ia3_output_form_keeps_no_input_for_a_frozen_weight(backend):
    """The output form's backward needs x only for the weight's gradient: with the weight frozen (always, under
    PEFT) x is not kept, as eager F.linear(x, W) * l keeps none; the gradients are the reference's."""
    M, K, N = 64, 48, 40
    x = torch.randn(M, K, device=DEVICE, requires_grad=True)
    w, b = torch.randn(N, K, device=DEVICE), torch.randn(N, device=DEVICE)
    scale = torch.randn(N, device=DEVICE, requires_grad=True)
    saved = _saved_activation_bytes(lambda: peftkern.ia3_linear(x, w, scale, b), [w, b, scale])
    assert saved <= M * N * 4 + 4096, f"kept {saved} bytes: more than z (M x N)"
    got = torch.autograd.grad(peftkern.ia3_linear(x, w, scale, b).square().sum(), [x, scale])
    xr, sr = x.detach().double().requires_grad_(), scale.detach().double().requires_grad_()
    want = torch.autograd.grad(reference.ia3_linear(xr, w.double(), sr, b.double(), False).square().sum(), [xr, sr])
    for g, r, name in zip(got, want, ("dx", "dl")):
        assert_close(g, r, torch.float32, name)
    # with the weight trainable x is kept, and its gradient is right
    w.requires_grad_(True)
    saved = _saved_activation_bytes(lambda: peftkern.ia3_linear(x, w, scale, b), [w, b, scale])
    assert saved >= M * K * 4
    gw, = torch.autograd.grad(peftkern.ia3_linear(x, w, scale, b).square().sum(), [w])
    wr = w.detach().double().requires_grad_()
    gwr, = torch.autograd.grad(reference.ia3_linear(x.detach().double(), wr, scale.detach().double(), b.double(),
                                                    False).square().sum(), [wr])
    assert_close(gw, gwr, torch.float32, "dW")


ZERO_WIDTH = {  # (x's shape, the op on x with gradients for its adapter tensors): one width of 0 each
    "lora-N0": ((4, 8), lambda x, t: peftkern.lora_linear(x, t(0, 8), t(2, 8, grad=True), t(0, 2, grad=True), 1.0)),
    "lora-K0": ((4, 0), lambda x, t: peftkern.lora_linear(x, t(6, 0), t(2, 0, grad=True), t(6, 2, grad=True), 1.0)),
    "ia3-output-N0": ((4, 8), lambda x, t: peftkern.ia3_linear(x, t(0, 8), t(0, grad=True))),
    "ia3-input-N0": ((4, 8), lambda x, t: peftkern.ia3_linear(x, t(0, 8), t(8, grad=True), scale_input=True)),
    "krona-K0": ((4, 0), lambda x, t: peftkern.krona_linear(x, t(6, 0), t(2, 0, grad=True), t(3, 0, grad=True), 1.0)),
    "adapter-d0": ((4, 0), lambda x, t: peftkern.bottleneck_adapter(x, t(2, 0, grad=True), None, t(0, 2, grad=True),
                                                                    None)),
}


@pytest.mark.parametrize("case", ZERO_WIDTH)
@pytest.mark.parametrize("backend", backend_params("lora"), indirect=True)  # cuda: KronA on Triton
def test_a_width_of_zero_gives_empty_outputs_and_zero_gradients(case, backend):
    """A weight with no rows or no columns: the Triton planners divided by zero (ZeroDivisionError), the cuda
    backend's IA3 reduction by an integer zero (a crash of the process), reshape(-1, 0) raised. Now the reference's
    products run, as for an empty batch."""
    shape, op = ZERO_WIDTH[case]
    made = []

    def t(*shape, grad=False):
        made.append(torch.randn(*shape, device=DEVICE).requires_grad_(grad))
        return made[-1]

    x = torch.randn(*shape, device=DEVICE, requires_grad=True)
    y = op(x, t)
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape and not x.grad.any()
    for tensor in made:
        if tensor.requires_grad:
            assert tensor.grad is not None and tensor.grad.shape == tensor.shape and not tensor.grad.any()


def _expert_layer(kind: str, t):
    """One expert's adapted layer (x (M, 24) -> y (M, 24)) of `kind`, its tensors made by t(*shape, grad=...)."""
    if kind == "lora":
        weights = t(24, 24), t(4, 24, grad=True), t(24, 4, grad=True), t(24, grad=True)
        return lambda x: peftkern.lora_linear(x, *weights[:3], 0.5, weights[3], dropout_p=0.25)
    if kind in ("ia3-output", "ia3-input"):
        weights = t(24, 24), t(24, grad=True), t(24, grad=True)
        return lambda x: peftkern.ia3_linear(x, *weights, scale_input=kind == "ia3-input")
    if kind in ("krona", "krona-kron"):
        weights = t(24, 24), (t(4, 2, grad=True), t(2, 6, grad=True)), t(6, 4, grad=True), t(24, grad=True)
        return lambda x: peftkern.krona_linear(x, *weights[:3], 0.5, weights[3])
    weights = t(8, 24, grad=True), t(8, grad=True), t(24, 8, grad=True), t(24, grad=True), t(24, grad=True)
    return lambda x: peftkern.bottleneck_adapter(x, *weights[:4], "gelu", 0.5, layer_norm=(weights[4], None))


@pytest.mark.parametrize("kind,backend", _params(ALL_OPS + ["krona-kron"]), indirect=["backend"])
def test_a_compiled_mixture_of_experts_routes_no_token_to_an_expert(kind, backend, eager_rng, monkeypatch):
    """A mixture of experts compiled whole (fullgraph, torch.where's token lists captured:
    capture_dynamic_output_shape_ops) calls each expert's layer on a row count that depends on the routing, 0 for an
    expert no token chose. The ops tested it for 0 at trace time ("Could not guard on data-dependent expression": an
    error under fullgraph, a graph break in every layer without), where F.linear traces; taken through the op
    instead, the Triton backward divided by that 0 and the reference's KronA and LN backwards raised. Now the graph
    holds the ops and an expert without tokens gets zero gradients, as in eager mode."""
    from peftkern.ops import krona

    if kind == "krona-kron":  # the Kronecker kernels, not the LoRA op's route
        monkeypatch.setattr(krona, "LORA_ROUTE_MAX_RANK", [0])
    kind = kind.removesuffix("-kron")
    made = []

    def t(*shape, grad=False):
        made.append(torch.randn(*shape, device=DEVICE).requires_grad_(grad))
        return made[-1]

    experts = [_expert_layer(kind, t) for _ in range(3)]
    h = torch.randn(6, 24, device=DEVICE, requires_grad=True)
    # the last expert gets no token (last: a compiled call draws its dropout seed, which an eager call without rows
    # does not, and the experts after it would draw different masks)
    route = torch.tensor([0, 1, 0, 0, 1, 0], device=DEVICE)

    def moe(h, route):
        out = torch.zeros_like(h)
        for e, expert in enumerate(experts):
            (tokens,) = torch.where(route == e)
            out = out.index_add(0, tokens, expert(h[tokens]))
        return out

    torch._dynamo.reset()  # moe's code object is every case's: their graphs would pile up past the recompile limit
    compiled = torch.compile(moe, fullgraph=True)
    results = []
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        for fn in (moe, compiled):
            for tensor in made + [h]:
                tensor.grad = None
            torch.manual_seed(run_seed(7))  # the same dropout seeds for both
            y = fn(h, route)
            y.square().sum().backward()
            results.append((y.detach(), [tensor.grad for tensor in made + [h]]))
    (y_eager, grads_eager), (y_compiled, grads_compiled) = results
    assert_close(y_compiled, y_eager, torch.float32, f"{kind} output")
    per_expert = len(made) // len(experts)
    for i, tensor in enumerate(made + [h]):
        if not tensor.requires_grad:
            continue
        got, want = grads_compiled[i], grads_eager[i]
        name = f"{kind} gradient of expert {i // per_expert}'s {tuple(tensor.shape)}" if i < len(made) else "dh"
        assert got is not None and got.shape == tensor.shape, f"{name}: {None if got is None else got.shape}"
        if 2 * per_expert <= i < len(made):
            assert not got.any(), f"{name}: the expert with no token gets zero gradients"
        else:
            assert_close(got, want, torch.float32, name)


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non-strict"])
@pytest.mark.parametrize("kind,backend", _params(), indirect=["backend"])
def test_an_exported_mixture_of_experts_routes_no_token_to_an_expert(kind, backend, strict):
    """torch.export of the mixture of experts above, run on routings that give an expert no token
    or one. Each expert's row count is unbacked (torch.where's); a strict export failed on every op ("'function' object
    has no attribute 'is_quantized'": the message function of apply_by_rows' torch._check went into dynamo's
    graph)."""

    def t(*shape, grad=False):
        return torch.randn(*shape, device=DEVICE)

    experts = [_expert_layer(kind, t) for _ in range(3)]

    class MoE(torch.nn.Module):
        def forward(self, h, route):
            out = torch.zeros_like(h)
            for e, expert in enumerate(experts):
                (tokens,) = torch.where(route == e)
                out = out.index_add(0, tokens, expert(h[tokens]))
            return out

    h = torch.randn(6, 24, device=DEVICE)
    exported = torch.export.export(MoE(), (h, torch.tensor([0, 1, 0, 2, 1, 2], device=DEVICE)), strict=strict)
    # an expert without tokens is the last (the graph draws its dropout seed, which an eager call without rows does
    # not: the experts after it would draw other masks), or gets one token
    for route in ([0, 1, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0], [0, 1, 1, 2, 1, 1]):
        route = torch.tensor(route, device=DEVICE)
        outputs = []
        for fn in (exported.module(), MoE()):
            torch.manual_seed(run_seed(7))  # the same dropout seeds for both (the LoRA expert's p = 0.25)
            outputs.append(fn(h, route))
        assert_close(*outputs, torch.float32, f"{kind} output, route {route.tolist()}")


def test_ops_launch_on_their_tensors_gpu(monkeypatch):
    """Triton and the C++ launcher launch on the current device: an op whose tensors are on another GPU (a model split
    by device_map="auto") enters that GPU first. Checked here by the guard's choice; on two GPUs by the next test."""
    from peftkern.ops import _common

    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda index: entered.append(index) or torch.autograd.no_grad())

    class OnGPU:
        is_cuda = True

        def __init__(self, index):
            self.index = index

        def get_device(self):
            return self.index

    with _common.on_device(OnGPU(1)):
        pass
    with _common.on_device(OnGPU(0)):
        pass
    with _common.on_device(torch.zeros(1)):
        pass
    assert entered == [1], entered


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("kind", ALL_OPS)
def test_an_op_on_the_second_gpu_while_the_first_is_current(kind):
    x = torch.randn(1024, 24, device="cuda:1", dtype=torch.bfloat16, requires_grad=True)
    vec = torch.randn(24, device="cuda:1", dtype=torch.bfloat16)
    with torch.cuda.device(0):
        y = _call(kind, x, vec)
        y.float().square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    with torch.cuda.device(1):
        y_ref = _call(kind, x_ref, vec)
        y_ref.float().square().sum().backward()
    torch.cuda.synchronize(1)
    assert_close(y, y_ref, torch.bfloat16, f"{kind} output")
    assert_close(x.grad, x_ref.grad, torch.bfloat16, f"{kind} dx")


def _subclass_cases(kind: str, x: torch.Tensor):
    """(operands by name, the op on them) for a subclass check: every tensor operand named, so that each can be
    swapped for a wrapper subclass in turn."""
    g = torch.Generator().manual_seed(run_seed(2))
    K = N = x.shape[-1]

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=x.device, dtype=x.dtype)

    if kind == "lora":
        ops = dict(x=x, weight=rand(N, K), lora_A=rand(4, K), lora_B=rand(N, 4), bias=rand(N))
        return ops, lambda o: peftkern.lora_linear(o["x"], o["weight"], o["lora_A"], o["lora_B"], 0.5, o["bias"])
    if kind in ("ia3-output", "ia3-input"):
        ops = dict(x=x, weight=rand(N, K), scale=rand(N), bias=rand(N))
        return ops, lambda o: peftkern.ia3_linear(o["x"], o["weight"], o["scale"], o["bias"],
                                                  scale_input=kind == "ia3-input")
    if kind == "krona":
        ops = dict(x=x, weight=rand(N, K), A=rand(4, 6), B=rand(6, 4), bias=rand(N))
        return ops, lambda o: peftkern.krona_linear(o["x"], o["weight"], o["A"], o["B"], 0.5, bias=o["bias"])
    ops = dict(h=x, down_weight=rand(8, K), down_bias=rand(8), up_weight=rand(K, 8), up_bias=rand(K),
               scale=rand(()), residual=rand(*x.shape), ln_weight=rand(K), ln_bias=rand(K))
    return ops, lambda o: peftkern.bottleneck_adapter(o["h"], o["down_weight"], o["down_bias"], o["up_weight"],
                                                      o["up_bias"], "gelu", o["scale"], o["residual"],
                                                      (o["ln_weight"], o["ln_bias"]))


@pytest.mark.parametrize("kind,backend", _params(), indirect=["backend"])
def test_a_subclass_operand_runs_on_the_reference(kind, backend):
    """Any tensor operand a wrapper subclass (as a quantised weight is: no storage of its own) runs on the reference
    with a warning and gives the plain tensors' answer. Only x was checked: a subclass weight, adapter, vector or
    factor reached the kernels, which read it through a data pointer it lacks, and the call crashed inside the launch
    (a review, 2026-12-05)."""
    two_tensor = pytest.importorskip("torch.testing._internal.two_tensor")
    x = torch.randn(5, 24, device=DEVICE)
    ops, op = _subclass_cases(kind, x)
    expected = op(ops)
    for name, t in ops.items():
        wrapped = two_tensor.TwoTensor(t, t.clone())
        got = op({**ops, name: wrapped})
        got = got.a if isinstance(got, two_tensor.TwoTensor) else got
        assert_close(got, expected, torch.float32, f"{kind} with {name} a subclass")
    if kind == "lora":  # a sparse weight likewise
        got = op({**ops, "weight": ops["weight"].to_sparse()})
        assert_close(got, expected, torch.float32, "lora with a sparse weight")


@pytest.mark.parametrize("kind,backend", _params(["lora", "ia3-output", "krona"]), indirect=["backend"])
def test_a_subclass_operand_merges_on_the_reference(kind, backend):
    """The merges likewise, for each operand a wrapper subclass."""
    two_tensor = pytest.importorskip("torch.testing._internal.two_tensor")
    g = torch.Generator().manual_seed(run_seed(3))

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE)

    w = rand(24, 24)
    ops = {"lora": dict(lora_A=rand(4, 24), lora_B=rand(24, 4)), "ia3-output": dict(scale=rand(24)),
           "krona": dict(A=rand(4, 6), B=rand(6, 4))}[kind]
    merge = {"lora": lambda w, o: peftkern.lora_merge_(w, o["lora_A"], o["lora_B"], 0.5),
             "ia3-output": lambda w, o: peftkern.ia3_merge_(w, o["scale"]),
             "krona": lambda w, o: peftkern.krona_merge_(w, o["A"], o["B"], 0.5)}[kind]
    expected = merge(w.clone(), ops)
    for name, t in ops.items():
        got = merge(w.clone(), {**ops, name: two_tensor.TwoTensor(t, t.clone())})
        assert_close(got, expected, torch.float32, f"{kind} merge with {name} a subclass")
    got = merge(two_tensor.TwoTensor(w.clone(), w.clone()), ops)
    assert_close(got.a, expected, torch.float32, f"{kind} merge into a subclass weight")


class _AtenOnly(torch.Tensor):
    """A wrapper subclass that knows aten's operators only, as a quantised weight's (torchao's) or a DTensor does: it
    computes them on the plain tensor it holds (dequantised on use), and refuses any other operator, peftkern's
    registered ops included."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=inner.device)

    def __init__(self, inner):
        self.inner = inner

    def __tensor_flatten__(self):
        return ["inner"], None

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return _AtenOnly(inner["inner"])

    def __repr__(self):
        return f"_AtenOnly({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func.namespace != "aten":
            raise NotImplementedError(f"_AtenOnly has no rule for {func}")
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
            return _AtenOnly(func(args[0].inner))
        unwrap = lambda t: t.inner if isinstance(t, _AtenOnly) else t  # noqa: E731
        return func(*torch.utils._pytree.tree_map(unwrap, args), **torch.utils._pytree.tree_map(unwrap, kwargs or {}))


@pytest.mark.parametrize("kind,backend", _params(), indirect=["backend"])
def test_a_subclass_operand_compiles_on_the_reference(kind, backend):
    """Under torch.compile too: pick_backend skipped its subclass check while compiling, and every backend (the
    reference's included) called the registered op, which a subclass that knows aten's operators only refuses. A
    quantised weight or a DTensor (tensor parallelism) failed to compile ("NotImplementedError when running FX
    node") where F.linear compiles; eager mode fell back (a review of the fallbacks, 2026-12-06)."""
    x = torch.randn(5, 24, device=DEVICE)
    ops, op = _subclass_cases(kind, x)
    first = next(iter(ops))
    adapters = [name for name in ops if name not in (first, "weight", "down_weight", "residual")][:2]
    grads = [first, *adapters]

    def run(call, operands):
        leaves = {name: t.detach().requires_grad_() if name in grads else t for name, t in operands.items()}
        out = call(leaves)
        out.square().sum().backward()
        return out.detach(), [leaves[name].grad for name in grads]

    expected, expected_grads = run(op, ops)
    weight = "down_weight" if kind == "adapter" else "weight"
    torch._dynamo.reset()
    got, got_grads = run(torch.compile(op, fullgraph=True), {**ops, weight: _AtenOnly(ops[weight])})
    assert_close(got, expected, torch.float32, f"compiled {kind} with a subclass {weight}")
    for name, g, e in zip(grads, got_grads, expected_grads):
        assert_close(g, e, torch.float32, f"compiled {kind}: d{name} with a subclass {weight}")


def test_krona_lora_route_runs_on_kronas_backend(monkeypatch):
    """KronA's LoRA route ran on the LoRA op's backend: with "cuda" forced, the CUDA LoRA kernels, where the README
    and the warning said KronA ran on Triton (a review, 2026-12-05). Resolution is stubbed: lora to cuda and krona to
    triton (an extension without KronA kernels), then both to cuda (one with them): the route takes KronA's."""
    from peftkern import _backend
    from peftkern.ops import krona as krona_op

    seen = []

    def spy_function():
        def run(x, weight, A, B, bias, scaling, p, transposed, backend):
            seen.append(backend)
            return reference.lora_linear(x, weight, A, B, scaling, bias)
        return run

    monkeypatch.setattr(krona_op, "lora_function", spy_function)
    x = torch.randn(5, 24)
    for krona_backend in ("triton", "cuda"):
        monkeypatch.setattr(_backend, "resolve", lambda op, device, kb=krona_backend: {"lora": "cuda"}.get(op, kb))
        peftkern.krona_linear(x, torch.randn(20, 24), torch.randn(4, 6), (torch.randn(5, 2), torch.randn(2, 4)), 0.5)
    assert seen == ["triton", "cuda"], seen


def test_a_fallback_warning_names_the_callers_line(monkeypatch):
    """A fallback's one warning points at the user's line, through the op and through a layer's nn.Module call: a
    fixed stacklevel named a line inside peftkern (ops/_common.py, or torch's module call for a layer)."""
    import warnings

    from peftkern import _backend

    peftkern.set_backend("triton")
    layer = peftkern.nn.LoRALinear.from_linear(torch.nn.Linear(8, 8, dtype=torch.float64, device=DEVICE), r=2)
    x = torch.randn(3, 8, dtype=torch.float64, device=DEVICE)
    for call in (lambda: peftkern.lora_linear(x, layer.weight, layer.lora_A, layer.lora_B, 2.0), lambda: layer(x)):
        monkeypatch.setattr(_backend, "_warned", set())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        assert [w.filename for w in caught if "reference path" in str(w.message)] == [__file__], \
            [(w.filename, w.lineno, str(w.message)) for w in caught]


# A review of the inputs' checks, 2026-12-06: each case below raised from deep inside (AttributeError, RuntimeError,
# NotImplementedError), or ran on a silently wrong reading of its argument, before its fix.


@pytest.mark.parametrize("backend", backend_params("lora"), indirect=True)  # cuda: KronA's merge on CUDA too
def test_merges_check_their_scalars_and_flags(backend):
    """The merges read scaling and sign by float() and their flags by truthiness: True, "0.5" and a tensor that
    requires grad merged, an IA3 inverse="no" divided the weight by l, a rank-0 LoRA merged nothing (lora_linear
    refuses all of them)."""
    w = torch.randn(6, 8, device=DEVICE)
    A, B = torch.randn(2, 8, device=DEVICE), torch.randn(6, 2, device=DEVICE)
    fa, fb = torch.randn(2, 2, device=DEVICE), torch.randn(3, 4, device=DEVICE)
    l_ = torch.rand(6, device=DEVICE) + 0.5
    merges = {"lora": lambda **kw: peftkern.lora_merge_(w, A, B, **{"scaling": 0.5, **kw}),
              "krona": lambda **kw: peftkern.krona_merge_(w, fa, fb, **{"scaling": 0.5, **kw})}
    for merge in merges.values():
        for bad in (True, "0.5", torch.tensor(0.5, requires_grad=True)):
            with pytest.raises(TypeError, match="scaling must be a number"):
                merge(scaling=bad)
        with pytest.raises(ValueError, match="scaling must be a number, got a tensor of shape"):
            merge(scaling=torch.ones(2))
        with pytest.raises(TypeError, match="sign must be a number"):
            merge(sign=True)
    with pytest.raises(TypeError, match="weight_transposed must be a bool"):
        peftkern.lora_merge_(w, A, B, 0.5, weight_transposed="no")
    with pytest.raises(ValueError, match="LoRA rank must be at least 1"):
        peftkern.lora_merge_(w, A[:0], B[:, :0], 0.5)
    for flag in ("inverse", "scale_input", "weight_transposed"):
        with pytest.raises(TypeError, match=f"{flag} must be a bool"):
            peftkern.ia3_merge_(w, l_, **{flag: "no"})
    w0 = w.clone()
    with pytest.raises(ValueError, match=r"scale of shape \(2, 3\) does not fit weight \(6, 8\)"):
        peftkern.ia3_merge_(w, l_.reshape(2, 3))  # a matrix of N values: ia3_linear refuses it
    assert torch.equal(w, w0), "a refused merge changes nothing"


def test_sparse_activations_are_refused_by_name():
    """A sparse COO x (which F.linear takes) raised "reshape is not implemented for sparse tensors" from inside the
    ops (an exploratory test, 2026-12-08): each op names the operand and the way out. Sparse weights still run (the
    reference's path)."""
    x = torch.randn(3, 8, device=DEVICE)
    w, A, B = torch.randn(6, 8, device=DEVICE), torch.randn(2, 8, device=DEVICE), torch.randn(6, 2, device=DEVICE)
    wd, wu = torch.randn(2, 8, device=DEVICE), torch.randn(8, 2, device=DEVICE)
    fa, fb = torch.randn(2, 2, device=DEVICE), torch.randn(3, 4, device=DEVICE)
    calls = {"x": [lambda x: peftkern.lora_linear(x, w, A, B, 0.5), lambda x: peftkern.ia3_linear(x, w, w[:, 0]),
                   lambda x: peftkern.krona_linear(x, w, fa, fb, 0.5)],
             "h": [lambda x: peftkern.bottleneck_adapter(x, wd, None, wu, None)],
             "residual": [lambda x: peftkern.bottleneck_adapter(x.to_dense(), wd, None, wu, None, residual=x)]}
    for name, ops in calls.items():
        for op in ops:
            with pytest.raises(TypeError, match=f"{name} must be a dense tensor, got layout torch.sparse_coo"):
                op(x.to_sparse())
            assert op(x).shape == (3, 6 if name == "x" else 8)
    assert_close(peftkern.lora_linear(x, w.to_sparse(), A, B, 0.5), reference.lora_linear(x, w, A, B, 0.5),
                 torch.float32, "a sparse weight")
    for layout in (torch.jagged, torch.strided):  # nested tensors, which to_dense does not take
        nested = torch.nested.nested_tensor([x[:2], x[2:]], layout=layout)
        with pytest.raises(TypeError, match="x must be a dense tensor, got a nested tensor"):
            peftkern.lora_linear(nested, w, A, B, 0.5)


@pytest.mark.parametrize("backend", backend_params("lora"), indirect=True)
@pytest.mark.parametrize("kind", ["lora", "ia3", "krona"])
def test_merge_refuses_an_expanded_weight(backend, kind):
    """An expanded weight (stride 0): the reference raised torch's RuntimeError, the Triton LoRA and KronA merge
    kernels wrote every row into the one row in memory (a silently wrong weight)."""
    row = torch.randn(1, 8, device=DEVICE)
    w = row.expand(6, 8)
    merge = {"lora": lambda: peftkern.lora_merge_(w, torch.randn(2, 8, device=DEVICE),
                                                  torch.randn(6, 2, device=DEVICE), 0.5),
             "ia3": lambda: peftkern.ia3_merge_(w, torch.rand(6, device=DEVICE) + 0.5),
             "krona": lambda: peftkern.krona_merge_(w, torch.randn(2, 2, device=DEVICE),
                                                    torch.randn(3, 4, device=DEVICE), 0.5)}[kind]
    before = row.clone()
    with pytest.raises(ValueError, match=r"weight must not be an expanded view .* shape \(6, 8\)"):
        merge()
    assert torch.equal(row, before)


@pytest.mark.parametrize("backend", backend_params("krona"), indirect=True)
def test_krona_refuses_a_stacked_factor_of_no_terms(backend):
    """A stacked (0, n, k) factor (T = 0 terms): an empty list is refused, but this ran on (the reference's
    krona_linear and the torch backend's merge raised AttributeError: 'int' object has no attribute 'reshape')."""
    x, w = torch.randn(5, 12, device=DEVICE), torch.randn(10, 12, device=DEVICE)
    a, b = torch.randn(0, 2, 3, device=DEVICE), torch.randn(0, 5, 4, device=DEVICE)
    pair = (torch.randn(0, 5, 2, device=DEVICE), torch.randn(0, 2, 4, device=DEVICE))
    for B in (b, pair):
        with pytest.raises(ValueError, match=r"must hold at least one term, got a stacked"):
            peftkern.krona_linear(x, w, a if B is pair else torch.randn(1, 2, 3, device=DEVICE), B, 0.5)
        with pytest.raises(ValueError, match=r"must hold at least one term, got a stacked"):
            peftkern.krona_merge_(w, torch.randn(1, 2, 3, device=DEVICE), B, 0.5)
    with pytest.raises(ValueError, match=r"A must hold at least one term, got a stacked factor of shape \(0, 2, 3\)"):
        peftkern.krona_linear(x, w, a, b, 0.5)


@pytest.mark.parametrize("backend", backend_params("lora"), indirect=True)
def test_op_flags_must_be_bools(backend):
    """weight_transposed and training were read by truthiness: weight_transposed="False" ran a square weight
    transposed, a silently wrong output."""
    x, w = torch.randn(5, 8, device=DEVICE), torch.randn(8, 8, device=DEVICE)
    A, B = torch.randn(2, 8, device=DEVICE), torch.randn(8, 2, device=DEVICE)
    with pytest.raises(TypeError, match="weight_transposed must be a bool"):
        peftkern.lora_linear(x, w, A, B, 0.5, weight_transposed="False")
    with pytest.raises(TypeError, match="training must be a bool"):
        peftkern.lora_linear(x, w, A, B, 0.5, dropout_p=0.1, training="False")
    with pytest.raises(TypeError, match="weight_transposed must be a bool"):
        peftkern.ia3_linear(x, w, torch.randn(8, device=DEVICE), weight_transposed="False")


def _int_linear(dtype: torch.dtype = torch.int8) -> torch.nn.Linear:
    linear = torch.nn.Linear(12, 10, bias=False)
    linear.weight = torch.nn.Parameter(torch.ones(10, 12, dtype=dtype), requires_grad=False)
    return linear


F8 = torch.float8_e4m3fn  # floating to is_floating_point, but no op takes it: TypeError at construction, like an int


LAYER_CASES = {  # a layer's construction -> (the exception, what its message says)
    "lora int weight": (lambda: peftkern.nn.LoRALinear.from_linear(_int_linear()), TypeError, "must be floating"),
    "lora int adapter_dtype": (lambda: peftkern.nn.LoRALinear.from_linear(torch.nn.Linear(12, 10),
                                                                          adapter_dtype=torch.int32),
                               TypeError, "adapter_dtype must be a floating"),
    "lora int dtype": (lambda: peftkern.nn.LoRALinear(12, 10, r=2, dtype=torch.int64), TypeError, "must be floating"),
    "lora negative in_features": (lambda: peftkern.nn.LoRALinear(-1, 10, r=2), ValueError, "in_features must be >= 0"),
    "lora alpha True": (lambda: peftkern.nn.LoRALinear(12, 10, r=2, alpha=True), TypeError, "alpha must be a number"),
    "lora alpha grad tensor": (lambda: peftkern.nn.LoRALinear(12, 10, r=2, alpha=torch.tensor(2.0, requires_grad=True)),
                               TypeError, "alpha must be a number"),
    "lora r True": (lambda: peftkern.nn.LoRALinear(12, 10, r=True), TypeError, "r must be an int"),
    "lora weight_transposed str": (lambda: peftkern.nn.LoRALinear(12, 10, r=2, weight_transposed="no"), TypeError,
                                   "weight_transposed must be a bool"),
    "ia3 feedforward str": (lambda: peftkern.nn.IA3Linear.from_linear(torch.nn.Linear(12, 10), feedforward="no"),
                            TypeError, "feedforward must be a bool"),
    "ia3 int scale_dtype": (lambda: peftkern.nn.IA3Linear(12, 10, scale_dtype=torch.int64), TypeError,
                            "scale_dtype must be a floating"),
    "krona int dtype": (lambda: peftkern.nn.KronALinear(12, 10, dtype=torch.int64), TypeError, "must be floating"),
    "krona int weight": (lambda: peftkern.nn.KronALinear.from_linear(_int_linear()), TypeError, "must be floating"),
    "krona scaling True": (lambda: peftkern.nn.KronALinear(12, 10, scaling=True), TypeError,
                           "scaling must be a number"),
    "krona scaling str": (lambda: peftkern.nn.KronALinear(12, 10, scaling="0.5"), TypeError,
                          "scaling must be a number"),
    "krona scaling grad tensor": (lambda: peftkern.nn.KronALinear(12, 10,
                                                                  scaling=torch.tensor(0.5, requires_grad=True)),
                                  TypeError, "scaling must be a number"),
    "krona a_shape float": (lambda: peftkern.nn.KronALinear(12, 10, a_shape=(2.5, 3)), TypeError,
                            "a_shape must be two ints"),
    "krona a_shape of 3": (lambda: peftkern.nn.KronALinear(12, 10, a_shape=(2, 3, 1)), TypeError,
                           "a_shape must be two ints"),
    "adapter non_linearity None": (lambda: peftkern.nn.BottleneckAdapter(12, non_linearity=None), ValueError,
                                   "non_linearity must be one of"),
    "adapter scaling True": (lambda: peftkern.nn.BottleneckAdapter(12, scaling=True), TypeError,
                             "scaling must be a number"),
    "adapter layer_norm str": (lambda: peftkern.nn.BottleneckAdapter(12, layer_norm="no"), TypeError,
                               "layer_norm must be a bool"),
    "adapter negative hidden_size": (lambda: peftkern.nn.BottleneckAdapter(-4, bottleneck_size=2), ValueError,
                                     "hidden_size must be a non-negative int"),
    "adapter int dtype": (lambda: peftkern.nn.BottleneckAdapter(12, dtype=torch.int64), TypeError,
                          "dtype must be a floating"),
    # the sizes raised Python's or torch's errors naming neither, factor=True and bias="no" built a layer (an
    # exploratory test, 2026-12-07)
    "krona factor float": (lambda: peftkern.nn.KronALinear(16, 24, factor=4.0), TypeError, "factor must be an int"),
    "krona factor True": (lambda: peftkern.nn.KronALinear(16, 24, factor=True), TypeError, "factor must be an int"),
    "krona 0 wide": (lambda: peftkern.nn.KronALinear(16, 0), ValueError, "in_features and out_features of at least"),
    "krona bias str": (lambda: peftkern.nn.KronALinear(16, 24, bias="no"), TypeError, "bias must be a bool"),
    "ia3 bias str": (lambda: peftkern.nn.IA3Linear(16, 24, bias="no"), TypeError, "bias must be a bool"),
    "lora bias str": (lambda: peftkern.nn.LoRALinear(16, 24, bias="no"), TypeError, "bias must be a bool"),
    "adapter bottleneck_size float": (lambda: peftkern.nn.BottleneckAdapter(12, bottleneck_size=3.0), TypeError,
                                      "bottleneck_size must be an int"),
    "adapter reduction_factor str": (lambda: peftkern.nn.BottleneckAdapter(12, reduction_factor="4"), TypeError,
                                     "reduction_factor must be a number"),
    "adapter reduction_factor 0": (lambda: peftkern.nn.BottleneckAdapter(12, reduction_factor=0), ValueError,
                                   "reduction_factor must be positive"),
    # float8 (a review of the fallbacks, 2026-12-06): LoRA's and KronA's from_linear raised NotImplementedError from
    # their init ("check_uniform_bounds" not implemented for 'Float8_e4m3fn'); IA3Linear was built and raised at its
    # first call; an adapter_dtype or dtype of float8 likewise
    "lora float8 weight": (lambda: peftkern.nn.LoRALinear.from_linear(_int_linear(F8)), TypeError,
                           "must be floating .*float8_e4m3fn"),
    "ia3 float8 weight": (lambda: peftkern.nn.IA3Linear.from_linear(_int_linear(F8)), TypeError,
                          "must be floating .*float8_e4m3fn"),
    "krona float8 weight": (lambda: peftkern.nn.KronALinear.from_linear(_int_linear(F8)), TypeError,
                            "must be floating .*float8_e4m3fn"),
    "lora float8 adapter_dtype": (lambda: peftkern.nn.LoRALinear.from_linear(torch.nn.Linear(12, 10),
                                                                             adapter_dtype=F8),
                                  TypeError, "adapter_dtype must be a floating"),
    "ia3 float8 scale_dtype": (lambda: peftkern.nn.IA3Linear(12, 10, scale_dtype=F8), TypeError,
                               "scale_dtype must be a floating"),
    "krona float8 dtype": (lambda: peftkern.nn.KronALinear(12, 10, dtype=F8), TypeError, "must be floating"),
    "adapter float8 dtype": (lambda: peftkern.nn.BottleneckAdapter(12, dtype=F8), TypeError,
                             "dtype must be a floating"),
}


@pytest.mark.parametrize("case", LAYER_CASES)
def test_layers_check_their_arguments(case):
    """The layers' constructors and from_linear raise a TypeError / ValueError naming the argument: before, an integer
    dtype or weight reached nn.Parameter's RuntimeError (KronALinear's init a NotImplementedError), a negative size
    torch.empty's, non_linearity=None an AttributeError; KronALinear and BottleneckAdapter took scaling=True or "0.5"
    by float() (a tensor that requires grad lost its gradient), a_shape=(2.5, 3) became (2, 3), and a flag such as
    feedforward="no" was read as true."""
    make, error, message = LAYER_CASES[case]
    with pytest.raises(error, match=message):
        make()

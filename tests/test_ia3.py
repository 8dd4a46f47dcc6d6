"""IA3: every backend against reference.py, both forms, with fresh random inputs; layer, merge, PEFT fuse."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DEVICE, HAS_CUDA, INTERPRET, assert_close, backend_params, dtypes_for, run_seed

import peftkern
from peftkern import reference
from peftkern.kernels.triton import ia3 as kia3
from peftkern.nn import IA3Linear

# The CPU shapes cover partial tiles, several row blocks, dl chunks spread unevenly over the column tiles
# (48 -> 80) and whole K steps (96 -> 64) under the interpreter's 16 x 32 x 32 tiles.
SHAPES = [((1,), 64, 48), ((37,), 72, 40), ((2, 9), 48, 80), ((5, 7), 96, 64)]
if HAS_CUDA:
    SHAPES += [((3, 129), 520, 264), ((600,), 256, 1000)]


def make(lead, K, N, dtype, scale_input, *, bias=True, transposed=False, scale_dtype=None, zeros=False,
         noncontig=False):
    g = torch.Generator().manual_seed(torch.randint(0, 2**31 - 1, ()).item())
    rnd = lambda *s, dt=dtype, sc=1.0: (torch.randn(*s, generator=g) * sc).to(DEVICE, dt)
    x = rnd(*lead, 2 * K)[..., ::2] if noncontig else rnd(*lead, K)
    w = rnd(K, N, sc=K ** -0.5) if transposed else rnd(N, K, sc=K ** -0.5)
    scale = 1.0 + 0.3 * rnd(K if scale_input else N, dt=scale_dtype or dtype)
    if zeros:
        scale[::3] = 0.0
    return x, w, scale, (rnd(N) if bias else None)


def run_both(x, w, scale, b, scale_input, transposed):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, scale, b)]
    refs = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, scale, b)]
    y = peftkern.ia3_linear(leaves[0], w, leaves[1], leaves[2], scale_input, transposed)
    y_ref = reference.ia3_linear(refs[0], w, refs[1], refs[2], scale_input, transposed)
    dy = torch.randn_like(y_ref)
    y.backward(dy)
    y_ref.backward(dy)
    got = {"y": y, "dx": leaves[0].grad, "dl": leaves[1].grad}
    ref = {"y": y_ref, "dx": refs[0].grad, "dl": refs[1].grad}
    if b is not None:
        got["dbias"], ref["dbias"] = leaves[2].grad, refs[2].grad
    return got, ref


@pytest.mark.parametrize("backend", backend_params("ia3"), indirect=True)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}->{s[2]}")
@pytest.mark.parametrize("scale_input", [False, True], ids=["output-form", "input-form"])
@pytest.mark.parametrize("variant", ["plain", "bias", "transposed", "noncontig", "zeros-in-l"])
def test_matches_reference(backend, shape, scale_input, variant, poison_empty):
    lead, K, N = shape
    for dtype in dtypes_for(backend):
        x, w, scale, b = make(lead, K, N, dtype, scale_input, bias=variant == "bias",
                              transposed=variant == "transposed", zeros=variant == "zeros-in-l",
                              noncontig=variant == "noncontig")
        got, ref = run_both(x, w, scale, b, scale_input, variant == "transposed")
        for name in ref:
            assert got[name].dtype == ref[name].dtype, f"{name}: {got[name].dtype} != {ref[name].dtype}"
            assert_close(got[name], ref[name], dtype, f"{backend} {dtype} {name}")


@pytest.mark.parametrize("backend", backend_params("ia3"), indirect=True)
@pytest.mark.parametrize("scale_input", [False, True])
def test_fp32_vector_beside_16bit_base_keeps_the_base_dtype(backend, scale_input):
    dtype = torch.bfloat16 if HAS_CUDA else torch.float16
    if dtype not in dtypes_for(backend):
        pytest.skip(f"{dtype} not testable on {backend} here")
    x, w, scale, b = make((2, 11), 64, 48, dtype, scale_input, scale_dtype=torch.float32)
    got, ref = run_both(x, w, scale, b, scale_input, False)
    assert got["y"].dtype == dtype, "the output keeps the base layer's dtype (as PEFT 0.21's does)"
    assert got["dl"].dtype == torch.float32
    for name in ref:
        assert_close(got[name], ref[name], dtype, name)


@pytest.mark.parametrize("backend", backend_params("ia3"), indirect=True)
@pytest.mark.parametrize("scale_input", [False, True])
def test_merge_unmerge_and_layer(backend, scale_input):
    torch.manual_seed(run_seed(0))
    lin = torch.nn.Linear(64, 48).to(DEVICE)
    layer = IA3Linear.from_linear(lin, feedforward=scale_input)
    assert layer.weight is lin.weight and not layer.weight.requires_grad
    assert torch.equal(layer.ia3_l, torch.ones_like(layer.ia3_l)), "IA3 starts at ones"
    with torch.no_grad():
        layer.ia3_l.uniform_(0.5, 1.5)
    x = torch.randn(5, 64, device=DEVICE)
    y = layer(x)
    layer.merge()
    assert_close(layer(x), y, torch.float32, "merged", 10.0)
    layer.unmerge()
    assert_close(layer(x), y, torch.float32, "unmerged", 10.0)
    with torch.no_grad():
        layer.ia3_l[3] = 0.0
    layer.merge()
    with pytest.raises(ValueError, match="zeros"):
        layer.unmerge()
    assert layer.peft_ref.as_dict()["parameter_adaptation"].startswith("rescaling")


@pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="needs a GPU or the Triton interpreter")
@pytest.mark.parametrize("scale_input", [False, True], ids=["output-form", "input-form"])
@pytest.mark.parametrize("mode", kia3.BACKWARD_MODES)
def test_triton_backward_every_gradient_subset(scale_input, mode, poison_empty):
    """Both backward modes of the Triton backend, each subset of gradients (the fused dx GEMMs serve some,
    the reduction pass the others), against reference.ia3_backward."""
    M, K, N = (300, 256, 192) if HAS_CUDA else (45, 64, 96)
    for dtype in dtypes_for("triton"):
        x, w, scale, _ = make((M,), K, N, dtype, scale_input, zeros=True)
        dy = torch.randn(M, N).to(DEVICE, dtype)
        _, z = reference.ia3_forward(x, w, scale, None, scale_input, False)
        for needs in ((1, 1, 1, 0), (1, 1, 0, 0), (0, 1, 0, 0), (1, 0, 1, 0), (1, 1, 1, 1)):
            needs = tuple(bool(n) for n in needs)
            got = kia3.ia3_backward(dy, x, w, scale, z, scale_input, False, needs, mode=mode)
            ref = reference.ia3_backward(dy, x, w, scale, z, scale_input, False, needs)
            for name, g, r, need in zip(("dx", "dl", "dbias", "dweight"), got, ref, needs):
                assert (g is None) == (not need), f"{name} computed although not asked for, or missing"
                if need:
                    assert_close(g, r, dtype, f"{mode} {dtype} {name} needs={needs}")


@pytest.mark.parametrize("backend", backend_params("ia3"), indirect=True)
@pytest.mark.parametrize("scale_input", [False, True], ids=["output-form", "input-form"])
def test_unfrozen_weight_gets_its_gradient(backend, scale_input):
    x, w, scale, b = make((30,), 48, 40, torch.float32, scale_input, transposed=True)
    w_leaf, w_ref = w.clone().requires_grad_(), w.clone().requires_grad_()
    dy = torch.randn(30, 40).to(DEVICE)
    peftkern.ia3_linear(x, w_leaf, scale, b, scale_input, True).backward(dy)
    reference.ia3_linear(x, w_ref, scale, b, scale_input, True).backward(dy)
    assert_close(w_leaf.grad, w_ref.grad, torch.float32, "dweight")


@pytest.mark.parametrize("backend", backend_params("ia3"), indirect=True)
@pytest.mark.parametrize("scale_input", [False, True], ids=["output-form", "input-form"])
@pytest.mark.parametrize("transposed", [False, True])
def test_merge_matches_reference(backend, scale_input, transposed):
    """W scaled along N (output form: b too) or K (input form), in float64 here rather than by reference.py (the torch
    backend's merge is reference.py's); unmerge gives W and b back."""
    for dtype in dtypes_for(backend):
        _, w, scale, b = make((1,), 72, 40, dtype, scale_input, transposed=transposed, scale_dtype=torch.float32)
        w0, b0 = w.clone(), b.clone()
        l64 = scale.double().reshape(-1)
        along_rows = scale_input == transposed  # the scaled dimension is w's first: N of (N, K), or K of (K, N)
        w_expected = w0.double() * (l64[:, None] if along_rows else l64[None, :])
        b_expected = b0.double() if scale_input else b0.double() * l64
        peftkern.ia3_merge_(w, scale, b, scale_input, weight_transposed=transposed)
        assert_close(w, w_expected, dtype, "merged weight")
        assert_close(b, b_expected, dtype, "merged bias")
        peftkern.ia3_merge_(w, scale, b, scale_input, inverse=True, weight_transposed=transposed)
        assert_close(w, w0, dtype, "unmerged weight")
        assert_close(b, b0, dtype, "unmerged bias")


@pytest.mark.parametrize("backend", backend_params("ia3"), indirect=True)
@pytest.mark.parametrize("scale_input", [False, True], ids=["output-form", "input-form"])
def test_merge_unmerge_cycles_do_not_drift(backend, scale_input):
    """Unmerging divides by l. Multiplying by a rounded 1 / l scaled W (and b) by the same 1 + d each cycle: an
    ulp a cycle in float32, 100 ulp after 100 cycles (a review, 2026-12-05)."""
    _, w, scale, b = make((1,), 40, 48, torch.float32, scale_input)
    with torch.no_grad():  # away from zero, both signs
        scale.copy_((torch.rand_like(scale) + 0.25) * torch.where(torch.rand_like(scale) < 0.5, -1.0, 1.0))
    w0, b0 = w.clone(), b.clone()
    for _ in range(30):
        peftkern.ia3_merge_(w, scale, b, scale_input)
        peftkern.ia3_merge_(w, scale, b, scale_input, inverse=True)
    eps = torch.finfo(torch.float32).eps  # 2 eps |v| is at least 2 ulp of v
    for name, got, want in (("weight", w, w0), ("bias", b, b0)):
        worst = ((got - want).abs() / (eps * want.abs())).max().item()
        assert worst <= 2.0, f"{name} drifted {worst:.0f} eps |{name}| after 30 merge / unmerge cycles"


def test_reference_backward_formulas_match_autograd():
    g = torch.Generator().manual_seed(run_seed(5))
    for scale_input, transposed in ((False, False), (True, False), (False, True), (True, True)):
        x = torch.randn(7, 6, dtype=torch.float64, generator=g)
        w = torch.randn(*((6, 5) if transposed else (5, 6)), dtype=torch.float64, generator=g)
        scale = torch.randn(6 if scale_input else 5, dtype=torch.float64, generator=g)
        scale[1] = 0.0
        b = torch.randn(5, dtype=torch.float64, generator=g)
        leaves = [t.clone().requires_grad_() for t in (x, w, scale, b)]
        y = reference.ia3_linear(leaves[0], leaves[1], leaves[2], leaves[3], scale_input, transposed)
        dy = torch.randn(7, 5, dtype=torch.float64, generator=g)
        y.backward(dy)
        y2, z = reference.ia3_forward(x, w, scale, b, scale_input, transposed)
        assert torch.allclose(y2, y, atol=1e-12)
        dx, dl, dbias, dw = reference.ia3_backward(dy, x, w, scale, z, scale_input, transposed, (True,) * 4)
        for name, got, leaf in (("dx", dx, leaves[0]), ("dw", dw, leaves[1]), ("dl", dl, leaves[2]),
                                ("dbias", dbias, leaves[3])):
            assert torch.allclose(got, leaf.grad, atol=1e-12), f"{name} (scale_input={scale_input})"


def test_autocast_keeps_the_autocast_dtype():
    dtype = torch.bfloat16 if HAS_CUDA else torch.float16
    x, w, scale, b = make((3, 5), 64, 48, torch.float32, False)
    with torch.autocast(DEVICE, dtype=dtype):
        y = peftkern.ia3_linear(x, w, scale, b)
    assert y.dtype == dtype
    ref = reference.ia3_linear(x.to(dtype), w.to(dtype), scale, b.to(dtype))
    assert_close(y, ref, dtype, "autocast output")


BAD = [
    (dict(x=torch.randn(4, 10)), ValueError, "x's last dimension"),
    (dict(scale=torch.randn(5)), ValueError, "scale must hold 6 values"),
    (dict(scale=torch.randint(0, 2, (6,))), TypeError, "scale must be a floating tensor"),
    (dict(bias=torch.randn(3)), ValueError, "bias must be"),
    (dict(weight=torch.randn(6, 8, dtype=torch.float64)), TypeError, "share a dtype"),
    (dict(scale_input="yes"), TypeError, "scale_input must be a bool"),
]


@pytest.mark.parametrize("backend", backend_params("ia3"), indirect=True)
@pytest.mark.parametrize("override,exc,message", BAD, ids=[b[2] for b in BAD])
def test_bad_input_is_named(backend, override, exc, message):
    args = dict(x=torch.randn(4, 8), weight=torch.randn(6, 8), scale=torch.randn(6), bias=torch.randn(6))
    args.update(override)
    args = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    with pytest.raises(exc, match=message):
        peftkern.ia3_linear(**args)


@pytest.mark.parametrize("backend", backend_params("ia3"), indirect=True)
@pytest.mark.parametrize("scale_input", [False, True], ids=["output-form", "input-form"])
def test_compile_dynamic_fullgraph_with_a_plain_tensor_scale(backend, scale_input):
    """The op called with plain tensors (no nn.Parameter) under torch.compile(dynamic=True, fullgraph=True): the
    scale's shape check, max(scale.shape, default=1), could not be traced with symbolic sizes (a review,
    2026-12-06). Each of the scale's layouts (a vector, PEFT's (N, 1) / (1, K)) matches eager, gradients too."""
    torch.manual_seed(run_seed(0))
    x = torch.randn(7, 24, device=DEVICE, requires_grad=True)
    w = torch.randn(20, 24, device=DEVICE)
    want = 24 if scale_input else 20
    compiled = torch.compile(lambda x, w, s: peftkern.ia3_linear(x, w, s, scale_input=scale_input), dynamic=True,
                             fullgraph=True)
    for shape in ((want,), (1, want) if scale_input else (want, 1)):
        scale = torch.rand(shape, device=DEVICE).add_(0.5).requires_grad_()
        results = []
        for fn in (lambda x, w, s: peftkern.ia3_linear(x, w, s, scale_input=scale_input), compiled):
            y = fn(x, w, scale)
            results.append((y.detach(), *torch.autograd.grad(y.square().sum(), [x, scale])))
        for got, expected, name in zip(results[1], results[0], ("y", "dx", "dscale")):
            assert_close(got, expected, torch.float32, f"{shape} {name}")


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(run_seed(0))
    layers = torch.nn.Sequential(IA3Linear(32, 48, device=DEVICE), torch.nn.GELU(),
                                 IA3Linear(48, 16, feedforward=True, device=DEVICE))
    with torch.no_grad():
        for p in layers.parameters():
            if p.requires_grad:
                p.uniform_(0.5, 1.5)
    x = torch.randn(6, 32, device=DEVICE)
    compiled = torch.compile(layers, fullgraph=True)
    outputs, grads = [], []
    for fn in (layers, compiled):  # each run's own gradients: the eager ones were read after the compiled run, so
        layers.zero_grad()         # the test compared compiled gradients with themselves (a test audit, 2026-12-05)
        y = fn(x)
        y.square().sum().backward()
        outputs.append(y.detach())
        grads.append([p.grad.clone() for p in layers.parameters() if p.requires_grad])
    assert_close(outputs[1], outputs[0], torch.float32, "compiled output")
    assert len(grads[0]) == len(grads[1]) == 2
    for got, want in zip(grads[1], grads[0]):
        assert_close(got, want, torch.float32, "compiled grad")


def test_peft_ia3_fused_twin_matches():
    peft = pytest.importorskip("peft")
    from test_fuse import batch, tiny_bert, tiny_gpt2, tiny_llama

    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    for factory, name, kw in ((tiny_llama, "llama", {}), (tiny_gpt2, "gpt2", {"fan_in_fan_out": True}),
                              (tiny_bert, "bert", {})):
        torch.manual_seed(run_seed(0))
        model = peft.get_peft_model(factory().to(DEVICE, dtype), peft.IA3Config(**kw),
                                    autocast_adapter_dtype=not HAS_CUDA)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "ia3_l" in n:
                    p.uniform_(0.5, 1.5)
        twin = copy.deepcopy(model)
        report = peftkern.fuse(twin)
        assert report.fused and not any("ia3" in r.lower() for _, r in report.skipped), str(report)
        x = batch(name)
        out_ref, out = model(**x), twin(**x)
        assert_close(out.logits, out_ref.logits, dtype, f"{name} IA3 logits", 2.0)
        out_ref.loss.backward()
        out.loss.backward()
        ref_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        got_grads = {n: p.grad for n, p in twin.named_parameters() if p.grad is not None}
        assert got_grads.keys() == ref_grads.keys() and ref_grads, "the same parameters get gradients"
        for n in ref_grads:
            assert_close(got_grads[n], ref_grads[n], dtype, f"{name} grad {n}", 5.0)
        model.merge_adapter()
        twin.merge_adapter()
        assert_close(twin(**x).logits, model(**x).logits, dtype, f"{name} merged", 2.0)


@pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="needs a GPU or the Triton interpreter")
@pytest.mark.parametrize("subtile", [True, False], ids=["half-tile-stores", "full-tile-stores"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_persistent_output_form_matches_reference(subtile, bias):
    """The output form's persistent forward (z and y = z * l stored from one GEMM's epilogue): y and z against
    reference.py with a float32 l holding zeros (those columns exactly zero), shapes that fill no tile."""
    dtype = torch.bfloat16 if HAS_CUDA else torch.float16  # the interpreter mishandles bf16
    shapes = [(45, 64, 48), (70, 40, 136)] + ([(1000, 520, 1096), (2304, 256, 520)] if HAS_CUDA else [])
    for M, K, N in shapes:
        x, w, scale, b = make((M,), K, N, dtype, False, bias=bias, zeros=True, scale_dtype=torch.float32)
        assert kia3.persistent_output_ok(x, w)
        y, z = kia3.persistent_output_form(x, w, scale, b, config={**kia3._persistent_config(M), "SUBTILE": subtile})
        y_ref, z_ref = reference.ia3_forward(x, w, scale, b, False, False)
        assert y.dtype == z.dtype == dtype
        assert_close(z, z_ref, dtype, f"z {M}x{K}->{N}")
        assert_close(y, y_ref, dtype, f"y {M}x{K}->{N}")
        assert torch.all(y[:, ::3] == 0), "zeros in l give exact zeros"


@pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="needs a GPU or the Triton interpreter")
@pytest.mark.parametrize("subtile", [True, False], ids=["half-tiles", "whole-tiles"])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_persistent_input_dx_matches_reference(subtile, transposed):
    """The input form's backward as one persistent GEMM (dx = (dy W) * l and dl's partial sums from x's tile in
    its epilogue): dx and dl against float64 with a float32 l holding zeros, on shapes that fill no tile, for
    nn.Linear's and Conv1D's weight layouts, and dl alone (no dx written)."""
    dtype = torch.bfloat16 if HAS_CUDA else torch.float16  # the interpreter mishandles bf16
    shapes = [(45, 64, 48), (70, 40, 136)] + ([(1000, 520, 1096), (2304, 256, 520)] if HAS_CUDA else [])
    for M, K, N in shapes:
        x, w, scale, _ = make((M,), K, N, dtype, True, bias=False, transposed=transposed, zeros=True,
                              scale_dtype=torch.float32)
        w_kn = w if transposed else w.t()  # W^T, (K, N): Conv1D stores it, nn.Linear's is a view
        dy = torch.randn(M, N, device=DEVICE, dtype=dtype)
        assert kia3.persistent_dx_input_ok(dy, w_kn, x)
        cfg = {**kia3._persistent_config(M), "SUBTILE": subtile}
        if HAS_CUDA and not subtile:
            cfg.update(BLOCK_N=128, num_stages=4)  # x's whole tile and the stages fit beside 128-column tiles
        dx, dl = kia3.persistent_dx_input_form(dy, w_kn, scale, x, config=cfg)
        t = dy.double() @ w_kn.double().t()
        what = f"{M}x{K}->{N} transposed={transposed} subtile={subtile}"
        assert dx.dtype == dtype and dl.dtype == torch.float32 and dl.shape == (K,)
        assert_close(dx, t * scale.double(), dtype, f"dx {what}")
        assert_close(dl, (t * x.double()).sum(0), dtype, f"dl {what}", 2.0)
        assert torch.all(dx[:, ::3] == 0), "zeros in l give exact zeros"
        none, dl_only = kia3.persistent_dx_input_form(dy, w_kn, scale, x, write_dx=False, config=cfg)
        assert none is None and torch.equal(dl_only, dl)


@pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="needs a GPU or the Triton interpreter")
def test_op_takes_the_persistent_input_dx_from_its_threshold(monkeypatch):
    """With PERSISTENT_DX the input form's backward is the persistent kernel from PERSISTENT_DX_MIN_M rows, and
    the pointer-based fused kernel below it; every gradient against the reference either way."""
    monkeypatch.setattr(kia3, "PERSISTENT_DX", True)
    M = 64 if INTERPRET else kia3.PERSISTENT_DX_MIN_M
    monkeypatch.setattr(kia3, "PERSISTENT_DX_MIN_M", M)
    dtype = torch.bfloat16 if HAS_CUDA else torch.float16
    calls = []
    original = kia3.persistent_dx_input_form
    monkeypatch.setattr(kia3, "persistent_dx_input_form", lambda *a, **k: calls.append(1) or original(*a, **k))
    peftkern.set_backend("triton")
    try:
        for rows, transposed, taken in ((M, False, True), (M - 8, False, False), (M, True, True)):
            calls.clear()
            x, w, scale, b = make((rows,), 96, 80, dtype, True, transposed=transposed, scale_dtype=torch.float32)
            got, ref = run_both(x, w, scale, b, True, transposed)
            assert bool(calls) == taken, (rows, transposed)
            for name in ref:
                assert_close(got[name], ref[name], dtype, f"{name} rows={rows} transposed={transposed}")
    finally:
        peftkern.set_backend(None)


@pytest.mark.skipif(not HAS_CUDA, reason="the op picks the persistent forward on a GPU only")
def test_op_takes_the_persistent_forward_from_its_threshold(monkeypatch):
    """On a GPU the output form's forward is the persistent kernel from PERSISTENT_MIN_M rows (cuBLAS below it,
    and for Conv1D's transposed weight); forward and backward against the reference either way."""
    calls = []
    original = kia3.persistent_output_form
    monkeypatch.setattr(kia3, "persistent_output_form", lambda *a, **k: calls.append(1) or original(*a, **k))
    M = kia3.PERSISTENT_MIN_M
    for rows, transposed, taken in ((M, False, True), (M - 8, False, False), (M, True, False)):
        calls.clear()
        x, w, scale, b = make((rows,), 256, 520, torch.bfloat16, False, transposed=transposed,
                              scale_dtype=torch.float32)
        got, ref = run_both(x, w, scale, b, False, transposed)
        assert bool(calls) == taken, (rows, transposed)
        for name in ref:
            assert_close(got[name], ref[name], torch.bfloat16, f"{name} rows={rows} transposed={transposed}")


def test_every_backend_module_takes_the_reference_arguments():
    """ops/ia3.py calls each backend's ia3_forward / ia3_backward / ia3_merge_ positionally with reference.py's
    arguments: the CUDA extension's wrappers (which CI cannot run) and the Triton ones must take as many, in the
    reference's order where the names agree, and default anything beyond."""
    import inspect

    from peftkern.kernels import cuda as kcuda

    for name in ("ia3_forward", "ia3_backward", "ia3_merge_"):
        ref = list(inspect.signature(getattr(reference, name)).parameters)
        for module in (kcuda, kia3):
            params = list(inspect.signature(getattr(module, name)).parameters.values())
            what = f"{module.__name__}.{name}{tuple(p.name for p in params)} vs reference {ref}"
            assert len(params) >= len(ref), what
            assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params[:len(ref)]), what
            assert all(p.name == r or {p.name, r} == {"scale", "scale_vec"} for p, r in zip(params, ref)), what
            assert all(p.default is not inspect.Parameter.empty for p in params[len(ref):]), what


@pytest.mark.parametrize("backend", backend_params("ia3"), indirect=True)
def test_a_product_input_is_recomputed_not_saved(backend, monkeypatch):
    """The feed-forward place (the down projection, input form) gets h = act(gate) * up: the op multiplies again in
    backward instead of saving h, with the saved path's gradients exactly (ops/_common.product_source)."""
    from peftkern.ops import _common

    dtype = dtypes_for(backend)[-1]
    g0, u0 = (torch.randn(2, 19, 64).to(DEVICE, dtype) for _ in range(2))
    _, w, scale0, b = make((1,), 64, 40, dtype, True, bias=True)
    results = []
    for recompute in (False, True):
        monkeypatch.setattr(_common, "RECOMPUTE_PRODUCT_INPUT", recompute)
        g, u, scale = g0.clone().requires_grad_(), u0.clone().requires_grad_(), scale0.clone().requires_grad_()
        h = torch.nn.functional.silu(g) * u
        y = peftkern.ia3_linear(h, w, scale, b, scale_input=True)
        node = y.grad_fn
        while type(node).__name__ != "IA3LinearFunctionBackward":
            node = node.next_functions[0][0]
        assert (node.x_source is not None) == recompute
        assert recompute != any(t is not None and t.data_ptr() == h.data_ptr() for t in node.saved_tensors)
        y.square().sum().backward()
        results.append([g.grad, u.grad, scale.grad])
    for got, ref in zip(*results):
        assert torch.equal(got, ref), "the recomputed input must give the saved path's gradients exactly"


@pytest.mark.parametrize("backend", backend_params("ia3"), indirect=True)
@pytest.mark.parametrize("scale_input", [False, True], ids=["output-form", "input-form"])
@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=["0", "2x0"])
def test_an_empty_batch_gives_zero_gradients(backend, scale_input, lead):
    """No tokens: an empty output, and zero gradients for x, l (PEFT's float32 vector) and the bias; no kernel launches
    (the output form's backward divided by the token count before)."""
    for dtype in dtypes_for(backend):
        x = torch.randn(*lead, 24, device=DEVICE, dtype=dtype, requires_grad=True)
        w = torch.randn(40, 24, device=DEVICE, dtype=dtype)
        scale = torch.randn(24 if scale_input else 40, device=DEVICE, dtype=torch.float32, requires_grad=True)
        bias = torch.randn(40, device=DEVICE, dtype=dtype, requires_grad=True)
        y = peftkern.ia3_linear(x, w, scale, bias, scale_input=scale_input)
        assert y.shape == (*lead, 40) and y.dtype == dtype
        y.sum().backward()
        for name, t in (("x", x), ("scale", scale), ("bias", bias)):
            assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any(), name

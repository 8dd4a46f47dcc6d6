"""kernels/triton/_launch.py: a kernel launched again through its compiled launcher gives what
kernel[grid](...) gives, for every class of arguments that Triton specialises on."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, INTERPRET, run_seed

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from peftkern.kernels.triton import _launch  # noqa: E402


@triton.jit
def _axpb_kernel(x_ptr, out_ptr, n, stride, a, b, BLOCK: tl.constexpr, SHIFT: tl.constexpr):
    """out[i] = a * x[i * stride] + b + SHIFT + n (n itself in the sum, so a wrong n shows)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs * stride, mask=mask, other=0.0)
    tl.store(out_ptr + offs, x * a + b + SHIFT + n, mask=mask)


def _expected(x, n, stride, a, b, shift):
    return x[: n * stride: stride] * a + b + shift + n


@triton.jit
def _desc_axpy_kernel(x_desc, y_desc, out_ptr, M, N, a, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out = a * x + y over (M, N), x and y read through host TMA descriptors, out through pointers."""
    pm, pn = tl.program_id(0), tl.program_id(1)
    x = x_desc.load([pm * BLOCK_M, pn * BLOCK_N])
    y = y_desc.load([pm * BLOCK_M, pn * BLOCK_N])
    rows = pm * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    cols = pn * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tl.store(out_ptr + rows * N + cols, x * a + y, mask=(rows < M) & (cols < N))


def test_argument_classes_separate_what_triton_specialises_on():
    """Ints: 1, divisibility by 16, width; tensors: dtype and 16-byte alignment; descriptors: block shape."""
    cls = _launch._arg_class
    assert cls(1) != cls(17) and cls(16) != cls(17) and cls(32) == cls(48) and cls(2**31) != cls(16)
    x = torch.zeros(64)
    assert cls(x) == cls(torch.ones(8)) and cls(x[1:]) != cls(x) and cls(x.half()) != cls(x)
    assert cls(2.5) == cls(0.5) and cls(None) is None and cls(True) != cls(False)
    m = torch.zeros(64, 64, dtype=torch.float16)
    d1, d2 = TensorDescriptor.from_tensor(m, [16, 32]), TensorDescriptor.from_tensor(m, [32, 32])
    assert cls(d1) != cls(d2) and cls(d1) == cls(TensorDescriptor.from_tensor(m.clone(), [16, 32]))
    with pytest.raises(TypeError):
        cls("a string")


def test_unchecked_descriptor_is_a_tensor_descriptor_of_the_same_class():
    """_launch.Descriptor skips the dataclass's checks only: the same fields and class as TensorDescriptor.from_tensor,
    for a row-major tensor and for a transposed view."""
    m = torch.zeros(64, 48, dtype=torch.float16)
    for t, block in ((m, [16, 32]), (m.t(), [16, 16]), (m[8:], [8, 16])):
        fast, ref = _launch.Descriptor(t, block), TensorDescriptor.from_tensor(t.contiguous(), block)
        fast_ref = TensorDescriptor(t, t.shape, t.stride(), block) if t.stride(-1) == 1 else None
        assert isinstance(fast, TensorDescriptor)
        assert (fast.base is t and list(fast.shape) == list(t.shape) and list(fast.strides) == list(t.stride())
                and fast.block_shape == block and fast.padding == ref.padding)
        if fast_ref is not None:
            assert _launch._arg_class(fast) == _launch._arg_class(fast_ref)
    assert _launch._arg_class(_launch.Descriptor(m, [16, 32])) != _launch._arg_class(_launch.Descriptor(m, [32, 32]))


def test_next_power_of_2_matches_triton():
    assert [_launch.next_power_of_2(n) for n in range(0, 1100)] == [triton.next_power_of_2(max(n, 1))
                                                                    for n in range(0, 1100)]


class _Param:
    def __init__(self, name, is_constexpr, default=None):
        self.name, self.is_constexpr, self.default = name, is_constexpr, default


class _FakeKernel:
    """A jitted kernel's launch interface without a GPU: kernel[grid](...) records a JIT launch and returns a
    compiled kernel whose launcher records direct launches."""

    def __init__(self, params):
        self.params = params
        self.calls = []

    def __getitem__(self, grid):
        def jit_launch(*args, **meta):
            self.calls.append(("jit", grid, args, meta))
            compiled = type("Compiled", (), {})()
            compiled.function, compiled.packed_metadata = 1234, "packed"
            compiled.run = lambda *launch_args: self.calls.append(("fast", launch_args))
            return compiled
        return jit_launch


@pytest.fixture
def fake_device(monkeypatch):
    """The fast path's view of a GPU: device 0, stream 77, not the interpreter."""
    monkeypatch.setattr(_launch, "triton_interpret", lambda: False)
    monkeypatch.setattr(_launch, "_current_device", lambda: 0)
    monkeypatch.setattr(_launch, "_current_stream", lambda device: 77)
    monkeypatch.setattr(_launch, "FAST_LAUNCH", [True])


def test_fast_path_passes_every_parameter_in_order(fake_device):
    """After one JIT launch per class, the launcher gets grid, stream, the compiled function and every parameter's
    value in the kernel's order: the positional ones as given, then the constexprs from meta or their defaults."""
    kernel = _FakeKernel([_Param("x", False), _Param("n", False), _Param("scale", False),
                          _Param("BLOCK", True), _Param("FLAG", True, default=False)])
    x = torch.zeros(64)
    _launch.launch(kernel, (4,), x, 64, 0.5, BLOCK=32, num_warps=4)
    _launch.launch(kernel, (5, 2), x, 96, 0.25, BLOCK=32, num_warps=4)  # same class: 96 and 64 divide by 16
    _launch.launch(kernel, (6,), x, 65, 0.25, BLOCK=32, num_warps=4)    # 65: a new class, so a JIT launch
    _launch.launch(kernel, (6,), x, 64, 0.25, BLOCK=64, num_warps=4)    # a new constexpr value: JIT again
    kinds = [c[0] for c in kernel.calls]
    assert kinds == ["jit", "fast", "jit", "jit"], kinds
    fast = kernel.calls[1][1]
    assert fast[:6] == (5, 2, 1, 77, 1234, "packed") and fast[6] is None
    assert fast[9:] == (x, 96, 0.25, 32, False)


def test_fast_path_refuses_what_it_cannot_key(fake_device):
    """A constexpr given by position, or a runtime parameter given by name, keeps that kernel on the JIT launch;
    so does an argument of a kind the classes do not know, and an installed launch hook."""
    by_position = _FakeKernel([_Param("x", False), _Param("BLOCK", True)])
    for block in (16, 32, 32):
        _launch.launch(by_position, (1,), torch.zeros(4), block)
    assert [c[0] for c in by_position.calls] == ["jit"] * 3 and by_position in _launch._refused
    by_name = _FakeKernel([_Param("x", False), _Param("n", False)])
    for _ in range(2):
        _launch.launch(by_name, (1,), torch.zeros(4), n=3)
    assert [c[0] for c in by_name.calls] == ["jit"] * 2 and by_name in _launch._refused
    odd = _FakeKernel([_Param("x", False)])
    for _ in range(2):
        _launch.launch(odd, (1,), "not a tensor")
    assert [c[0] for c in odd.calls] == ["jit"] * 2
    _launch._refused.difference_update({by_position, by_name})


def test_planned_launch_keys_its_class_by_the_plan(fake_device):
    """launch_planned: the caller's key stands for the arguments' classes: one JIT launch per key, then the launcher,
    with every parameter in order; a new key launches through the JIT again."""
    kernel = _FakeKernel([_Param("x", False), _Param("n", False), _Param("BLOCK", True)])
    x = torch.zeros(64)
    _launch.launch_planned(kernel, (2,), ("plan", 1), x, 64, BLOCK=32)
    _launch.launch_planned(kernel, (3,), ("plan", 1), x, 64, BLOCK=32)
    _launch.launch_planned(kernel, (3,), ("plan", 2), x, 65, BLOCK=32)
    assert [c[0] for c in kernel.calls] == ["jit", "fast", "jit"]
    assert kernel.calls[1][1][:4] == (3, 1, 1, 77) and kernel.calls[1][1][9:] == (x, 64, 32)


def test_launch_hooks_take_the_jit_launch(fake_device, monkeypatch):
    hooked = _FakeKernel([_Param("x", False)])
    chain = type("Chain", (), {"calls": [print]})()
    monkeypatch.setattr(_launch, "_hooks", lambda: (chain, None))
    for _ in range(3):
        _launch.launch(hooked, (1,), torch.zeros(4))
    assert [c[0] for c in hooked.calls] == ["jit"] * 3
    assert not _launch._hook_set(type("Chain", (), {"calls": []})()) and not _launch._hook_set(None)


@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="the fast path needs a GPU (the interpreter takes the slow one)")
def test_fast_path_matches_the_jit_launch():
    torch.manual_seed(run_seed(0))
    _launch.FAST_LAUNCH[0] = True
    fast_before = _launch.stats["fast"]
    try:
        cases = [  # (n, stride, offset into x, shift): each row a new class after the first
            (1000, 1, 0, 0), (1000, 1, 0, 0), (1024, 1, 0, 0), (1024, 1, 0, 0), (1, 1, 0, 0), (1, 1, 0, 0),
            (777, 2, 0, 0), (777, 2, 0, 0), (777, 2, 1, 0), (777, 2, 1, 0), (500, 1, 0, 3), (500, 1, 0, 3),
        ]
        for n, stride, offset, shift in cases:
            base = torch.randn(2 * 1024 + 8, device="cuda")
            x = base[offset:]
            a, b = float(torch.rand(())), float(torch.randn(()))
            out = torch.full((n,), float("nan"), device="cuda")
            _launch.launch(_axpb_kernel, (triton.cdiv(n, 256),), x, out, n, stride, a, b, BLOCK=256, SHIFT=shift,
                           num_warps=4)
            want = _expected(x, n, stride, a, b, shift)
            torch.testing.assert_close(out, want, msg=lambda m: f"n={n} stride={stride} offset={offset}: {m}")
        assert _launch.stats["fast"] - fast_before == 6, "every repeated class takes the fast path"
    finally:
        _launch.FAST_LAUNCH[0] = True


def _desc_axpy_cases():
    """_desc_axpy_kernel through _launch.launch on new tensors, on tensors made again at a freed address (a memoised
    tensor map's hit) and on views of other shapes and strides, each checked against torch."""
    for M, N, cols in [(256, 128, 128), (256, 128, 128), (200, 96, 128), (64, 64, 256), (256, 128, 128)]:
        big_x = torch.randn(M, cols, device="cuda", dtype=torch.float16)
        x = big_x[:, :N]  # a view whose row stride is not its width
        y = torch.randn(M, N, device="cuda", dtype=torch.float16)
        out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.float16)
        a = float(torch.randn(()))
        _launch.launch(_desc_axpy_kernel, (triton.cdiv(M, 64), triton.cdiv(N, 32)),
                       _launch.Descriptor(x, [64, 32]), _launch.Descriptor(y, [64, 32]), out, M, N, a,
                       BLOCK_M=64, BLOCK_N=32, num_warps=4)
        torch.testing.assert_close(out, (x.float() * a + y.float()).half(), msg=lambda m: f"{M}x{N}: {m}")
        del big_x, y  # freed: the next tensors of the same size may take these addresses


@pytest.mark.skipif(not HAS_CUDA or INTERPRET or torch.cuda.get_device_capability()[0] < 9 if HAS_CUDA else True,
                    reason="host TMA descriptors need a Hopper GPU")
def test_direct_launch_with_descriptors_matches_the_jit_launch():
    """The fast path's direct call (the C launcher with memoised tensor maps): right results for new tensors, for a
    tensor freed and made again at the same address (the memo's hit), and for views of other shapes and strides; the
    same outputs with DIRECT_LAUNCH off, where Triton's launcher runs."""
    torch.manual_seed(run_seed(0))
    _launch.FAST_LAUNCH[0] = True
    before = dict(_launch.stats)
    _launch.NATIVE_LAUNCH[0] = False  # csrc/launch.cpp would take these launches first
    try:
        for direct in (True, False, True):
            _launch.DIRECT_LAUNCH[0] = direct
            _desc_axpy_cases()
    finally:
        _launch.DIRECT_LAUNCH[0] = True
        _launch.NATIVE_LAUNCH[0] = True
    assert _launch.stats["direct"] - before["direct"] >= 6, "the repeated classes took the direct call"
    assert any(k[0] for k in _launch._tensormaps), "tensor maps were memoised"


@triton.jit
def _scalars_kernel(out_ptr, small, big, a, flag, BIG_OFFSET: tl.constexpr):
    """out = [small, big - BIG_OFFSET, a, flag]: an int32, an int64, a float32 and a bool parameter read back."""
    tl.store(out_ptr + 0, small.to(tl.float32))
    tl.store(out_ptr + 1, (big - BIG_OFFSET).to(tl.float32))
    tl.store(out_ptr + 2, a)
    tl.store(out_ptr + 3, flag.to(tl.float32))


def _has_native_launcher() -> bool:
    from peftkern.kernels.cuda import extension

    ext = extension()
    return ext is not None and hasattr(ext, "TritonLauncher")


@pytest.mark.skipif(not HAS_CUDA or INTERPRET or torch.cuda.get_device_capability()[0] < 9 if HAS_CUDA else True,
                    reason="host TMA descriptors need a Hopper GPU")
def test_native_launch_matches_the_jit_launch():
    """csrc/launch.cpp's TritonLauncher: the descriptor kernel on new tensors, on tensors made again at a freed
    address (its memo's hit) and on views of other shapes and strides, and int32, int64, float32 and bool scalars,
    give what Triton's own launch gives (NATIVE_LAUNCH off, DIRECT_LAUNCH off)."""
    if not _has_native_launcher():
        pytest.fail("peftkern._C.TritonLauncher is not built: install with the CUDA extension on the GPU machine")
    torch.manual_seed(run_seed(0))
    _launch.FAST_LAUNCH[0] = True
    before = dict(_launch.stats)
    big_offset = 2**33
    try:
        for native in (True, False, True):
            _launch.NATIVE_LAUNCH[0] = native
            _launch.DIRECT_LAUNCH[0] = native
            _desc_axpy_cases()
            for small, extra, flag in [(-77, 12345, True), (-77, 12345, True), (2**30 + 3, -999, False),
                                       (41, 7, False)]:
                out = torch.full((4,), float("nan"), device="cuda")
                a = float(torch.randn(()))
                _launch.launch(_scalars_kernel, (1,), out, small, big_offset + extra, a, flag, BIG_OFFSET=big_offset,
                               num_warps=1)
                want = torch.tensor([float(small), float(extra), a, float(flag)], device="cuda")
                torch.testing.assert_close(out, want, msg=lambda m: f"small={small} extra={extra} flag={flag}: {m}")
    finally:
        _launch.NATIVE_LAUNCH[0] = True
        _launch.DIRECT_LAUNCH[0] = True
    assert _launch.stats["native"] - before["native"] >= 8, "the repeated classes took the native launch"


def test_native_launcher_reads_the_compiled_signature(monkeypatch):
    """_native_launcher's parameter list: constexprs and None arguments dropped, each host descriptor with its TMA
    metadata (element type in the driver's host enum), pointers and 8- to 64-bit scalars by position; None for what
    csrc/launch.cpp cannot take (a 16-bit float scalar, a tuple, another descriptor class, no direct plan)."""
    made = []

    class FakeLauncher:
        def __init__(self, *args):
            made.append(args)

    kinds = {"pointer": 0, "i8": 1, "i16": 2, "i32": 3, "i64": 4, "fp32": 5, "fp64": 6, "descriptor": 7}
    ext = type("Ext", (), {"TritonLauncher": FakeLauncher, "TRITON_LAUNCHER_KINDS": kinds})()
    from peftkern.kernels import cuda

    monkeypatch.setattr(cuda, "extension", lambda: ext)
    meta = {"swizzle": 3, "elem_size": 2, "elem_type": 10, "block_size": [64, 32], "fp4_padded": False}
    signature = {"x_desc": "tensordesc<bf16[64, 32]>", "a_desc": "constexpr", "out": "*bf16", "M": "i32",
                 "one": "constexpr", "big": "i64", "s": "fp32", "flag": "i1", "BLOCK": "constexpr"}

    def compiled(sig):
        run = type("Run", (), {"launch_cooperative_grid": False, "launch_pdl": False})()
        md = type("M", (), {"tensordesc_meta": [meta], "num_warps": 8, "num_ctas": 1, "shared": 1024})()
        return type("Compiled", (), {"src": type("Src", (), {"signature": sig})(), "metadata": md, "run": run,
                                     "function": 1234})()

    desc = _launch.Descriptor(torch.zeros(64, 32, dtype=torch.bfloat16), [64, 32])
    args = (desc, None, torch.zeros(4), 9, 1, 2**40, 0.5, True)
    assert isinstance(_launch._native_launcher(compiled(signature), args, ()), FakeLauncher)
    function, warps, ctas, shared, coop, pdl, slots, desc_type = made[-1]
    assert (function, warps, ctas, shared, coop, pdl, desc_type) == (1234, 8, 1, 1024, False, False, _launch.Descriptor)
    assert slots == [(7, 0, 9, 2, 3, False, [64, 32]), (0, 2), (3, 3), (4, 5), (5, 6), (1, 7)]
    assert _launch._native_launcher(compiled(signature), args, None) is None, "no direct plan: not the known layout"
    assert _launch._native_launcher(compiled({**signature, "s": "fp16"}), args, ()) is None
    assert _launch._native_launcher(compiled({**signature, "s": ("fp32", "fp32")}), args, ()) is None
    other = TensorDescriptor.from_tensor(torch.zeros(64, 32, dtype=torch.bfloat16), [64, 32])
    assert _launch._native_launcher(compiled(signature), (other, *args[1:]), ()) is None


def test_direct_plan_reads_the_launcher_it_knows():
    """_direct_plan finds the C function behind Triton's descriptor wrapper, and refuses launchers it does not know
    and kernels that want scratch memory."""
    def launch(*args):  # stands in for the C module's function by name and type below
        return args
    c_launch = type("builtin_function_or_method", (), {"__name__": "launch", "__call__": launch})()

    def wrap(raw):
        def inner(*args):
            return raw(*args)
        return inner

    meta = {"swizzle": 3, "elem_size": 2, "elem_type": 6, "block_size": [64, 32], "fp4_padded": False}
    run = type("Run", (), {"launch": wrap(c_launch), "global_scratch_size": 0, "profile_scratch_size": 0,
                           "launch_cooperative_grid": False, "launch_pdl": False})()
    compiled = type("Compiled", (), {"run": run, "metadata": type("M", (), {"tensordesc_meta": [meta]})()})()
    desc = _launch.Descriptor(torch.zeros(64, 32, dtype=torch.float16), [64, 32])
    if _launch._make_tensordesc_arg is None:
        assert _launch._direct_plan(compiled, (desc, 3)) is None
        return
    plan = _launch._direct_plan(compiled, (desc, 3))
    assert plan is not None and plan[0] is c_launch and plan[3] == ((0, meta, _launch._frozen(meta)),)
    run.global_scratch_size = 128
    assert _launch._direct_plan(compiled, (desc, 3)) is None, "scratch memory: Triton's launcher"
    run.global_scratch_size, run.launch = 0, lambda *a: None
    assert _launch._direct_plan(compiled, (desc, 3)) is None, "an unknown launcher: Triton's"


@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs a GPU")
def test_fast_path_off_and_positional_constexpr_take_the_jit_launch():
    x = torch.randn(300, device="cuda")
    out = torch.empty(300, device="cuda")
    _launch.FAST_LAUNCH[0] = False
    try:
        before = dict(_launch.stats)
        for _ in range(2):
            _launch.launch(_axpb_kernel, (2,), x, out, 300, 1, 2.0, 1.0, BLOCK=256, SHIFT=0)
        assert _launch.stats["fast"] == before["fast"] and _launch.stats["slow"] == before["slow"] + 2
    finally:
        _launch.FAST_LAUNCH[0] = True
    torch.testing.assert_close(out, _expected(x, 300, 1, 2.0, 1.0, 0))
    # a constexpr given by position: its class is not its value, so that kernel never takes the fast path
    for shift in (0, 5, 5):
        _launch.launch(_axpb_kernel, (2,), x, out, 300, 1, 2.0, 1.0, 256, shift)
        torch.testing.assert_close(out, _expected(x, 300, 1, 2.0, 1.0, shift))
    assert _axpb_kernel in _launch._refused
    _launch._refused.discard(_axpb_kernel)


def test_every_launch_in_the_package_can_take_the_fast_path():
    """Each `launch(kernel, grid, ...)` in kernels/triton passes every parameter that is not a constexpr by position
    and only constexprs by name: the fast path refuses a kernel otherwise and sends all its launches through
    Triton's dispatch (~100 us of host time a layer). Found on an H200 on 2026-12-03: the persistent LoRA kernel's
    flags_ptr and xa_scale, given by name since the xa workers came in, kept it off the fast path for a session."""
    import ast
    import importlib
    import inspect
    import pathlib

    folder = pathlib.Path(_launch.__file__).parent
    checked = 0
    for path in sorted(folder.glob("*.py")):
        module = importlib.import_module(f"peftkern.kernels.triton.{path.stem}")
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("launch", "launch_planned")):
                continue
            kernel = getattr(module, node.args[0].id)
            where = f"{path.name}:{node.lineno} {node.args[0].id}"
            # the function's own signature (a JITFunction's params, which the interpreter's wrapper lacks)
            params = [(p.name, p.annotation is tl.constexpr or "constexpr" in str(p.annotation))
                      for p in inspect.signature(kernel.fn).parameters.values()]
            plain = [name for name, constexpr in params if not constexpr]
            assert [name for name, _ in params[:len(plain)]] == plain, f"{where}: a constexpr before {plain}"
            by_name = {k.arg for k in node.keywords if k.arg is not None}
            assert not by_name & set(plain), f"{where}: {sorted(by_name & set(plain))} must come by position"
            positional = len(node.args) - (3 if node.func.id == "launch_planned" else 2)
            if not any(isinstance(a, ast.Starred) for a in node.args):  # a splat's length is not known here
                assert positional == len(plain), f"{where}: {positional} by position, {plain}"
            checked += 1
    assert checked >= 15, checked


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_empty_buffers_make_each_spec(device):
    """_launch.empty_buffers: each (shape, dtype, zero) spec as a tensor on ref's device, the zeroed ones all zero
    (on the GPU over memory that held other data first), by csrc/launch.cpp where the extension is built."""
    if device == "cuda" and (not HAS_CUDA or INTERPRET):
        pytest.skip("needs a GPU")
    if device == "cuda" and not _has_native_launcher():
        pytest.fail("peftkern._C.empty_buffers is not built: install with the CUDA extension on the GPU machine")
    ref = torch.randn(3, device=device)
    specs = (((5, 7), torch.bfloat16, False), ((33,), torch.int32, True), ((0,), torch.float32, True),
             ((4, 2, 3), torch.float32, True))
    for _ in range(3):  # what the allocator hands back next held these values
        junk = [torch.full(shape, 7, device=device, dtype=dtype) for shape, dtype, _ in specs]
        del junk
        made = _launch.empty_buffers(ref, *specs)
        assert [(tuple(t.shape), t.dtype, t.device.type) for t in made] == [(s, d, device) for s, d, _ in specs]
        for t, (_, _, zero) in zip(made, specs):
            if zero:
                assert int(torch.count_nonzero(t)) == 0, f"{t.shape} {t.dtype} not cleared"

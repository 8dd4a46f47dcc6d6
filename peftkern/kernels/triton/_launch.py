"""Launching a jitted kernel again without JITFunction.run's per-call dispatch.

`kernel[grid](*args, **meta)` binds ~20 arguments, specialises each one, builds a cache key from them and the
options, and looks the compiled kernel up, on every call: tens of microseconds of host time per launch
(scripts/host_costs.py), and a training step of many small LoRA layers is bound by the host (NOTES-lora.md).
`launch` does the same lookup once per class of arguments and then calls the compiled kernel's own launcher.

The class of an argument holds everything Triton specialises a kernel on, and a little more: a tensor's dtype
and whether its address is 16-byte aligned; an int's being 1, its divisibility by 16 and its width; a host
TMA descriptor's dtype, block shape, padding, base alignment and the divisibility of its shape and strides;
the keyword arguments (constexprs, num_warps, num_stages) by value. A finer class than Triton's only makes more
entries, each holding the kernel that Triton compiled for an argument list of that class.

The slow path stays in charge where the fast one cannot know enough: the interpreter, a launch hook installed
(profilers), an argument of another kind, or a launcher that refuses the call (another Triton release);
PEFTKERN_FAST_LAUNCH=0 turns the fast path off.
"""

from __future__ import annotations

import os

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from ..._backend import triton_interpret

FAST_LAUNCH = [os.environ.get("PEFTKERN_FAST_LAUNCH", "1") != "0"]  # a list: tests and benchmarks flip it
# On the fast path, call the compiled launcher's C function itself, with each host TMA descriptor's expansion (its
# CUtensorMap, shape and strides) memoised: Triton's Python launcher rebuilds every tensor map on every launch (five
# or six a launch of the persistent kernel) and loops over all the arguments in Python to do it. A tensor map holds the
# address, shape, strides, element type, box and swizzle, all of them in the memo's key, so a memoised one is the very
# map Triton would build. PEFTKERN_DIRECT_LAUNCH=0 keeps Triton's launcher.
DIRECT_LAUNCH = [os.environ.get("PEFTKERN_DIRECT_LAUNCH", "1") != "0"]
# Where the CUDA extension is built, the direct call goes one step further: peftkern._C.TritonLauncher reads the
# arguments, encodes (or reuses) the tensor maps and calls cuLaunchKernelEx in one C++ call, with the kernel's parameter
# list worked out once per compiled kernel (csrc/launch.cpp). It takes the direct call's conditions and more: every host
# descriptor one of this file's Descriptors, scalars of 8 to 64 bits. PEFTKERN_NATIVE_LAUNCH=0 keeps the direct call.
NATIVE_LAUNCH = [os.environ.get("PEFTKERN_NATIVE_LAUNCH", "1") != "0"]


def _known_driver():
    """Triton's own expansion of a host descriptor (reused on a memo miss), where the NVIDIA driver's launcher takes the
    arguments this file passes it (Triton 3.5-3.6: 13 leading arguments, make_tensordesc_arg(arg, metadata)); else
    None, and Triton's launcher runs throughout."""
    try:
        import inspect

        from triton.backends.nvidia import driver
        expand = driver.make_tensordesc_arg
        if getattr(driver, "_BASE_ARGS_FORMAT", None) != "iiiKKppOOOOOO" or len(
                inspect.signature(expand).parameters) != 2:
            return None
        return expand
    except (ImportError, AttributeError, TypeError, ValueError):
        return None


_make_tensordesc_arg = _known_driver()
_MAX_TENSORMAPS = 4096
_MAX_ENTRIES = 512  # per kernel; a run that makes more (shapes that never repeat) starts the cache again

_entries: dict = {}  # kernel -> {class: (launcher, function, packed metadata, trailing arguments, compiled kernel,
# _direct_plan's plan or None, csrc/launch.cpp's TritonLauncher or None)}
_refused: set = set()  # kernels whose launcher refused a direct call: the slow path for good
stats = {"fast": 0, "slow": 0, "direct": 0, "native": 0}  # launches by path (tests check that the fast path is
# taken); direct: of the fast ones, those that called Triton's C launcher; native: those that csrc/launch.cpp launched
_tensormaps: dict = {}  # (address, shape, strides, padding, dtype, the kernel's descriptor metadata) -> expansion


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers' host code: triton.cdiv is a jitted function, and a call to it from Python goes
    through JITFunction.__call__ (~2 us a call, tens of calls a layer)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): triton.next_power_of_2 is a constexpr function, and a call from
    Python goes through its wrapper (~2.5 us)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


class Descriptor(TensorDescriptor):
    """TensorDescriptor.from_tensor(base, block_shape) without the dataclass's per-call checks (~1 us of assertions a
    descriptor; a layer's launches make up to six). The callers check what TMA needs first (16-byte aligned base and
    outer strides, a unit inner stride: lora._tma_layout), and a block shape of powers of two is theirs to pick.
    padding and the other options keep TensorDescriptor's defaults (class attributes of the dataclass)."""

    def __init__(self, base: torch.Tensor, block_shape: list):  # noqa: D107 - no dataclass __init__ (no checks)
        self.base = base
        self.shape = base.shape
        self.strides = base.stride()
        self.block_shape = block_shape


def _int_class(v: int) -> tuple:
    return (v == 1, v % 16 == 0, -(2**31) <= v < 2**31, v >= 0)


def _arg_class(v):
    kind = type(v)  # the common kinds first, by exact type (isinstance chains cost ~0.5 us an argument)
    if kind is int:
        return _int_class(v)
    if kind is float:
        return float
    if kind is torch.Tensor:
        return (v.dtype, v.data_ptr() % 16 == 0)
    if isinstance(v, torch.Tensor):
        return (v.dtype, v.data_ptr() % 16 == 0)
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int):
        return _int_class(v)
    if isinstance(v, float):
        return float
    if isinstance(v, TensorDescriptor):
        # memoised on the raw values: a descriptor's class cost ~1.5 us to build, and a layer's launches take six
        raw = (v.base.dtype, v.base.data_ptr() % 16 == 0, *v.block_shape, getattr(v, "padding", None), *v.shape,
               *v.strides)
        cls = _desc_classes.get(raw)
        if cls is None:
            if len(_desc_classes) >= 4096:  # shapes that never repeat (varying sequence lengths): start again
                _desc_classes.clear()
            cls = _desc_classes[raw] = (v.base.dtype, raw[1], tuple(v.block_shape), raw[len(v.block_shape) + 2],
                                        tuple(_int_class(s) for s in v.shape), tuple(_int_class(s) for s in v.strides))
        return cls
    raise TypeError(type(v))


_desc_classes: dict = {}


_RUNTIME = getattr(getattr(triton, "knobs", None), "runtime", None)  # Triton >= 3.4 keeps the launch hooks here


def _hooks() -> tuple:
    """(enter, exit) launch hooks as JITFunction.run passes them to the launcher."""
    if _RUNTIME is None:
        return None, None
    return _RUNTIME.launch_enter_hook, _RUNTIME.launch_exit_hook


def _hook_set(hook) -> bool:
    # a HookChain (Triton >= 3.5) is never None: installed hooks are in its calls
    return hook is not None and bool(getattr(hook, "calls", True))


def _current_device() -> int:
    return torch.cuda.current_device()


def _current_stream(device: int) -> int:
    return triton.runtime.driver.active.get_current_stream(device)


def _jit_launch(kernel, grid: tuple, args: tuple, meta: dict):
    stats["slow"] += 1
    return kernel[grid](*args, **meta)


def launch(kernel, grid: tuple, *args, **meta) -> None:
    """kernel[grid](*args, **meta), with the dispatch done once per class of arguments. args are the
    kernel's leading parameters in order, meta the rest (constexprs) and the launch options by name."""
    enter, leave = _hooks()
    if _slow_path(kernel, enter, leave):
        _jit_launch(kernel, grid, args, meta)
        return
    try:
        key = (_current_device(), tuple(_arg_class(a) for a in args), tuple(meta.items()))
    except TypeError:
        _jit_launch(kernel, grid, args, meta)
        return
    _launch_class(kernel, grid, key, args, meta, enter, leave)


def launch_planned(kernel, grid: tuple, plan_key, *args, **meta) -> None:
    """launch(kernel, grid, *args, **meta) where the caller names the class of args and meta itself: plan_key (any
    hashable) must determine everything launch's own key would hold (each argument's class, meta's values), as a
    host-side plan memoised on the call's shapes, strides, dtypes and alignments does. It saves the per-argument
    classification (~8 us a launch of the persistent kernel's 17 arguments on a fast CPU)."""
    enter, leave = _hooks()
    if _slow_path(kernel, enter, leave):
        _jit_launch(kernel, grid, args, meta)
        return
    _launch_class(kernel, grid, (_current_device(), "planned", plan_key), args, meta, enter, leave)


def _slow_path(kernel, enter, leave) -> bool:
    """Whether this launch must go through Triton's dispatch: the fast path off, the interpreter, a kernel whose
    launcher refused a direct call, or launch hooks installed (profilers)."""
    return not FAST_LAUNCH[0] or triton_interpret() or kernel in _refused or _hook_set(enter) or _hook_set(leave)


def _launch_class(kernel, grid: tuple, key: tuple, args: tuple, meta: dict, enter, leave) -> None:
    """The launch of a class of arguments (key: the device first): its compiled kernel's launcher once known, else
    Triton's dispatch, whose compiled kernel is then kept for the class."""
    table = _entries.get(kernel)
    entry = table.get(key) if table is not None else None
    if entry is None:
        compiled = _jit_launch(kernel, grid, args, meta)
        if table is None:
            table = _entries[kernel] = {}
        elif len(table) >= _MAX_ENTRIES:
            table.clear()
        # The launcher takes every parameter's value in order, constexprs included (it skips those): the ones
        # after args come from meta or their defaults, fixed for the whole class.
        try:
            params = kernel.params
            # the class of a positional argument is not its value, so a constexpr must come by name, and what
            # comes by name is fixed for the class, so it must be a constexpr
            if any(p.is_constexpr for p in params[:len(args)]) or not all(p.is_constexpr for p in params[len(args):]):
                _refused.add(kernel)
                return
            tail = tuple(meta[p.name] if p.name in meta else p.default for p in params[len(args):])
            # the entry holds the compiled kernel itself: its module is unloaded when it is collected, and the
            # function handle would then name freed code
            direct = _direct_plan(compiled, args)
            table[key] = (compiled.run, compiled.function, compiled.packed_metadata, tail, compiled, direct,
                          _native_launcher(compiled, args, direct))
        except AttributeError:  # a Triton release without these: the slow path for good
            _refused.add(kernel)
        return
    run, function, packed, tail, _, direct, native = entry
    g = tuple(grid) + (1, 1)
    if native is not None and NATIVE_LAUNCH[0] and native.launch(g[0], g[1], g[2], args):
        stats["fast"] += 1
        stats["native"] += 1
        return
    try:
        if direct is not None and DIRECT_LAUNCH[0]:
            _direct_call(direct, g, _current_stream(key[0]), function, packed, enter, leave, args, tail)
            stats["direct"] += 1
        else:
            run(g[0], g[1], g[2], _current_stream(key[0]), function, packed, None, enter, leave, *args, *tail)
    except (TypeError, SystemError):
        # another Triton release's launcher convention: never try this kernel's fast path again
        _refused.add(kernel)
        table.clear()
        _jit_launch(kernel, grid, args, meta)
        return
    stats["fast"] += 1


def _frozen(meta) -> tuple:
    """A descriptor's metadata (a dict of ints and lists) as a hashable key."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in meta.items()))


def _raw_launcher(run):
    """The C function behind a compiled kernel's launcher (Triton 3.5-3.6's CudaLauncher: `launch` is the C module's
    function itself, or, for kernels with host descriptors, Triton's Python wrapper `inner` around it), else None."""
    launch = getattr(run, "launch", None)
    if getattr(launch, "__name__", None) == "inner":
        found = None
        for cell in launch.__closure__ or ():
            try:
                value = cell.cell_contents
            except ValueError:
                continue
            if type(value).__name__ == "builtin_function_or_method" and value.__name__ == "launch":
                found = value
                break
        launch = found
    if type(launch).__name__ != "builtin_function_or_method" or launch.__name__ != "launch":
        return None
    return launch


def _direct_plan(compiled, args: tuple):
    """What _direct_call needs to call the compiled launcher's C function itself: (that function, the cooperative-grid
    and PDL flags, ((position, metadata, frozen metadata) of each host descriptor argument)). None where this Triton's
    launcher is not the one this knows (then Triton's own launcher runs): no C function found, a kernel that wants
    scratch memory allocated per launch, descriptors without the kernel's TMA metadata."""
    if _make_tensordesc_arg is None:
        return None
    run = compiled.run
    raw = _raw_launcher(run)
    if raw is None or getattr(run, "global_scratch_size", 1) or getattr(run, "profile_scratch_size", 1):
        return None
    positions = [i for i, a in enumerate(args) if isinstance(a, TensorDescriptor)]
    metas = list(getattr(compiled.metadata, "tensordesc_meta", None) or [])
    if len(metas) != len(positions) or any(not isinstance(m, dict) for m in metas):
        return None
    descs = tuple((i, m, _frozen(m)) for i, m in zip(positions, metas))
    return raw, bool(run.launch_cooperative_grid), bool(run.launch_pdl), descs[::-1]  # last first: see _direct_call


def _direct_call(direct, g: tuple, stream: int, function, packed, enter, leave, args: tuple, tail: tuple) -> None:
    """The compiled launcher's C function with the arguments Triton's launcher would give it: no scratch buffers (the
    plan checked), each host descriptor replaced by its memoised (tensor map, shape..., strides...)."""
    raw, cooperative, pdl, descs = direct
    flat = list(args)
    for i, meta, frozen in descs:  # last descriptor first, so that each expansion leaves earlier positions in place
        d = flat[i]
        base = d.base
        k = (base.data_ptr(), tuple(d.shape), tuple(d.strides), getattr(d, "padding", None), base.dtype, frozen)
        expansion = _tensormaps.get(k)
        if expansion is None:
            if len(_tensormaps) >= _MAX_TENSORMAPS:
                _tensormaps.clear()
            expansion = _tensormaps[k] = _make_tensordesc_arg(d, meta)
        flat[i:i + 1] = expansion
    raw(g[0], g[1], g[2], stream, function, cooperative, pdl, None, None, packed, None, enter, leave, *flat, *tail)


# Triton's scalar types as csrc/launch.cpp's kinds (ty_to_cpp in Triton's NVIDIA driver: i1 is an int8_t there)
_SCALAR_KINDS = {"i1": "i8", "i8": "i8", "u1": "i8", "u8": "i8", "i16": "i16", "u16": "i16", "i32": "i32",
                 "u32": "i32", "i64": "i64", "u64": "i64", "fp32": "fp32", "f32": "fp32", "fp64": "fp64"}
# The TMA element type enum differs between the device side (the kernel's metadata) and the driver's host API
_TMA_DTYPE_TO_HOST = {8: 10, 9: 8, 10: 9}


def _extension_attr(name: str):
    """peftkern._C's `name` (csrc/launch.cpp's launcher and buffer maker), or None where the extension is not built."""
    from ..cuda import extension

    return getattr(extension(), name, None)


def _native_launcher(compiled, args: tuple, direct):
    """peftkern._C.TritonLauncher for this compiled kernel, or None (then _direct_call or Triton's launcher runs): the
    extension not built, no direct plan (another launcher layout, scratch memory, descriptors without TMA metadata), or
    a parameter it cannot take (a tuple, a 16-bit scalar, a descriptor of another class)."""
    launcher = _extension_attr("TritonLauncher")
    if direct is None or launcher is None:
        return None
    try:
        kinds = _extension_attr("TRITON_LAUNCHER_KINDS")
        signature = list(compiled.src.signature.values())
        metas = list(compiled.metadata.tensordesc_meta or [])
        slots, described = [], 0
        for i, ty in enumerate(signature):
            if not isinstance(ty, str):
                return None
            if ty == "constexpr":
                continue
            if i >= len(args):  # a run-time parameter among those the class fixes: not the layout this knows
                return None
            if ty.startswith("tensordesc"):
                arg, meta = args[i], metas[described]
                described += 1
                if type(arg) is not Descriptor or meta.get("fp4_padded"):
                    return None
                elem = meta["elem_type"]
                slots.append((kinds["descriptor"], i, _TMA_DTYPE_TO_HOST.get(elem, elem), meta["elem_size"],
                              meta["swizzle"], getattr(arg, "padding", None) == "nan", list(meta["block_size"])))
            elif ty.startswith("*"):
                slots.append((kinds["pointer"], i))
            elif ty in _SCALAR_KINDS:
                slots.append((kinds[_SCALAR_KINDS[ty]], i))
            else:
                return None
        if described != len(metas):
            return None
        md, run = compiled.metadata, compiled.run
        return launcher(compiled.function, md.num_warps, getattr(md, "num_ctas", 1), md.shared,
                        bool(run.launch_cooperative_grid), bool(run.launch_pdl), slots, Descriptor)
    except (AttributeError, IndexError, KeyError, TypeError, RuntimeError):
        return None


_buffer_maker: list = []  # [peftkern._C.empty_buffers or None], looked up at the first call


def empty_buffers(ref: torch.Tensor, *specs: tuple) -> list:
    """Tensors on ref's device for a launch's outputs and workspaces, one per (shape, dtype, zero) spec, cleared where
    zero is true. One C++ call where the extension is built and ref is a CUDA tensor (csrc/launch.cpp: at::empty and
    cudaMemsetAsync, a few microseconds of host time for all of them), else torch.empty / torch.zeros each."""
    if not _buffer_maker:
        _buffer_maker.append(_extension_attr("empty_buffers"))
    maker = _buffer_maker[0]
    if maker is not None and NATIVE_LAUNCH[0] and ref.is_cuda:
        return maker(ref, specs)
    return [(torch.zeros if zero else torch.empty)(shape, device=ref.device, dtype=dtype) for shape, dtype, zero in specs]

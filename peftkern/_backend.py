"""Backend selection: which implementation (cuda | triton | torch) runs an op.

Order of precedence: `set_backend(...)`, then the environment variable PEFTKERN_BACKEND, then the
per-op default below (the fastest backend the benchmarks measured on an H100, see benchmarks/results/).
The torch backend (reference.py) is always available and is the only one for CPU tensors, except that
the Triton kernels also run on CPU tensors under TRITON_INTERPRET=1 (that is how CI tests them).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Optional

import torch

BACKENDS = ("cuda", "triton", "torch")

# Fastest measured backend per op on a CUDA device (benchmarks/results/, kernels/triton/NOTES-*.md).
DEFAULT_CUDA_BACKEND = {
    "lora": "triton",
    "ia3": "triton",
    "krona": "triton",
    "adapter": "triton",
}

_override: Optional[str] = None
_warned: set = set()


# Under torch.compile dynamo cannot trace warnings.warn (fullgraph=True raised on a fallback's warning) nor, inside a
# checkpointed layer, the set's update: as a constant-result function it runs for real while the graph is traced,
# which is when the fallback is decided, and the graph keeps only its answer.
@torch.compiler.assume_constant_result
def warn_once(cause: str, message: str) -> None:
    """One RuntimeWarning per cause per process (a fallback that would otherwise warn on every call), attributed to
    the first caller outside peftkern and the libraries that call into it (_CALLERS_SKIPPED): the user's line."""
    if cause not in _warned:
        _warned.add(cause)
        warnings.warn(message, RuntimeWarning, stacklevel=_callers_stacklevel())


# The packages whose frames lie between a user's line and a fallback: peftkern's own calls, torch's nn.Module call and
# autograd, and the model and adapter code of transformers, peft and accelerate (a fixed stacklevel named a line
# inside peftkern, which depended on the call path; a review, 2026-12-05).
_CALLERS_SKIPPED = ("peftkern", "torch", "transformers", "peft", "accelerate")


def _callers_stacklevel() -> int:
    """warnings.warn's stacklevel, called in warn_once, of the first frame outside _CALLERS_SKIPPED's folders: 2 is
    warn_once's caller. The folders come from the packages already imported, so nothing is imported here."""
    folders = tuple(os.path.dirname(module.__file__) + os.sep for module in map(sys.modules.get, _CALLERS_SKIPPED)
                    if getattr(module, "__file__", None))
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(folders):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 2


def set_backend(name: Optional[str]) -> None:
    """Force every op onto one backend ("cuda", "triton", "torch"), for the whole process (not per thread); None
    drops the forcing: PEFTKERN_BACKEND then decides where set, else each op's default."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    global _override
    _override = name


def get_backend() -> Optional[str]:
    """The forced backend, if any (set_backend or PEFTKERN_BACKEND)."""
    if _override is not None:
        return _override
    env = os.environ.get("PEFTKERN_BACKEND", "").strip().lower()
    if env and env != "auto":
        if env not in BACKENDS:
            raise ValueError(f"PEFTKERN_BACKEND must be one of {BACKENDS} or 'auto', got {env!r}")
        return env
    return None


# The probes below run once and keep their answer in a module-level list. Under torch.compile, dynamo would trace that
# first run as a mutation of module state, and inside a checkpointed layer (the tag_activation_checkpoint HOP) it
# refuses one ("HOP: Unsafe side effect"): the graph broke at the first fused layer of a model compiled before any
# eager call, and fullgraph=True raised (seen on an H200, torch 2.11, bench e2e's compiled checkpointed step).
# assume_constant_result makes dynamo call them for real at trace time and keep the answer as a constant.
@torch.compiler.assume_constant_result
def triton_interpret() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1). Read once: Triton decides it when a kernel
    module is imported, and the launchers ask several times a call (an environment lookup costs ~0.5 us)."""
    if not _interpret:
        _interpret.append(os.environ.get("TRITON_INTERPRET", "0") == "1")
    return _interpret[0]


_interpret: list = []


_triton_found: list = []  # [whether triton imports], once known (a list, not lru_cache: dynamo warned at every
# compile of a fused model that it ignores lru_cache wrappers)


@torch.compiler.assume_constant_result
def _triton_importable() -> bool:
    if not _triton_found:
        try:
            import triton  # noqa: F401
        except ImportError:
            _triton_found.append(False)
        else:
            _triton_found.append(True)
    return _triton_found[0]


def cuda_extension():
    """The compiled extension peftkern._C, or None when it was not built."""
    from .kernels import cuda

    return cuda.extension()


def backend_status() -> dict:
    """Which backends can run here, and why not: used by `python -m peftkern info`."""
    status = {"torch": "available (reference.py)"}
    if not _triton_importable():
        status["triton"] = "unavailable: triton is not installed"
    elif torch.cuda.is_available():
        status["triton"] = "available"
    elif triton_interpret():
        status["triton"] = "available on CPU tensors under TRITON_INTERPRET=1 (slow; for tests)"
    else:
        status["triton"] = "unavailable: no CUDA device (set TRITON_INTERPRET=1 to interpret on the CPU)"
    from .kernels import cuda

    if cuda.extension() is not None:
        ops = cuda_ops()
        missing = [op for op in DEFAULT_CUDA_BACKEND if op not in ops]
        status["cuda"] = f"available for {', '.join(ops) or 'no op'}" + (
            f" (no CUDA kernel yet for {', '.join(missing)}: those run on triton)" if missing else "")
    else:
        status["cuda"] = f"unavailable: {cuda.why_unavailable()}"
    return status


def cuda_ops() -> tuple:
    """The ops the built CUDA extension implements (kernels.cuda has `<op>_forward` and peftkern._C its kernels)."""
    from .kernels import cuda

    ext = cuda.extension()
    if ext is None:
        return ()
    return tuple(op for op in DEFAULT_CUDA_BACKEND
                 if hasattr(cuda, f"{op}_forward") and hasattr(ext, f"{op}_forward"))


def available(name: str, device: torch.device, op: Optional[str] = None) -> bool:
    """Whether backend `name` can run here (and, given `op`, implements that op)."""
    if name == "torch":
        return True
    if name == "triton":
        if not _triton_importable():
            return False
        return device.type == "cuda" or (device.type == "cpu" and triton_interpret())
    if name == "cuda":
        return device.type == "cuda" and _cuda_implements(op or "")
    return False


@torch.compiler.assume_constant_result
def _cuda_implements(op: str) -> bool:
    """Whether the CUDA extension is built and, for a non-empty op, has that op's kernels. (A constant under
    torch.compile, as the probes above: cuda_extension() imports peftkern._C and records why it failed.)"""
    if cuda_extension() is None:
        return False
    return not op or op in cuda_ops()


def resolve(op: str, device: torch.device) -> str:
    """The backend that runs `op` for tensors on `device`."""
    forced = get_backend()
    if device.type == "meta":
        # Meta tensors hold no data, so no kernel can run on them: a forced backend raised "cannot run on meta" where
        # the default took the reference, and a meta forward (shape inference: torch.distributed.pipelining's, a model
        # summary) failed only when PEFTKERN_BACKEND was set (a review, 2026-12-06)
        if forced not in (None, "torch"):
            warn_once(f"{op}-meta", f"peftkern {op}: meta tensors run on the reference path (shapes only), not on the "
                                    f"forced {forced!r} backend")
        return "torch"
    if forced == "cuda" and device.type == "cuda" and not _cuda_implements(op) and _cuda_implements(""):
        warn_once(f"{op}-no-cuda-kernel", f"peftkern: the cuda backend has no {op} kernel yet; {op} runs on "
                  f"{DEFAULT_CUDA_BACKEND.get(op, 'triton')}")
        forced = None
    if forced is not None:
        if not available(forced, device, op):
            raise RuntimeError(
                f"peftkern backend {forced!r} was requested for {op} but cannot run on {device}: "
                f"{backend_status().get(forced)}"
            )
        return forced
    if device.type != "cuda":
        return "torch"
    preferred = DEFAULT_CUDA_BACKEND.get(op, "triton")
    for name in (preferred, "triton", "cuda", "torch"):
        if available(name, device, op):
            return name
    return "torch"

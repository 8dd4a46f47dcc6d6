"""Backend selection: which implementation (cuda | triton | torch) runs an op.

Order of precedence: `set_backend(...)`, then the environment variable PEFTKERN_BACKEND, then the
per-op default below (the fastest backend the benchmarks measured on an H100, see benchmarks/results/).
The torch backend (reference.py) is always available and is the only one for CPU tensors, except that
the Triton kernels also run on CPU tensors under TRITON_INTERPRET=1 (that is how CI tests them).
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

BACKENDS = ("cuda", "triton", "torch")

# Fastest measured backend per op on a CUDA device (benchmarks/results/, NOTES.md per kernel family).
DEFAULT_CUDA_BACKEND = {
    "lora": "triton",
    "ia3": "triton",
    "krona": "triton",
    "adapter": "triton",
}

_override: Optional[str] = None


def set_backend(name: Optional[str]) -> None:
    """Force every op onto one backend ("cuda", "triton", "torch"); None restores the defaults."""
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


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


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

    status["cuda"] = "available" if cuda.extension() is not None else f"unavailable: {cuda.why_unavailable()}"
    return status


def available(name: str, device: torch.device) -> bool:
    if name == "torch":
        return True
    if name == "triton":
        if not _triton_importable():
            return False
        return device.type == "cuda" or (device.type == "cpu" and triton_interpret())
    if name == "cuda":
        return device.type == "cuda" and cuda_extension() is not None
    return False


def resolve(op: str, device: torch.device) -> str:
    """The backend that runs `op` for tensors on `device`."""
    forced = get_backend()
    if forced is not None:
        if not available(forced, device):
            raise RuntimeError(
                f"peftkern backend {forced!r} was requested for {op} but cannot run on {device}: "
                f"{backend_status().get(forced)}"
            )
        return forced
    if device.type != "cuda":
        return "torch"
    preferred = DEFAULT_CUDA_BACKEND.get(op, "triton")
    for name in (preferred, "triton", "cuda", "torch"):
        if available(name, device):
            return name
    return "torch"

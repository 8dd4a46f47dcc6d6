"""The compiled CUDA extension (peftkern._C, built from csrc/ by setup.py), if present.

Each op's functions here keep the signatures of reference.py's, so ops/ can call any backend alike.
"""

from __future__ import annotations

import functools
from typing import Optional

_import_error: Optional[str] = None


@functools.lru_cache(maxsize=None)
def extension():
    """peftkern._C, or None when the package was installed without the CUDA build."""
    global _import_error
    try:
        from .. import _C
    except ImportError as exc:
        _import_error = f"peftkern._C is not built ({exc}); reinstall with a CUDA build of torch and nvcc"
        return None
    return _C


def why_unavailable() -> str:
    extension()
    return _import_error or ""

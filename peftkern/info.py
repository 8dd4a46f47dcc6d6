"""`python -m peftkern info`: the device, the backends and why one is missing, versions, the methods."""

from __future__ import annotations

import argparse
import platform

import torch

from . import _backend


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers", "peft"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "not installed"
    return out


def _methods() -> dict:
    """Every peftkern.nn layer class with PEFT-Ref properties."""
    from . import nn as pk_nn

    found = {}
    for name in dir(pk_nn):
        obj = getattr(pk_nn, name)
        if isinstance(obj, type) and hasattr(obj, "peft_ref"):
            found[name] = obj.peft_ref.as_dict()
    return found


def report() -> dict:
    device = {"cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device.update(name=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                      memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    defaults = {op: _backend.resolve(op, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
                for op in _backend.DEFAULT_CUDA_BACKEND}
    return {"device": device, "backends": _backend.backend_status(), "forced_backend": _backend.get_backend(),
            "backend_per_op": defaults, "cuda_extension_built": _backend.cuda_extension() is not None,
            "versions": _versions(), "methods": _methods()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peftkern info")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    data = report()
    if args.json:
        import json

        print(json.dumps(data, indent=1))
        return 0
    print("device:", ", ".join(f"{k}={v}" for k, v in data["device"].items()))
    print("backends:")
    for name, status in data["backends"].items():
        print(f"  {name:7s} {status}")
    print("forced backend:", data["forced_backend"] or "none (set_backend / PEFTKERN_BACKEND)")
    print("backend per op here:", ", ".join(f"{k}={v}" for k, v in data["backend_per_op"].items()))
    print("CUDA extension built:", data["cuda_extension_built"])
    print("versions:", ", ".join(f"{k} {v}" for k, v in data["versions"].items()))
    print("methods (PEFT-Ref properties):")
    for cls, props in data["methods"].items():
        print(f"  {cls}")
        for k, v in props.items():
            print(f"    {k:22s} {v}")
    return 0

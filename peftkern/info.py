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


def _load_config(model: str):
    """A transformers config: a workloads shape name (1b, 7b, tiny), or a config.json / a folder holding one."""
    from pathlib import Path

    from . import workloads

    if model in workloads.SHAPES:
        from transformers import LlamaConfig

        return LlamaConfig(**workloads.SHAPES[model]), True
    from transformers import AutoConfig

    path = Path(model)
    if not path.exists():
        raise SystemExit(f"--model {model!r}: neither one of {', '.join(workloads.SHAPES)} nor a config path")
    if path.is_dir():
        return AutoConfig.from_pretrained(str(path)), False
    import json

    fields = json.loads(path.read_text())
    return AutoConfig.for_model(fields.pop("model_type"), **fields), False


def trainable_parameters(model: str) -> dict:
    """method -> {trainable, total, percent} for the model config `model`, counted on the meta device (nothing
    is allocated). For the workloads shapes the adapters are the benchmarks' (peftkern/workloads.py); for any
    other config PEFT's default target modules for its model type, and Pfeiffer bottleneck adapters."""
    import copy

    from transformers import AutoModelForCausalLM

    from . import workloads
    from .integrations.adapters import add_adapters

    config, ours = _load_config(model)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in base.parameters())
    counts = {}
    for method in workloads.METHODS:
        try:
            m = copy.deepcopy(base)
            if method == "adapter":
                add_adapters(m, "pfeiffer")
                setup = "Pfeiffer, after the feed-forward block, reduction 16"
            else:
                import peft

                cfg = workloads.peft_config(method) if ours else {
                    "lora": peft.LoraConfig, "ia3": peft.IA3Config, "lokr": peft.LoKrConfig}[method]()
                m = peft.get_peft_model(m, cfg)
                # what was counted, said: the named shapes take the benchmarks' adapters on every projection, a config
                # file PEFT's defaults (q and v for LoRA), 10x fewer on the same model (an exploratory test, 2026-12-07)
                resolved = m.peft_config["default"]
                setup = ("the benchmarks' config" if ours else "PEFT's default config") + \
                    f", targets {sorted(resolved.target_modules)}" + \
                    (f", r={resolved.r}" if getattr(resolved, "r", None) else "")
            trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        except Exception as exc:  # a method PEFT cannot attach to this model type
            counts[method] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        counts[method] = {"trainable": trainable, "total_with_adapters": sum(p.numel() for p in m.parameters()),
                          "percent_of_base": 100.0 * trainable / total, "setup": setup}
    return {"model": model, "model_type": config.model_type, "base_parameters": total, "methods": counts}


def report() -> dict:
    device = {"cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device.update(name=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                      memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    defaults = {op: _resolved(op) for op in _backend.DEFAULT_CUDA_BACKEND}
    try:
        forced = _backend.get_backend()
    except ValueError as exc:  # a PEFTKERN_BACKEND no backend answers to: info is where the user looks
        forced = f"invalid: {exc}"
    return {"device": device, "backends": _backend.backend_status(), "forced_backend": forced,
            "backend_per_op": defaults, "cuda_extension_built": _backend.cuda_extension() is not None,
            "versions": _versions(), "methods": _methods()}


def _resolved(op: str) -> str:
    """The backend `op` runs on here, or why the forced one cannot (resolve raises on every op call then)."""
    try:
        return _backend.resolve(op, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, ValueError) as exc:
        return f"error ({exc})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peftkern info")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--model", default="1b",
                        help="model config for the trainable-parameter counts: 1b, 7b, tiny (peftkern/workloads.py) "
                             "or a config.json / a folder with one (default 1b); 'none' skips them")
    args = parser.parse_args(argv)
    data = report()
    if args.model != "none":
        try:
            data["trainable_parameters"] = trainable_parameters(args.model)
        except ImportError as exc:
            data["trainable_parameters"] = {"error": f"needs transformers and peft: {exc}"}
        except (ValueError, KeyError, OSError, TypeError) as exc:
            # a config transformers cannot build a causal LM from (T5), or without a model_type: the counts say
            # so, and the report stays (a traceback lost it, and --json printed nothing; a review, 2026-12-05)
            data["trainable_parameters"] = {"error": f"--model {args.model}: {type(exc).__name__}: {exc}"}
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
    counts = data.get("trainable_parameters")
    if counts and "methods" in counts:
        print(f"trainable parameters on {counts['model']} ({counts['model_type']}, "
              f"{counts['base_parameters']:,} base parameters):")
        for method, c in counts["methods"].items():
            print(f"  {method:8s} " + (c["error"] if "error" in c else
                                       f"{c['trainable']:>13,}  ({c['percent_of_base']:.3f}% of the base; "
                                       f"{c['setup']})"))
    elif counts:
        print("trainable parameters:", counts["error"])
    print("methods (PEFT-Ref properties):")
    for cls, props in data["methods"].items():
        print(f"  {cls}")
        for k, v in props.items():
            print(f"    {k:22s} {v}")
    return 0

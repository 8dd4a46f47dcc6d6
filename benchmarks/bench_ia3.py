"""IA3 linear: peftkern against the frozen base GEMM (the floor) and PEFT's IA3 in the same run.

Anchors: PEFT IA3 eager with its default float32 vector and with a bf16 vector (autocast_adapter_dtype=False),
and the bf16 one under torch.compile. Both forms: output (keys/values: y = (x W^T + b) * l) and input
(feed-forward down projection: y = (x * l) W^T + b). Timing as in bench_lora (CUDA-graph replays by default).

    python -m peftkern bench ia3 [--quick] [--shapes M,K,N ...] [--no-compile] [--eager] [--variants] [--out DIR]

--variants adds, on a GPU, the Triton backend with each other backward mode of kernels/triton/ia3.py (fused dx
GEMMs vs cuBLAS dx + a reduction pass), timed forward+backward against the floor of its own run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import (  # noqa: E402
    bench_device,
    compiled,
    note_gpu_only,
    note_spread,
    peft_single_layer,
    print_table,
    progress,
    reference_rows_only,
    time_layer_impls,
)

import peftkern  # noqa: E402

DEFAULT_CASES = [(8192, 4096, 4096), (8192, 4096, 11008), (2048, 4096, 4096)]
QUICK_CASES = [(8192, 4096, 4096), (2048, 4096, 4096)]
CPU_CASES = [(256, 256, 256)]


def _peft_layer(base: torch.nn.Linear, feedforward: bool, fp32_vector: bool):
    from peft import IA3Config

    cfg = IA3Config(target_modules=["proj"], feedforward_modules=["proj"] if feedforward else [])
    layer = peft_single_layer(base, cfg, fp32_vector)
    with torch.no_grad():
        layer.ia3_l["default"].uniform_(0.5, 1.5)
    return layer, [layer.ia3_l["default"]]


def implementations(M, K, N, dtype, device, feedforward: bool, compile_anchor: bool) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    W = (torch.randn(N, K, device=device, dtype=dtype, generator=gen) * K ** -0.5)
    scale = (1 + 0.3 * torch.randn(K if feedforward else N, device=device, dtype=dtype, generator=gen))
    scale.requires_grad_()
    impls = {"floor (F.linear)": (lambda x: F.linear(x, W), [])}
    backends = [b for b in ("triton", "cuda") if peftkern._backend.available(b, torch.device(device), "ia3")]
    for backend in backends if device == "cuda" else ["torch"]:
        def run(x, backend=backend):
            peftkern.set_backend(backend)
            try:
                return peftkern.ia3_linear(x, W, scale, scale_input=feedforward)
            finally:
                peftkern.set_backend(None)
        impls[f"peftkern {backend}"] = (run, [scale])
    try:
        import peft  # noqa: F401
    except ImportError:
        return impls
    dname = str(dtype).replace("torch.", "")
    for fp32 in (True, False):
        base = torch.nn.Linear(K, N, bias=False, device=device, dtype=dtype)
        base.weight = torch.nn.Parameter(W, requires_grad=False)
        layer, params = _peft_layer(base, feedforward, fp32)
        impls[f"PEFT eager ({'float32' if fp32 else dname} vector)"] = (layer, params)
        if not fp32 and compile_anchor and device == "cuda":
            impls[f"PEFT + torch.compile ({dname} vector)"] = (compiled(layer), params)
    return impls


def backward_variants(case: str, impls: dict, x, dy, eager: bool) -> list:
    """peftkern triton forward+backward with each backward mode in turn (the floor re-timed beside it)."""
    from peftkern.kernels.triton import ia3 as kia3

    default, rows = kia3.DEFAULT_BACKWARD_MODE, []
    floor_name, floor = next(iter(impls.items()))
    for mode in kia3.BACKWARD_MODES:
        kia3.DEFAULT_BACKWARD_MODE = {form: mode for form in default}
        try:
            timed = time_layer_impls("ia3", case, {floor_name: floor, f"peftkern triton ({mode} bwd)":
                                                   impls["peftkern triton"]}, x, dy, eager, passes=("fwd+bwd",))
        finally:
            kia3.DEFAULT_BACKWARD_MODE = default
        rows += timed[1:]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="peftkern bench ia3", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the target cases only")
    parser.add_argument("--shapes", nargs="*", type=common.positive_ints(3), help="cases as M,K,N")
    parser.add_argument("--no-compile", action="store_true", help="skip the PEFT IA3 + torch.compile anchor")
    parser.add_argument("--eager", action="store_true", help="time eager calls instead of CUDA-graph replays")
    parser.add_argument("--variants", action="store_true", help="also time the other Triton backward modes")
    parser.add_argument("--out", help="directory for the JSON (default $PEFTKERN_RESULTS_DIR, else "
                                          "benchmarks/results/)")
    args = parser.parse_args(argv)
    device, dtype = bench_device()
    note_gpu_only(device, variants=args.variants, eager=args.eager, quick=args.quick)
    reference_rows_only(device, "ia3")
    if args.shapes:
        cases = list(args.shapes)
    else:
        cases = CPU_CASES if device == "cpu" else (QUICK_CASES if args.quick else DEFAULT_CASES)
    timing = common.timing_label(device, args.eager)
    results = common.PartialResults("ia3", {"cases": cases, "dtype": str(dtype), "timing": timing}, args.out)
    rows = []
    for i, (M, K, N) in enumerate(cases):
        for feedforward in (False, True):
            form = "input" if feedforward else "output"
            progress(f"[{i + 1}/{len(cases)}] ia3 {form} form M={M} K={K} N={N}")
            gen = torch.Generator(device=device).manual_seed(1)
            x = torch.randn(M, K, device=device, dtype=dtype, generator=gen).requires_grad_()
            dy = torch.randn(M, N, device=device, dtype=dtype, generator=gen)
            impls = implementations(M, K, N, dtype, device, feedforward, not args.no_compile)
            rows += time_layer_impls("ia3", f"{form} M={M} K={K} N={N}", impls, x, dy, args.eager)
            if args.variants and device == "cuda":
                rows += backward_variants(f"{form} M={M} K={K} N={N}", impls, x, dy, args.eager)
            results.save(rows)
    note_spread(rows)
    print_table(rows, f"IA3, {str(dtype).replace('torch.', '')}: ms and ratio to the frozen F.linear")
    path = results.finish(rows)
    progress(f"saved {path}")
    return rows


if __name__ == "__main__":
    main()

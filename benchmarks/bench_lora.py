"""LoRA linear: peftkern (triton, cuda) against the frozen base GEMM (the floor) and the anchors.

Anchors, all in the same run: HF PEFT LoRA eager with its default fp32 adapters and with bf16 adapters
(autocast_adapter_dtype=False), PEFT LoRA under torch.compile, and an eager Unsloth-style LoRA (base GEMM,
then an in-place addmm of the low-rank term, gradients by hand). Forward is timed under no_grad; forward+
backward as torch.autograd.grad of (x, A, B) (no gradient accumulation in the loop). Every implementation
is timed as CUDA-graph replays (benchmarks/common.time_fn): the GPU time of its kernels, not Python's
launch rate; `--eager` times plain calls instead.

    python -m peftkern bench lora [--quick | --full] [--shapes M,K,N,r ...] [--no-compile] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PartialResults,
    Row,
    bench_device,
    compiled,
    note_gpu_only,
    note_spread,
    peft_single_layer,
    positive_ints,
    print_table,
    progress,
    reference_rows_only,
    time_layer_impls,
    timing_label,
)

import peftkern  # noqa: E402

# The default run: the target cases (a few minutes on an H100).
DEFAULT_CASES = [
    (8192, 4096, 4096, 16), (8192, 4096, 11008, 16), (8192, 11008, 4096, 16),
    (2048, 4096, 4096, 16), (1, 4096, 4096, 16), (16, 4096, 4096, 16),
    (8192, 4096, 4096, 64), (8192, 4096, 4096, 128), (16384, 4096, 4096, 16), (512, 4096, 4096, 16),
]
QUICK_CASES = [(8192, 4096, 4096, 16), (2048, 4096, 4096, 16), (16, 4096, 4096, 16)]
FULL_M = [1, 16, 512, 2048, 8192, 16384]
FULL_KN = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)]
FULL_R = [8, 16, 64, 128]
CPU_CASES = [(256, 256, 256, 16), (1, 256, 256, 16)]


class UnslothStyleLoRA(torch.autograd.Function):
    """Eager LoRA with hand-written gradients: base GEMM, then y.addmm_(x A^T, B^T, alpha=s)."""

    @staticmethod
    def forward(ctx, x, weight, A, B, s):
        y = x @ weight.t()
        y.addmm_(x @ A.t(), B.t(), alpha=s)
        ctx.save_for_backward(x, weight, A, B)
        ctx.s = s
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, A, B = ctx.saved_tensors
        s = ctx.s
        dyb = dy @ B
        dx = dy @ weight
        dx.addmm_(dyb, A, alpha=s)
        dA = (dyb.t() @ x).mul_(s)
        dB = (dy.t() @ (x @ A.t())).mul_(s)
        return dx, None, dA, dB, None


def _peft_layer(base: torch.nn.Linear, r: int, fp32_adapters: bool):
    from peft import LoraConfig

    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"], lora_dropout=0.0)
    layer = peft_single_layer(base, cfg, fp32_adapters)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.01)
    return layer, [layer.lora_A["default"].weight, layer.lora_B["default"].weight]


def implementations(M, K, N, r, dtype, device, compile_anchor: bool):
    """name -> (forward fn(x), list of trainable tensors) for one case."""
    gen = torch.Generator(device=device).manual_seed(0)
    base = torch.nn.Linear(K, N, bias=False, device=device, dtype=dtype)
    base.weight.requires_grad_(False)
    with torch.no_grad():
        base.weight.normal_(0, K ** -0.5, generator=gen)
    A = (torch.randn(r, K, device=device, dtype=dtype, generator=gen) * K ** -0.5).requires_grad_()
    B = (torch.randn(N, r, device=device, dtype=dtype, generator=gen) * 0.01).requires_grad_()
    s = 2.0
    W = base.weight
    impls = {"floor (F.linear)": (lambda x: F.linear(x, W), [])}
    # On the CPU the kernels would run in Triton's interpreter (TRITON_INTERPRET=1, which the test suite sets), whose
    # times say nothing about speed (this benchmark took 74 s there, 8 s without them): the reference row stands in,
    # as the other benchmarks' CPU versions do.
    for backend in ("triton", "cuda") if device == "cuda" else ():
        if peftkern._backend.available(backend, torch.device(device), "lora"):
            def run(x, backend=backend):
                peftkern.set_backend(backend)
                try:
                    return peftkern.lora_linear(x, W, A, B, s)
                finally:
                    peftkern.set_backend(None)
            impls[f"peftkern {backend}"] = (run, [A, B])
    if device == "cpu":
        def run_ref(x):
            peftkern.set_backend("torch")
            try:
                return peftkern.lora_linear(x, W, A, B, s)
            finally:
                peftkern.set_backend(None)
        impls["peftkern torch (reference)"] = (run_ref, [A, B])
    impls["unsloth-style eager"] = (lambda x: UnslothStyleLoRA.apply(x, W, A, B, s), [A, B])
    try:
        import peft  # noqa: F401
        have_peft = True
    except ImportError:
        have_peft = False
    if have_peft:
        layer32, p32 = _peft_layer(base, r, fp32_adapters=True)
        impls["PEFT eager (fp32 adapters)"] = (layer32, p32)
        layer16, p16 = _peft_layer(torch.nn.Linear(K, N, bias=False, device=device, dtype=dtype), r, False)
        layer16.base_layer.weight = W
        if dtype != torch.float32:  # a float32 model's adapters are float32 either way: the row above
            impls[f"PEFT eager ({str(dtype).replace('torch.', '')} adapters)"] = (layer16, p16)
        if compile_anchor and device == "cuda":
            impls[f"PEFT + torch.compile ({str(dtype).replace('torch.', '')} adapters)"] = (compiled(layer16), p16)
    return impls


def bench_case(M, K, N, r, dtype, device, compile_anchor: bool, eager: bool = False) -> list[Row]:
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(M, K, device=device, dtype=dtype, generator=gen).requires_grad_()
    dy = torch.randn(M, N, device=device, dtype=dtype, generator=gen)
    impls = implementations(M, K, N, r, dtype, device, compile_anchor)
    return time_layer_impls("lora", f"M={M} K={K} N={N} r={r}", impls, x, dy, eager)


def parse_cases(args, device) -> list[tuple]:
    if args.shapes:
        return list(args.shapes)
    if device != "cuda":
        return CPU_CASES
    if args.full:
        return [(m, k, n, r) for m in FULL_M for (k, n) in FULL_KN for r in FULL_R]
    return QUICK_CASES if args.quick else DEFAULT_CASES


def main(argv=None) -> list[Row]:
    parser = argparse.ArgumentParser(prog="peftkern bench lora", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="three cases only")
    parser.add_argument("--full", action="store_true", help="the whole M x (K, N) x r grid (long)")
    parser.add_argument("--shapes", nargs="*", type=positive_ints(4), help="cases as M,K,N,r")
    parser.add_argument("--no-compile", action="store_true", help="skip the PEFT + torch.compile anchor")
    parser.add_argument("--eager", action="store_true", help="time eager calls instead of CUDA-graph replays")
    parser.add_argument("--out", help="directory for the JSON (default $PEFTKERN_RESULTS_DIR, else "
                                          "benchmarks/results/)")
    args = parser.parse_args(argv)
    device, dtype = bench_device()
    note_gpu_only(device, eager=args.eager, quick=args.quick, full=args.full)
    reference_rows_only(device, "lora")
    cases = parse_cases(args, device)
    timing = timing_label(device, args.eager)
    results = PartialResults("lora", {"cases": cases, "dtype": str(dtype), "timing": timing}, args.out)
    rows = []
    for i, (M, K, N, r) in enumerate(cases):
        progress(f"[{i + 1}/{len(cases)}] lora M={M} K={K} N={N} r={r}")
        rows += bench_case(M, K, N, r, dtype, device, compile_anchor=not args.no_compile, eager=args.eager)
        results.save(rows)
    note_spread(rows)
    print_table(rows, f"LoRA, {str(dtype).replace('torch.', '')}: ms and ratio to the frozen F.linear")
    path = results.finish(rows)
    progress(f"saved {path}")
    return rows


if __name__ == "__main__":
    main()

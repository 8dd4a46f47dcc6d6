"""Bottleneck adapter: peftkern against the memory floor, eager PyTorch and eager under torch.compile.

The floor is timed, not assumed: `MemoryFloor` moves exactly the floor's bytes with copy kernels (forward: read h
[and r], write out; backward: read g, write dh, read h once more), so its time is the floor at this run's copy
bandwidth; the bandwidth of a 1 GiB device-to-device copy is measured too and saved with every row, with the
floor it implies. Anchors: an nn.Sequential-style adapter (r + s * up(act(down(h)))) eager and under
torch.compile. Forward is timed under no_grad; forward+backward as torch.autograd.grad of h and the adapter's
parameters, as CUDA-graph replays (benchmarks/common.time_fn).

    python -m peftkern bench adapter [--quick] [--cases M,d,reduction,form ...] [--no-compile] [--eager]
                                     [--explore] [--e2e] [--out DIR]

--explore also times the Triton kernels with each schedule / tile choice in EXPLORE_CONFIGS (kernels/triton/
adapter.py's default_config picks one). --e2e is `bench e2e --method adapter`: the training step of the
Llama-style model with Pfeiffer adapters (peftkern, and an eager adapter through the same hooks) against the
frozen model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PartialResults,
    Row,
    bench_device,
    compiled,
    note_gpu_only,
    note_spread,
    positive_ints,
    print_table,
    progress,
    reference_rows_only,
    time_fn,
    time_layer_impls,
    timing_label,
)

import peftkern  # noqa: E402
from peftkern.kernels.triton import adapter as kadapter  # noqa: E402

FORMS = ("sequential", "parallel", "sequential+ln", "parallel+ln")
DEFAULT_CASES = [(8192, 4096, 16, "sequential"), (16384, 4096, 16, "sequential"), (8192, 4096, 16, "parallel"),
                 (8192, 4096, 16, "sequential+ln"), (2048, 4096, 16, "sequential"), (8192, 2048, 16, "sequential")]
QUICK_CASES = [(8192, 4096, 16, "sequential"), (16384, 4096, 16, "sequential")]
CPU_CASES = [(256, 256, 16, "sequential"), (128, 256, 16, "parallel+ln")]
# Schedules and tiles worth measuring for b = 256 (kernels/triton/adapter.py explains the trade-offs).
EXPLORE_CONFIGS = {
    "fused m64": dict(block_m=64, block_k=64, block_n=64, warps=4, stages=3, split_n=1, two_pass=False),
    "fused m64 n128 s2": dict(block_m=64, block_k=64, block_n=128, warps=4, stages=2, split_n=1, two_pass=False),
    "fused m128 w8": dict(block_m=128, block_k=64, block_n=64, warps=8, stages=3, split_n=1, two_pass=False),
    "fused m128 w8 split2": dict(block_m=128, block_k=64, block_n=64, warps=8, stages=3, split_n=2, two_pass=False),
    "two-pass m64 split4": dict(block_m=64, block_k=64, block_n=64, warps=4, stages=3, split_n=4, two_pass=True),
    "two-pass m128 w8 split4": dict(block_m=128, block_k=64, block_n=64, warps=8, stages=3, split_n=4,
                                    two_pass=True),
    # loop 1's product (h Wd^T, g Wu) from cuBLAS, everything else in one kernel: loop 1 had 64 row blocks at
    # M = 8192 and no split over d, cuBLAS splits that reduction; the column splits now cost no recomputation.
    "gemm-first m128 w8 split2": dict(block_m=128, block_k=64, block_n=64, warps=8, stages=3, split_n=2,
                                      two_pass=False, gemm_first=True),
    # ... and loop 2 as a tiled GEMM of its own (adapter_wide_kernel), wide_tile = (BM, BN, BK, warps, stages)
    **{f"wide {bm}x{bn}x{bk} w{w} s{st}": dict(block_m=128, block_k=64, block_n=64, warps=8, stages=3, split_n=1,
                                               two_pass=False, wide=True, wide_tile=(bm, bn, bk, w, st))
       for bm, bn, bk, w, st in [(128, 128, 64, 8, 3), (128, 128, 64, 4, 3), (128, 256, 64, 8, 3),
                                 (64, 256, 64, 4, 3), (128, 64, 64, 4, 4), (256, 128, 64, 8, 2)]},
    # ... and loop 2 (forward, and the backward's dh without LN) by the persistent kernel, whose weight tile stays in
    # shared memory while its runs of row blocks stream a and the residual by TMA: persistent = (BM, BN, warps, stages)
    **{f"persistent {bm}x{bn} w{w} s{st}": dict(block_m=128, block_k=64, block_n=64, warps=8, stages=3, split_n=2,
                                                two_pass=False, gemm_first=True, wide="backward",
                                                wide_tile=(128, 128, 64, 4, 3), persistent=(bm, bn, w, st))
       for bm, bn, w, st in [(64, 128, 4, 3), (64, 128, 4, 2), (64, 128, 8, 3), (64, 64, 4, 4), (64, 128, 4, 4)]},
}


class MemoryFloor(torch.autograd.Function):
    """The floor's traffic and nothing else: forward reads h (and r) and writes out; backward reads g, writes
    dh and reads h once more (what dWd = dz^T h cannot avoid)."""

    @staticmethod
    def forward(ctx, h, residual):
        ctx.save_for_backward(h)
        return h.clone() if residual is None else h + residual

    @staticmethod
    def backward(ctx, grad_out):
        (h,) = ctx.saved_tensors
        h.sum()
        return grad_out.clone(), None


def copy_bandwidth(device) -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write)."""
    src = torch.empty(2**29, device=device, dtype=torch.float16)
    dst = torch.empty_like(src)
    ms, _ = time_fn(lambda: dst.copy_(src), torch.device(device), cuda_graph=False)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def _eager_adapter(d, b, activation, ln: bool, dtype, device, gen) -> torch.nn.Sequential:
    act = {"relu": torch.nn.ReLU(), "gelu": torch.nn.GELU(), "silu": torch.nn.SiLU()}[activation]
    layers = ([torch.nn.LayerNorm(d)] if ln else []) + [torch.nn.Linear(d, b), act, torch.nn.Linear(b, d)]
    seq = torch.nn.Sequential(*layers).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in seq.parameters():
            p.normal_(0, 0.02, generator=gen)
    return seq


def implementations(M, d, reduction, form, dtype, device, compile_anchor: bool, residual) -> dict:
    """name -> (forward fn(h), trainable tensors); the floor first."""
    gen = torch.Generator(device=device).manual_seed(0)
    ln = form.endswith("+ln")
    seq = _eager_adapter(d, d // reduction, "relu", ln, dtype, device, gen)
    params = list(seq.parameters())
    down, up = seq[-3], seq[-1]
    s = 2.0
    impls = {"memory floor (copies)": (lambda h: MemoryFloor.apply(h, residual), [])}
    backends = [name for name in ("triton", "cuda")
                if peftkern._backend.available(name, torch.device(device), "adapter")]
    for backend in backends if device == "cuda" else ["torch"]:
        def run(h, backend=backend):
            peftkern.set_backend(backend)
            try:
                return peftkern.bottleneck_adapter(h, down.weight, down.bias, up.weight, up.bias, "relu", s,
                                                   residual, seq[0] if ln else None)
            finally:
                peftkern.set_backend(None)
        impls[f"peftkern {backend}"] = (run, params)

    def eager(h):
        return (h if residual is None else residual) + s * seq(h)

    impls["eager (nn.Sequential)"] = (eager, params)
    if compile_anchor and device == "cuda":
        impls["eager + torch.compile"] = (compiled(eager), params)
    return impls


def explore_rows(case: str, impls: dict, h, dy, eager: bool) -> list[Row]:
    """peftkern triton with each EXPLORE_CONFIGS entry in place of default_config (the floor re-timed beside)."""
    default, rows = kadapter.default_config, []
    floor_name, floor = next(iter(impls.items()))
    for name, cfg in EXPLORE_CONFIGS.items():
        kadapter.default_config = lambda *a, cfg=cfg: dict(cfg)
        try:
            timed = time_layer_impls("adapter", case, {floor_name: floor, f"peftkern triton [{name}]":
                                                       impls["peftkern triton"]}, h, dy, eager)
        finally:
            kadapter.default_config = default
        rows += [r for r in timed if r.impl != floor_name]
    return rows


def bench_case(M, d, reduction, form, dtype, device, args, bandwidth) -> list[Row]:
    gen = torch.Generator(device=device).manual_seed(1)
    h = torch.randn(M, d, device=device, dtype=dtype, generator=gen).requires_grad_()
    residual = torch.randn(M, d, device=device, dtype=dtype, generator=gen) if form.startswith("parallel") else None
    dy = torch.randn(M, d, device=device, dtype=dtype, generator=gen)
    case = f"{form} M={M} d={d} b={d // reduction}"
    impls = implementations(M, d, reduction, form, dtype, device, not args.no_compile, residual)
    rows = time_layer_impls("adapter", case, impls, h, dy, args.eager)
    if args.explore and device == "cuda":
        rows += explore_rows(case, impls, h, dy, args.eager)
    act_bytes = M * d * h.element_size()
    fwd_passes = 3 if residual is not None else 2
    floor_ms = {"fwd": fwd_passes * act_bytes / bandwidth * 1e3,
                "fwd+bwd": (fwd_passes + 3) * act_bytes / bandwidth * 1e3}
    gflop = {"fwd": 4 * M * d * (d // reduction) / 1e9, "fwd+bwd": 12 * M * d * (d // reduction) / 1e9}
    for r in rows:
        r.extra.update(copy_bandwidth_GBps=bandwidth / 1e9, bandwidth_floor_ms=floor_ms[r.pass_],
                       ratio_to_bandwidth_floor=r.ms / floor_ms[r.pass_],
                       tflops=gflop[r.pass_] / r.ms if r.impl.startswith("peftkern") else None)
    return rows


def parse_cases(args, device) -> list[tuple]:
    if args.cases:
        cases = []
        for spec in args.cases:
            *numbers, form = spec.split(",") if spec.count(",") == 3 else (*spec.split(","), "sequential")
            if form not in FORMS:
                raise SystemExit(f"bench adapter: --cases {spec!r}: form must be one of {FORMS}, got {form!r}")
            try:
                M, d, red = positive_ints(3)(",".join(numbers))
            except argparse.ArgumentTypeError as exc:
                raise SystemExit(f"bench adapter: --cases {spec!r}: expected M,d,reduction[,form] ({exc})") from None
            if d // red < 1:  # the bottleneck d // reduction: 0 ran a case with no adapter at all
                raise SystemExit(f"bench adapter: --cases {spec!r}: reduction {red} leaves no bottleneck at d = {d}")
            cases.append((M, d, red, form))
        return cases
    if device != "cuda":
        return CPU_CASES
    return QUICK_CASES if args.quick else DEFAULT_CASES


def main(argv=None) -> list[Row]:
    parser = argparse.ArgumentParser(prog="peftkern bench adapter", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the two target cases (with --e2e: fewer timed steps)")
    parser.add_argument("--cases", nargs="*", help="cases as M,d,reduction[,form] (form: " + ", ".join(FORMS) + ")")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile anchor")
    parser.add_argument("--eager", action="store_true", help="time eager calls instead of CUDA-graph replays")
    parser.add_argument("--explore", action="store_true", help="also time every EXPLORE_CONFIGS schedule")
    parser.add_argument("--e2e", action="store_true", help="the Llama-style training step instead of the layer")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--out", help="directory for the JSON (default $PEFTKERN_RESULTS_DIR, else "
                                          "benchmarks/results/)")
    args = parser.parse_args(argv)
    device, dtype = bench_device()
    note_gpu_only(device, explore=args.explore, eager=args.eager, quick=args.quick and not args.e2e)
    if args.e2e:  # the training step lives with the other methods' in bench_e2e
        import bench_e2e

        return bench_e2e.main(["--method", "adapter", "--batch", str(args.batch), "--seq", str(args.seq),
                               *(["--quick"] if args.quick else []), *(["--out", args.out] if args.out else [])])
    reference_rows_only(device, "adapter")
    cases = parse_cases(args, device)  # before the bandwidth's 2 GiB copies: a bad case is refused at once
    bandwidth = copy_bandwidth(device)
    progress(f"copy bandwidth: {bandwidth / 1e9:.0f} GB/s")
    timing = timing_label(device, args.eager)
    results = PartialResults("adapter", {"cases": cases, "dtype": str(dtype), "timing": timing,
                                         "copy_bandwidth_GBps": bandwidth / 1e9}, args.out)
    rows = []
    for i, (M, d, reduction, form) in enumerate(cases):
        progress(f"[{i + 1}/{len(cases)}] adapter {form} M={M} d={d} reduction={reduction}")
        rows += bench_case(M, d, reduction, form, dtype, device, args, bandwidth)
        results.save(rows)
    note_spread(rows)
    print_table(rows, f"Bottleneck adapter, {str(dtype).replace('torch.', '')}: ms and ratio to the memory floor")
    path = results.finish(rows)
    progress(f"saved {path}")
    return rows


if __name__ == "__main__":
    main()

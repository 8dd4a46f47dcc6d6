"""Where a fused training step's host time goes, by Python function: cProfile over a few steps.

step_trace.py shows that the fused 1b LoRA step (eager, checkpointed and compiled) is bound by its host, and which
autograd nodes take the time; host_costs.py times each piece of the layer alone. The pieces add up to well under the
whole layer's time, so this profiles the whole: autograd's backward runs in the calling thread
(torch.autograd.set_multithreading_enabled(False), which cProfile needs: it sees one thread), and cProfile prints the
functions with the most time of their own (tottime: a torch builtin's line is the C++ work behind it) and the most
time below them (cumtime).

    python scripts/host_profile.py [--impl fused] [--checkpointing] [--compile] [--steps 3] [--layer]

--layer profiles one fused layer's forward + autograd.grad (M 8192, 2048 x 2048, r 16), 200 calls, instead.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time

import torch
from cpu_overhead import add_step_args  # this folder

ROWS = 40


def host_ms(fn, n: int) -> float:
    """Host time per call until the last call's work is queued (no profiler)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    ms = (time.perf_counter() - t0) * 1e3 / n
    torch.cuda.synchronize()
    return ms


def report(prof: cProfile.Profile, calls: int, what: str) -> None:
    for key in ("tottime", "cumtime"):
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        stats.sort_stats(key).print_stats(ROWS)
        print(f"== {what}: by {key} (seconds over {calls} calls)")
        lines = out.getvalue().splitlines()
        start = next((i for i, line in enumerate(lines) if line.strip().startswith("ncalls")), 0)
        print("\n".join(lines[start:]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_step_args(parser, steps=3)
    parser.add_argument("--layer", action="store_true", help="one fused layer's fwd + grad instead of a model's step")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a GPU")
        return 0
    if args.layer:
        from peftkern.ops import lora as ops

        torch.manual_seed(0)
        M, K, N, R = 8192, 2048, 2048, 16
        dt, dev = torch.bfloat16, "cuda"
        x = torch.randn(M, K, device=dev, dtype=dt, requires_grad=True)
        W = torch.randn(N, K, device=dev, dtype=dt) / K ** 0.5
        A = (torch.randn(R, K, device=dev, dtype=dt) / K ** 0.5).requires_grad_()
        B = (torch.randn(N, R, device=dev, dtype=dt) / R ** 0.5).requires_grad_()
        dy = torch.randn(M, N, device=dev, dtype=dt)

        def fn():
            torch.autograd.grad(ops.lora_linear(x, W, A, B, 2.0), [x, A, B], dy)
        calls, what = 200, f"lora_linear fwd + grad, M={M} K={K} N={N} r={R}"
    else:
        from peftkern import workloads

        model = workloads.build(args.method, args.impl, args.shape, "cuda", torch.bfloat16, 16, False,
                                max_positions=2048)
        fn = workloads.training_step(model, 4, 2048, "cuda", args.compile, args.checkpointing)
        calls = args.steps
        what = (f"{args.method} {args.impl} {args.shape} step" + (" +ckpt" if args.checkpointing else "")
                + (" compiled" if args.compile else ""))
    for _ in range(5):
        fn()
    n = 30 if args.layer else 5
    print(f"{what}: host ms per call, autograd's device thread on: {host_ms(fn, n):.3f}; ", end="")
    with torch.autograd.set_multithreading_enabled(False):
        print(f"off: {host_ms(fn, n):.3f}")
        prof = cProfile.Profile()
        torch.cuda.synchronize()
        prof.enable()
        for _ in range(calls):
            fn()
        prof.disable()
        torch.cuda.synchronize()
    report(prof, calls, what)
    return 0


if __name__ == "__main__":
    sys.exit(main())

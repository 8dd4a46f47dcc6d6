"""Where the bottleneck adapter's time goes on a GPU: each product and pass of the op timed alone.

bf16, M = 8192 (and 16384), d = 4096, b = 256 (reduction 16), relu, sequential form. Rows:
  * copy: h.clone() (read + write one activation: the unit of the memory floor);
  * the skinny products as cuBLAS runs them: h Wd^T (bf16 out and float32 out, `mm_float32`), g Wu, the weight
    gradients g^T [a, 1] and dz^T h, and the up projection with the residual done by cuBLAS two ways
    (torch.addmm(h, a, Wu^T), which copies h into the output first, and out = h.clone(); out.addmm_(...));
  * the op's kernels: the forward and backward launchers with each schedule (its out / dh checked against
    default_config's: relative error < 1e-2) (default_config, and the
    `gemm_first` ones of benchmarks/bench_adapter.py's EXPLORE_CONFIGS), whole; the difference to the
    cuBLAS product they start with is the Triton kernel's share.
Timing: benchmarks/common.time_fn (CUDA events, L2 flushed between calls). Prints one table; with OUT set, also
writes $OUT/explore_adapter.json.

    python scripts/explore_adapter.py [--m 8192 16384] [--d 4096] [--b 256] [--quick] [--ln]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_adapter import EXPLORE_CONFIGS  # noqa: E402
from common import environment, time_fn  # noqa: E402

from peftkern import reference  # noqa: E402
from peftkern.kernels.triton import adapter as ka  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--m", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--b", type=int, default=256)
    parser.add_argument("--quick", action="store_true",
                        help="only the copy, loop 2 alone, and the default_config and persistent schedules")
    parser.add_argument("--ln", action="store_true",
                        help="the op with a layer norm on the adapter's input (the LN backward's dh by the tiled "
                             "kernel and, `persistent+ln`, by the persistent one)")
    args = parser.parse_args()
    dev = torch.device("cuda")
    dt = torch.bfloat16
    rows = []
    for M in args.m:
        d, b = args.d, args.b
        g = torch.Generator(device=dev).manual_seed(0)
        h = torch.randn(M, d, device=dev, dtype=dt, generator=g)
        gy = torch.randn(M, d, device=dev, dtype=dt, generator=g)
        wd = torch.randn(b, d, device=dev, dtype=dt, generator=g) * d**-0.5
        wu = torch.randn(d, b, device=dev, dtype=dt, generator=g) * b**-0.5
        bd = torch.zeros(b, device=dev, dtype=dt)
        bu = torch.zeros(d, device=dev, dtype=dt)
        a = torch.relu(h @ wd.t())
        a_ext = torch.cat([a, torch.ones(M, 8, device=dev, dtype=dt)], 1)
        dz = torch.randn(M, b, device=dev, dtype=dt, generator=g)
        out = torch.empty_like(h)
        pieces = {
            "copy h -> out (1 read + 1 write)": lambda: out.copy_(h),
            "cuBLAS h Wd^T, bf16 out": lambda: h @ wd.t(),
            "cuBLAS h Wd^T, float32 out": lambda: ka.mm_float32(h, wd.t()),
            "cuBLAS g Wu, float32 out": lambda: ka.mm_float32(gy, wu),
            "cuBLAS torch.addmm(h, a, Wu^T)": lambda: torch.addmm(h, a, wu.t()),
            "cuBLAS out.copy_(h); out.addmm_(a, Wu^T)": lambda: out.copy_(h).addmm_(a, wu.t()),
            "cuBLAS g^T [a, 1] (dWu, dbu)": lambda: gy.t() @ a_ext,
            "cuBLAS dz^T h (dWd)": lambda: dz.t() @ h,
            "cuBLAS torch.addmm(g, dz, Wd) (dh)": lambda: torch.addmm(gy, dz, wd),
        }
        # each schedule is checked against reference.py (eager PyTorch in bf16), not against another schedule
        lw = (1.0 + 0.1 * torch.randn(d, device=dev, generator=g)).to(dt) if args.ln else None
        lb = (0.1 * torch.randn(d, device=dev, generator=g)).to(dt) if args.ln else None
        fwd_args = (h, wd, bd, wu, bu, None, None, lw, lb, "relu", 2.0, args.ln, 1e-5)
        out_ref, z_saved, stats = reference.adapter_forward(*fwd_args)
        needs = (True,) * 5 + (False,) + (args.ln,) * 2
        bwd_args = (gy, h, wd, bd, wu, bu, None, z_saved, stats, lw, lb, "relu", 2.0, True, args.ln, needs)
        dh_ref = reference.adapter_backward(*bwd_args)[0]
        before = dict(ka.default_config(M, d, b, dev, dt), persistent=None)  # the tiled loop 2 (before 2026-12-04)
        kinds = ("persistent",) if args.quick else ("gemm-first", "wide", "persistent")
        configs = {"default_config": None, "default_config without persistent": before,
                   **{k: v for k, v in EXPLORE_CONFIGS.items() if k.startswith(kinds)}}
        if args.ln:
            configs["persistent+ln"] = dict(ka.default_config(M, d, b, dev, dt), persistent_ln=ka.PERSISTENT_LN_TILE)
        if args.quick:
            pieces = {k: v for k, v in pieces.items() if k.startswith("copy")}
        # loop 2 alone, as the forward runs it: out = h + s (a Wu^T + bu), a = act(z) given in bf16 (the tiled kernel
        # reads z in float32 and applies the activation itself)
        z32 = (h @ wd.t()).float()
        loop2_ref = h.float() + 2.0 * (a.float() @ wu.float().t() + bu.float())
        pieces["loop 2 alone: tiled adapter_wide_kernel 128x128x64 w4 s3"] = lambda: ka._launch_wide(
            z32, wu.t(), h, None, out, bu, None, None, None, 2.0, "relu", True, False,
            dict(wide_tile=(128, 128, 64, 4, 3)))
        for k, v in EXPLORE_CONFIGS.items():
            if k.startswith("persistent"):
                pieces[f"loop 2 alone: {k}"] = lambda t=v["persistent"]: ka._launch_wide_persistent(
                    a, wu.t(), h, out, bu, None, 2.0, t)
        for name, cfg in configs.items():
            pieces[f"op forward [{name}]"] = lambda cfg=cfg: ka.adapter_forward(*fwd_args, config=cfg)
            pieces[f"op backward [{name}]"] = lambda cfg=cfg: ka.adapter_backward(*bwd_args, config=cfg)
        copy_ms = None
        for name, fn in pieces.items():
            try:
                if name.startswith(("op ", "loop 2 alone: persistent")):  # the right answer, bf16 roundings apart
                    if name.startswith("loop 2"):
                        fn()
                        got, want = out, loop2_ref
                    else:
                        got, want = fn()[0], out_ref if name.startswith("op forward") else dh_ref
                    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
                    if not err < 1e-2:
                        print(f"M={M} {name}: WRONG, relative error {err:.2e} against reference.py")
                        continue
                ms, _ = time_fn(fn, dev)
            except Exception as err:  # a config that does not compile or fit: say so, go on
                print(f"M={M} {name}: failed: {type(err).__name__}: {str(err)[:200]}")
                continue
            copy_ms = copy_ms or ms
            rows.append(dict(M=M, d=d, b=b, piece=name, ms=ms, copies=ms / copy_ms))
            print(f"M={M:6d} {name:52s} {ms * 1e3:8.1f} us  {ms / copy_ms:5.2f} copies", flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "explore_adapter.json").write_text(
            json.dumps(dict(environment=environment(), rows=rows), indent=1))


if __name__ == "__main__":
    main()

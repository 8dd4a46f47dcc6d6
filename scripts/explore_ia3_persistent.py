"""IA3's output form, y = (x W^T + b) * l, as one persistent GEMM that stores both z = x W^T + b (saved for dl)
and y from its epilogue, against the op's forward (cuBLAS writes z, then a pass reads z and writes y).

Why (NOTES-ia3.md): the output form's forward was 1.11-1.15x F.linear, and the two extra activation passes
were most of that. lora.py's persistent kernel matched cuBLAS on the x W^T layout; its walk with an epilogue
that scales by l and stores z beside y replaces a read and a write with one asynchronous TMA store.
Predicted ~1.04x F.linear at M = 8192, 4096 x 4096; measured on an H100 (2026-11-23,
results/logs/explore-ia3-persistent-h100.log): 1.099x (op 1.148x), 1.044x at 4096 -> 11008 (op 1.095x),
1.051-1.062x at M = 2048 (op 1.081x); storing y alone would be 1.00-1.02x. The kernel now lives in
peftkern/kernels/triton/ia3.py (the output form's default forward from M = 2048); this script times its
configs against the cuBLAS path.

Variants, bf16, each timed twice (CUDA-graph replays, median) with F.linear between, ratio to that F.linear:
the op's cuBLAS forward (`ia3_forward(mode="cublas")`) and the persistent kernel storing z and y (half-tile
and full-tile stores, 128x256 and 128x128 tiles). Every variant's y and z are checked against the cuBLAS
path's. With OUT set, writes $OUT/explore_ia3_persistent.json.

    python scripts/explore_ia3_persistent.py            # a GPU
    TRITON_INTERPRET=1 python scripts/explore_ia3_persistent.py --check   # the kernel's answers, no GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from peftkern.kernels.triton import ia3 as ki

BASE = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, FLATTEN=True, SUBTILE=True, num_warps=8, num_stages=3)
CONFIGS = {
    "z+y 128x256x64 s3 half-stores": BASE,
    "z+y 128x256x64 s3 full-stores": {**BASE, "SUBTILE": False},
    "z+y 128x128x64 s4 full-stores": {**BASE, "BLOCK_N": 128, "num_stages": 4, "SUBTILE": False},
}
SHAPES = [(8192, 4096, 4096), (8192, 4096, 11008), (2048, 4096, 4096)]
INTERPRETER = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, FLATTEN=False, SUBTILE=True, num_warps=4,
                   num_stages=1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check() -> None:
    """The kernel against float64 math on shapes that fill no tile (the interpreter or a GPU)."""
    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    dt = torch.float16 if device == "cpu" else torch.bfloat16  # the interpreter mishandles bf16
    cfg = INTERPRETER if device == "cpu" else BASE
    for M, K, N in [(45, 64, 48), (70, 40, 136)] if device == "cpu" else [(45, 64, 48), (1000, 520, 1096)]:
        for subtile in (True, False):
            x = torch.randn(M, K, device=device).to(dt)
            w = (torch.randn(N, K, device=device) * K**-0.5).to(dt)
            b = torch.randn(N, device=device).to(dt)
            l_vec = torch.randn(N, device=device)
            l_vec[::7] = 0.0  # exact for zeros
            y, z = ki.persistent_output_form(x, w, l_vec, b, config={**cfg, "SUBTILE": subtile})
            z_ref = x.double() @ w.double().t() + b.double()
            errors = rel(z, z_ref), rel(y, z_ref * l_vec.double())
            assert max(errors) < 1e-2, (M, K, N, subtile, errors)
            assert torch.all(y[:, ::7] == 0)
            print(f"M={M} K={K} N={N} subtile={subtile}: z rel {errors[0]:.1e}, y rel {errors[1]:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="check the kernel's answers only")
    if parser.parse_args().check or not torch.cuda.is_available():
        check()
        return
    import triton.testing as tt

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from common import environment

    check()
    torch.manual_seed(0)
    dt, rows = torch.bfloat16, []
    for M, K, N in SHAPES:
        x = torch.randn(M, K, device="cuda", dtype=dt)
        w = torch.randn(N, K, device="cuda", dtype=dt) * K**-0.5
        l_vec = torch.rand(N, device="cuda") + 0.5  # PEFT's float32 vector
        y_ref, z_ref = ki.ia3_forward(x, w, l_vec, None, False, False, mode="cublas")
        variants = {"op (cuBLAS z, then y = z * l)": lambda: ki.ia3_forward(x, w, l_vec, None, False, False,
                                                                            mode="cublas")}
        for name, cfg in CONFIGS.items():
            variants[name] = lambda cfg=cfg: ki.persistent_output_form(x, w, l_vec, config=cfg)
        for name, fn in variants.items():
            y, z = fn()
            err = max(rel(y, y_ref), rel(z, z_ref) if z is not None else 0.0)
            times, floors = [], []
            for _ in range(2):
                floors.append(tt.do_bench_cudagraph(lambda: F.linear(x, w), rep=100, return_mode="median"))
                times.append(tt.do_bench_cudagraph(fn, rep=100, return_mode="median"))
            floor, t = sorted(floors)[0], sorted(times)[0]
            rows.append(dict(M=M, K=K, N=N, variant=name, ms=t, floor_ms=floor, ratio=t / floor, rel_err=err))
            print(f"M={M} K={K} N={N}  {name:36s} {t:.4f} ms  {t / floor:.3f}x F.linear  (err {err:.1e})")
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "explore_ia3_persistent.json"
        path.write_text(json.dumps(dict(environment=environment(), rows=rows), indent=1))
        print("saved", path)


if __name__ == "__main__":
    main()

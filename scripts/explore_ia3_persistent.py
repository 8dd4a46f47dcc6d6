"""IA3's output form, y = (x W^T + b) * l, as one persistent GEMM that stores both z = x W^T + b (saved for dl)
and y from its epilogue, against the op's forward (cuBLAS writes z, then a pass reads z and writes y).

Why (NOTES-ia3.md): the output form's forward is 1.11x F.linear, and the two extra activation passes are most
of that. lora.py's persistent kernel matched cuBLAS on the x W^T layout; its walk with an epilogue that scales
by l and stores z beside y replaces a read and a write with one asynchronous TMA store. Predicted: ~1.04x
F.linear for the forward at M = 8192, 4096 x 4096. Written without a GPU (2026-11-23): never timed yet.

Variants, bf16, each timed twice (CUDA-graph replays, median) with F.linear between, ratio to that F.linear:
the op's forward (`ia3_forward`), the persistent kernel storing z and y (half-tile stores and full-tile
stores), and the same kernel storing y alone (what the forward would cost if z were not saved). Every
variant's y (and z) is checked against the op's. With OUT set, writes $OUT/explore_ia3_persistent.json.

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
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from peftkern.kernels.triton import ia3 as ki
from peftkern.kernels.triton.lora import _sm_count, _tile_coords, _tile_counts


@triton.jit
def ia3_output_persistent_kernel(
    x_desc, w_desc, y_desc, z_desc, l_ptr, bias_ptr, M, N, K, NUM_SMS,
    HAS_BIAS: tl.constexpr, STORE_Z: tl.constexpr, FLATTEN: tl.constexpr, SUBTILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """z = x W^T + b and y = z * l (float32 math, each rounded once), W K-major, one program per SM."""
    dtype = y_desc.dtype
    start = tl.program_id(0)
    num_m, num_n, num_tiles, k_tiles = _tile_counts(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K)
    out_tile = start - NUM_SMS
    for tile in tl.range(start, num_tiles, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in tl.range(k_tiles):
            x = x_desc.load([pid_m * BLOCK_M, kk * BLOCK_K])
            acc = tl.dot(x, w_desc.load([pid_n * BLOCK_N, kk * BLOCK_K]).T, acc)
        out_tile += NUM_SMS
        out_m, out_n = _tile_coords(out_tile, num_m, num_n, GROUP_M)
        cols = out_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        scaled = acc * tl.load(l_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        row, col = out_m * BLOCK_M, out_n * BLOCK_N
        if SUBTILE:
            y_left, y_right = tl.split(tl.permute(tl.reshape(scaled, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            y_desc.store([row, col], y_left.to(dtype))
            y_desc.store([row, col + BLOCK_N // 2], y_right.to(dtype))
            if STORE_Z:
                z_left, z_right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
                z_desc.store([row, col], z_left.to(dtype))
                z_desc.store([row, col + BLOCK_N // 2], z_right.to(dtype))
        else:
            y_desc.store([row, col], scaled.to(dtype))
            if STORE_Z:
                z_desc.store([row, col], acc.to(dtype))


def persistent_output_form(x, w, l_vec, bias=None, config=None, store_z=True):
    """(y, z) of the output form by ia3_output_persistent_kernel; w (N, K) K-major; z None unless store_z."""
    M, K = x.shape
    N = w.shape[0]
    cfg = dict(config)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    store_n = bn // 2 if cfg["SUBTILE"] else bn
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    z = torch.empty((M, N), device=x.device, dtype=x.dtype) if store_z else y
    grid = (min(_sm_count(x.device), triton.cdiv(M, bm) * triton.cdiv(N, bn)),)
    ia3_output_persistent_kernel[grid](
        TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk]),
        TensorDescriptor.from_tensor(y, [bm, store_n]), TensorDescriptor.from_tensor(z, [bm, store_n]),
        l_vec, bias if bias is not None else y, M, N, K, grid[0],
        HAS_BIAS=bias is not None, STORE_Z=store_z, **cfg,
    )
    return y, (z if store_z else None)


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
            y, z = persistent_output_form(x, w, l_vec, b, config={**cfg, "SUBTILE": subtile})
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
        y_ref, z_ref = ki.ia3_forward(x, w, l_vec, None, False, False)
        variants = {"op (cuBLAS z, then y = z * l)": lambda: ki.ia3_forward(x, w, l_vec, None, False, False)}
        for name, cfg in CONFIGS.items():
            variants[name] = lambda cfg=cfg: persistent_output_form(x, w, l_vec, config=cfg)
        variants["y only 128x256x64 s3 half-stores"] = lambda: persistent_output_form(x, w, l_vec, config=BASE,
                                                                                        store_z=False)
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

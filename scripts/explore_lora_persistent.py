"""The LoRA forward with x A^T and the low-rank term inside one persistent GEMM, against the op's cuBLAS modes.

kernels/triton/lora.py's `persistent_forward` (lora_forward_persistent_kernel) with a few tile configs, xa
from cuBLAS (XA_GIVEN) or accumulated inside, next to
lora_forward's "cublas-beta" (the default from M = 4096) and "cublas-add" modes and F.linear alone (the floor),
bf16, r = 16, at the foundation issue's shapes. Each variant is timed twice (CUDA-graph replays, median), with
F.linear timed between, and its ratio is taken to that F.linear time (the H100 drifts with its power limit).
Every variant's y and xa are checked against the cublas-beta mode's (relative Frobenius error < 1e-2).
With OUT set, writes $OUT/explore_lora_persistent.json.

    python scripts/explore_lora_persistent.py
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing as tt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import environment  # noqa: E402

from peftkern.kernels.triton import lora as kl  # noqa: E402

BASE = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, FLATTEN=True, SUBTILE=True, XA_GIVEN=True,
            num_warps=8, num_stages=3)
CONFIGS = {
    "xa-cublas 128x256x64 s3 flat sub": BASE,
    "xa-cublas 128x256x64 s3 flat full-store": {**BASE, "SUBTILE": False},
    "xa-cublas 128x128x64 s4 flat w8 full-store": {**BASE, "BLOCK_N": 128, "num_stages": 4, "SUBTILE": False},
}
SHAPES = [(8192, 4096, 4096), (8192, 11008, 4096), (2048, 4096, 4096), (1024, 4096, 4096), (512, 4096, 4096)]


def ms(fn) -> float:
    return tt.do_bench_cudagraph(fn, rep=100, return_mode="median")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def main() -> None:
    torch.manual_seed(0)
    dt, r, s = torch.bfloat16, 16, 2.0
    rows = []
    for M, K, N in SHAPES:
        x = torch.randn(M, K, device="cuda", dtype=dt)
        W = torch.randn(N, K, device="cuda", dtype=dt) * K**-0.5
        A = torch.randn(r, K, device="cuda", dtype=dt) * K**-0.5
        B = torch.randn(N, r, device="cuda", dtype=dt) * 0.1
        y_ref, xa_ref = kl.lora_forward(x, W, A, B, s, None, 0.0, 0, False, mode="cublas-beta")
        variants = {f"op {m or 'default'}": (lambda m=m: kl.lora_forward(x, W, A, B, s, None, 0.0, 0, False, mode=m))
                    for m in ("cublas-beta", "cublas-add", None)}
        variants.update({f"persistent {name}": (lambda c=c: kl.persistent_forward(x, W, A, B, s, None, config=c))
                         for name, c in CONFIGS.items()})
        print(f"\n== M={M} K={K} N={N} r={r}", flush=True)
        for name, fn in variants.items():
            try:
                y, xa = fn()
                err = max(rel(y, y_ref), rel(xa, xa_ref))
                t1 = ms(fn)
                floor = ms(lambda: F.linear(x, W))
                t2 = ms(fn)
            except Exception as e:  # a config that does not fit: say so, go on
                print(f"  {name:36s} failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
                continue
            t = (t1 + t2) / 2
            ok = "ok" if err < 1e-2 else "WRONG"
            rows.append(dict(M=M, K=K, N=N, r=r, variant=name, ms=t, floor_ms=floor, ratio=t / floor, err=err))
            print(f"  {name:36s} {t:.4f} ms  {t / floor:.3f}x (F.linear {floor:.4f})  err {err:.1e} {ok}",
                  flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "explore_lora_persistent.json").write_text(
            json.dumps(dict(environment=environment(), rows=rows), indent=1))


if __name__ == "__main__":
    main()

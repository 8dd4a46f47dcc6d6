"""Exploration on the GPU: the LoRA forward at decode sizes (M = 1 and 16) against F.linear, one run.

Not part of the test suite. Prints, per (M, K, N): F.linear, the op's forward as it stands, the fused GEMM
(fused_matmul, xa given) and the one-launch decode kernels (decode_forward, xa inside) per tile
config, all as CUDA-graph replays (the GPU time, launch gaps included).
    python scripts/explore_lora_decode.py
"""
import itertools

import torch
import torch.nn.functional as F
import triton.testing as tt

import peftkern
from peftkern.kernels.triton import lora as kl


def ms(fn):
    return tt.do_bench_cudagraph(fn, rep=50, return_mode="median")


def main():
    torch.manual_seed(0)
    dt = torch.bfloat16
    r = 16
    for M, K, N in [(1, 4096, 4096), (16, 4096, 4096), (16, 4096, 11008), (16, 11008, 4096), (64, 4096, 4096)]:
        x = torch.randn(M, K, device="cuda", dtype=dt)
        W = torch.randn(N, K, device="cuda", dtype=dt) * K ** -0.5
        A = torch.randn(r, K, device="cuda", dtype=dt) * K ** -0.5
        B = torch.randn(N, r, device="cuda", dtype=dt) * 0.01
        base = ms(lambda: F.linear(x, W))
        gbs = N * K * 2 / base / 1e6
        op = ms(lambda: peftkern.lora_linear(x, W, A, B, 2.0, training=False))
        xa = (x @ A.t()).float()
        down = ms(lambda: (x @ A.t()).float())
        print(f"\n== M={M} K={K} N={N} r={r}: F.linear {base * 1e3:.1f} us ({gbs:.0f} GB/s of W); "
              f"op fwd {op * 1e3:.1f} us ({op / base:.2f}x); xa by cuBLAS + cast {down * 1e3:.1f} us", flush=True)
        bm = max(16, min(64, 1 << (M - 1).bit_length()))
        sweeps = [("decode_forward", [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st)
                                      for bn, bk, (w, st) in itertools.product(
                                          [32, 64], [128, 256], [(2, 4), (2, 5), (2, 6), (1, 4)])])]
        if M == 1:  # the non-MMA kernel for one row
            sweeps.append(("gemv", [dict(BLOCK_M=1, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st)
                                    for bn, bk, (w, st) in itertools.product(
                                        [4, 8, 16, 32], [128, 256, 512], [(2, 3), (4, 1), (4, 3), (8, 3)])]))
        for name, configs in sweeps:
            rows = []
            for cfg in configs:
                try:
                    t = ms(lambda: kl.decode_forward(x, W, A, B, 2.0, config=cfg))
                except Exception as e:  # out of shared memory or registers: skip the config
                    print(f"  {name} {cfg}: {type(e).__name__}", flush=True)
                    continue
                rows.append((t, sorted(cfg.items())))
            rows.sort()
            for t, cfg in rows[:6]:
                print(f"  {name} {dict(cfg)}: {t * 1e3:.1f} us ({t / base:.2f}x)")
        print(f"  fused_matmul (xa given), the op's dx config {kl._matmul_config(M, dt)}: "
              f"{ms(lambda: kl.fused_matmul(x, W, B, xa, 2.0)) * 1e3:.1f} us", flush=True)
        print(f"  decode_forward, the op's config {kl._decode_config(M, N, dt)}: "
              f"{ms(lambda: kl.decode_forward(x, W, A, B, 2.0)) * 1e3:.1f} us", flush=True)


if __name__ == "__main__":
    main()

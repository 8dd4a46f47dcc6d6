"""Prototype, not wired into the op: KronA's forward term inside the frozen GEMM (NOTES-krona.md, forty-fourth session).

One program computes an output tile of BLOCK_M tokens by BLOCK_N = C n2 columns, i.e. C values of i1 (whole rows of B).
While the K loop streams x's tile of K block j1 (BLOCK_K = k2) into the MMA with W, it also accumulates, on CUDA cores,
    V[m, c, :] += A[i1_c, j1] x[m, j1 k2 : (j1 + 1) k2]          (V = A X for the tile's i1 values, fp32)
and the epilogue adds s V B^T (V rounded to x's dtype, as the other kernels round their intermediates; one MMA of
(BLOCK_M C) x k2 by k2 x n2) and the bias. No pass outside the GEMM: x is read once, y written once.

    python scripts/explore_krona_ingemm.py            # on a GPU: check against reference.py, time configs against
                                                      # F.linear and the op's forward (term kernel + cuBLAS)
The interpreter checks the kernel (tests/test_tools.py::test_krona_ingemm_prototype_matches_reference).
Needs n2, k2 and C powers of two (Triton's block shapes): 64 x 64 (4096^2) and 86x64 beside 128x64 (4096 -> 11008).
"""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from peftkern.kernels.triton._launch import cdiv


@triton.jit
def krona_ingemm_forward_kernel(
    x_ptr, x2_ptr, w_ptr, a_ptr, b_ptr, bias_ptr, y_ptr, M, N, K, k1, scaling,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, N2: tl.constexpr, C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, X_TWICE: tl.constexpr,
):
    """y = x W^T + b + s (A (x) B) x for one (BLOCK_M, C N2) tile; BLOCK_K = k2; A (n1, k1) and B (N2, k2) row-major,
    x (M, K), W (N, K), y (M, N) with unit column strides. X_TWICE: the CUDA-core sum reads x's tile by a load of its
    own (x2_ptr, the same tensor), so no pipelined buffer feeds both the MMA and registers: with Triton 3.6 on sm_90
    that pattern gave wrong products in the adapter's loop 1 (NOTES-adapter.md, "The LN failure found"), and
    scripts/compile_report.py flags it here when x's tile is loaded once."""
    BLOCK_N: tl.constexpr = C * N2
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_m < M
    cols = offs_n < N
    i1 = pid_n * C + tl.arange(0, C)  # the tile's rows of A
    n1 = N // N2
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    v = tl.zeros((BLOCK_M, C, BLOCK_K), dtype=tl.float32)
    for j1 in range(0, k1):
        kcols = j1 * BLOCK_K + offs_k
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + kcols[None, :], mask=rows[:, None], other=0.0)
        wt = tl.load(w_ptr + offs_n[:, None] * stride_wn + kcols[None, :], mask=cols[:, None], other=0.0)
        acc = tl.dot(xt, wt.T, acc)
        if X_TWICE:
            xt = tl.load(x2_ptr + offs_m[:, None] * stride_xm + kcols[None, :], mask=rows[:, None], other=0.0)
        a_col = tl.load(a_ptr + i1 * k1 + j1, mask=i1 < n1, other=0.0).to(tl.float32)
        v += xt.to(tl.float32)[:, None, :] * a_col[None, :, None]
    # epilogue: the tile's columns are (c, i2) for c < C, i2 < N2, row-major, as V B^T's rows (m, c) reshaped
    bt = tl.load(b_ptr + tl.arange(0, N2)[None, :] * BLOCK_K + offs_k[:, None])  # B^T (k2, N2)
    term = tl.dot(tl.reshape(v, (BLOCK_M * C, BLOCK_K)).to(bt.dtype), bt)
    acc += scaling * tl.reshape(term, (BLOCK_M, BLOCK_N))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=cols, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=rows[:, None] & cols[None, :])


def ingemm_forward(x, w, a, b, scaling, bias=None, block_m=64, c=None, group_m=8, num_warps=8, num_stages=3,
                   x_twice=True):
    """krona_ingemm_forward_kernel's y for x (M, K), w (N, K), one term a (n1, k1), b (n2, k2) in x's dtype."""
    M, K = x.shape
    N = w.shape[0]
    n1, k1 = a.shape
    n2, k2 = b.shape
    if c is None:
        c = max(1, 256 // n2)
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    grid = (cdiv(M, block_m) * cdiv(n1, c),)
    krona_ingemm_forward_kernel[grid](
        x, x, w, a.contiguous(), b.contiguous(), bias if bias is not None else y, y, M, N, K, k1, float(scaling),
        x.stride(0), w.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, N2=n2, C=c, BLOCK_M=block_m, BLOCK_K=k2, GROUP_M=group_m, X_TWICE=x_twice,
        num_warps=num_warps, num_stages=num_stages)
    return y


def main() -> int:
    import torch.nn.functional as F
    import triton.testing as tt

    from peftkern import reference
    from peftkern.kernels.triton import krona as kk

    torch.manual_seed(0)
    dt = torch.bfloat16
    for M, (n1, k1), (n2, k2) in [(8192, (64, 64), (64, 64)), (8192, (86, 64), (128, 64)), (2048, (64, 64), (64, 64))]:
        N, K = n1 * n2, k1 * k2
        x = torch.randn(M, K, device="cuda", dtype=dt)
        w = torch.randn(N, K, device="cuda", dtype=dt) * K ** -0.5
        a = torch.randn(n1, k1, device="cuda", dtype=dt) * k1 ** -0.5
        b = torch.randn(n2, k2, device="cuda", dtype=dt) * k2 ** -0.5
        bias = torch.randn(N, device="cuda", dtype=dt)
        ref = reference.krona_forward(x.double(), w.double(), a.double()[None], None, b.double()[None], None, 2.0,
                                      bias.double())
        us = lambda fn: 1e3 * tt.do_bench_cudagraph(fn, rep=100, return_mode="median")  # noqa: E731
        floor = us(lambda: F.linear(x, w))
        op = us(lambda: kk.krona_forward(x, w, a[None], None, b[None], None, 2.0, bias))
        print(f"\n== M={M} A {n1}x{k1} B {n2}x{k2}: F.linear {floor:.1f} us; the op's forward {op:.1f} us "
              f"({op / floor:.3f}x)", flush=True)
        half = 256 // n2 // 2
        for block_m, c, warps, stages, twice in [(64, None, 8, 3, True), (64, None, 8, 3, False), (64, None, 4, 3, True),
                                                 (128, half, 8, 3, True), (128, half, 8, 4, True),
                                                 (64, None, 8, 1, False)]:
            cfg = dict(block_m=block_m, c=c, num_warps=warps, num_stages=stages, x_twice=twice)
            try:
                y = ingemm_forward(x, w, a, b, 2.0, bias, **cfg)
                err = ((y.double() - ref).norm() / ref.norm()).item()
                t = us(lambda: ingemm_forward(x, w, a, b, 2.0, bias, **cfg))
                print(f"  in-GEMM {cfg}: {t:.1f} us ({t / floor:.3f}x F.linear), rel err {err:.2e}", flush=True)
            except Exception as e:  # a config that does not fit: say so, keep going
                print(f"  in-GEMM {cfg}: failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

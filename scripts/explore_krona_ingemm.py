"""Prototype, not wired into the op: KronA's term inside the frozen GEMMs (NOTES-krona.md, forty-fourth session).

Measured on an H100 (2026-12-06, NOTES-krona.md "Forty-fifth session"): 2.4-2.8x F.linear for the forward and 2.1-2.9x
dy @ W for dx, against the op's 1.19x and 1.25x, so the design is dropped and this stays as the record. The configs that
load x's tile once (x_twice=False) are wrong at 64 x 64 on the GPU (relative error 1e-2 to 3e-2): compile_report's
MMA-operand hazard.

One program computes an output tile of BLOCK_M tokens by BLOCK_N = C n2 columns, i.e. C values of i1 (whole rows of B).
While the K loop streams x's tile of K block j1 (BLOCK_K = k2) into the MMA with W, it also accumulates, on CUDA cores,
    V[m, c, :] += A[i1_c, j1] x[m, j1 k2 : (j1 + 1) k2]          (V = A X for the tile's i1 values, fp32)
and the epilogue adds s V B^T (V rounded to x's dtype, as the other kernels round their intermediates; one MMA of
(BLOCK_M C) x k2 by k2 x n2) and the bias. No pass outside the GEMM: x is read once, y written once.
The backward's dx = dy W + s vec(A^T G B) likewise (`krona_ingemm_dx_kernel`): a tile of BLOCK_M tokens by C k2 input
columns (C values of j1), the K loop over dy's blocks of n2 (one i1 each) summing U[m, c, :] += A[i1, j1_c] G[m, i1, :],
the epilogue adding s U B. dA and dB would still take one pass over dy and x (the op's grad_fused without the dx term).

    python scripts/explore_krona_ingemm.py            # on a GPU: check against reference.py, time configs against
                                                      # F.linear and the op's forward (term kernel + cuBLAS)
The interpreter checks both kernels (tests/test_tools.py::test_krona_ingemm_prototype_matches_reference).
Needs n2, k2 and C powers of two (Triton's block shapes): 64 x 64 (4096^2) and 86x64 beside 128x64 (4096 -> 11008).
"""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from peftkern.kernels.triton._launch import cdiv
from peftkern.kernels.triton.lora import _dot_precision, _tile_coords


@triton.jit
def _tile(M, COLS, C: tl.constexpr, WIDTH: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr):
    """The program's output tile: rows offs_m of M and columns offs_c of COLS (C blocks of WIDTH), their masks, and
    the C rows (forward) or columns (dx) of A that the tile's column blocks belong to."""
    BLOCK_C: tl.constexpr = C * WIDTH
    pid_m, pid_c = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(COLS, BLOCK_C), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return offs_m, offs_c, offs_m < M, offs_c < COLS, pid_c * C + tl.arange(0, C)


@triton.jit
def krona_ingemm_forward_kernel(
    x_ptr, x2_ptr, w_ptr, a_ptr, b_ptr, bias_ptr, y_ptr, M, N, K, k1, scaling,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, N2: tl.constexpr, C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, X_TWICE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """y = x W^T + b + s (A (x) B) x for one (BLOCK_M, C N2) tile; BLOCK_K = k2; A (n1, k1) and B (N2, k2) row-major,
    x (M, K), W (N, K), y (M, N) with unit column strides. X_TWICE: the CUDA-core sum reads x's tile by a load of its
    own (x2_ptr, the same tensor), so no pipelined buffer feeds both the MMA and registers: with Triton 3.6 on sm_90
    that pattern gave wrong products in the adapter's loop 1 (NOTES-adapter.md, "The LN failure found"), and
    scripts/compile_report.py flags it here when x's tile is loaded once."""
    BLOCK_N: tl.constexpr = C * N2
    offs_m, offs_n, rows, cols, i1 = _tile(M, N, C, N2, BLOCK_M, GROUP_M)  # i1: the tile's rows of A
    offs_k = tl.arange(0, BLOCK_K)
    n1 = N // N2
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    v = tl.zeros((BLOCK_M, C, BLOCK_K), dtype=tl.float32)
    for j1 in range(0, k1):
        kcols = j1 * BLOCK_K + offs_k
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + kcols[None, :], mask=rows[:, None], other=0.0)
        wt = tl.load(w_ptr + offs_n[:, None] * stride_wn + kcols[None, :], mask=cols[:, None], other=0.0)
        acc = tl.dot(xt, wt.T, acc, input_precision=DOT_PRECISION)
        if X_TWICE:
            xt = tl.load(x2_ptr + offs_m[:, None] * stride_xm + kcols[None, :], mask=rows[:, None], other=0.0)
        a_col = tl.load(a_ptr + i1 * k1 + j1, mask=i1 < n1, other=0.0).to(tl.float32)
        v += xt.to(tl.float32)[:, None, :] * a_col[None, :, None]
    # epilogue: the tile's columns are (c, i2) for c < C, i2 < N2, row-major, as V B^T's rows (m, c) reshaped
    bt = tl.load(b_ptr + tl.arange(0, N2)[None, :] * BLOCK_K + offs_k[:, None])  # B^T (k2, N2)
    term = tl.dot(tl.reshape(v, (BLOCK_M * C, BLOCK_K)).to(bt.dtype), bt, input_precision=DOT_PRECISION)
    acc += scaling * tl.reshape(term, (BLOCK_M, BLOCK_N))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=cols, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=rows[:, None] & cols[None, :])


@triton.jit
def krona_ingemm_dx_kernel(
    g_ptr, g2_ptr, w_ptr, a_ptr, b_ptr, dx_ptr, M, N, K, n1, k1, scaling,
    stride_gm, stride_wn, stride_dm,
    K2: tl.constexpr, C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N2: tl.constexpr, GROUP_M: tl.constexpr,
    X_TWICE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dx = dy W + s vec(A^T G B) for one (BLOCK_M, C K2) tile of dx (M, K); the K loop runs over N in blocks of
    BLOCK_N2 = n2, block i1 being G[:, i1, :]; A (n1, k1), B (n2, K2) row-major, W (N, K). X_TWICE as the forward's."""
    BLOCK_K: tl.constexpr = C * K2
    offs_m, offs_k, rows, cols, j1 = _tile(M, K, C, K2, BLOCK_M, GROUP_M)  # j1: the tile's columns of A
    offs_n = tl.arange(0, BLOCK_N2)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    u = tl.zeros((BLOCK_M, C, BLOCK_N2), dtype=tl.float32)
    for i1 in range(0, n1):
        ncols = i1 * BLOCK_N2 + offs_n
        gt = tl.load(g_ptr + offs_m[:, None] * stride_gm + ncols[None, :], mask=rows[:, None], other=0.0)
        wt = tl.load(w_ptr + ncols[:, None] * stride_wn + offs_k[None, :], mask=cols[None, :], other=0.0)
        acc = tl.dot(gt, wt, acc, input_precision=DOT_PRECISION)
        if X_TWICE:
            gt = tl.load(g2_ptr + offs_m[:, None] * stride_gm + ncols[None, :], mask=rows[:, None], other=0.0)
        a_row = tl.load(a_ptr + i1 * k1 + j1, mask=j1 < k1, other=0.0).to(tl.float32)
        u += gt.to(tl.float32)[:, None, :] * a_row[None, :, None]
    bm = tl.load(b_ptr + offs_n[:, None] * K2 + tl.arange(0, K2)[None, :])  # B (n2, K2)
    term = tl.dot(tl.reshape(u, (BLOCK_M * C, BLOCK_N2)).to(bm.dtype), bm, input_precision=DOT_PRECISION)
    acc += scaling * tl.reshape(term, (BLOCK_M, BLOCK_K))
    tl.store(dx_ptr + offs_m[:, None] * stride_dm + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=rows[:, None] & cols[None, :])


def _ingemm(forward, z, w, a, b, scaling, bias, block_m, c, group_m, num_warps, num_stages, x_twice):
    """One term a (n1, k1), b (n2, k2): the forward y of z = x (M, K), or the backward's dx of z = dy (M, N); w (N, K).
    A tile's columns are c rows of A times n2 (forward) or c columns of A times k2 (dx)."""
    M = z.shape[0]
    N, K = w.shape
    (n1, k1), (n2, k2) = a.shape, b.shape
    if c is None:
        c = max(1, 256 // (n2 if forward else k2))
    out = torch.empty(M, N if forward else K, device=z.device, dtype=z.dtype)
    grid = (cdiv(M, block_m) * cdiv(n1 if forward else k1, c),)
    a, b = a.contiguous(), b.contiguous()
    common = dict(C=c, BLOCK_M=block_m, GROUP_M=group_m, X_TWICE=x_twice, DOT_PRECISION=_dot_precision(z.dtype),
                  num_warps=num_warps, num_stages=num_stages)
    if forward:
        krona_ingemm_forward_kernel[grid](
            z, z, w, a, b, bias if bias is not None else out, out, M, N, K, k1, float(scaling), z.stride(0),
            w.stride(0), out.stride(0), HAS_BIAS=bias is not None, N2=n2, BLOCK_K=k2, **common)
    else:
        krona_ingemm_dx_kernel[grid](
            z, z, w, a, b, out, M, N, K, n1, k1, float(scaling), z.stride(0), w.stride(0), out.stride(0), K2=k2,
            BLOCK_N2=n2, **common)
    return out


def ingemm_forward(x, w, a, b, scaling, bias=None, block_m=64, c=None, group_m=8, num_warps=8, num_stages=3,
                   x_twice=True):
    """krona_ingemm_forward_kernel's y for x (M, K), w (N, K), one term a (n1, k1), b (n2, k2) in x's dtype."""
    return _ingemm(True, x, w, a, b, scaling, bias, block_m, c, group_m, num_warps, num_stages, x_twice)


def ingemm_dx(dy, w, a, b, scaling, block_m=64, c=None, group_m=8, num_warps=8, num_stages=3, x_twice=True):
    """krona_ingemm_dx_kernel's dx for dy (M, N), w (N, K), one term a (n1, k1), b (n2, k2) in dy's dtype."""
    return _ingemm(False, dy, w, a, b, scaling, None, block_m, c, group_m, num_warps, num_stages, x_twice)


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
        for block_m, c, warps, stages, twice in [(64, None, 8, 3, True), (64, None, 8, 3, False),
                                                 (64, None, 4, 3, True), (128, half, 8, 3, True),
                                                 (128, half, 8, 4, True), (64, None, 8, 1, False)]:
            cfg = dict(block_m=block_m, c=c, num_warps=warps, num_stages=stages, x_twice=twice)
            try:
                y = ingemm_forward(x, w, a, b, 2.0, bias, **cfg)
                err = ((y.double() - ref).norm() / ref.norm()).item()
                t = us(lambda: ingemm_forward(x, w, a, b, 2.0, bias, **cfg))
                print(f"  in-GEMM {cfg}: {t:.1f} us ({t / floor:.3f}x F.linear), rel err {err:.2e}", flush=True)
            except Exception as e:  # a config that does not fit: say so, keep going
                print(f"  in-GEMM {cfg}: failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
        # the backward: dx in the GEMM, plus grad_fused for dA and dB alone, against the op's backward
        dy = torch.randn(M, N, device="cuda", dtype=dt)
        needs = (True, True, False, True, False, False, False)
        ref_dx = reference.krona_backward(dy.double(), x.double(), w.double(), a.double()[None], None,
                                          b.double()[None], None, 2.0, needs)[0]
        floor_dx = us(lambda: dy @ w)
        op_bwd = us(lambda: kk.krona_backward(dy, x, w, a[None], None, b[None], None, 2.0, needs))
        ab = us(lambda: kk.grad_fused(dy, x, a[None], b[None], 2.0, False))
        print(f"  dy @ W {floor_dx:.1f} us; the op's backward {op_bwd:.1f} us ({op_bwd / floor_dx:.3f}x); grad_fused "
              f"for dA, dB alone {ab:.1f} us", flush=True)
        half = 256 // k2 // 2
        for block_m, c, warps, stages, twice in [(64, None, 8, 3, True), (64, None, 8, 3, False),
                                                 (128, half, 8, 3, True), (64, None, 4, 3, True)]:
            cfg = dict(block_m=block_m, c=c, num_warps=warps, num_stages=stages, x_twice=twice)
            try:
                got = ingemm_dx(dy, w, a, b, 2.0, **cfg)
                err = ((got.double() - ref_dx).norm() / ref_dx.norm()).item()
                t = us(lambda: ingemm_dx(dy, w, a, b, 2.0, **cfg))
                print(f"  in-GEMM dx {cfg}: {t:.1f} us ({t / floor_dx:.3f}x dy @ W; with grad_fused "
                      f"{(t + ab) / floor_dx:.3f}x), rel err {err:.2e}", flush=True)
            except Exception as e:
                print(f"  in-GEMM dx {cfg}: failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

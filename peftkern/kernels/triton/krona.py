"""KronA in Triton: sums of Kronecker products applied through the reshape identity, never as an N x K matrix.

Math (x: M x K, W: N x K frozen, s = scaling, terms t = 1..T with A_t: n1 x k1 and B_t: n2 x k2, N = n1 n2,
K = k1 k2, torch.kron's layout (A (x) B)[i1 n2 + i2, j1 k2 + j2] = A[i1, j1] B[i2, j2]). Per token m, X_m is x_m
as a (k1, k2) matrix and G_m is dy_m as (n1, n2), both row-major:
    forward   y_m  = W x_m + b + s sum_t vec(A_t X_m B_t^T)      right product P = X B^T, then left product A P
    backward  dx_m = W^T dy_m + s sum_t vec(A_t^T G_m B_t)        the same term with A^T and B^T, on dy
              dA_t = s sum_m G_m B_t X_m^T        dB_t = s sum_m G_m^T A_t X_m        db = sum_m dy_m
A low-rank B_t = Ba_t Bb_t (n2 x r, r x k2) stays factored where that is cheaper (Compacter's B_i):
    y_m gets A_t (X_m Bb_t^T) Ba_t^T;  dBa_t = s sum_m G_m^T A_t X_m Bb_t^T;  dBb_t = s sum_m (A_t^T G_m Ba_t)^T X_m.
A low-rank A_t (n1 x k1, the small factor) is multiplied out on the host: its chain rule is two tiny GEMMs.

Every per-token product is a 2-D MMA. Where the factor blocks are MMA operands (every factor dimension >= 16), one
token a step: the batched 3-D products over several tokens ran 3-5x slower on an H200 (NOTES-krona.md). Where a factor
dimension is below the MMA minimum of 16, BT tokens a step, the right product Z_m R^T with (token, row) pairs as its
rows and the left product with the block-diagonal I_BT (x) A (wasting a factor BT on a product that is small exactly
then; such sums are mostly of low rank and run as the LoRA layer instead, ops/krona.py). The reductions over M for dA
and dB split M into float32 partial sums that the host adds in order.

Floor (bf16, M = 8192, N = K = 4096, one term of 64 x 64 factors): the base GEMM is 2MNK = 275 GFLOP each way,
~0.40 ms on an H200. The term costs 2M(K n2 + N k1) = 8.6 GFLOP forward (3%: a fraction 1/n1 + 1/k2), the dx term
8.6 GFLOP and dA, dB 8.6 GFLOP each, so the FLOPs are little; the bytes are what cost: x, y and dy are 64 MB each,
~17 us per read or write at an H200's ~3.9 TB/s. With whole factors in one program (dimensions 16..128, PEFT LoKr's
64 x 64 and 86 x 128), passes over an M x K or M x N operand beyond the two GEMMs' own:
    forward:  read x, write the term C (krona_term_whole_kernel); cuBLAS reads C as its beta input (~4 us)
    backward: read dy and x, write the dx term C' (krona_grad_fused_kernel, with dA and dB); cuBLAS reads C'
Measured at M = 8192 (H200, NOTES-krona.md): 1.08x forward and 1.12-1.14x forward+backward of the frozen layer at
4096^2, 1.10-1.11x at 4096 -> 11008; the 1.10x target needs the term inside the GEMMs. Where TMA can read them
(contiguous rows, Hopper), the whole-factor kernels move each token's block of x, dy and the term by TMA.
Kernels:
  * `krona_term_whole_kernel`: out = s sum_t (A_t (x) B_t) x (+ bias), whole dense factors, tokens looped.
  * `krona_grad_fused_kernel`: one term's dA and dB partial sums and, for one term, the dx term, in one pass.
  * `krona_term_kernel`: the same term tiled (any factor sizes, a factored low-rank B, or out += term).
  * `krona_grad_outer_kernel`: partial sums of dA_t = s sum_m H_m P_m^T (H = G or G Ba, P = X B^T or X Bb^T).
  * `krona_grad_inner_kernel`: partial sums of dB_t = s sum_m G_m^T A_t X_m [Bb_t^T] (dB, dBa; dBb by symmetry).
  * `krona_merge_kernel`: W += sign s sum_t A_t (x) B_t in place, each element its own products.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..._backend import triton_interpret
from ...reference import krona_dense_factor, krona_lowrank_grads
from ._launch import Descriptor, cdiv, launch
from .lora import _dot_precision, _facts, _sm_count, _tma_layout

FUSED_GRAD = [os.environ.get("PEFTKERN_KRONA_FUSED_GRAD", "1") != "0"]  # a list: tests and benchmarks flip it
WHOLE_TERM = [os.environ.get("PEFTKERN_KRONA_WHOLE_TERM", "1") != "0"]  # krona_term_whole_kernel where it fits
TMA_TOKENS = [os.environ.get("PEFTKERN_KRONA_TMA", "1") != "0"]  # whole-factor kernels move token blocks by TMA

# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _token_tile(ptr, m0, M, stride_m, stride_k, i0, n_outer, n_inner, c0,
                BT: tl.constexpr, BI: tl.constexpr, BC: tl.constexpr):
    """tile[(t, i), c] = Z[m0 + t, (i0 + i) n_inner + c0 + c], (BT*BI, BC), zero outside: rows i0.. of BT tokens'
    (n_outer, n_inner) matrices, token-major. Each row is n_inner contiguous elements of one token."""
    rows = tl.arange(0, BT * BI)
    tok = m0 + rows // BI
    i = i0 + rows % BI
    c = c0 + tl.arange(0, BC)
    mask = ((tok < M) & (i < n_outer))[:, None] & (c < n_inner)[None, :]
    ptrs = ptr + tok[:, None] * stride_m + (i[:, None] * n_inner + c[None, :]) * stride_k
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _right_product(z_ptr, m0, M, stride_zm, stride_zk, i0, n_outer, n_inner,
                   r_ptr, stride_rr, stride_rc, r0, n_r,
                   BT: tl.constexpr, BI: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """(BT*BI, BR) float32: rows (t, i) of Z_m R^T for BT tokens, R an (n_r, n_inner) view read at rows r0..r0+BR.
    One 2-D MMA per step over n_inner: the tokens' rows stack into the GEMM's M dimension."""
    acc = tl.zeros((BT * BI, BR), dtype=tl.float32)
    offs_r = r0 + tl.arange(0, BR)
    for c0 in range(0, n_inner, BC):
        z = _token_tile(z_ptr, m0, M, stride_zm, stride_zk, i0, n_outer, n_inner, c0, BT, BI, BC)
        offs_c = c0 + tl.arange(0, BC)
        r = tl.load(r_ptr + offs_r[None, :] * stride_rr + offs_c[:, None] * stride_rc,
                    mask=(offs_r < n_r)[None, :] & (offs_c < n_inner)[:, None], other=0.0)
        acc = tl.dot(z, r.to(z.dtype), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _left_product(a_ptr, stride_ai, stride_aj, i0, n_i, j0, n_j, p,
                  BT: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BC: tl.constexpr,
                  LEFT_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(BT*BI, BC) float32: rows (t, i) of A[i0:i0+BI, j0:j0+BJ] P_t, p holding the rows (t, j) of P (BT*BJ, BC)."""
    if LEFT_DOT:
        offs_i = i0 + tl.arange(0, BI)
        offs_j = j0 + tl.arange(0, BJ)
        a = tl.load(a_ptr + offs_i[:, None] * stride_ai + offs_j[None, :] * stride_aj,
                    mask=(offs_i < n_i)[:, None] & (offs_j < n_j)[None, :], other=0.0).to(p.dtype)
        if BT == 1:
            out = tl.dot(a, p, input_precision=DOT_PRECISION)
        else:
            prod = tl.dot(tl.broadcast_to(a[None, :, :], (BT, BI, BJ)), tl.reshape(p, (BT, BJ, BC)),
                          input_precision=DOT_PRECISION)
            out = tl.reshape(prod, (BT * BI, BC))
    else:
        # Factor dimensions below 16 cannot be an MMA operand's: I_BT (x) A, loaded straight into its
        # block-diagonal place (zeros elsewhere), makes the batched product one 2-D MMA of legal shape.
        rows = tl.arange(0, BT * BI)
        cols = tl.arange(0, BT * BJ)
        i = i0 + rows % BI
        j = j0 + cols % BJ
        mask = ((rows // BI)[:, None] == (cols // BJ)[None, :]) & (i < n_i)[:, None] & (j < n_j)[None, :]
        a = tl.load(a_ptr + i[:, None] * stride_ai + j[None, :] * stride_aj, mask=mask, other=0.0).to(p.dtype)
        out = tl.dot(a, p, input_precision=DOT_PRECISION)
    return out


@triton.jit
def _contract_tokens(h, p, acc, BT: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BC: tl.constexpr,
                     LEFT_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc += sum_t H_t P_t^T, h the rows (t, i) of H (BT*BI, BC), p the rows (t, j) of P (BT*BJ, BC).
    LEFT_DOT: acc is (BI, BJ) and the sum over (t, c) is one MMA's K dimension. Otherwise acc is (BT*BI, BT*BJ):
    every token pair's product, of which only the diagonal blocks are kept (_sum_diagonal_blocks adds them)."""
    if LEFT_DOT and BT == 1:
        acc = tl.dot(h, tl.trans(p), acc, input_precision=DOT_PRECISION)
    elif LEFT_DOT:
        h2 = tl.reshape(tl.permute(tl.reshape(h, (BT, BI, BC)), (1, 0, 2)), (BI, BT * BC))
        p2 = tl.reshape(tl.permute(tl.reshape(p, (BT, BJ, BC)), (0, 2, 1)), (BT * BC, BJ))
        acc = tl.dot(h2, p2, acc, input_precision=DOT_PRECISION)
    else:
        rows = tl.arange(0, BT * BI)
        cols = tl.arange(0, BT * BJ)
        same = (rows // BI)[:, None] == (cols // BJ)[None, :]
        acc += tl.where(same, tl.dot(h, tl.trans(p), input_precision=DOT_PRECISION), 0.0)
    return acc


@triton.jit
def _sum_diagonal_blocks(acc, BT: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, LEFT_DOT: tl.constexpr):
    if LEFT_DOT:
        out = acc
    else:
        out = tl.sum(tl.sum(tl.reshape(acc, (BT, BI, BT, BJ)), axis=2), axis=0)
    return out


@triton.jit
def _whole_factor(ptr, n_rows, n_cols, stride_r, stride_c, dt, BR: tl.constexpr, BC: tl.constexpr):
    """A whole factor (or its transpose, by swapped strides) as a (BR, BC) tile in dtype dt, zero-padded."""
    rows = tl.arange(0, BR)
    cols = tl.arange(0, BC)
    return tl.load(ptr + rows[:, None] * stride_r + cols[None, :] * stride_c,
                   mask=(rows < n_rows)[:, None] & (cols < n_cols)[None, :], other=0.0).to(dt)


@triton.jit
def krona_term_kernel(
    x_ptr, a_ptr, b_ptr, ba_ptr, bias_ptr, out_ptr,
    M, n1, k1, n2, k2, R, TERMS,
    stride_xm, stride_xk, stride_at, stride_ai, stride_aj, stride_bt, stride_bi, stride_bj,
    stride_bat, stride_bai, stride_baj, stride_om, stride_on,
    scaling,
    LOWRANK: tl.constexpr, LEFT_DOT: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BT: tl.constexpr, BI1: tl.constexpr, BJ1: tl.constexpr, BI2: tl.constexpr, BJ2: tl.constexpr,
    BR: tl.constexpr,
):
    """out[m, i1 n2 + i2] (=, or += with ACCUMULATE) s sum_t (A_t X_m B_t^T)[i1, i2] (+ bias) for BT tokens,
    rows i1 of one BI1 block and columns i2 of one BI2 block. b is B (T, n2, k2), or with LOWRANK Bb (T, R, k2)
    and ba is Ba (T, n2, R). Any strides: the dx term passes A^T and B^T as views."""
    pid_t = tl.program_id(0)
    pid_i2 = tl.program_id(1)
    pid_i1 = tl.program_id(2)
    m0 = pid_t * BT
    i1_0 = pid_i1 * BI1
    i2_0 = pid_i2 * BI2
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros((BT * BI1, BI2), dtype=tl.float32)
    for term in range(TERMS):
        a_t = a_ptr + term * stride_at
        b_t = b_ptr + term * stride_bt
        if LOWRANK:
            q = tl.zeros((BT * BI1, BR), dtype=tl.float32)
            for j1_0 in range(0, k1, BJ1):
                p = _right_product(x_ptr, m0, M, stride_xm, stride_xk, j1_0, k1, k2, b_t, stride_bi, stride_bj,
                                   0, R, BT, BJ1, BJ2, BR, DOT_PRECISION)
                q += _left_product(a_t, stride_ai, stride_aj, i1_0, n1, j1_0, k1, p.to(dt),
                                   BT, BI1, BJ1, BR, LEFT_DOT, DOT_PRECISION)
            offs_r = tl.arange(0, BR)
            offs_i2 = i2_0 + tl.arange(0, BI2)
            ba = tl.load(ba_ptr + term * stride_bat + offs_i2[None, :] * stride_bai + offs_r[:, None] * stride_baj,
                         mask=(offs_i2 < n2)[None, :] & (offs_r < R)[:, None], other=0.0)
            acc = tl.dot(q.to(dt), ba.to(dt), acc, input_precision=DOT_PRECISION)
        else:
            for j1_0 in range(0, k1, BJ1):
                p = _right_product(x_ptr, m0, M, stride_xm, stride_xk, j1_0, k1, k2, b_t, stride_bi, stride_bj,
                                   i2_0, n2, BT, BJ1, BJ2, BI2, DOT_PRECISION)
                acc += _left_product(a_t, stride_ai, stride_aj, i1_0, n1, j1_0, k1, p.to(dt),
                                     BT, BI1, BJ1, BI2, LEFT_DOT, DOT_PRECISION)
    acc = acc * scaling
    rows = tl.arange(0, BT * BI1)
    tok = m0 + rows // BI1
    i1 = i1_0 + rows % BI1
    i2 = i2_0 + tl.arange(0, BI2)
    cols = i1[:, None] * n2 + i2[None, :]
    mask = ((tok < M) & (i1 < n1))[:, None] & (i2 < n2)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    o_ptrs = out_ptr + tok[:, None] * stride_om + cols * stride_on
    if ACCUMULATE:
        acc += tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def krona_term_whole_kernel(
    x_ptr, a_ptr, b_ptr, bias_ptr, out_ptr,
    M, n1, k1, n2, k2, TERMS, rows_per_split,
    stride_xm, stride_xk, stride_at, stride_ai, stride_aj, stride_bt, stride_bi, stride_bj, stride_om, stride_on,
    scaling,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr, ONE_TERM: tl.constexpr,
    BN1: tl.constexpr, BK1: tl.constexpr, BN2: tl.constexpr, BK2: tl.constexpr,
):
    """krona_term_kernel's dense case with whole factors in one program (every dimension 16..128): out[m] =
    s sum_t vec(A_t X_m B_t^T) (+ bias) for this split's tokens, one token a step, the factors of one term loaded
    once for the whole split (each term's again per token for sums: they stay in L1).
    TMA: x_ptr and out_ptr are descriptors of x as (M, k1, k2) and out as (M, n1, n2), blocks (1, BK1, BK2) and
    (1, BN1, BN2): a token's X comes by TMA straight into shared memory (the MMA's operand) and its term leaves by an
    asynchronous TMA store, which clips the padded rows and columns.
    ONE_TERM (TERMS = 1) leaves the loop over terms out of the token loop: Triton pipelines innermost loops only, so
    with it there the next tokens' X would not be fetched while this one's products run."""
    pid_s = tl.program_id(0)
    if TMA:
        dt = x_ptr.dtype
    else:
        dt = x_ptr.dtype.element_ty
    offs_n1 = tl.arange(0, BN1)
    offs_n2 = tl.arange(0, BN2)
    a = _whole_factor(a_ptr, n1, k1, stride_ai, stride_aj, dt, BN1, BK1)
    bt = _whole_factor(b_ptr, k2, n2, stride_bj, stride_bi, dt, BK2, BN2)  # B^T (k2, n2)
    cols = offs_n1[:, None] * n2 + offs_n2[None, :]
    out_mask = (offs_n1 < n1)[:, None] & (offs_n2 < n2)[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=out_mask, other=0.0).to(tl.float32)
    m_start = pid_s * rows_per_split
    m_end = min(m_start + rows_per_split, M)
    for m in range(m_start, m_end):
        if TMA:
            x = tl.reshape(x_ptr.load([m, 0, 0]), (BK1, BK2))
        else:
            x = _token_tile(x_ptr, m, m_end, stride_xm, stride_xk, 0, k1, k2, 0, 1, BK1, BK2).to(dt)
        p = tl.dot(x, bt, input_precision=DOT_PRECISION).to(dt)  # (k1, n2): X B^T
        acc = tl.dot(a, p, input_precision=DOT_PRECISION)  # (n1, n2): A X B^T
        if not ONE_TERM:
            for term in range(1, TERMS):
                a_t = _whole_factor(a_ptr + term * stride_at, n1, k1, stride_ai, stride_aj, dt, BN1, BK1)
                bt_t = _whole_factor(b_ptr + term * stride_bt, k2, n2, stride_bj, stride_bi, dt, BK2, BN2)
                p = tl.dot(x, bt_t, input_precision=DOT_PRECISION).to(dt)
                acc = tl.dot(a_t, p, acc, input_precision=DOT_PRECISION)
        acc = acc * scaling
        if HAS_BIAS:
            acc += bias
        if TMA:
            out_ptr.store([m, 0, 0], tl.reshape(acc.to(out_ptr.dtype), (1, BN1, BN2)))
        else:
            tl.store(out_ptr + m * stride_om + cols * stride_on, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def krona_grad_outer_kernel(
    g_ptr, x_ptr, rg_ptr, rx_ptr,
    M, n1, k1, n2, k2, NC, n_i1_blocks, n_j1_blocks,
    stride_gm, stride_gn, stride_xm, stride_xk, stride_rgt, stride_rgr, stride_rgc,
    stride_rxt, stride_rxr, stride_rxc,
    part_ptr, rows_per_split, stride_ps, stride_pt,
    HAS_RG: tl.constexpr, LEFT_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BT: tl.constexpr, BI1: tl.constexpr, BJ1: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
):
    """part[split, t, i1, j1] = sum over this split's tokens m and c < NC of H_m[i1, c] P_m[j1, c], with
    P_m = X_m RX_t^T (RX_t: (NC, k2)) and H_m = G_m RG_t^T (RG_t: (NC, n2)) or, without HAS_RG, G_m itself
    (NC = n2). Dense B: RX = B, H = G, the sum gives dA. Low-rank: RG = Ba^T, RX = Bb."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    term = pid // (n_i1_blocks * n_j1_blocks)
    i1_0 = (pid // n_j1_blocks) % n_i1_blocks * BI1
    j1_0 = pid % n_j1_blocks * BJ1
    dt = x_ptr.dtype.element_ty
    if LEFT_DOT:
        acc = tl.zeros((BI1, BJ1), dtype=tl.float32)
    else:
        acc = tl.zeros((BT * BI1, BT * BJ1), dtype=tl.float32)
    m_start = pid_s * rows_per_split
    m_end = min(m_start + rows_per_split, M)
    for m0 in range(m_start, m_end, BT):
        for c0 in range(0, NC, BC):
            if HAS_RG:
                h = _right_product(g_ptr, m0, m_end, stride_gm, stride_gn, i1_0, n1, n2,
                                   rg_ptr + term * stride_rgt, stride_rgr, stride_rgc, c0, NC,
                                   BT, BI1, BK, BC, DOT_PRECISION).to(dt)
            else:
                h = _token_tile(g_ptr, m0, m_end, stride_gm, stride_gn, i1_0, n1, n2, c0, BT, BI1, BC).to(dt)
            p = _right_product(x_ptr, m0, m_end, stride_xm, stride_xk, j1_0, k1, k2,
                               rx_ptr + term * stride_rxt, stride_rxr, stride_rxc, c0, NC,
                               BT, BJ1, BK, BC, DOT_PRECISION).to(dt)
            acc = _contract_tokens(h, p, acc, BT, BI1, BJ1, BC, LEFT_DOT, DOT_PRECISION)
    out = _sum_diagonal_blocks(acc, BT, BI1, BJ1, LEFT_DOT)
    offs_i = i1_0 + tl.arange(0, BI1)
    offs_j = j1_0 + tl.arange(0, BJ1)
    p_ptrs = part_ptr + pid_s * stride_ps + term * stride_pt + offs_i[:, None] * k1 + offs_j[None, :]
    tl.store(p_ptrs, out, mask=(offs_i < n1)[:, None] & (offs_j < k1)[None, :])


@triton.jit
def krona_grad_inner_kernel(
    g_ptr, x_ptr, a_ptr, rx_ptr,
    M, n1, k1, n2, k2, NC, n_i2_blocks, n_c_blocks,
    stride_gm, stride_gn, stride_xm, stride_xk, stride_at, stride_ai, stride_aj,
    stride_rxt, stride_rxr, stride_rxc,
    part_ptr, rows_per_split, stride_ps, stride_pt,
    HAS_RX: tl.constexpr, LEFT_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BT: tl.constexpr, BI1: tl.constexpr, BJ1: tl.constexpr, BI2: tl.constexpr, BC: tl.constexpr,
    BK: tl.constexpr,
):
    """part[split, t, i2, c] = sum over this split's tokens m and i1 of G_m[i1, i2] V_m[i1, c] with
    V_m = A_t X_m RX_t^T (RX_t: (NC, k2)) or, without HAS_RX, A_t X_m (NC = k2). Dense B: gives dB.
    Low-rank: RX = Bb gives dBa; called with x and dy swapped, A^T and RX = Ba^T it gives dBb^T."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    term = pid // (n_i2_blocks * n_c_blocks)
    i2_0 = (pid // n_c_blocks) % n_i2_blocks * BI2
    c0 = pid % n_c_blocks * BC
    dt = x_ptr.dtype.element_ty
    a_t = a_ptr + term * stride_at
    acc = tl.zeros((BI2, BC), dtype=tl.float32)
    m_start = pid_s * rows_per_split
    m_end = min(m_start + rows_per_split, M)
    for m0 in range(m_start, m_end, BT):
        for i1_0 in range(0, n1, BI1):
            v = tl.zeros((BT * BI1, BC), dtype=tl.float32)
            for j1_0 in range(0, k1, BJ1):
                if HAS_RX:
                    p = _right_product(x_ptr, m0, m_end, stride_xm, stride_xk, j1_0, k1, k2,
                                       rx_ptr + term * stride_rxt, stride_rxr, stride_rxc, c0, NC,
                                       BT, BJ1, BK, BC, DOT_PRECISION).to(dt)
                else:
                    p = _token_tile(x_ptr, m0, m_end, stride_xm, stride_xk, j1_0, k1, k2, c0, BT, BJ1, BC).to(dt)
                v += _left_product(a_t, stride_ai, stride_aj, i1_0, n1, j1_0, k1, p,
                                   BT, BI1, BJ1, BC, LEFT_DOT, DOT_PRECISION)
            g = _token_tile(g_ptr, m0, m_end, stride_gm, stride_gn, i1_0, n1, n2, i2_0, BT, BI1, BI2).to(dt)
            acc = tl.dot(tl.trans(g), v.to(dt), acc, input_precision=DOT_PRECISION)
    offs_i = i2_0 + tl.arange(0, BI2)
    offs_c = c0 + tl.arange(0, BC)
    p_ptrs = part_ptr + pid_s * stride_ps + term * stride_pt + offs_i[:, None] * NC + offs_c[None, :]
    tl.store(p_ptrs, acc, mask=(offs_i < n2)[:, None] & (offs_c < NC)[None, :])


@triton.jit
def krona_grad_fused_kernel(
    g_ptr, x_ptr, a_ptr, b_ptr, dx_ptr, part_a_ptr, part_b_ptr,
    M, n1, k1, n2, k2, rows_per_split,
    stride_gm, stride_gn, stride_xm, stride_xk, stride_at, stride_ai, stride_aj, stride_bt, stride_bi, stride_bj,
    stride_dm, stride_dk, stride_pas, stride_pat, stride_pbs, stride_pbt,
    scaling,
    WRITE_DX: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr,
    BT: tl.constexpr, BN1: tl.constexpr, BK1: tl.constexpr, BN2: tl.constexpr, BK2: tl.constexpr,
):
    """One term t of a dense sum, whole factors in one program (every factor dimension 16..128): over this split's
    tokens, with G_m = dy_m as (n1, n2) and X_m = x_m as (k1, k2),
        H = G B,  part_a[split, t] = sum_m H X^T (dA),  V = A X,  part_b[split, t] = sum_m G^T V (dB),
    and with WRITE_DX (one term) dx_term[m] = s vec(A^T H) (the dx term: cuBLAS adds dy W into it). One read of dy
    and x for all three, where the separate kernels read them three times. The terms of one split are neighbouring
    programs (the grid's first axis), so that for sums they read the split's dy and x while it is in L2.
    TMA (BT = 1): g_ptr, x_ptr and dx_ptr are descriptors of dy as (M, n1, n2) and of x and dx as (M, k1, k2), whole
    token blocks: G and X come by TMA straight into shared memory, where the products read them as operands."""
    term = tl.program_id(0)
    pid_s = tl.program_id(1)
    if TMA:
        dt = x_ptr.dtype
    else:
        dt = x_ptr.dtype.element_ty
    offs_n1 = tl.arange(0, BN1)
    offs_k1 = tl.arange(0, BK1)
    offs_n2 = tl.arange(0, BN2)
    offs_k2 = tl.arange(0, BK2)
    a_t = a_ptr + term * stride_at
    b_t = b_ptr + term * stride_bt
    a = _whole_factor(a_t, n1, k1, stride_ai, stride_aj, dt, BN1, BK1)
    at = _whole_factor(a_t, k1, n1, stride_aj, stride_ai, dt, BK1, BN1)
    b = _whole_factor(b_t, n2, k2, stride_bi, stride_bj, dt, BN2, BK2)
    a3 = tl.broadcast_to(a[None, :, :], (BT, BN1, BK1))
    at3 = tl.broadcast_to(at[None, :, :], (BT, BK1, BN1))
    acc_a = tl.zeros((BN1, BK1), dtype=tl.float32)
    acc_b = tl.zeros((BN2, BK2), dtype=tl.float32)
    m_start = pid_s * rows_per_split
    m_end = min(m_start + rows_per_split, M)
    for m0 in range(m_start, m_end, BT):
        if TMA:
            g = tl.reshape(g_ptr.load([m0, 0, 0]), (BN1, BN2))
            x = tl.reshape(x_ptr.load([m0, 0, 0]), (BK1, BK2))
        else:
            g = _token_tile(g_ptr, m0, m_end, stride_gm, stride_gn, 0, n1, n2, 0, BT, BN1, BN2).to(dt)
            x = _token_tile(x_ptr, m0, m_end, stride_xm, stride_xk, 0, k1, k2, 0, BT, BK1, BK2).to(dt)
        h = tl.dot(g, b, input_precision=DOT_PRECISION).to(dt)  # (BT*BN1, BK2): rows (t, i1) of G B
        if BT == 1:
            acc_a = tl.dot(h, tl.trans(x), acc_a, input_precision=DOT_PRECISION)
            v = tl.dot(a, x, input_precision=DOT_PRECISION)
        else:
            acc_a = _contract_tokens(h, x, acc_a, BT, BN1, BK1, BK2, True, DOT_PRECISION)
            v = tl.reshape(tl.dot(a3, tl.reshape(x, (BT, BK1, BK2)), input_precision=DOT_PRECISION), (BT * BN1, BK2))
        acc_b = tl.dot(tl.trans(g), v.to(dt), acc_b, input_precision=DOT_PRECISION)
        if WRITE_DX:
            if BT == 1:
                d = tl.dot(at, h, input_precision=DOT_PRECISION)
            else:
                d = tl.reshape(tl.dot(at3, tl.reshape(h, (BT, BN1, BK2)), input_precision=DOT_PRECISION),
                               (BT * BK1, BK2))
            d = d * scaling
            if TMA:
                dx_ptr.store([m0, 0, 0], tl.reshape(d.to(dx_ptr.dtype), (1, BK1, BK2)))
            else:
                rows = tl.arange(0, BT * BK1)
                tok = m0 + rows // BK1
                j1 = rows % BK1
                mask = ((tok < m_end) & (j1 < k1))[:, None] & (offs_k2 < k2)[None, :]
                d_ptrs = dx_ptr + tok[:, None] * stride_dm + (j1[:, None] * k2 + offs_k2[None, :]) * stride_dk
                tl.store(d_ptrs, d.to(dx_ptr.dtype.element_ty), mask=mask)
    pa = part_a_ptr + pid_s * stride_pas + term * stride_pat + offs_n1[:, None] * k1 + offs_k1[None, :]
    tl.store(pa, acc_a, mask=(offs_n1 < n1)[:, None] & (offs_k1 < k1)[None, :])
    pb = part_b_ptr + pid_s * stride_pbs + term * stride_pbt + offs_n2[:, None] * k2 + offs_k2[None, :]
    tl.store(pb, acc_b, mask=(offs_n2 < n2)[:, None] & (offs_k2 < k2)[None, :])


@triton.jit
def krona_merge_kernel(
    w_ptr, a_ptr, b_ptr,
    N, K, n2, k2, TERMS,
    stride_wn, stride_wk, stride_at, stride_ai, stride_aj, stride_bt, stride_bi, stride_bj,
    alpha,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """w += alpha sum_t A_t (x) B_t (alpha = +-scaling), float32 products, rounded once to w's dtype."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    a_off = (offs_n // n2)[:, None] * stride_ai + (offs_k // k2)[None, :] * stride_aj
    b_off = (offs_n % n2)[:, None] * stride_bi + (offs_k % k2)[None, :] * stride_bj
    delta = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for term in range(TERMS):
        a = tl.load(a_ptr + term * stride_at + a_off, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + term * stride_bt + b_off, mask=mask, other=0.0).to(tl.float32)
        delta += a * b
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(w_ptrs, (w + alpha * delta).to(w_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------- launchers


def _pow2(n: int, cap: int) -> int:
    return min(triton.next_power_of_2(max(int(n), 1)), cap)


def _left_tiles(n_i: int, n_j: int, cap: int) -> tuple[int, int, bool]:
    """(BI, BJ, LEFT_DOT) for a product over a factor of n_i x n_j: the batched MMA needs both blocks >= 16;
    below that the block-diagonal form keeps the blocks at the factor's own size instead of padding them."""
    bi, bj = _pow2(n_i, cap), _pow2(n_j, cap)
    return bi, bj, bi >= 16 and bj >= 16


def _token_block(bi: int, bj: int, left_dot: bool, width: int, budget: int = 16384) -> tuple[int, int]:
    """(BT, BI): one token a step where the factor blocks are MMA operands themselves (left_dot): the batched
    3-D product over BT > 1 tokens ran 3-5x slower on an H200 than BT = 1's 2-D ones (NOTES-krona.md, 2026-12-03).
    The block-diagonal form takes about 128 GEMM rows (token, j) per right-product step and at least 16 rows in
    every MMA. An accumulator of BT*BI x width and a block-diagonal factor of BT*BI x BT*BJ within `budget` elements
    (64 float32 registers a thread at 8 warps, 128 at 4), shrinking BT first, then the i block."""
    bt_min = cdiv(16, bj) if left_dot else max(cdiv(16, bj), cdiv(16, bi))
    bt = 1 if left_dot else triton.next_power_of_2(max(bt_min, 128 // bj))

    def too_big(bt, bi):
        return bt * bi * width > budget or (not left_dot and bt * bt * bi * bj > budget)

    while bt > bt_min and too_big(bt, bi):
        bt //= 2
    while too_big(bt, bi) and bi > (16 if left_dot else cdiv(16, bt)):
        bi //= 2
    return bt, bi


def _term_config(n1: int, k1: int, n2: int, k2: int) -> dict:
    """Tiles of krona_term_kernel (GPU values to tune: NOTES-krona.md). i1 blocks up to 128, so a whole 86- or
    128-row A fits one program and X B^T is computed once per token; 64-wide i2 and k2 blocks. The interpreter
    takes the same shapes (its cost is per operation, not per element)."""
    bi1, bj1, left_dot = _left_tiles(n1, k1, 128)
    bj1 = min(bj1, 64)
    bi2 = max(16, _pow2(n2, 64))
    bt, bi1 = _token_block(bi1, bj1, left_dot, bi2)
    # 8 warps once the accumulator passes 64 registers a thread at 4 (an 86- or 128-row A).
    warps = 8 if bt * bi1 * bi2 > 8192 else 4
    return dict(BT=bt, BI1=bi1, BJ1=bj1, BI2=bi2, BJ2=max(16, _pow2(k2, 64)), LEFT_DOT=left_dot,
                num_warps=warps, num_stages=1 if triton_interpret() else 2)


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def use_lowrank_b(n1: int, k1: int, n2: int, k2: int, r: int) -> bool:
    """Keep a low-rank B factored when that saves most of the term's MMA work: per token the dense B costs
    K n2 + N k1 multiply-adds, the factored one (K + N + n1 k1) r (r padded to 16). PEFT LoKr's default 64 x 64 B
    of rank 8 is multiplied out (both are tiny and the factored backward needs one more pass over x and dy);
    Compacter's 1024 x 1024 B_i of rank 4 stays factored (25x fewer FLOPs)."""
    K, N = k1 * k2, n1 * n2
    return K * n2 + N * k1 > 4 * (K + N + n1 * k1) * _block_r(r)


def kron_term(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, Ba: Optional[torch.Tensor], scaling: float,
              bias: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
              config: Optional[dict] = None) -> torch.Tensor:
    """(M, n1 n2) = s sum_t (A_t (x) B_t) x_m per row of x (M, k1 k2), plus bias, or added into `out`.

    A: (T, n1, k1) view; B: (T, n2, k2) view, or with Ba given the low-rank pair Ba (T, n2, r) @ B (T, r, k2).
    Any strides: the backward passes A^T and B^T as transposed views.
    """
    M = x.shape[0]
    T, n1, k1 = A.shape
    lowrank = Ba is not None
    n2 = Ba.shape[1] if lowrank else B.shape[1]
    k2 = B.shape[2]
    R = B.shape[1] if lowrank else n2
    accumulate = out is not None
    if out is None:
        out = torch.empty((M, n1 * n2), device=x.device, dtype=x.dtype)
    if WHOLE_TERM[0] and not lowrank and not accumulate and config is None and whole_factors_fit(n1, k1, n2, k2, x.dtype):
        return _kron_term_whole(x, A, B, scaling, bias, out)
    cfg = dict(config or _term_config(n1, k1, n2, k2))
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    ba = Ba if lowrank else B
    grid = (cdiv(M, cfg["BT"]), cdiv(n2, cfg["BI2"]), cdiv(n1, cfg["BI1"]))
    launch(krona_term_kernel, grid,
        x, A, B, ba, bias if bias is not None else out, out,
        M, n1, k1, n2, k2, R, T,
        x.stride(0), x.stride(1), *A.stride(), *B.stride(), *ba.stride(), out.stride(0), out.stride(1),
        float(scaling),
        LOWRANK=lowrank, HAS_BIAS=bias is not None, ACCUMULATE=accumulate, DOT_PRECISION=_dot_precision(x.dtype),
        BR=_block_r(R), num_warps=num_warps, num_stages=num_stages, **cfg,
    )
    return out


def _whole_config(n1: int, k1: int, n2: int, k2: int) -> dict:
    """Warps and stages of krona_term_whole_kernel, from H200 sweeps (NOTES-krona.md): with plain loads (ff433e7) 4
    warps and 4 stages at 2 programs an SM took 38 us at 64 x 64 (8 warps: 47), 88 at 86x64 beside 128x64 (8 warps:
    114), 78 at 64x86 beside 64x128; with TMA token blocks (twenty-third session) 38.5, 77.8 and 68.0 us, each within
    2 us of the best config."""
    return dict(num_warps=4, num_stages=1 if triton_interpret() else 4)


def _token_desc(t: torch.Tensor, rows: int, cols: int, block_rows: int, block_cols: int) -> Optional[Descriptor]:
    """A TMA descriptor of t (M, rows cols) as (M, rows, cols), one token's (block_rows, block_cols) block at a time
    (the padding past rows and cols zero-filled on loads and clipped on stores); None where TMA cannot take t: an inner
    stride other than 1, a base or row stride not 16-byte aligned, cols not a multiple of 16 bytes, or a GPU before
    Hopper (TMA_TOKENS off: None everywhere)."""
    if not TMA_TOKENS[0] or _tma_layout(t) != "row" or (cols * t.element_size()) % 16:
        return None
    if not triton_interpret() and (not t.is_cuda or _facts(t.device)[1] < 9):
        return None
    view = t.as_strided((t.shape[0], rows, cols), (t.stride(0), cols, 1))
    return Descriptor(view, [1, block_rows, block_cols])


def _kron_term_whole(x, A, B, scaling, bias, out, config: Optional[dict] = None, programs_per_sm: int = 2):
    M = x.shape[0]
    T, n1, k1 = A.shape
    n2, k2 = B.shape[1:]
    bn1, bk1, bn2, bk2 = (_pow2(d, 128) for d in (n1, k1, n2, k2))
    cfg = dict(config or _whole_config(n1, k1, n2, k2))
    splits = max(1, min(programs_per_sm * _sm_count(x.device), M))
    rows = cdiv(M, splits)
    x_desc = _token_desc(x, k1, k2, bk1, bk2)
    out_desc = _token_desc(out, n1, n2, bn1, bn2) if x_desc is not None else None
    tma = out_desc is not None
    launch(krona_term_whole_kernel, (cdiv(M, rows),),
        x_desc if tma else x, A, B, bias if bias is not None else out, out_desc if tma else out,
        M, n1, k1, n2, k2, T, rows,
        x.stride(0), x.stride(1), *A.stride(), *B.stride(), out.stride(0), out.stride(1),
        float(scaling),
        HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(x.dtype), TMA=tma, ONE_TERM=T == 1,
        BN1=bn1, BK1=bk1, BN2=bn2, BK2=bk2, **cfg,
    )
    return out


def _reduce_over_m(kernel, args: tuple, M: int, programs: int, out_shape: tuple, x: torch.Tensor,
                   **meta) -> torch.Tensor:
    """Launch a reduction over the M tokens as `programs` x splits programs, each writing float32 partial sums
    of its split into part (splits, *out_shape), and add the partials in order (deterministic). ~2 programs per
    SM in all; every split holds whole token blocks."""
    target = 2 * _sm_count(x.device)
    bt = meta["BT"]
    splits = max(1, min(cdiv(target, programs), cdiv(M, bt)))
    rows = cdiv(cdiv(M, splits), bt) * bt
    part = torch.empty((cdiv(M, rows), *out_shape), device=x.device, dtype=torch.float32)
    kernel[(programs, part.shape[0])](
        *args, part, rows, part.stride(0), part.stride(1),
        DOT_PRECISION=_dot_precision(x.dtype), num_warps=4, num_stages=1 if triton_interpret() else 2, **meta,
    )
    return part.sum(0)


def grad_outer(g: torch.Tensor, x: torch.Tensor, n1: int, k1: int, RX: torch.Tensor,
               RG: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(T, n1, k1) float32 = sum_m H_m P_m^T with G_m = g_m as (n1, n2), X_m = x_m as (k1, k2),
    P_m = X_m RX_t^T (RX: (T, NC, k2)) and H_m = G_m RG_t^T (RG: (T, NC, n2)) or G_m (NC = n2)."""
    T, NC, k2 = RX.shape
    n2 = g.shape[1] // n1
    bi1, bj1, left_dot = _left_tiles(n1, k1, 64)
    bc = max(16, _pow2(NC, 64))
    bt, bi1 = _token_block(bi1, bj1, left_dot, bc)
    n_i1, n_j1 = cdiv(n1, bi1), cdiv(k1, bj1)
    rg = RG if RG is not None else RX
    args = (g, x, rg, RX, x.shape[0], n1, k1, n2, k2, NC, n_i1, n_j1,
            g.stride(0), g.stride(1), x.stride(0), x.stride(1), *rg.stride(), *RX.stride())
    return _reduce_over_m(krona_grad_outer_kernel, args, x.shape[0], T * n_i1 * n_j1, (T, n1, k1), x,
                          HAS_RG=RG is not None, LEFT_DOT=left_dot, BT=bt, BI1=bi1, BJ1=bj1, BC=bc,
                          BK=max(16, _pow2(max(k2, n2), 64)))


def grad_inner(g: torch.Tensor, x: torch.Tensor, A: torch.Tensor, n2: int, RX: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
    """(T, n2, NC) float32 = sum_m G_m^T V_m with G_m = g_m as (n1, n2), X_m = x_m as (k1, k2), A: (T, n1, k1)
    and V_m = A_t X_m RX_t^T (RX: (T, NC, k2)) or A_t X_m (NC = k2)."""
    T, n1, k1 = A.shape
    k2 = x.shape[1] // k1
    NC = RX.shape[1] if RX is not None else k2
    bi1, bj1, left_dot = _left_tiles(n1, k1, 64)
    bi2, bc = max(16, _pow2(n2, 64)), max(16, _pow2(NC, 64))
    bt, bi1 = _token_block(bi1, bj1, left_dot, max(bi2, bc))
    n_i2, n_c = cdiv(n2, bi2), cdiv(NC, bc)
    rx = RX if RX is not None else A
    args = (g, x, A, rx, x.shape[0], n1, k1, n2, k2, NC, n_i2, n_c,
            g.stride(0), g.stride(1), x.stride(0), x.stride(1), *A.stride(), *rx.stride())
    return _reduce_over_m(krona_grad_inner_kernel, args, x.shape[0], T * n_i2 * n_c, (T, n2, NC), x,
                          HAS_RX=RX is not None, LEFT_DOT=left_dot, BT=bt, BI1=bi1, BJ1=bj1, BI2=bi2, BC=bc,
                          BK=max(16, _pow2(k2, 64)))


def whole_factors_fit(n1: int, k1: int, n2: int, k2: int, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether one program holds a dense term's whole factors (krona_grad_fused_kernel, krona_term_whole_kernel):
    every factor dimension padded to 16..128 (..64 in float32, whose operands take twice the shared memory), so
    that both factors, both gradients' accumulators and a token's G and X fit."""
    top = 64 if dtype == torch.float32 else 128
    return all(16 <= _pow2(d, 256) <= top for d in (n1, k1, n2, k2))


def _fused_config(n1: int, k1: int, n2: int, k2: int) -> dict:
    """Tokens per step, warps, stages and programs an SM of krona_grad_fused_kernel, measured on an H200
    (NOTES-krona.md): one token a step (two: 3-6x slower); 3 stages (64 x 64: 73 against 96 us at 2; 4 stages ran
    out of shared memory at the 11008 shapes); 4 warps and 2 programs an SM at 64 x 64 (72.5 us; 8 warps 95), 8 warps
    and 1 program an SM from 64 x 128 operands up (86x64 beside 128x64: 130 against 142 us at 2; 4 warps: 740)."""
    bn1, bk1, bn2, bk2 = (_pow2(d, 128) for d in (n1, k1, n2, k2))
    big = max(bn1 * bk2, bk1 * bk2, bn1 * bk1, bn2 * bk2) > 64 * 64
    return dict(BT=1, BN1=bn1, BK1=bk1, BN2=bn2, BK2=bk2, num_warps=8 if big else 4,
                num_stages=1 if triton_interpret() else 3, programs_per_sm=1 if big else 2)


def fused_tma_fits(cfg: dict, write_dx: bool) -> bool:
    """Whether krona_grad_fused_kernel takes its token blocks by TMA at this config. Not with the dx term's store beside
    a 128 x 128 block of x (64x86 beside 64x128): at 3 stages that needs 232 KB of shared memory (compile_report.py),
    more than an SM has, and at 2 stages it ran 259 us against plain loads' 201 on an H200 (NOTES-krona.md)."""
    return not (write_dx and cfg["BK1"] * cfg["BK2"] > 64 * 64)


def grad_fused(g: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
               want_dx: bool, config: Optional[dict] = None, programs_per_sm: Optional[int] = None):
    """(dx term (M, K) or None, dA (T, n1, k1) float32 unscaled, dB (T, n2, k2) float32 unscaled) of a dense sum
    in one pass over dy and x (krona_grad_fused_kernel). The dx term, s sum_t vec(A_t^T G B_t), only for one term
    (several would need their sum in one program); dA and dB are float32 partial sums over M splits, added in order."""
    M = x.shape[0]
    T, n1, k1 = A.shape
    n2, k2 = B.shape[1:]
    cfg = dict(config or _fused_config(n1, k1, n2, k2))
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    per_sm = cfg.pop("programs_per_sm", 2)
    programs_per_sm = programs_per_sm or per_sm
    write_dx = want_dx and T == 1
    bt = cfg["BT"]
    splits = max(1, min(cdiv(programs_per_sm * _sm_count(x.device), T), cdiv(M, bt)))
    rows = cdiv(cdiv(M, splits), bt) * bt
    splits = cdiv(M, rows)
    part_a = torch.empty((splits, T, n1, k1), device=x.device, dtype=torch.float32)
    part_b = torch.empty((splits, T, n2, k2), device=x.device, dtype=torch.float32)
    dx = torch.empty((M, k1 * k2), device=x.device, dtype=x.dtype) if write_dx else part_a
    descs = None
    if bt == 1 and g.dtype == x.dtype and fused_tma_fits(cfg, write_dx):
        descs = (_token_desc(g, n1, n2, cfg["BN1"], cfg["BN2"]), _token_desc(x, k1, k2, cfg["BK1"], cfg["BK2"]),
                 _token_desc(dx, k1, k2, cfg["BK1"], cfg["BK2"]) if write_dx else dx)
        descs = None if any(d is None for d in descs) else descs
    g_arg, x_arg, dx_arg = descs or (g, x, dx)
    launch(krona_grad_fused_kernel, (T, splits),
        g_arg, x_arg, A, B, dx_arg, part_a, part_b,
        M, n1, k1, n2, k2, rows,
        g.stride(0), g.stride(1), x.stride(0), x.stride(1), *A.stride(), *B.stride(),
        dx.stride(0) if write_dx else 0, dx.stride(1) if write_dx else 0,
        part_a.stride(0), part_a.stride(1), part_b.stride(0), part_b.stride(1),
        float(scaling),
        WRITE_DX=write_dx, DOT_PRECISION=_dot_precision(x.dtype), TMA=descs is not None, num_warps=num_warps,
        num_stages=num_stages, **cfg,
    )
    return (dx if write_dx else None), part_a.sum(0), part_b.sum(0)


# ------------------------------------------------------------------------------------------- the op


def _b_operands(A: torch.Tensor, b: torch.Tensor, b2: Optional[torch.Tensor], factored: Optional[bool]):
    """(B, Ba): the dense B and None, or for a low-rank B kept factored Bb = b2 and Ba = b. `factored` forces
    the choice (tests); None takes use_lowrank_b's."""
    if factored is None and b2 is not None:
        factored = use_lowrank_b(A.shape[1], A.shape[2], b.shape[1], b2.shape[2], b.shape[2])
    if b2 is not None and factored:
        return b2, b
    return krona_dense_factor(b, b2), None


def krona_forward(x, weight, a, a2, b, b2, scaling, bias, mode: Optional[str] = None,
                  factored_b: Optional[bool] = None):
    """y = x W^T + b + s sum_t (A_t (x) B_t) x, with cuBLAS for x W^T.

    mode "cublas-beta" (default): the term kernel writes C = s term + b, then cuBLAS adds x W^T into C as its
    beta = 1 input, so y is written once by each; "cublas-add": y = F.linear(x, W, b), then the term kernel adds
    into y in place (the same passes; kept to measure against). factored_b: see _b_operands.
    """
    A = krona_dense_factor(a, a2)
    B, Ba = _b_operands(A, b, b2, factored_b)
    if mode == "cublas-add":
        y = torch.nn.functional.linear(x, weight, bias)
        return kron_term(x, A, B, Ba, scaling, out=y)
    return kron_term(x, A, B, Ba, scaling, bias).addmm_(x, weight.t())


def krona_backward(grad_y, x, weight, a, a2, b, b2, scaling, needs, factored_b: Optional[bool] = None):
    """(dx, da, da2, db, db2, dbias, dweight) as in reference.krona_backward.

    A dense B whose factors fit krona_grad_fused_kernel (every dimension 16..128: PEFT's 64 x 64, 86 x 128): dA, dB
    and, for one term, the dx term in one pass over dy and x (FUSED_GRAD; PEFTKERN_KRONA_FUSED_GRAD=0 turns it off).
    Otherwise:
    dx: the term kernel on dy with A^T and B^T (C), then cuBLAS C += dy W; dA: one reduction over M reading x and
    dy; dB (or dBa and dBb of a factored B): one reduction each. Factor gradients come back in their own dtypes.
    """
    need_x, need_a, need_a2, need_b, need_b2, need_bias, need_w = needs
    A = krona_dense_factor(a, a2)
    B, Ba = _b_operands(A, b, b2, factored_b)
    n1, k1 = A.shape[1:]
    n2 = Ba.shape[1] if Ba is not None else B.shape[1]
    dx = da = da2 = db = db2 = dbias = dw = None
    At = A.transpose(1, 2)
    fused = FUSED_GRAD[0] and Ba is None and (need_a or need_a2 or need_b or need_b2) and whole_factors_fit(
        n1, k1, n2, B.shape[2], x.dtype)
    if fused:
        term, dA, dB = grad_fused(grad_y, x, A, B, scaling, need_x)
        if need_x:
            if term is None:
                term = kron_term(grad_y, At, B.transpose(1, 2), None, scaling)
            dx = term.addmm_(grad_y, weight)
        da, da2 = krona_lowrank_grads(dA.mul_(scaling), a, a2, need_a, need_a2)
        db, db2 = krona_lowrank_grads(dB.mul_(scaling), b, b2, need_b, need_b2)
        need_x = need_a = need_a2 = need_b = need_b2 = False
    if need_x:
        if Ba is None:
            term = kron_term(grad_y, At, B.transpose(1, 2), None, scaling)
        else:
            term = kron_term(grad_y, At, Ba.transpose(1, 2), B.transpose(1, 2), scaling)
        dx = term.addmm_(grad_y, weight)
    if need_a or need_a2:
        if Ba is None:
            dA = grad_outer(grad_y, x, n1, k1, B)
        else:
            dA = grad_outer(grad_y, x, n1, k1, B, RG=Ba.transpose(1, 2))
        da, da2 = krona_lowrank_grads(dA.mul_(scaling), a, a2, need_a, need_a2)
    if Ba is not None:
        db = grad_inner(grad_y, x, A, n2, RX=B).mul_(scaling).to(b.dtype) if need_b else None
        if need_b2:
            db2 = grad_inner(x, grad_y, At, B.shape[2], RX=Ba.transpose(1, 2)).mul_(scaling)
            db2 = db2.transpose(1, 2).to(b2.dtype)
    elif need_b or need_b2:
        db, db2 = krona_lowrank_grads(grad_inner(grad_y, x, A, n2).mul_(scaling), b, b2, need_b, need_b2)
    if need_bias:
        dbias = grad_y.sum(0, dtype=torch.float32)
    if need_w:
        dw = (grad_y.t() @ x).float()
    return dx, da, da2, db, db2, dbias, dw


def krona_merge_(weight, a, a2, b, b2, scaling, sign):
    """weight += sign * scaling * sum_t A_t (x) B_t in place (weight (N, K))."""
    A, B = krona_dense_factor(a, a2), krona_dense_factor(b, b2)
    N, K = weight.shape
    T, n2, k2 = B.shape
    block_n, block_k = (16, 32) if triton_interpret() else (64, 64)
    krona_merge_kernel[(cdiv(N, block_n), cdiv(K, block_k))](
        weight, A, B, N, K, n2, k2, T,
        weight.stride(0), weight.stride(1), *A.stride(), *B.stride(),
        float(sign * scaling), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return weight

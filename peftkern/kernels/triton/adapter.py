"""Bottleneck adapters in Triton: both skinny GEMMs of a row block in one kernel, the adds in their epilogue.

Math (h: M x d, Wd: b x d, Wu: d x b, s = scaling [* learned scale], r = h (sequential) or a given tensor
(parallel), LN optional, applied to the adapter's input):
    forward   x = LN(h);  z = x Wd^T + bd  (M x b, saved, fp32);  out = r + s (act(z) Wu^T + bu)
    backward  g = dout;  dz = s act'(z) * (g Wu);  dx = dz Wd;  dh = LN'(dx) [+ g if r = h]
              dWu = s g^T act(z)  dbu = s sum_m g  dWd = dz^T x  dbd = sum_m dz  (dr = g, no work)

Floor (bf16, M = 8192, d = 4096, b = d/16 = 256): an activation pass is M d 2 B = 64 MiB (~22 us at 3 TB/s).
The memory floor reads h and writes out (forward), reads g, writes dh and reads h once more for dWd (backward):
5 passes, 320 MiB, ~110 us. The FLOPs are 2 M d b = 17.2 GFLOP per skinny GEMM, 2 forward and 4 backward:
103 GFLOP, ~104 us at the H100's dense bf16 peak. So once fused the op is as much compute- as memory-bound
(256 FLOP per byte of h and out against a ridge near 300), and the kernels must keep the tensor cores busy
while they stream: a pass saved is worth little if the GEMMs run at half speed.

Kernels (one row block of BLOCK_M rows per program; both loop over d):
  * `adapter_fwd_kernel`: loop 1 accumulates z = h Wd^T (BLOCK_M x b, fp32, in registers) over d, with the
    row sums for LN; z + bd is stored (backward needs it) and act(z) stays in registers; loop 2 walks d again
    in tiles of BLOCK_N and writes out = r + s (act(z) Wu^T + bu): h is read once from HBM and once more for
    the residual, last tiles first so that the second read finds the tiles loop 1 left in L2.
  * `adapter_bwd_kernel`: the same shape: loop 1 accumulates g Wu; dz = s act'(z) (g Wu) and a = act(z) are
    stored for the weight gradients (M x b each: small); loop 2 writes dh = dz Wd (+ LN backward) (+ g).
The weight gradients are reductions over M (g^T a and dz^T h) that cuBLAS runs at full speed with split-K;
a ones column appended to a gives sum_m g from the same product (a learned scale's gradient comes from the
kernel's float32 accumulator instead). So the backward reads g twice, h once
(plus once with LN, whose backward needs h) and writes dh once.

LN is folded into the GEMMs so that no normalised copy of h is ever written: with W' = Wd * gamma,
c1 = W' 1 and c2 = Wd beta, LN(h) Wd^T = rstd (h W'^T - mean c1) + c2, with the row statistics from a pass of
their own on GPUs (LOOP1_SUMS: summed inside a pipelined loop 1 they made its product wrong) and in loop 1 otherwise.
Float32 h sums (h - mean) W'^T instead in the Triton loop 1 (CENTRE) and centres the weight gradients' rows in
chunks: the fold's two sums cancel where a row's mean is large against its spread, and rstd multiplies what is left.
Backward: gamma * dx = dz W', mean_d(gamma dx) = dz c1 / d and mean_d(gamma dx xhat) = dz (z - c2 - bd) / d
are skinny too, and dz^T LN(h) = ((dz rstd)^T h - (dz rstd)^T mean) * gamma + (sum_m dz) beta.

Two schedules (`config`): "fused" runs each kernel once per row block (split_n > 1 recomputes loop 1 in
split_n programs that each write a part of the columns); "two_pass" runs loop 1 alone, then loop 2 on z / dz
from memory over (row block, column split) programs: one more read of h for the forward's residual, but any
M fills the GPU. `gemm_first` takes loop 1's product (h W'^T, g [Wu, bu]) from cuBLAS, which splits that
reduction (the kernels then run only loop 1's epilogue and loop 2); `wide` also runs loop 2 as a tiled GEMM of
its own (`adapter_wide_kernel`), in both directions (True) or in the backward only ("backward"); `persistent`
runs loop 2 by `adapter_wide_persistent_kernel` instead where the operands allow (persistent_tile): a persistent
GEMM with K = b in one MMA, whose weight tile stays in shared memory while each program streams a run of row blocks'
a and residual tiles by TMA. The gemm-first schedule with the persistent loop 2 is the default for 16-bit h from
1024 rows with b <= 256 (default_config, persistent_schedule). Which wins where is a measurement
(NOTES-adapter.md, scripts/explore_adapter.py, benchmarks/bench_adapter.py --explore).
Every program reads both weights whole: 2 d b 2 B = 4 MiB from L2 per row block, M / BLOCK_M times, so
BLOCK_M trades L2 traffic against the number of programs.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..._backend import triton_interpret
from ._launch import Descriptor, cdiv, launch
from .lora import _block_r, _dot_precision, _facts, _grouped_pid, _sm_count, _tma_layout, mm_float32, scaled_mm

# The persistent loop-2 kernel's bottleneck is one MMA deep (a TMA box holds at most 256 elements a dimension).
PERSISTENT_MAX_B = 256
# (BLOCK_M, BLOCK_N, warps, stages) of adapter_wide_persistent_kernel in default_config; PEFTKERN_ADAPTER_PERSISTENT=0
# keeps the tiled kernels (adapter_wide_kernel, adapter_fwd_kernel's loop 2) instead.
PERSISTENT_TILE = (64, 128, 4, 3) if os.environ.get("PEFTKERN_ADAPTER_PERSISTENT", "1") != "0" else None
# The LN backward's tile (`persistent_ln`): h's tile is a third stream, so 2 stages fit (177 KB at b = 256 with
# Triton 3.6, compile_report.py). In default_config since it was timed on an H200 (M = 8192, d = 4096, b = 256: the
# op's LN backward 328 us against 381 us with the tiled adapter_wide_kernel; NOTES-adapter.md).
PERSISTENT_LN_TILE = (64, 128, 4, 2) if PERSISTENT_TILE is not None else None
PERSISTENT_MIN_M = 1024  # rows from which default_config takes the persistent schedule at any b <= 256 (measured: 2048)
# Row sums beside loop 1's product (LN's statistics in the forward, g . bu for the learned scale's gradient in the
# backward) are taken on GPUs from passes of their own (row_stats_kernel; cuBLAS's g [Wu, bu]), not inside the loop. On
# an H200 with Triton 3.6 the loop with a loaded tile feeding both its MMA and a row sum gave a wrong product whenever
# it was pipelined (2 or 3 stages): at M = 2000, d = 4096, b = 256, LN's mean and rstd came out right and z 4.6e-2 off
# (scripts/diag_adapter_ln_loop1.py, logs/diag-adapter-ln-loop1-9d8aa48-h200.log; 1 stage and separate statistics:
# 1.5e-4, the reference's error). That was the known LN failure of NOTES-adapter.md. The interpreter never showed it.
# PEFTKERN_ADAPTER_LOOP1_SUMS=1 sums inside the loop again, to look at the failure.
LOOP1_SUMS = os.environ.get("PEFTKERN_ADAPTER_LOOP1_SUMS", "0") == "1"
ACTIVATION_IDS = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}
# float32 h under LN: the weight gradients' rows are centred this many at a time (weight_grads)
CENTRE_ROWS = 2048

# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _activation(z, ACT: tl.constexpr):
    """(act(z), act'(z)) in float32; gelu_tanh's 0.5 (1 + tanh(u)) is sigmoid(2u), so no tanh is needed."""
    if ACT == 0:
        # a NaN stays NaN as in torch.relu: plain tl.maximum is max.f32 on the GPU, which returns the 0 beside a NaN
        return tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL), (z > 0).to(tl.float32)
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        return z * cdf, cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACT == 2:
        sig = tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))
        du = 0.7978845608028654 * (1.0 + 0.134145 * z * z)
        return z * sig, sig + 2.0 * z * sig * (1.0 - sig) * du
    else:
        sig = tl.sigmoid(z)
        return z * sig, sig * (1.0 + z * (1.0 - sig))


@triton.jit
def _row_block(M, BLOCK_M: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    # Rows past M read row 0 rather than being masked, so the big loads stay unpredicated along M; what
    # they compute lands only in rows the stores skip.
    rows = tl.where(offs_m < M, offs_m, 0)
    return offs_m, rows


@triton.jit
def _rows_times_skinny(a_ptr, rows, stride_am, stride_ak, w_ptr, stride_wk, stride_wb, offs_b, b_mask, D, shift,
                       vec_ptr, ROW_STATS: tl.constexpr, ROW_DOT: tl.constexpr, EVEN_D: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_B: tl.constexpr, CENTRE: tl.constexpr):
    """Loop 1: (a[rows] @ w) (BLOCK_M, BLOCK_B) float32 for a (M, D) and w a (D, B) view, of (a - shift) with
    CENTRE (float32 a only: the tile is not rounded again); with ROW_STATS also the row sums of (a - shift) and of
    its squares (the LN statistics, shifted by a value of the row so that the variance does not cancel when the
    mean is large); with ROW_DOT the row sums of a * vec (D,)."""
    acc = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    sum1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sum2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
        w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_b[None, :] * stride_wb
        if EVEN_D:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs, mask=b_mask[None, :], other=0.0)
            if ROW_DOT:
                vec = tl.load(vec_ptr + offs_k).to(tl.float32)
        else:
            k_mask = offs_k < D
            a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None] & b_mask[None, :], other=0.0)
            if ROW_DOT:
                vec = tl.load(vec_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        if CENTRE:
            a = (a.to(tl.float32) - shift[:, None]).to(a.dtype)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        if ROW_DOT:
            sum1 += tl.sum(a.to(tl.float32) * vec[None, :], axis=1)
        if ROW_STATS:
            if CENTRE:
                centred = a  # shifted above
            else:
                centred = a.to(tl.float32) - shift[:, None]
            if not EVEN_D:
                centred = tl.where(k_mask[None, :], centred, 0.0)
            sum1 += tl.sum(centred, axis=1)
            sum2 += tl.sum(centred * centred, axis=1)
    return acc, sum1, sum2


@triton.jit
def _column_tile(pid_n, i, n_per_split, D, BLOCK_N: tl.constexpr):
    """The i-th column tile of this program's split, last tile first (loop 1 just read those; they are the
    ones still in L2)."""
    n_start = pid_n * n_per_split
    n_end = min(n_start + n_per_split, D)
    num_tiles = tl.cdiv(n_end - n_start, BLOCK_N)
    offs_n = n_start + (num_tiles - 1 - i) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_n, offs_n < n_end


@triton.jit
def _small_times_wide(small, w_ptr, stride_wb, stride_wn, offs_b, b_mask, offs_n, n_mask,
                      DOT_PRECISION: tl.constexpr):
    """Loop 2's product: small (BLOCK_M, BLOCK_B) @ w[:, offs_n] for w a (B, D) view."""
    w = tl.load(w_ptr + offs_b[:, None] * stride_wb + offs_n[None, :] * stride_wn,
                mask=b_mask[:, None] & n_mask[None, :], other=0.0)
    return tl.dot(small, w, input_precision=DOT_PRECISION)


@triton.jit
def _mean_rstd(sum1, sum2, shift, D, ln_eps):
    """Each row's LN mean and rstd from its sums of (h - shift) and (h - shift)^2 over D features."""
    mean_shifted = sum1 / D
    # a row holding an inf gives inf - inf: its NaN variance must stay NaN (plain tl.maximum gave 0, rstd 316, and
    # finite outputs where torch's layer_norm gives NaN)
    var = tl.maximum(sum2 / D - mean_shifted * mean_shifted, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return mean_shifted + shift, 1.0 / tl.sqrt(var + ln_eps)


@triton.jit
def row_stats_kernel(h_ptr, stats_ptr, M, D, stride_hm, stride_hd, ln_eps, EVEN_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """stats[m] = (mean, rstd) of row m of h, the sums shifted by the row's first element (LN statistics in a
    pass of their own: the `separate_stats` schedule)."""
    offs_m, rows = _row_block(M, BLOCK_M)
    shift = tl.load(h_ptr + rows * stride_hm).to(tl.float32)
    sum1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sum2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        ptrs = h_ptr + rows[:, None] * stride_hm + offs_k[None, :] * stride_hd
        if EVEN_D:
            centred = tl.load(ptrs).to(tl.float32) - shift[:, None]
        else:
            k_mask = offs_k < D
            centred = tl.where(k_mask[None, :], tl.load(ptrs, mask=k_mask[None, :], other=0.0).to(tl.float32)
                               - shift[:, None], 0.0)
        sum1 += tl.sum(centred, axis=1)
        sum2 += tl.sum(centred * centred, axis=1)
    mean, rstd = _mean_rstd(sum1, sum2, shift, D, ln_eps)
    m_mask = offs_m < M
    tl.store(stats_ptr + offs_m * 2, mean, mask=m_mask)
    tl.store(stats_ptr + offs_m * 2 + 1, rstd, mask=m_mask)


@triton.jit
def adapter_fwd_kernel(
    h_ptr, res_ptr, out_ptr, down_ptr, up_ptr, down_b_ptr, up_b_ptr, scale_ptr, z_ptr, stats_ptr, c1_ptr, c2_ptr,
    acc_ptr, a_out_ptr, M, D, B, n_per_split,
    stride_hm, stride_hd, stride_rm, stride_rd, stride_om, stride_od,
    stride_db, stride_dd, stride_ud, stride_ub, stride_acc,
    scaling, ln_eps,
    ACT: tl.constexpr, Z_GIVEN: tl.constexpr, ACC_GIVEN: tl.constexpr, UP_PROJECT: tl.constexpr,
    SEQUENTIAL: tl.constexpr,
    LAYER_NORM: tl.constexpr, STATS_GIVEN: tl.constexpr, HAS_DOWN_BIAS: tl.constexpr, HAS_UP_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
    STORE_A: tl.constexpr = False, CENTRE: tl.constexpr = False,
):
    """out[rows, this split's columns] = r + s (act(z) Wu^T + bu), z = LN(h) Wd^T + bd computed here (loop 1,
    stored by the split-0 program) or read back (Z_GIVEN); with ACC_GIVEN loop 1's product h W'^T comes from
    memory (a cuBLAS GEMM: the `gemm_first` schedule; LN then needs STATS_GIVEN). down_ptr holds W' = Wd * gamma
    under LN. STORE_A (not Z_GIVEN): the split-0 program also stores act(z) in a_out's dtype at a_out (M, B)
    row-major, the A operand of adapter_wide_persistent_kernel. CENTRE (LN, float32 h, loop 1 here): loop 1 sums
    (h - shift) W'^T, shift each row's mean (STATS_GIVEN) or its first element, and z = rstd (acc - (mean - shift)
    c1) + c2: h W'^T - mean c1 cancels where a row's mean is large against its spread, and a row whose variance is
    below ln_eps multiplies the leftover by rstd (up to 1 / sqrt(ln_eps))."""
    pid_n = tl.program_id(1)
    offs_m, rows = _row_block(M, BLOCK_M)
    m_mask = offs_m < M
    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    z_ptrs = z_ptr + offs_m[:, None] * B + offs_b[None, :]
    zb_mask = m_mask[:, None] & b_mask[None, :]
    if Z_GIVEN:
        z = tl.load(z_ptrs, mask=zb_mask, other=0.0)
    else:
        if ACC_GIVEN:
            acc = tl.load(acc_ptr + offs_m[:, None] * stride_acc + offs_b[None, :], mask=zb_mask, other=0.0)
        else:
            if CENTRE and STATS_GIVEN:
                shift = tl.load(stats_ptr + rows * 2)
            else:
                shift = tl.load(h_ptr + rows * stride_hm).to(tl.float32)
            acc, sum1, sum2 = _rows_times_skinny(h_ptr, rows, stride_hm, stride_hd, down_ptr, stride_dd, stride_db,
                                                 offs_b, b_mask, D, shift, c1_ptr, LAYER_NORM and not STATS_GIVEN,
                                                 False, EVEN_D, DOT_PRECISION, BLOCK_M, BLOCK_K, BLOCK_B, CENTRE)
        if LAYER_NORM:
            if STATS_GIVEN:
                mean = tl.load(stats_ptr + rows * 2)
                rstd = tl.load(stats_ptr + rows * 2 + 1)
            else:
                mean, rstd = _mean_rstd(sum1, sum2, shift, D, ln_eps)
            c1 = tl.load(c1_ptr + offs_b, mask=b_mask, other=0.0)
            c2 = tl.load(c2_ptr + offs_b, mask=b_mask, other=0.0)
            offset = mean - shift if CENTRE else mean  # what loop 1's product still holds of each row's mean
            z = rstd[:, None] * (acc - offset[:, None] * c1[None, :]) + c2[None, :]
            if pid_n == 0 and not STATS_GIVEN:
                tl.store(stats_ptr + offs_m * 2, mean, mask=m_mask)
                tl.store(stats_ptr + offs_m * 2 + 1, rstd, mask=m_mask)
        else:
            z = acc
        if HAS_DOWN_BIAS:
            z += tl.load(down_b_ptr + offs_b, mask=b_mask, other=0.0).to(tl.float32)[None, :]
        # padded columns are 0: the product gives inf * 0 = NaN there for a row of h that holds an inf, and the
        # up projection would spread it over the row (act(NaN) is NaN), where torch's adapter gives one inf
        z = tl.where(b_mask[None, :], z, 0.0)
        if pid_n == 0:
            tl.store(z_ptrs, z, mask=zb_mask)
            if STORE_A:
                a_st, _ = _activation(z, ACT)
                tl.store(a_out_ptr + offs_m[:, None] * B + offs_b[None, :], a_st.to(a_out_ptr.dtype.element_ty),
                         mask=zb_mask)
    if UP_PROJECT:
        dtype = out_ptr.dtype.element_ty
        # Padded bottleneck columns hold z = 0 and act(0) = 0 for every activation here: they add nothing.
        a, _ = _activation(z, ACT)
        a = a.to(dtype)
        s = scaling
        if HAS_SCALE:
            s = s * tl.load(scale_ptr).to(tl.float32)
        num_tiles = tl.cdiv(min(n_per_split, D - pid_n * n_per_split), BLOCK_N)
        for i in range(0, num_tiles):
            offs_n, n_mask = _column_tile(pid_n, i, n_per_split, D, BLOCK_N)
            u = _small_times_wide(a, up_ptr, stride_ub, stride_ud, offs_b, b_mask, offs_n, n_mask, DOT_PRECISION)
            if HAS_UP_BIAS:
                u += tl.load(up_b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            if SEQUENTIAL:
                r_ptrs = h_ptr + rows[:, None] * stride_hm + offs_n[None, :] * stride_hd
            else:
                r_ptrs = res_ptr + rows[:, None] * stride_rm + offs_n[None, :] * stride_rd
            r = tl.load(r_ptrs, mask=n_mask[None, :], other=0.0).to(tl.float32)
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_od, (r + s * u).to(dtype),
                     mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def adapter_bwd_kernel(
    g_ptr, h_ptr, dh_ptr, down_ptr, up_ptr, down_b_ptr, up_b_ptr, scale_ptr, z_ptr, stats_ptr, c1_ptr, c2_ptr,
    dz_ptr, a_ptr, r_ptr, sdot_ptr, acc_ptr,
    M, D, B, n_per_split,
    stride_gm, stride_gd, stride_hm, stride_hd, stride_dhm, stride_dhd,
    stride_db, stride_dd, stride_ud, stride_ub, stride_am, stride_acc,
    scaling,
    ACT: tl.constexpr, DZ_GIVEN: tl.constexpr, ACC_GIVEN: tl.constexpr, WRITE_DH: tl.constexpr,
    SEQUENTIAL: tl.constexpr,
    LAYER_NORM: tl.constexpr, HAS_DOWN_BIAS: tl.constexpr, HAS_UP_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    SCALE_GRAD: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Loop 1 (unless DZ_GIVEN): dz = s act'(z) (g Wu), stored with a = act(z) (for dWu, dWd) and, under LN,
    r = (dz c1 / d, dz (z - c2 - bd) / d) by the split-0 program; with SCALE_GRAD also each row's
    sum(g * u) = a . (g Wu) + g . bu in float32 (the learned scale's gradient, from the fp32 accumulator: a
    scalar summed over M d terms would lose too much through a rounded g^T a). Loop 2 (WRITE_DH): dh = dz W'
    [LN backward] [+ g] for this split's columns. With ACC_GIVEN loop 1's product comes from memory: g [Wu, bu]
    (a cuBLAS GEMM, the `gemm_first` schedule; its column B holds g . bu when SCALE_GRAD and HAS_UP_BIAS)."""
    pid_n = tl.program_id(1)
    offs_m, rows = _row_block(M, BLOCK_M)
    m_mask = offs_m < M
    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    zb_mask = m_mask[:, None] & b_mask[None, :]
    dz_ptrs = dz_ptr + offs_m[:, None] * B + offs_b[None, :]
    dtype = dz_ptr.dtype.element_ty
    if DZ_GIVEN:
        dz = tl.load(dz_ptrs, mask=zb_mask, other=0.0).to(tl.float32)
        if LAYER_NORM:
            r1 = tl.load(r_ptr + offs_m * 2, mask=m_mask, other=0.0)
            r2 = tl.load(r_ptr + offs_m * 2 + 1, mask=m_mask, other=0.0)
    else:
        if ACC_GIVEN:
            gu = tl.load(acc_ptr + offs_m[:, None] * stride_acc + offs_b[None, :], mask=zb_mask, other=0.0)
            if SCALE_GRAD and HAS_UP_BIAS:
                g_dot_bu = tl.load(acc_ptr + offs_m * stride_acc + B, mask=m_mask, other=0.0)
            else:
                g_dot_bu = tl.zeros((BLOCK_M,), dtype=tl.float32)
        else:
            gu, g_dot_bu, _ = _rows_times_skinny(g_ptr, rows, stride_gm, stride_gd, up_ptr, stride_ud, stride_ub,
                                                 offs_b, b_mask, D, offs_m.to(tl.float32), up_b_ptr, False,
                                                 SCALE_GRAD and HAS_UP_BIAS, EVEN_D, DOT_PRECISION, BLOCK_M,
                                                 BLOCK_K, BLOCK_B, False)
        z = tl.load(z_ptr + offs_m[:, None] * B + offs_b[None, :], mask=zb_mask, other=0.0)
        a, act_grad = _activation(z, ACT)
        s = scaling
        if HAS_SCALE:
            s = s * tl.load(scale_ptr).to(tl.float32)
        dz = s * act_grad * gu
        if LAYER_NORM:
            c1 = tl.load(c1_ptr + offs_b, mask=b_mask, other=0.0)
            centred = z - tl.load(c2_ptr + offs_b, mask=b_mask, other=0.0)[None, :]
            if HAS_DOWN_BIAS:
                centred -= tl.load(down_b_ptr + offs_b, mask=b_mask, other=0.0).to(tl.float32)[None, :]
            # the rounded dz that loop 2's product reads: mean_d(dz W') then cancels against it exactly
            dz_r = dz.to(dtype).to(tl.float32)
            r1 = tl.sum(dz_r * c1[None, :], axis=1) / D
            # a unit with dz = 0 (ReLU's dead side) adds nothing, as in torch's LN backward: its centred z is
            # -inf - (-inf) = NaN where bd (or LN's beta, through c2) is -inf, and 0 * NaN made the row's dh NaN
            # (a NaN dz stays: NaN != 0)
            r2 = tl.sum(tl.where(b_mask[None, :] & (dz_r != 0.0), dz_r * centred, 0.0), axis=1) / D
        if pid_n == 0:
            tl.store(dz_ptrs, dz.to(dtype), mask=zb_mask)
            tl.store(a_ptr + offs_m[:, None] * stride_am + offs_b[None, :], a.to(dtype), mask=zb_mask)
            # a's row is [act(z), 1, 0, ...] up to its stride: the ones column gives sum_m g from dWu's product
            pad = tl.arange(0, 8)[None, :]
            tl.store(a_ptr + offs_m[:, None] * stride_am + B + pad, tl.where(pad == 0, 1.0, 0.0).to(dtype)
                     + tl.zeros((BLOCK_M, 8), dtype), mask=m_mask[:, None] & (B + pad < stride_am))
            if LAYER_NORM:
                tl.store(r_ptr + offs_m * 2, r1, mask=m_mask)
                tl.store(r_ptr + offs_m * 2 + 1, r2, mask=m_mask)
            if SCALE_GRAD:
                tl.store(sdot_ptr + offs_m, tl.sum(a * gu, axis=1) + g_dot_bu, mask=m_mask)
    if WRITE_DH:
        dz_small = dz.to(dtype)
        if LAYER_NORM:
            mean = tl.load(stats_ptr + rows * 2)
            rstd = tl.load(stats_ptr + rows * 2 + 1)
        num_tiles = tl.cdiv(min(n_per_split, D - pid_n * n_per_split), BLOCK_N)
        for i in range(0, num_tiles):
            offs_n, n_mask = _column_tile(pid_n, i, n_per_split, D, BLOCK_N)
            dx = _small_times_wide(dz_small, down_ptr, stride_db, stride_dd, offs_b, b_mask, offs_n, n_mask,
                                   DOT_PRECISION)
            if LAYER_NORM:
                x = tl.load(h_ptr + rows[:, None] * stride_hm + offs_n[None, :] * stride_hd, mask=n_mask[None, :],
                            other=0.0).to(tl.float32)
                xhat = (x - mean[:, None]) * rstd[:, None]
                dx = rstd[:, None] * (dx - r1[:, None] - xhat * r2[:, None])
            if SEQUENTIAL:
                dx += tl.load(g_ptr + rows[:, None] * stride_gm + offs_n[None, :] * stride_gd, mask=n_mask[None, :],
                              other=0.0).to(tl.float32)
            tl.store(dh_ptr + offs_m[:, None] * stride_dhm + offs_n[None, :] * stride_dhd,
                     dx.to(dh_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def adapter_wide_kernel(
    small_ptr, w_ptr, res_ptr, h_ptr, out_ptr, bias_ptr, scale_ptr, stats_ptr, r_ptr,
    M, D, B,
    stride_sm, stride_wb, stride_wn, stride_rm, stride_rd, stride_hm, stride_hd, stride_om, stride_od,
    scaling,
    ACT: tl.constexpr, APPLY_ACT: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr, LN_BACKWARD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Loop 2 as a GEMM of its own, one (BLOCK_M, BLOCK_N) output tile per program (the `wide` schedule):
    out = [r +] epilogue(act?(small) @ w) with small (M, B) from memory and w a (B, D) view; K = B is short, so
    the tile's big operands (r, and h for the LN backward) are loaded before the loop and arrive while the
    MMAs run, and the many programs per SM overlap one tile's stores with another's loads.
      forward:  small = z (float32, APPLY_ACT), w = Wu^T, out = r + s (act(z) Wu^T + bu);
      backward: small = dz, w = W', out = [LN backward of] dz W' [+ g]."""
    pid_m, pid_n = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(D, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Masks rather than clamped indices: offsets straight from tl.arange keep their contiguity, so the big
    # loads and the store stay 16 bytes wide (a tl.where on the column index made them scalar).
    m_mask = offs_m < M
    n_mask = offs_n < D
    mn_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RES:
        res = tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rd, mask=mn_mask, other=0.0)
    if LN_BACKWARD:
        x = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_n[None, :] * stride_hd, mask=mn_mask, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, B, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < B
        a = tl.load(small_ptr + offs_m[:, None] * stride_sm + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        if APPLY_ACT:
            a, _ = _activation(a.to(tl.float32), ACT)  # act(0) = 0: the masked columns add nothing
        w = tl.load(w_ptr + offs_k[:, None] * stride_wb + offs_n[None, :] * stride_wn,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
    if LN_BACKWARD:
        mean = tl.load(stats_ptr + offs_m * 2, mask=m_mask, other=0.0)
        rstd = tl.load(stats_ptr + offs_m * 2 + 1, mask=m_mask, other=0.0)
        r1 = tl.load(r_ptr + offs_m * 2, mask=m_mask, other=0.0)
        r2 = tl.load(r_ptr + offs_m * 2 + 1, mask=m_mask, other=0.0)
        xhat = (x.to(tl.float32) - mean[:, None]) * rstd[:, None]
        acc = rstd[:, None] * (acc - r1[:, None] - xhat * r2[:, None])
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    s = scaling
    if HAS_SCALE:
        s = s * tl.load(scale_ptr).to(tl.float32)
    acc = acc * s
    if HAS_RES:
        acc += res.to(tl.float32)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_od, acc.to(out_ptr.dtype.element_ty),
             mask=mn_mask)


@triton.jit
def adapter_wide_persistent_kernel(
    a_desc, w_desc, r_desc, y_desc, bias_ptr, scale_ptr, x_desc, stats_ptr, rr_ptr,
    M, D, scaling, NUM_SMS,
    W_KMAJOR: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, STAGES: tl.constexpr,
    LN_BACKWARD: tl.constexpr = False,
):
    """Loop 2 as a persistent GEMM whose weight tile stays put: y = [r +] s (a @ w + bias), a (M, B) in y's dtype,
    w a (B, D) operand given as (D, B) K-major (W_KMAJOR: Wu as stored) or as (B, D) (Wd as stored), B <= BLOCK_B
    (one MMA of the whole bottleneck per tile).
    The output tiles are walked column block by column block, rows fastest, and each program takes a contiguous
    run of NUM_SMS-th of them: its run crosses a column boundary at most a few times, so the (BLOCK_B, BLOCK_N)
    weight tile is loaded once per column block and the inner loop over row blocks holds only a's tile and the
    residual's, both by TMA. They are unconditional loads of a plain loop, so the pipeliner keeps STAGES - 1 row
    blocks of them in flight while this one's MMA and store run: the residual's read overlaps the rest, which is
    what a K = B GEMM's epilogue needs (adapter_wide_kernel loads it once per tile and waits).
    LN_BACKWARD (the backward's dh under LN, a = dz, w = W'): the tile becomes rstd (acc - r1 - xhat r2) before the
    residual, as in adapter_wide_kernel, with h's tile (x_desc) a third TMA stream and each row's (mean, rstd) and
    (r1, r2) from stats_ptr and rr_ptr ((M, 2) float32 each)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    total = num_m * tl.cdiv(D, BLOCK_N)
    t = (pid * total) // NUM_SMS
    hi = ((pid + 1) * total) // NUM_SMS
    s = scaling
    if HAS_SCALE:
        s = s * tl.load(scale_ptr).to(tl.float32)
    while t < hi:
        col = t // num_m
        row0 = t - col * num_m
        rows = min(num_m - row0, hi - t)
        off_n = col * BLOCK_N
        if W_KMAJOR:
            w = w_desc.load([off_n, 0]).T
        else:
            w = w_desc.load([0, off_n])
        if HAS_BIAS:
            cols = off_n + tl.arange(0, BLOCK_N)
            bias = tl.load(bias_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        for i in tl.range(0, rows, num_stages=STAGES):
            off_m = (row0 + i) * BLOCK_M
            acc = tl.dot(a_desc.load([off_m, 0]), w)
            if LN_BACKWARD:
                m_idx = off_m + tl.arange(0, BLOCK_M)
                in_m = m_idx < M
                mean = tl.load(stats_ptr + m_idx * 2, mask=in_m, other=0.0)
                rstd = tl.load(stats_ptr + m_idx * 2 + 1, mask=in_m, other=0.0)
                r1 = tl.load(rr_ptr + m_idx * 2, mask=in_m, other=0.0)
                r2 = tl.load(rr_ptr + m_idx * 2 + 1, mask=in_m, other=0.0)
                xhat = (x_desc.load([off_m, off_n]).to(tl.float32) - mean[:, None]) * rstd[:, None]
                acc = rstd[:, None] * (acc - r1[:, None] - xhat * r2[:, None])
            if HAS_BIAS:
                acc += bias[None, :]
            acc = acc * s
            if HAS_RES:
                acc += r_desc.load([off_m, off_n]).to(tl.float32)
            y_desc.store([off_m, off_n], acc.to(y_desc.dtype))
        t += rows


# ------------------------------------------------------------------------------------------- launchers


def default_config(M: int, D: int, B: int, device: torch.device, dtype: Optional[torch.dtype] = None) -> dict:
    """Tiles and schedule for both kernels (measured on an H100 where it says so: NOTES-adapter.md).

    The BLOCK_M x b float32 accumulator lives in registers: 64 x 256 is 128 registers a thread over 4 warps
    (one warpgroup), so b = 256 takes BLOCK_M = 64; narrower bottlenecks take 128 rows and 8 warps, which
    halves the L2 traffic of the weights. BLOCK_N = 64 keeps loop 2's pipelined Wu tiles (b x BLOCK_N) in
    shared memory beside loop 1's. While the row blocks fill at least half the SMs the fused schedule runs;
    below that the two-pass schedule splits loop 2's columns to fill the GPU.
    """
    if triton_interpret():
        return dict(block_m=16, block_k=32, block_n=32, warps=4, stages=1, split_n=1, two_pass=False)
    block_b = _block_r(B)
    block_m, warps = (128, 8) if block_b <= 128 else (64, 4)
    n_rows = cdiv(M, block_m)
    sms = _sm_count(device)
    # 16-bit only: with float32 (tf32) tiles this schedule asked for 272 KB of shared memory on an H100 (the
    # GPU test at M = 4300, d = 512); float32 keeps the 64-row fused schedule below, tested at that size.
    sixteen_bit = dtype is None or dtype in (torch.float16, torch.bfloat16)
    if block_b > 128 and cdiv(M, 128) * 2 * 2 >= sms and sixteen_bit:
        # Measured on an H100 (bf16, d=4096, b=256, relu, scripts/explore_adapter.py, results/logs/explore-adapter-
        # wide-h100.log): the forward with loop 1's product from cuBLAS and the rest in one kernel of 128 rows
        # x 2 column splits, 132 us at M = 8192 (the all-Triton fused schedule: 153 us); the backward with
        # g Wu from cuBLAS and dh = dz W' as a tiled GEMM (adapter_wide_kernel, 128x128x64, 4 warps), 246 us
        # (fused: 283 us). M = 16384: 261 + 444 us against 313 + 547 us.
        # persistent: where the operands allow (persistent_tile), loop 2 of both directions (the LN backward's too,
        # at 2 stages: persistent_ln) by adapter_wide_persistent_kernel instead, 64 x 128 tiles, 4 warps, 3 stages
        # (213 KB of shared memory).
        return _gemm_first_config(2)
    if persistent_schedule(M, D, B, dtype):
        # Measured on an H200 (bf16, relu, sequential, explore_adapter.py --quick, NOTES-adapter.md, 2026-12-04): the
        # gemm-first schedule with the persistent loop 2 against this function's earlier picks, forward / backward:
        # M = 2048, d = 4096, b = 256: 33 / 72 us against two-pass 69 / 108; M = 8192, d = 2048, b = 128: 43 / 98 us
        # against fused 59 / 114. The column splits serve the LN backward's tiled kernel and operands that
        # persistent_tile refuses.
        return _gemm_first_config(max(2, min(cdiv(2 * sms, cdiv(M, 128)), cdiv(D, 64))))
    if 2 * n_rows >= sms:
        return dict(block_m=block_m, block_k=64, block_n=64, warps=warps, stages=3, split_n=1, two_pass=False)
    split = max(1, min(cdiv(2 * sms, n_rows), cdiv(D, 64)))
    return dict(block_m=block_m, block_k=64, block_n=64, warps=warps, stages=3, split_n=split, two_pass=True)


def _gemm_first_config(split: int) -> dict:
    """default_config's gemm-first schedule: loop 1's product by cuBLAS, loop 2 by the persistent kernel where
    persistent_tile allows, else in split column splits (forward) and by the tiled wide kernel (backward)."""
    return dict(block_m=128, block_k=64, block_n=64, warps=8, stages=3, split_n=split, two_pass=False,
                gemm_first=True, wide="backward", wide_tile=(128, 128, 64, 4, 3), persistent=PERSISTENT_TILE,
                persistent_ln=PERSISTENT_LN_TILE)


def _persistent_operands_ok(dtype: Optional[torch.dtype], B: int, D: int) -> bool:
    """What adapter_wide_persistent_kernel needs of the dtype and sizes: 16 bits, B a multiple of 8 (a's and the
    weight's rows 16-byte lines) and at most PERSISTENT_MAX_B, d a multiple of 8."""
    return dtype in (torch.float16, torch.bfloat16) and B % 8 == 0 and B <= PERSISTENT_MAX_B and D % 8 == 0


def persistent_schedule(M: int, D: int, B: int, dtype: Optional[torch.dtype]) -> bool:
    """Whether default_config (on a GPU) takes the gemm-first schedule with the persistent loop 2 for shapes it
    would otherwise give the fused or two-pass schedule: 16-bit, from PERSISTENT_MIN_M rows, b and d as
    persistent_tile needs them. (Large M at b > 128 takes that schedule anyway.) Under it LN's statistics come
    from a pass of their own and loop 1's product from cuBLAS."""
    return (PERSISTENT_TILE is not None and M >= PERSISTENT_MIN_M and _persistent_operands_ok(dtype, B, D)
            and not triton_interpret())


def _splits(D: int, cfg: dict) -> tuple[int, int]:
    """(number of column splits, columns per split: a multiple of BLOCK_N)."""
    per_split = cdiv(cdiv(D, cfg["split_n"]), cfg["block_n"]) * cfg["block_n"]
    return cdiv(D, per_split), per_split


def fold_layer_norm(down_weight, ln_weight, ln_bias, layer_norm: bool, dtype: torch.dtype):
    """(W', c1, c2): W' = Wd * gamma in `dtype` (what the GEMMs read), c1 = W' 1 (from the rounded W', so the
    mean cancels exactly against what the GEMM summed) and c2 = Wd beta, both float32. Without LN: (Wd, None,
    None) in `dtype`."""
    if not layer_norm:
        return down_weight.to(dtype), None, None
    w = down_weight.float()
    folded = (w * ln_weight.float()[None, :] if ln_weight is not None else w).to(dtype)
    c1 = folded.float().sum(1)
    c2 = w @ ln_bias.float() if ln_bias is not None else torch.zeros_like(c1)
    return folded, c1, c2


def _common_meta(h: torch.Tensor, D: int, B: int, cfg: dict, activation: str) -> dict:
    return dict(ACT=ACTIVATION_IDS[activation], EVEN_D=D % cfg["block_k"] == 0,
                DOT_PRECISION=_dot_precision(h.dtype), BLOCK_M=cfg["block_m"], BLOCK_K=cfg["block_k"],
                BLOCK_N=cfg["block_n"], BLOCK_B=_block_r(B), num_warps=cfg["warps"], num_stages=cfg["stages"])


def _launch_wide(small, w_bd, res, h, out, bias, scale, stats, r, scaling, activation, apply_act, ln_backward, cfg):
    """adapter_wide_kernel over out (M, D): small (M, B), w_bd a (B, D) view; res / bias / scale / LN operands
    where given (None: not used)."""
    M, D = out.shape
    B = small.shape[1]
    bm, bn, bk, warps, stages = cfg.get("wide_tile", (128, 128, 64, 8, 3))
    dummy = out
    res_arg = res if res is not None else dummy
    h_arg = h if h is not None else dummy
    grid = (cdiv(M, bm) * cdiv(D, bn),)
    launch(adapter_wide_kernel, grid,
        small, w_bd, res_arg, h_arg, out, bias if bias is not None else dummy, scale if scale is not None else dummy,
        stats if stats is not None else dummy, r if r is not None else dummy,
        M, D, B,
        small.stride(0), w_bd.stride(0), w_bd.stride(1), res_arg.stride(0), res_arg.stride(1),
        h_arg.stride(0), h_arg.stride(1), out.stride(0), out.stride(1),
        float(scaling),
        ACT=ACTIVATION_IDS[activation], APPLY_ACT=apply_act, HAS_RES=res is not None, HAS_BIAS=bias is not None,
        HAS_SCALE=scale is not None, LN_BACKWARD=ln_backward, DOT_PRECISION=_dot_precision(out.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=min(bk, max(16, triton.next_power_of_2(B))), GROUP_M=8,
        num_warps=warps, num_stages=stages)


def persistent_tile(cfg: dict, small_dtype: torch.dtype, B: int, D: int, res: Optional[torch.Tensor],
                    w_bd: torch.Tensor, ln_h: Optional[torch.Tensor] = None) -> Optional[tuple]:
    """cfg's `persistent` tile (BLOCK_M, BLOCK_N, warps, stages[, programs]) where adapter_wide_persistent_kernel
    takes these operands, else None: 16-bit operands, B a multiple of 8 (a's and the weight's rows 16-byte lines)
    and at most PERSISTENT_MAX_B, d a multiple of 8, the residual row-major and TMA-able, w_bd (B, D) TMA-able
    either way, and a Hopper or newer GPU (or the interpreter). ln_h (the LN backward's h, row-major and TMA-able):
    cfg's `persistent_ln` tile instead (default_config's gemm-first schedule asks for it)."""
    tile = cfg.get("persistent" if ln_h is None else "persistent_ln")
    if ln_h is not None and (ln_h.dtype != small_dtype or _tma_layout(ln_h) != "row"):
        return None
    if tile is None or w_bd.dtype != small_dtype or not _persistent_operands_ok(small_dtype, B, D):
        return None
    if not triton_interpret() and (w_bd.device.type != "cuda" or _facts(w_bd.device)[1] < 9):
        return None
    if res is not None and (res.dtype != small_dtype or _tma_layout(res) != "row"):
        return None
    return tile if _tma_layout(w_bd) is not None else None


def _launch_wide_persistent(a, w_bd, res, out, bias, scale, scaling, tile, ln=None) -> None:
    """out = [res +] s (a @ w_bd + bias) by adapter_wide_persistent_kernel: a (M, B) row-major in out's dtype, w_bd
    a (B, D) view (Wu^T or Wd), tile from persistent_tile; ln = (h, stats, r): the LN backward's epilogue."""
    M, D = out.shape
    B = a.shape[1]
    bm, bn, warps, stages = tile[:4]
    bb = _block_r(B)
    programs = min(tile[4] if len(tile) > 4 else _sm_count(out.device), cdiv(M, bm) * cdiv(D, bn))
    w_kmajor = _tma_layout(w_bd) == "col"  # (B, D) with unit stride along B: the (D, B) matrix is row-major
    w_desc = Descriptor(w_bd.t(), [bn, bb]) if w_kmajor else Descriptor(w_bd, [bb, bn])
    y_desc = Descriptor(out, [bm, bn])
    h, stats, r = ln if ln is not None else (None, out, out)
    launch(adapter_wide_persistent_kernel, (programs,),
           Descriptor(a, [bm, bb]), w_desc, Descriptor(res, [bm, bn]) if res is not None else y_desc, y_desc,
           bias if bias is not None else out, scale if scale is not None else out,
           Descriptor(h, [bm, bn]) if h is not None else y_desc, stats, r,
           M, D, float(scaling), programs,
           W_KMAJOR=w_kmajor, HAS_RES=res is not None, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
           BLOCK_M=bm, BLOCK_N=bn, BLOCK_B=bb, STAGES=stages, LN_BACKWARD=ln is not None, num_warps=warps,
           num_stages=stages)


def adapter_forward(h, down_weight, down_bias, up_weight, up_bias, scale, residual, ln_weight, ln_bias,
                    activation, scaling, layer_norm, ln_eps, config: Optional[dict] = None):
    """(out (M, d), z (M, b) float32, stats (M, 2) float32 or empty) as in reference.adapter_forward, for a
    2-D h; the adapter tensors may have any float dtype (they are read in h's)."""
    M, D = h.shape
    B = down_weight.shape[0]
    cfg = config or default_config(M, D, B, h.device, h.dtype)
    wd, c1, c2 = fold_layer_norm(down_weight, ln_weight, ln_bias, layer_norm, h.dtype)
    wu = up_weight.to(h.dtype)
    out = torch.empty((M, D), device=h.device, dtype=h.dtype)
    z = torch.empty((M, B), device=h.device, dtype=torch.float32)
    stats = torch.empty((M, 2) if layer_norm else (0,), device=h.device, dtype=torch.float32)
    res = residual if residual is not None else h
    n_split, per_split = _splits(D, cfg)
    meta = _common_meta(h, D, B, cfg, activation)
    persistent = persistent_tile(cfg, h.dtype, B, D, res, wu.t())
    wide = cfg.get("wide", False) is True or persistent is not None  # "backward": the wide kernel in the backward only
    gemm_first = wide or cfg.get("gemm_first", False)
    stats_given = layer_norm and (gemm_first or cfg.get("separate_stats", False) or (h.is_cuda and not LOOP1_SUMS))
    flags = dict(SEQUENTIAL=residual is None, LAYER_NORM=layer_norm, STATS_GIVEN=stats_given,
                 HAS_DOWN_BIAS=down_bias is not None, HAS_UP_BIAS=up_bias is not None, HAS_SCALE=scale is not None)
    dummy = z
    if stats_given:
        # 16 rows x 512 columns a step, 8 warps: four times the programs of the 64 x 128 blocks used before (128 at
        # M = 8192, one an SM: the LN forward took 97 us more than the one without LN on an H200, 2026-12-04, for
        # this pass over h and W's fold), each with twice the bytes in flight. Interpreter: small blocks.
        bm, bk, warps = (4, 32, 4) if triton_interpret() else (16, 512, 8)
        launch(row_stats_kernel, (cdiv(M, bm),), h, stats, M, D, h.stride(0), h.stride(1), float(ln_eps),
               EVEN_D=D % bk == 0, BLOCK_M=bm, BLOCK_K=bk, num_warps=warps)
    acc = mm_float32(h, wd.t()) if gemm_first else dummy
    # float32 h: loop 1 sums the centred rows (no copy of h: a subtraction on the tile in registers). 16-bit h keeps
    # the fold: its error matched the reference's at every offset (NOTES-adapter.md), and its measured schedules
    # (cuBLAS's product) could not centre without writing a copy
    centre = layer_norm and h.dtype == torch.float32 and not gemm_first

    a_out = torch.empty((M, B), device=h.device, dtype=h.dtype) if persistent is not None else dummy

    def run_fwd(grid, z_given, up_project):
        launch(adapter_fwd_kernel, grid,
            h, res, out, wd, wu, down_bias if down_bias is not None else dummy,
            up_bias if up_bias is not None else dummy, scale if scale is not None else dummy, z, stats,
            c1 if c1 is not None else dummy, c2 if c2 is not None else dummy, acc, a_out,
            M, D, B, per_split,
            h.stride(0), h.stride(1), res.stride(0), res.stride(1), out.stride(0), out.stride(1),
            wd.stride(0), wd.stride(1), wu.stride(0), wu.stride(1), acc.stride(0),
            float(scaling), float(ln_eps), Z_GIVEN=z_given, ACC_GIVEN=gemm_first, UP_PROJECT=up_project,
            STORE_A=persistent is not None, CENTRE=centre, **flags, **meta)

    n_rows = cdiv(M, cfg["block_m"])
    if persistent is not None:
        run_fwd((n_rows, 1), False, False)  # z from cuBLAS's product: + bd, LN's correction; a = act(z) in h's dtype
        _launch_wide_persistent(a_out, wu.t(), res, out, up_bias, scale, scaling, persistent)
    elif wide:
        run_fwd((n_rows, 1), False, False)  # z from cuBLAS's product: + bd, LN's correction
        _launch_wide(z, wu.t(), res, None, out, up_bias, scale, None, None, scaling, activation, True, False, cfg)
    elif cfg["two_pass"] and not gemm_first:
        run_fwd((n_rows, 1), False, False)
        run_fwd((n_rows, n_split), True, True)
    else:
        run_fwd((n_rows, n_split), False, True)
    return out, z, stats


def adapter_backward(grad_out, h, down_weight, down_bias, up_weight, up_bias, scale, z, stats, ln_weight,
                     ln_bias, activation, scaling, sequential, layer_norm, needs, config: Optional[dict] = None):
    """(dh, dWd, dbd, dWu, dbu, dscale, dgamma, dbeta) as in reference.adapter_backward (None where not needed).

    The kernel writes dh, dz and a; the weight gradients are cuBLAS products over M: G = g^T [a, 1] gives dWu
    and sum_m g at once (the ones column), P = (dz [* rstd])^T h gives dWd (and, under LN, dgamma)."""
    need_h, need_dw, need_db, need_uw, need_ub, need_scale, need_lnw, need_lnb = needs
    M, D = h.shape
    B = z.shape[1]
    dtype = h.dtype
    cfg = config or default_config(M, D, B, h.device, h.dtype)
    wd, c1, c2 = fold_layer_norm(down_weight, ln_weight, ln_bias, layer_norm, dtype)
    wu = up_weight.to(dtype)
    dz = torch.empty((M, B), device=h.device, dtype=dtype)
    b_ext = cdiv(B + 1, 8) * 8  # a's row stride stays 16-byte aligned for cuBLAS
    a_ext = torch.empty((M, b_ext), device=h.device, dtype=dtype)  # the kernel writes its ones and zeros too
    r = torch.empty((M, 2), device=h.device, dtype=torch.float32) if layer_norm else z
    sdot = torch.empty((M,), device=h.device, dtype=torch.float32) if need_scale else z
    dh = torch.empty((M, D), device=h.device, dtype=dtype) if need_h else dz
    n_split, per_split = _splits(D, cfg)
    meta = _common_meta(h, D, B, cfg, activation)
    flags = dict(SEQUENTIAL=sequential, LAYER_NORM=layer_norm, HAS_DOWN_BIAS=down_bias is not None,
                 HAS_UP_BIAS=up_bias is not None, HAS_SCALE=scale is not None, SCALE_GRAD=need_scale)
    dummy = z
    persistent = None if not need_h else persistent_tile(cfg, dtype, B, D, grad_out if sequential else None, wd,
                                                         h if layer_norm else None)
    wide = bool(cfg.get("wide", False)) or persistent is not None
    # g . bu (the learned scale's gradient) comes from cuBLAS's product on GPUs: loop 1 does not sum rows (LOOP1_SUMS)
    row_dot = need_scale and up_bias is not None and grad_out.is_cuda and not LOOP1_SUMS
    gemm_first = wide or cfg.get("gemm_first", False) or row_dot
    acc = dummy
    if gemm_first:
        # g [Wu, bu]: the extra column gives each row's g . bu, which the learned scale's gradient needs
        wu_ext = torch.cat([wu, up_bias.to(dtype)[:, None]], 1) if need_scale and up_bias is not None else wu
        acc = mm_float32(grad_out, wu_ext)

    def run_bwd(grid, dz_given, write_dh):
        launch(adapter_bwd_kernel, grid,
            grad_out, h, dh, wd, wu, down_bias if down_bias is not None else dummy,
            up_bias if up_bias is not None else dummy, scale if scale is not None else dummy, z,
            stats if layer_norm else dummy, c1 if c1 is not None else dummy, c2 if c2 is not None else dummy,
            dz, a_ext, r, sdot, acc,
            M, D, B, per_split,
            grad_out.stride(0), grad_out.stride(1), h.stride(0), h.stride(1), dh.stride(0), dh.stride(1),
            wd.stride(0), wd.stride(1), wu.stride(0), wu.stride(1), a_ext.stride(0), acc.stride(0),
            float(scaling), DZ_GIVEN=dz_given, ACC_GIVEN=gemm_first, WRITE_DH=write_dh, **flags, **meta)

    n_rows = cdiv(M, cfg["block_m"])
    if wide:
        run_bwd((n_rows, 1), False, False)  # dz, a, the LN row terms, the scale's row sums
        if persistent is not None:  # dh = [LN backward of] dz W' [+ g]
            _launch_wide_persistent(dz, wd, grad_out if sequential else None, dh, None, None, 1.0, persistent,
                                    (h, stats, r) if layer_norm else None)
        elif need_h:
            _launch_wide(dz, wd, grad_out if sequential else None, h if layer_norm else None, dh, None, None,
                         stats if layer_norm else None, r if layer_norm else None, 1.0, activation, False,
                         layer_norm, cfg)
    elif cfg["two_pass"] and need_h and not gemm_first:
        run_bwd((n_rows, 1), False, False)
        run_bwd((n_rows, n_split), True, True)
    else:
        run_bwd((n_rows, n_split if need_h else 1), False, need_h)
    d_scale = (scaling * sdot.sum()).reshape(scale.shape).to(scale.dtype) if need_scale else None
    grads = weight_grads(grad_out, h, dz, a_ext, down_weight, down_bias, up_weight, up_bias, scale, stats,
                         ln_weight, ln_bias, scaling, layer_norm, needs[1:5] + needs[6:])
    return (dh if need_h else None, *grads[:4], d_scale, *grads[4:])


def weight_grads(grad_out, h, dz, a_ext, down_weight, down_bias, up_weight, up_bias, scale, stats, ln_weight,
                 ln_bias, scaling, layer_norm, needs):
    """(dWd, dbd, dWu, dbu, dgamma, dbeta) from dz (M, b) and a_ext = [act(z), 1, 0...] (M, b + pad): two
    products over M, the rest on b x d tensors."""
    need_dw, need_db, need_uw, need_ub, need_lnw, need_lnb = needs
    B = dz.shape[1]
    d_dw = d_db = d_uw = d_ub = d_lnw = d_lnb = None
    if need_uw or need_ub:
        if scale is None:  # s into cuBLAS's alpha, the result in the weight's dtype: no passes over it but the slices
            prod = scaled_mm(grad_out.t(), a_ext, float(scaling), up_weight.dtype)
            d_uw = prod[:, :B] if need_uw else None
            d_ub = prod[:, B].to(up_bias.dtype) if need_ub else None
        else:  # a learned scale: s is a tensor
            s = scaling * scale.float().reshape(())
            prod = mm_float32(grad_out.t(), a_ext)
            d_uw = (s * prod[:, :B]).to(up_weight.dtype) if need_uw else None
            d_ub = (s * prod[:, B]).to(up_bias.dtype) if need_ub else None
    dz_sum = dz.sum(0, dtype=torch.float32) if (need_db or layer_norm) else None
    d_db = dz_sum.to(down_bias.dtype) if need_db else None
    if not (need_dw or need_lnw or need_lnb):
        return d_dw, d_db, d_uw, d_ub, d_lnw, d_lnb
    if not layer_norm:
        return scaled_mm(dz.t(), h, 1.0, down_weight.dtype), d_db, d_uw, d_ub, d_lnw, d_lnb
    mean, rstd = stats[:, 0], stats[:, 1]
    dz_r = (dz.float() * rstd[:, None]).to(h.dtype)
    # dz^T xhat = (dz rstd)^T h - (dz rstd)^T mean: the product runs on h itself, never on a normalised copy. The two
    # sums cancel where a row's mean is large against its spread, so both take the same rounded dz rstd and the
    # product keeps its float32 sum (with dz rstd rounded for the product alone and the product rounded to h's
    # dtype, fp16 rows offset by 60 sigma gave dWd 1.9e-2 off, 100x the reference's error: a fuzz, 2026-12-05)
    if h.dtype == torch.float32:
        # float32 h: the sums cancel as in the forward's fold, and a row whose variance is below ln_eps multiplies
        # what is left by rstd (dgamma 3e-3 where it is 0 for constant rows of 10: an exploratory test, 2026-12-08).
        # The rows are centred in chunks of CENTRE_ROWS instead: a float32 copy of that many rows at a time
        dz_xhat = torch.zeros((B, h.shape[1]), device=h.device, dtype=torch.float32)
        for start in range(0, h.shape[0], CENTRE_ROWS):
            rows = slice(start, start + CENTRE_ROWS)
            dz_xhat.addmm_(dz_r[rows].t(), h[rows] - mean[rows, None])
    else:
        dz_xhat = mm_float32(dz_r.t(), h) - (dz_r.float().t() @ mean)[:, None]
    w = down_weight.float()
    if need_dw:
        gamma = ln_weight.float() if ln_weight is not None else 1.0
        d_dw = dz_xhat * gamma
        if ln_bias is not None:
            d_dw = d_dw + dz_sum[:, None] * ln_bias.float()[None, :]
        d_dw = d_dw.to(down_weight.dtype)
    d_lnw = (dz_xhat * w).sum(0).to(ln_weight.dtype) if need_lnw else None
    d_lnb = (dz_sum @ w).to(ln_bias.dtype) if need_lnb else None
    return d_dw, d_db, d_uw, d_ub, d_lnw, d_lnb

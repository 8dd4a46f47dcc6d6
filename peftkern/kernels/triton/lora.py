"""LoRA in Triton: the low-rank term rides inside a GEMM's epilogue instead of costing passes of its own.

Math (x: M x K, W: N x K frozen, A: r x K, B: N x r, s = scaling, p = dropout):
    forward   y  = x W^T + b + s (drop(x) A^T) B^T          xa = drop(x) A^T  (M x r, saved: lora_xa_dtype)
    backward  dx = dy W + s * drop'((dy B) A)                dyb = dy B        (M x r)
              dA = s dyb^T drop(x)      dB = s dy^T xa       db = sum_m dy

Floor (bf16, M=8192, N=K=4096): the base GEMM is 2MNK = 275 GFLOP each way, ~0.35-0.39 ms on an H100;
the whole LoRA term adds 2Mr(N+K) = 4.3 GFLOP (1.6%) forward and twice that backward, but in eager PyTorch
it also costs passes over x, y and dy (64 MB each, ~22 us each at ~3 TB/s): that is where the time goes.
Kernels:
  * `lora_fused_matmul_kernel`: one output tile of a w^T plus s [mask] (low up^T) in its epilogue, so the output
    is written once. The backward's dx = dy W + s mask (dyb A) runs on it (W read N-major, where this kernel
    matches cuBLAS); `lora_fused_matmul_tma_kernel` is the same with TMA descriptors (measured no faster).
  * `lora_down_kernel`: xa = drop(x) A^T (or dyb = dy B): one read of x, the dropout mask from a seed.
  * `lora_adapter_grad_kernel`: dA and dB (and the bias gradient) as skinny reductions over M, split over M
    into partial sums that a small deterministic sum finishes.
  * `lora_forward_persistent_kernel`: the forward from M = 512 without dropout: one program per SM walks the
    output tiles of x W^T by TMA and adds s xa B^T in each tile's epilogue (xa from cuBLAS beforehand, or, where the
    walk leaves SMs free, from the kernel's own first programs, which flag each row block as it is stored:
    XA_WORKERS). The backward's dx runs on it too.
  * `lora_skinny_grads_kernel`: dA, dB and the bias gradient in one launch; `lora_dyb_db_kernel` (with
    `lora_dyb_db_finish_kernel`): dyb and dB from one read of dy, before the persistent dx kernel up to r = 16.
  * `lora_column_grad_kernel`: dA = s dyb^T x by column strips of x, no partials, behind the dx kernel (TAIL_DA).
  * `lora_merge_kernel`: W += sign s B A in place; `lora_dropout_mask_kernel`: the mask, for tests.
How the op uses them (the persistent forward where it applies, else cuBLAS for x W^T with the term added
beside; the backward uses the fused dx GEMM; the skinny products go to cuBLAS when there is no dropout) and
why: NOTES-lora.md, with the measurements.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Optional

import torch
import triton
import triton.language as tl

from ..._backend import triton_interpret
from ._launch import Descriptor, cdiv, empty_buffers, launch, launch_planned, next_power_of_2

# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _keep_mask(seed, rows, cols, ncols, dropout_p):
    # One Philox draw per element of the (M, K) input, indexed by its flat position: forward and
    # backward regenerate the same mask from the seed, so no mask is stored.
    offsets = rows[:, None] * ncols + cols[None, :]
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # Groups of GROUP_M row-tiles walk the columns together so the W tiles they share stay in L2.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _lowrank_epilogue(acc, low_ptr, up_ptr, bias_ptr, offs_m, offs_n, rows, cols, N, R,
                      stride_lm, stride_lr, stride_un, stride_ur, scaling, dropout_p, seed,
                      HAS_BIAS: tl.constexpr, DROPOUT_OUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      BLOCK_R: tl.constexpr, dtype: tl.constexpr):
    """acc += s [mask] low[rows] up[cols]^T (+ bias): the whole low-rank term of one output tile is one
    small MMA (K = r) on operands already in L2, so y is written once."""
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    low = tl.load(low_ptr + rows[:, None] * stride_lm + offs_r[None, :] * stride_lr, mask=r_mask[None, :], other=0.0)
    up = tl.load(up_ptr + cols[None, :] * stride_un + offs_r[:, None] * stride_ur, mask=r_mask[:, None], other=0.0)
    low_s = (low * scaling).to(dtype)
    if DROPOUT_OUT:
        lr = tl.dot(low_s, up.to(dtype), input_precision=DOT_PRECISION)
        keep = _keep_mask(seed, offs_m, offs_n, N, dropout_p)
        acc += tl.where(keep, lr / (1.0 - dropout_p), 0.0)
    else:
        acc = tl.dot(low_s, up.to(dtype), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    return acc


@triton.jit
def lora_fused_matmul_kernel(
    a_ptr, w_ptr, up_ptr, low_ptr, bias_ptr, out_ptr,
    M, N, K, R,
    stride_am, stride_ak, stride_wn, stride_wk, stride_un, stride_ur,
    stride_lm, stride_lr, stride_om, stride_on,
    scaling, dropout_p, seed,
    HAS_BIAS: tl.constexpr, DROPOUT_OUT: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out = a w^T (+ bias) + s [mask] low up^T, with plain pointer loads: any strides (the general path)."""
    pid = tl.program_id(0)
    pid_m, pid_n = _grouped_pid(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows/cols read row 0 instead of being masked: the loads stay unpredicated and the
    # garbage lands only in rows/cols the final store skips. The hints keep the loads vectorised.
    rows = tl.max_contiguous(tl.multiple_of(tl.where(offs_m < M, offs_m, 0), BLOCK_M), BLOCK_M)
    cols = tl.max_contiguous(tl.multiple_of(tl.where(offs_n < N, offs_n, 0), BLOCK_N), BLOCK_N)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_mask = offs_k < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    acc = _lowrank_epilogue(acc, low_ptr, up_ptr, bias_ptr, offs_m, offs_n, rows, cols, N, R,
                            stride_lm, stride_lr, stride_un, stride_ur, scaling, dropout_p, seed,
                            HAS_BIAS, DROPOUT_OUT, DOT_PRECISION, BLOCK_R, a_ptr.dtype.element_ty)
    o_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def lora_decode_kernel(
    x_ptr, w_ptr, down_ptr, up_ptr, bias_ptr, out_ptr, xa_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_dr, stride_dk, stride_un, stride_ur,
    stride_om, stride_on,
    scaling, dropout_p, seed,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """The whole forward for a few rows (decode) in one launch: out = x W^T (+ b) + s xa B^T, xa = drop(x) A^T.
    At M <= DECODE_MAX_M the time is the stream of W (N x K) through the SMs; every program streams one strip of W and
    accumulates xa beside it from A (r x K: from L2 after the first program reads it), so the low-rank term
    costs no launch of its own. The programs of the first column strip write xa (summed in float32, stored in xa's
    dtype) for backward."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    # As in the fused GEMM: rows/cols out of range read row 0, unmasked and vectorised; the stores skip them.
    rows = tl.max_contiguous(tl.multiple_of(tl.where(offs_m < M, offs_m, 0), BLOCK_M), BLOCK_M)
    cols = tl.max_contiguous(tl.multiple_of(tl.where(offs_n < N, offs_n, 0), BLOCK_N), BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    low = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        offs_k = k * BLOCK_K + tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = w_ptr + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk
        d_ptrs = down_ptr + offs_r[None, :] * stride_dr + offs_k[:, None] * stride_dk
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
            d = tl.load(d_ptrs, mask=r_mask[None, :], other=0.0)
        else:
            k_mask = offs_k < K
            x = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
            d = tl.load(d_ptrs, mask=r_mask[None, :] & k_mask[:, None], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        if HAS_DROPOUT:  # the mask of lora_down_kernel: backward regenerates it from the seed
            x = tl.where(_keep_mask(seed, offs_m, offs_k, K, dropout_p), x, 0.0)
        low = tl.dot(x, d.to(x.dtype), low, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        low = low / (1.0 - dropout_p)
    if pid_n == 0:
        tl.store(xa_ptr + offs_m[:, None] * R + offs_r[None, :], low,
                 mask=(offs_m[:, None] < M) & r_mask[None, :])
    up = tl.load(up_ptr + cols[None, :] * stride_un + offs_r[:, None] * stride_ur, mask=r_mask[:, None], other=0.0)
    dtype = x_ptr.dtype.element_ty
    acc = tl.dot((low * scaling).to(dtype), up.to(dtype), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    o_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def lora_gemv_kernel(
    x_ptr, w_ptr, down_ptr, up_ptr, bias_ptr, out_ptr, xa_ptr,
    N, K, R,
    stride_xk, stride_wn, stride_wk, stride_dr, stride_dk, stride_un, stride_ur,
    scaling, dropout_p, seed,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """lora_decode_kernel for one row, without tensor cores: products of W's strip and of A with x accumulate
    elementwise in float32 tiles, summed across K once at the end (an MMA would waste 15 of its 16 rows)."""
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    cols = tl.where(offs_n < N, offs_n, 0)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    low = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        offs_k = k * BLOCK_K + tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + offs_k * stride_xk
        w_ptrs = w_ptr + cols[:, None] * stride_wn + offs_k[None, :] * stride_wk
        d_ptrs = down_ptr + offs_r[:, None] * stride_dr + offs_k[None, :] * stride_dk
        if EVEN_K:
            x = tl.load(x_ptrs).to(tl.float32)
            w = tl.load(w_ptrs)
            d = tl.load(d_ptrs, mask=r_mask[:, None], other=0.0)
        else:
            k_mask = offs_k < K
            x = tl.load(x_ptrs, mask=k_mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0)
            d = tl.load(d_ptrs, mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
        if HAS_DROPOUT:  # row 0 of _keep_mask: the Philox offset of x[0, k] is k
            x = tl.where(tl.rand(seed, offs_k) >= dropout_p, x, 0.0)
        low += d.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    xa = tl.sum(low, axis=1)
    if HAS_DROPOUT:
        xa = xa / (1.0 - dropout_p)
    if pid_n == 0:
        tl.store(xa_ptr + offs_r, xa, mask=r_mask)
    up = tl.load(up_ptr + cols[:, None] * stride_un + offs_r[None, :] * stride_ur, mask=r_mask[None, :], other=0.0)
    # the low-rank term as the MMA paths form it: s xa rounded to x's dtype, B in x's dtype
    dtype = x_ptr.dtype.element_ty
    xa_s = (xa * scaling).to(dtype).to(tl.float32)
    y += tl.sum(up.to(dtype).to(tl.float32) * xa_s[None, :], axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols).to(tl.float32)
    tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def lora_fused_matmul_tma_kernel(
    a_desc, w_desc, out_desc, up_ptr, low_ptr, bias_ptr,
    M, N, K, R,
    stride_un, stride_ur, stride_lm, stride_lr,
    scaling, dropout_p, seed,
    W_KMAJOR: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT_OUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """The same GEMM with every big tile moved by the Hopper tensor-memory accelerator (TMA): no address
    arithmetic in the loop, zero fill past the edges, and deep asynchronous pipelines. W is read in its
    stored layout: K-major (y = x W^T) or N-major (dx = dy W), so the backward needs no transposed copy."""
    pid = tl.program_id(0)
    pid_m, pid_n = _grouped_pid(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = a_desc.load([off_m, k * BLOCK_K])
        if W_KMAJOR:
            acc = tl.dot(a, w_desc.load([off_n, k * BLOCK_K]).T, acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(a, w_desc.load([k * BLOCK_K, off_n]), acc, input_precision=DOT_PRECISION)
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    rows = tl.where(offs_m < M, offs_m, 0)
    cols = tl.where(offs_n < N, offs_n, 0)
    acc = _lowrank_epilogue(acc, low_ptr, up_ptr, bias_ptr, offs_m, offs_n, rows, cols, N, R,
                            stride_lm, stride_lr, stride_un, stride_ur, scaling, dropout_p, seed,
                            HAS_BIAS, DROPOUT_OUT, DOT_PRECISION, BLOCK_R, out_desc.dtype)
    out_desc.store([off_m, off_n], acc.to(out_desc.dtype))


@triton.jit
def _tile_coords(tile, num_m, num_n, GROUP_M: tl.constexpr):
    # GROUP_M consecutive row-tiles sweep the columns together: the W tiles they share come from DRAM once.
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    rows_in_group = min(num_m - first_m, GROUP_M)
    local = tile % per_group
    return first_m + local % rows_in_group, local // rows_in_group


@triton.jit
def _tile_counts(M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(row tiles, column tiles, output tiles, K steps) of a persistent GEMM's walk."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    return num_m, num_n, num_m * num_n, tl.cdiv(K, BLOCK_K)


@triton.jit
def _wait_ready(flag_ptr, valid):
    """Where valid (an int32, nonzero), spin until the int32 at flag_ptr is nonzero (acquire, GPU scope), then fence
    the async proxy so that TMA loads issued after it see what the flag's writer stored before its release; returns
    1. One inline-asm loop, no loop in Triton's IR, so the flattened walk around it stays flattened. It is declared
    pure, which the flattened walk's pipeliner needs (it cannot predicate an op with side effects): it may then run
    it for an iteration past the walk's end, which `valid` makes a no-op. The caller puts the returned 1 into the
    coordinates of the loads that must wait, a data dependence that every pass keeps."""
    return tl.inline_asm_elementwise(
        "{ .reg .pred %p; .reg .b32 %v; setp.eq.b32 %p, $2, 0; @%p bra done${:uid}; wait${:uid}: "
        "ld.acquire.gpu.global.b32 %v, [$1]; setp.eq.b32 %p, %v, 0; @%p bra wait${:uid}; fence.proxy.async.global; "
        "done${:uid}: mov.b32 $0, 1; }",
        "=r,l,r", [flag_ptr, valid], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _store_xa_block(xa_ptr, acc, mb, M, R, stride_xam, xa_scale, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """Row block mb of xa = xa_scale acc, in xa's dtype, masked to M rows and R ranks."""
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_R)
    tl.store(xa_ptr + rows[:, None] * stride_xam + rk[None, :], (acc * xa_scale).to(xa_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (rk[None, :] < R))


@triton.jit
def _xa_worker(x_desc, a_desc, xa_ptr, flags_ptr, worker, M, R, stride_xam, xa_scale, num_m, k_tiles,
               stride, A_KMAJOR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_R: tl.constexpr, WORKER_STAGES: tl.constexpr):
    """xa = xa_scale x A^T by row blocks of BLOCK_M, worker, worker + stride, ... in the order the GEMM's tiles
    need them; each block stored, then its flag set with release semantics (after a barrier: every warp's stores
    first). A_KMAJOR: a_desc holds A (r, K); else A^T (K, r), both row-major. One SM streams x only as fast as the
    loads it keeps in flight allow (~16 KB per stage over a DRAM latency of a microsecond or two under the GEMM's
    traffic): WORKER_STAGES, deeper than the GEMM's pipeline, keeps more in flight."""
    for mb in tl.range(worker, num_m, stride):
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for kk in tl.range(k_tiles, num_stages=WORKER_STAGES):
            x = x_desc.load([mb * BLOCK_M, kk * BLOCK_K])
            if A_KMAJOR:
                acc = tl.dot(x, a_desc.load([0, kk * BLOCK_K]).T, acc)
            else:
                acc = tl.dot(x, a_desc.load([kk * BLOCK_K, 0]), acc)
        _store_xa_block(xa_ptr, acc, mb, M, R, stride_xam, xa_scale, BLOCK_M, BLOCK_R)
        tl.debug_barrier()
        tl.atomic_xchg(flags_ptr + mb, 1, sem="release", scope="gpu")


@triton.jit
def _xa_pairs(x_desc, a_desc, xa_ptr, flags_ptr, helper, M, R, stride_xam, xa_scale, num_m, k_tiles,
              stride, A_KMAJOR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
              BLOCK_R: tl.constexpr, WORKER_STAGES: tl.constexpr):
    """_xa_worker two row blocks at a time: blocks 2 p and 2 p + 1 for p = helper, helper + stride, ..., both
    multiplied by each of A's tiles as it arrives. Per MMA that loads as many bytes as the walk's 128x256 tiles do
    (two x tiles and one A tile against one x and a W tile twice A's size), where one block at a time loads a third
    more; each block stored and flagged as _xa_worker does."""
    for pair in tl.range(helper, tl.cdiv(num_m, 2), stride):
        mb = 2 * pair
        acc0 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for kk in tl.range(k_tiles, num_stages=WORKER_STAGES):
            x0 = x_desc.load([mb * BLOCK_M, kk * BLOCK_K])
            x1 = x_desc.load([mb * BLOCK_M + BLOCK_M, kk * BLOCK_K])  # past M: TMA fills zeros, nothing is stored
            if A_KMAJOR:
                a_t = a_desc.load([0, kk * BLOCK_K]).T
            else:
                a_t = a_desc.load([kk * BLOCK_K, 0])
            acc0 = tl.dot(x0, a_t, acc0)
            acc1 = tl.dot(x1, a_t, acc1)
        _store_xa_block(xa_ptr, acc0, mb, M, R, stride_xam, xa_scale, BLOCK_M, BLOCK_R)
        _store_xa_block(xa_ptr, acc1, mb + 1, M, R, stride_xam, xa_scale, BLOCK_M, BLOCK_R)
        tl.debug_barrier()
        tl.atomic_xchg(flags_ptr + mb, 1, sem="release", scope="gpu")
        if mb + 1 < num_m:
            tl.atomic_xchg(flags_ptr + mb + 1, 1, sem="release", scope="gpu")


@triton.jit
def _persistent_tiles(x_desc, w_desc, y_desc, a_desc, b_desc, xa_desc, xa_ptr, bias_ptr, flags_ptr,
                      M, N, R, stride_xam, scaling, start, step, num_m, num_n, num_tiles, k_tiles,
                      XA_GIVEN: tl.constexpr, W_KMAJOR: tl.constexpr, HAS_BIAS: tl.constexpr, FLATTEN: tl.constexpr,
                      SUBTILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, B_RMAJOR: tl.constexpr, R_CHUNKS: tl.constexpr,
                      XA_SCALED: tl.constexpr, WAIT: tl.constexpr):
    """The GEMM programs' walk of lora_forward_persistent_kernel: tiles start, start + step, ... WAIT: xa's row
    block comes from the kernel's own xa workers, and the epilogue waits for its flag before loading it."""
    dtype = y_desc.dtype
    # The epilogue's tile comes from a counter of its own: with the loops flattened, the next tile's loads
    # run ahead of this tile's epilogue.
    out_tile = start - step
    for tile in tl.range(start, num_tiles, step, flatten=FLATTEN):
        pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if not XA_GIVEN:
            xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for kk in tl.range(k_tiles):
            off_k = kk * BLOCK_K
            x = x_desc.load([off_m, off_k])
            if W_KMAJOR:
                acc = tl.dot(x, w_desc.load([off_n, off_k]).T, acc)
            else:
                acc = tl.dot(x, w_desc.load([off_k, off_n]), acc)
            if not XA_GIVEN:
                xa = tl.dot(x, a_desc.load([0, off_k]).T, xa)
        out_tile += step
        out_m, out_n = _tile_coords(out_tile, num_m, num_n, GROUP_M)
        xa_row = out_m * BLOCK_M
        if WAIT:
            valid = (out_tile < num_tiles).to(tl.int32)
            xa_row = xa_row * _wait_ready(flags_ptr + tl.where(valid != 0, out_m, 0), valid)
        for c in tl.range(R_CHUNKS, num_stages=1):
            if XA_GIVEN:
                xa = xa_desc.load([xa_row, c * BLOCK_R])
            if B_RMAJOR:
                b_t = b_desc.load([c * BLOCK_R, out_n * BLOCK_N])
            else:
                b_t = b_desc.load([out_n * BLOCK_N, c * BLOCK_R]).T
            if XA_SCALED:
                acc = tl.dot(xa, b_t, acc)
            else:
                acc = tl.dot((xa * scaling).to(dtype), b_t, acc)
        if HAS_BIAS:
            cols = out_n * BLOCK_N + tl.arange(0, BLOCK_N)
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if not XA_GIVEN and out_n == 0:
            rows = out_m * BLOCK_M + tl.arange(0, BLOCK_M)
            rk = tl.arange(0, BLOCK_R)
            tl.store(xa_ptr + rows[:, None] * stride_xam + rk[None, :], xa,
                     mask=(rows[:, None] < M) & (rk[None, :] < R))
        _store_tile(y_desc, out_m * BLOCK_M, out_n * BLOCK_N, acc, SUBTILE, BLOCK_M, BLOCK_N)


@triton.jit
def lora_forward_persistent_kernel(
    x_desc, w_desc, y_desc, a_desc, b_desc, xa_desc, xa_ptr, bias_ptr,
    M, N, K, R, stride_xam, scaling, NUM_SMS, flags_ptr, xa_scale,
    XA_GIVEN: tl.constexpr, W_KMAJOR: tl.constexpr, HAS_BIAS: tl.constexpr, FLATTEN: tl.constexpr,
    SUBTILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, B_RMAJOR: tl.constexpr = False, R_CHUNKS: tl.constexpr = 1,
    XA_SCALED: tl.constexpr = False, XA_WORKERS: tl.constexpr = 0,
    A_KMAJOR: tl.constexpr = True, SPIN: tl.constexpr = True, WORKER_STAGES: tl.constexpr = 3,
    XA_HELPERS: tl.constexpr = 0,
):
    """The whole LoRA forward in one kernel: y = x W^T + b + s (x A^T) B^T, and xa = x A^T stored for backward
    (in xa's dtype; read by TMA in it when XA_GIVEN). One program per SM walks the output tiles (persistent: a tile's epilogue overlaps the next
    tile's loads, which is what brought Triton to cuBLAS's speed on this layout, NOTES-lora.md); x, W and y
    move by TMA, and so do the small xa and B tiles. Unless XA_GIVEN (xa from cuBLAS), xa is accumulated
    beside the main product from the x tiles already in shared memory (r / BLOCK_N more MMA work instead of a
    separate pass over x) and the column-0 tiles store it: measured slower on an H100 with Triton 3.6
    (NOTES-lora.md). B_RMAJOR: b_desc holds B^T (r, N) row-major (the backward's dx passes A itself as B^T).
    R_CHUNKS (XA_GIVEN only): the rank is added in R_CHUNKS slices of BLOCK_R, so r = 128 takes the shared memory
    and registers of r = 64. XA_SCALED (XA_GIVEN only): the scaling is in the given xa (s x A^T) or in B already,
    and xa's tile, in y's dtype, goes to the tensor cores straight from shared memory (no multiply on the way).
    XA_WORKERS (XA_GIVEN, R_CHUNKS = 1): the first XA_WORKERS programs make xa = xa_scale x A^T themselves, row block
    by row block, each flagged in flags_ptr (int32 zeros, one per row block), on SMs the walk leaves free (the
    grid's other programs take as many rounds of tiles as all of them would); the GEMM programs wait for a row
    block's flag in the epilogue that reads it. Every program must be resident at once (a grid of at most one
    program per SM does that). SPIN = False (the interpreter, which runs the programs one after another, workers
    first) leaves the wait out.
    XA_HELPERS (XA_GIVEN, R_CHUNKS = 1, no XA_WORKERS): where the walk gives XA_HELPERS of the NUM_SMS programs a tile
    fewer than the rest, those programs (the first XA_HELPERS) make xa's row blocks first, two at a time (_xa_pairs),
    then walk their tiles:
    no program is taken from the walk, and the helpers' blocks fill the round the others spend on their last
    tile. Under the interpreter (no SPIN) program 0 makes every block before any tile is walked."""
    pid = tl.program_id(0)
    num_m, num_n, num_tiles, k_tiles = _tile_counts(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K)
    if XA_HELPERS > 0:
        # The walk's slots rem, ..., NUM_SMS - 1 (rem = num_tiles mod NUM_SMS) hold a tile fewer: the helpers take them.
        if pid < XA_HELPERS:
            if SPIN:
                _xa_pairs(x_desc, a_desc, xa_ptr, flags_ptr, pid, M, R, stride_xam, xa_scale, num_m, k_tiles,
                          XA_HELPERS, A_KMAJOR, BLOCK_M, BLOCK_K, BLOCK_R, WORKER_STAGES)
            elif pid == 0:
                _xa_pairs(x_desc, a_desc, xa_ptr, flags_ptr, 0, M, R, stride_xam, xa_scale, num_m, k_tiles,
                          1, A_KMAJOR, BLOCK_M, BLOCK_K, BLOCK_R, WORKER_STAGES)
            slot = pid + NUM_SMS - XA_HELPERS
        else:
            slot = pid - XA_HELPERS
        _persistent_tiles(x_desc, w_desc, y_desc, a_desc, b_desc, xa_desc, xa_ptr, bias_ptr, flags_ptr,
                          M, N, R, stride_xam, scaling, slot, NUM_SMS, num_m, num_n, num_tiles, k_tiles,
                          XA_GIVEN, W_KMAJOR, HAS_BIAS, FLATTEN, SUBTILE, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, GROUP_M,
                          B_RMAJOR, R_CHUNKS, XA_SCALED, SPIN)
    elif XA_WORKERS > 0:
        if pid < XA_WORKERS:
            _xa_worker(x_desc, a_desc, xa_ptr, flags_ptr, pid, M, R, stride_xam, xa_scale, num_m, k_tiles,
                       XA_WORKERS, A_KMAJOR, BLOCK_M, BLOCK_K, BLOCK_R, WORKER_STAGES)
        else:
            _persistent_tiles(x_desc, w_desc, y_desc, a_desc, b_desc, xa_desc, xa_ptr, bias_ptr, flags_ptr,
                              M, N, R, stride_xam, scaling, pid - XA_WORKERS, NUM_SMS - XA_WORKERS,
                              num_m, num_n, num_tiles, k_tiles, XA_GIVEN, W_KMAJOR, HAS_BIAS, FLATTEN, SUBTILE,
                              BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, GROUP_M, B_RMAJOR, R_CHUNKS, XA_SCALED, SPIN)
    else:
        _persistent_tiles(x_desc, w_desc, y_desc, a_desc, b_desc, xa_desc, xa_ptr, bias_ptr, flags_ptr,
                          M, N, R, stride_xam, scaling, pid, NUM_SMS, num_m, num_n, num_tiles, k_tiles,
                          XA_GIVEN, W_KMAJOR, HAS_BIAS, FLATTEN, SUBTILE, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, GROUP_M,
                          B_RMAJOR, R_CHUNKS, XA_SCALED, False)


@triton.jit
def _store_tile(desc, row, col, tile, SUBTILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A float32 output tile stored by TMA in desc's dtype, at [row, col]. SUBTILE stores it as two halves of
    BLOCK_N / 2 columns: the epilogue's shared-memory buffer halves, and a pipeline stage fits beside it."""
    dtype = desc.dtype
    if SUBTILE:
        left, right = tl.split(tl.permute(tl.reshape(tile, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        desc.store([row, col], left.to(dtype))
        desc.store([row, col + BLOCK_N // 2], right.to(dtype))
    else:
        desc.store([row, col], tile.to(dtype))


@triton.jit
def lora_down_kernel(
    a_ptr, down_ptr, part_ptr,
    M, K, R, k_per_split,
    stride_am, stride_ak, stride_dr, stride_dk,
    dropout_p, seed,
    HAS_DROPOUT: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """part[split, m, r] = sum over this split's k of drop(a)[m, k] down[r, k], float32: one read of a.
    Splitting K as well as M puts several programs on every SM, enough loads in flight to stream a at
    the copy bandwidth even when M is only a few thousand rows."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    rows = tl.where(offs_m < M, offs_m, 0)
    r_mask = offs_r < R
    k_start = pid_k * k_per_split
    k_end = min(k_start + k_per_split, K)
    low = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
        d_ptrs = down_ptr + offs_r[None, :] * stride_dr + offs_k[:, None] * stride_dk
        if EVEN_K:
            a = tl.load(a_ptrs)
            d = tl.load(d_ptrs, mask=r_mask[None, :], other=0.0)
        else:
            k_mask = offs_k < k_end
            a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
            d = tl.load(d_ptrs, mask=r_mask[None, :] & k_mask[:, None], other=0.0)
        if HAS_DROPOUT:
            a = tl.where(_keep_mask(seed, offs_m, offs_k, K, dropout_p), a, 0.0)
        low = tl.dot(a, d.to(a.dtype), low, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        low = low / (1.0 - dropout_p)
    p_ptrs = part_ptr + pid_k * M * BLOCK_R + offs_m[:, None] * BLOCK_R + offs_r[None, :]
    tl.store(p_ptrs, low, mask=(offs_m[:, None] < M) & (offs_r[None, :] < BLOCK_R))


@triton.jit
def _skinny_partial(big_ptr, small_ptr, cb, split, M, C, R, rows_per_split, stride_bm, stride_bc, stride_sm, stride_sr,
                    dropout_p, seed, HAS_DROPOUT: tl.constexpr, COLSUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """(acc, colsum): sum over this split's rows m of drop(big)[m, c]^T small[m, :] for the column block cb (BLOCK_C x
    BLOCK_R), and big's column sums when COLSUM."""
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    offs_mb = tl.arange(0, BLOCK_M)
    c_mask = offs_c < C
    r_mask = offs_r < R
    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    colsum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m_start = split * rows_per_split
    m_end = min(m_start + rows_per_split, M)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + offs_mb
        m_mask = offs_m < m_end
        big = tl.load(big_ptr + offs_m[:, None] * stride_bm + offs_c[None, :] * stride_bc,
                      mask=m_mask[:, None] & c_mask[None, :], other=0.0)
        if HAS_DROPOUT:
            big = tl.where(_keep_mask(seed, offs_m, offs_c, C, dropout_p), big, 0.0)
        small = tl.load(small_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                        mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        acc = tl.dot(tl.trans(big), small.to(big.dtype), acc, input_precision=DOT_PRECISION)
        if COLSUM:
            colsum += tl.sum(big.to(tl.float32), axis=0)
    return acc, colsum


@triton.jit
def lora_adapter_grad_kernel(
    big_ptr, small_ptr, part_ptr, colsum_ptr,
    M, P, R, rows_per_split,
    stride_bm, stride_bp, stride_sm, stride_sr,
    dropout_p, seed,
    HAS_DROPOUT: tl.constexpr, COLSUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """part[split, p, r] = sum over this split's rows m of drop(big)[m, p] * small[m, r]; colsum[split, p] too.
    (Computing the transposed product small^T big instead was measured 5-60% slower: NOTES-lora.md.)"""
    pid_p = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = tl.arange(0, BLOCK_R)
    p_mask = offs_p < P
    r_mask = offs_r < R
    acc, colsum = _skinny_partial(big_ptr, small_ptr, pid_p, pid_s, M, P, R, rows_per_split, stride_bm, stride_bp,
                                  stride_sm, stride_sr, dropout_p, seed, HAS_DROPOUT, COLSUM, DOT_PRECISION, BLOCK_M,
                                  BLOCK_P, BLOCK_R)
    base = part_ptr + pid_s * P * BLOCK_R
    tl.store(base + offs_p[:, None] * BLOCK_R + offs_r[None, :], acc, mask=p_mask[:, None] & r_mask[None, :])
    if COLSUM:
        tl.store(colsum_ptr + pid_s * P + offs_p, colsum, mask=p_mask)


@triton.jit
def _skinny_finish(acc, colsum, part_ptr, sums_ptr, count_ptr, slot, split, splits, out_ptr, bias_ptr, cb, C, R,
                   stride_oc, stride_or, scale,
                   STORE_OUT: tl.constexpr, COLSUM: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """Leave this split's partial in part (and sums); the split that arrives last for the column block adds all of them
    in split order, scales, casts and stores out[c, r] (and the bias gradient), then clears the block's counter."""
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    tile = offs_c[:, None] * BLOCK_R + offs_r[None, :]
    tl.store(part_ptr + (slot * splits + split) * BLOCK_C * BLOCK_R + tile, acc)
    if COLSUM:
        tl.store(sums_ptr + (slot * splits + split) * BLOCK_C + offs_c, colsum)
    tl.debug_barrier()  # every thread's partial written before the release below
    arrived = tl.atomic_add(count_ptr + slot, 1, sem="acq_rel", scope="gpu")
    if arrived == splits - 1:
        total = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
        total_sum = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for s in range(0, splits):  # a fixed order: the same bits every run
            total += tl.load(part_ptr + (slot * splits + s) * BLOCK_C * BLOCK_R + tile, cache_modifier=".cg")
            if COLSUM:
                total_sum += tl.load(sums_ptr + (slot * splits + s) * BLOCK_C + offs_c, cache_modifier=".cg")
        cols = cb * BLOCK_C + offs_c
        if STORE_OUT:
            tl.store(out_ptr + cols[:, None] * stride_oc + offs_r[None, :] * stride_or,
                     (total * scale).to(out_ptr.dtype.element_ty), mask=(cols[:, None] < C) & (offs_r[None, :] < R))
        if COLSUM:
            tl.store(bias_ptr + cols, total_sum, mask=cols < C)
        tl.atomic_xchg(count_ptr + slot, 0)


@triton.jit
def lora_skinny_grads_kernel(
    x_ptr, dyb_ptr, da_ptr, dy_ptr, xa_ptr, db_ptr, dbias_ptr, part_ptr, sums_ptr, count_ptr,
    M, K, N, R, rows_per_split, splits, blocks_a, scale_a, scale_b,
    stride_xm, stride_xk, stride_dybm, stride_dybr, stride_dak, stride_dar,
    stride_dym, stride_dyn, stride_xam, stride_xar, stride_dbn, stride_dbr,
    STORE_DB: tl.constexpr, COLSUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """The backward's reductions over M in one launch: dA^T = scale_a x^T dyb (programs 0 .. blocks_a - 1 along axis 0,
    one per BLOCK_C columns of x) and dB = scale_b dy^T xa with the bias gradient dy^T 1 (the rest, one per BLOCK_C
    columns of dy); axis 1 splits M. Each split leaves a float32 partial; the last split of a column block to arrive
    (an atomic counter) adds them in split order and stores the result in the gradient's dtype."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    if pid < blocks_a:
        acc, colsum = _skinny_partial(x_ptr, dyb_ptr, pid, split, M, K, R, rows_per_split, stride_xm, stride_xk,
                                      stride_dybm, stride_dybr, 0.0, 0, False, False, DOT_PRECISION, BLOCK_M, BLOCK_C,
                                      BLOCK_R)
        _skinny_finish(acc, colsum, part_ptr, sums_ptr, count_ptr, pid, split, splits, da_ptr, dbias_ptr, pid, K, R,
                       stride_dak, stride_dar, scale_a, True, False, BLOCK_C, BLOCK_R)
    else:
        cb = pid - blocks_a
        acc, colsum = _skinny_partial(dy_ptr, xa_ptr, cb, split, M, N, R, rows_per_split, stride_dym, stride_dyn,
                                      stride_xam, stride_xar, 0.0, 0, False, COLSUM, DOT_PRECISION, BLOCK_M, BLOCK_C,
                                      BLOCK_R)
        _skinny_finish(acc, colsum, part_ptr, sums_ptr, count_ptr, pid, split, splits, db_ptr, dbias_ptr, cb, N, R,
                       stride_dbn, stride_dbr, scale_b, STORE_DB, COLSUM, BLOCK_C, BLOCK_R)


@triton.jit
def lora_dyb_db_kernel(
    dy_ptr, b_ptr, xa_ptr, dyb_part_ptr, db_part_ptr,
    M, N, R, rows_per_split,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_xam, stride_xar,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    STAGES: tl.constexpr,
):
    """dyb = dy B and dB = dy^T xa from one read of dy, as float32 partials that lora_dyb_db_finish_kernel adds.
    Program (cb, split) takes BLOCK_C columns of dy over a split of its rows: each dy tile feeds dB's product, summed
    over the split's rows into db_part[split, cb's columns], and the row block's share of dyb, stored in dyb_part[cb,
    rows]. (The sums finished in this kernel instead, by the last program to arrive at atomic counters as in
    skinny_grads, took 64-127 us against 21-48 us with the second launch: NOTES-lora.md, 2026-12-06.)"""
    cb = tl.program_id(0)
    split = tl.program_id(1)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    offs_mb = tl.arange(0, BLOCK_M)
    c_mask = offs_c < N
    r_mask = offs_r < R
    b = tl.load(b_ptr + offs_c[:, None] * stride_bn + offs_r[None, :] * stride_br,
                mask=c_mask[:, None] & r_mask[None, :], other=0.0).to(dy_ptr.dtype.element_ty)
    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    m_start = split * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    part_base = dyb_part_ptr + cb * M * BLOCK_R
    for m0 in tl.range(m_start, m_end, BLOCK_M, num_stages=STAGES):
        offs_m = m0 + offs_mb
        m_mask = offs_m < m_end
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_c[None, :] * stride_dyn,
                     mask=m_mask[:, None] & c_mask[None, :], other=0.0)
        xa = tl.load(xa_ptr + offs_m[:, None] * stride_xam + offs_r[None, :] * stride_xar,
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        acc = tl.dot(tl.trans(dy), xa.to(dy.dtype), acc, input_precision=DOT_PRECISION)
        part = tl.dot(dy, b, input_precision=DOT_PRECISION)
        tl.store(part_base + offs_m[:, None] * BLOCK_R + offs_r[None, :], part, mask=m_mask[:, None])
    tl.store(db_part_ptr + split * N * BLOCK_R + offs_c[:, None] * BLOCK_R + offs_r[None, :], acc,
             mask=c_mask[:, None])


@triton.jit
def _sum_parts(part_ptr, out_ptr, block, rows_total, parts, R, stride_o0, stride_o1, scale,
               BLOCK_ROWS: tl.constexpr, BLOCK_R: tl.constexpr):
    """out[rows, :R] = scale * sum over p of part[p, rows, :] (part: parts x rows_total x BLOCK_R float32), for the
    block's BLOCK_ROWS rows, adding the partials in order."""
    offs_r = tl.arange(0, BLOCK_R)
    rows = block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    mask = rows < rows_total
    total = tl.zeros((BLOCK_ROWS, BLOCK_R), dtype=tl.float32)
    for p in range(0, parts):
        total += tl.load(part_ptr + p * rows_total * BLOCK_R + rows[:, None] * BLOCK_R + offs_r[None, :],
                         mask=mask[:, None], other=0.0)
    tl.store(out_ptr + rows[:, None] * stride_o0 + offs_r[None, :] * stride_o1,
             (total * scale).to(out_ptr.dtype.element_ty), mask=mask[:, None] & (offs_r[None, :] < R))


@triton.jit
def lora_dyb_db_finish_kernel(dyb_part_ptr, db_part_ptr, dyb_ptr, db_ptr, M, N, R, num_cb, splits, scale_b,
                              dyb_programs, stride_dybm, stride_dybr, stride_dbn, stride_dbr,
                              BLOCK_ROWS: tl.constexpr, BLOCK_R: tl.constexpr):
    """lora_dyb_db_kernel's sums: programs below dyb_programs add dyb's num_cb partials for BLOCK_ROWS rows, the rest
    dB's splits partials (scaled), each in partial order: the same bits every run."""
    pid = tl.program_id(0)
    if pid < dyb_programs:
        _sum_parts(dyb_part_ptr, dyb_ptr, pid, M, num_cb, R, stride_dybm, stride_dybr, 1.0, BLOCK_ROWS, BLOCK_R)
    else:
        _sum_parts(db_part_ptr, db_ptr, pid - dyb_programs, N, splits, R, stride_dbn, stride_dbr, scale_b, BLOCK_ROWS,
                   BLOCK_R)


@triton.jit
def lora_column_grad_kernel(
    big_ptr, small_ptr, out_ptr,
    M, C, R, scale,
    stride_bm, stride_bc, stride_sm, stride_sr, stride_or, stride_oc,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[:R, cols] = scale (big[:, cols]^T small)^T for the program's BLOCK_C columns of big (M, C), over all M rows
    of big and small (M, R): _skinny_partial with one split, so one program owns its columns whole, there are no
    partial sums and every run gives the same bits. The backward's dA = s dyb^T x behind the persistent dx kernel
    (column_grad): a few programs that each stream a strip of x through a deep pipeline (the launch's num_stages),
    sized for the SMs that the kernel's last round of tiles leaves idle."""
    pid = tl.program_id(0)
    acc, _ = _skinny_partial(big_ptr, small_ptr, pid, 0, M, C, R, M, stride_bm, stride_bc, stride_sm, stride_sr,
                             0.0, 0, False, False, DOT_PRECISION, BLOCK_M, BLOCK_C, BLOCK_R)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    tl.store(out_ptr + offs_r[None, :] * stride_or + offs_c[:, None] * stride_oc,
             (acc * scale).to(out_ptr.dtype.element_ty), mask=(offs_c < C)[:, None] & (offs_r < R)[None, :])


@triton.jit
def lora_merge_kernel(
    w_ptr, a_ptr, b_ptr,
    N, K, R,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    alpha,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """w += alpha * b a (alpha = +-scaling), in float32, rounded once to w's dtype."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    n_mask = offs_n < N
    k_mask = offs_k < K
    r_mask = offs_r < R
    b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
    a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
    # The delta is a float32 product (ieee): merge and unmerge must cancel to the weight's own rounding.
    delta = tl.dot(b, a, input_precision="ieee")
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
    mask = n_mask[:, None] & k_mask[None, :]
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(w_ptrs, (w + alpha * delta).to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def lora_dropout_mask_kernel(keep_ptr, M, K, dropout_p, seed, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """keep[m, k] = the mask every kernel above draws for element (m, k): exposed for tests."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep_mask(seed, offs_m, offs_k, K, dropout_p)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(keep_ptr + offs_m[:, None] * K + offs_k[None, :], keep.to(tl.int8), mask=mask)


# ------------------------------------------------------------------------------------------- launchers


_device_facts: dict = {}


def _facts(device: torch.device) -> tuple[int, int, bool]:
    """(SM count, major compute capability, is an H200) of a CUDA device, asked once: the queries cost the host several
    microseconds on every call otherwise (scripts/host_costs.py)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    facts = _device_facts.get(index)
    if facts is None:
        props = torch.cuda.get_device_properties(index)
        facts = _device_facts[index] = (props.multi_processor_count, props.major, "H200" in props.name)
    return facts


def _sm_count(device: torch.device) -> int:
    return _facts(device)[0] if device.type == "cuda" else 4


def _block_r(r: int) -> int:
    # tl.dot needs every dimension >= 16.
    return max(16, next_power_of_2(r))


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype != torch.float32:
        return "ieee"  # unused for 16-bit operands
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _matmul_config(M: int, dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None) -> dict:
    """Tile shapes for the fused GEMM on H100/H200 in 16-bit (measured: NOTES-lora.md), by shape class:
    - M > 2048: 128x256, 8 warps (two consumer warpgroups of 64x256): cuBLAS's own tile class;
    - 1024 < M <= 2048 with a 16-bit dtype given (LoRA's dx): 128x256x64, 3 stages;
    - medium M otherwise: 128x128x64, 4 stages, so a 2048x4096 output still has 4 tiles per SM;
    - small M (decode, <= 64): 16..64-row tiles over narrow 64-column strips so every SM streams W.
    """
    if triton_interpret():
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    if M <= 64:
        return dict(BLOCK_M=max(16, min(64, next_power_of_2(M))), BLOCK_N=64, BLOCK_K=128,
                    GROUP_M=1, num_warps=4, num_stages=4)
    if M <= 2048:
        if M > 1024 and dtype in (torch.float16, torch.bfloat16):
            # dx = dy W at M = 2048, 4096 x 4096 (H100, logs/explore-lora-configs-h100.log, this kernel's code
            # unchanged since): 0.0995 ms, 1.07x cuBLAS, against 0.1147 ms, 1.24x, with 128x128x64 x 4 stages.
            # 1024 rows and below were not measured; float32 tiles would need twice the shared memory.
            return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
    if device is not None and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and _facts(device)[2]:
        # On H200s BLOCK_K=64 (3 or 4 stages) beat BLOCK_K=32 in both sweeps of 2026-12-03 (dx-tiles logs,
        # explore-lora-dx-tiles-*-h200.log): 1.052x / 1.076x cuBLAS's dx at M = 4096 / 8192 against 1.066x / 1.103x.
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
    # BLOCK_K=32 with 5 stages on an H100: 0.376 ms for the 8192x4096x4096 dx GEMM, 0.97x cuBLAS (BLOCK_K=64: 1.07x).
    return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=5)


def _tma_layout(t: torch.Tensor) -> Optional[str]:
    """'row' if t's rows are contiguous TMA-able lines, 'col' if its columns are, None otherwise.
    TMA needs a unit inner stride, 16-byte aligned outer strides and a 16-byte aligned base."""
    if t.data_ptr() % 16:
        return None
    size = t.element_size()
    if t.stride(1) == 1 and (t.stride(0) * size) % 16 == 0:
        return "row"
    if t.stride(0) == 1 and (t.stride(1) * size) % 16 == 0:
        return "col"
    return None


def _tma_ok(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> bool:
    if not triton_interpret():
        if not a.is_cuda or _facts(a.device)[1] < 9:
            return False
    return _tma_layout(a) == "row" and _tma_layout(out) == "row" and _tma_layout(w) is not None


def fused_matmul(
    a: torch.Tensor, w: torch.Tensor, up: torch.Tensor, low: torch.Tensor, scaling: float,
    bias: Optional[torch.Tensor] = None, dropout_p: float = 0.0, seed: int = 0,
    config: Optional[dict] = None, use_tma: bool = False,
) -> torch.Tensor:
    """out (M, N) = a (M, K) @ w^T + s [mask] low @ up^T (+ bias).

    w is an (N, K) view with any strides (W itself for y = x W^T; W.t() for dx = dy W); up (N, R) and low
    (M, R) likewise. dropout_p > 0 applies the seed's (M, N) keep-mask to the low-rank term (the backward of
    input dropout). use_tma=True takes the TMA kernel where the strides allow it (Hopper and newer, or the
    interpreter); it measured no faster than the pointer kernel on an H100 and costs host time to build the
    descriptors on every call, so the pointer kernel is the default (NOTES-lora.md).
    """
    M, K = a.shape
    N = w.shape[0]
    R = up.shape[1]
    out = torch.empty((M, N), device=a.device, dtype=a.dtype)
    cfg = dict(config or _matmul_config(M, a.dtype, a.device))
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    grid = (cdiv(M, bm) * cdiv(N, bn),)
    common = dict(HAS_BIAS=bias is not None, DROPOUT_OUT=dropout_p > 0.0, DOT_PRECISION=_dot_precision(a.dtype),
                  BLOCK_R=_block_r(R), num_warps=num_warps, num_stages=num_stages, **cfg)
    bias_arg = bias if bias is not None else out
    if use_tma and _tma_ok(a, w, out):
        w_kmajor = _tma_layout(w) == "row"
        w_desc = (Descriptor(w, [bn, bk]) if w_kmajor
                  else Descriptor(w.t(), [bk, bn]))
        lora_fused_matmul_tma_kernel[grid](
            Descriptor(a, [bm, bk]), w_desc, Descriptor(out, [bm, bn]),
            up, low, bias_arg, M, N, K, R,
            up.stride(0), up.stride(1), low.stride(0), low.stride(1),
            float(scaling), float(dropout_p), int(seed), W_KMAJOR=w_kmajor, **common,
        )
        return out
    launch(
        lora_fused_matmul_kernel, grid, a, w, up, low, bias_arg, out, M, N, K, R,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), up.stride(0), up.stride(1),
        low.stride(0), low.stride(1), out.stride(0), out.stride(1),
        float(scaling), float(dropout_p), int(seed), EVEN_K=K % bk == 0, **common,
    )
    return out


# Up to DECODE_MAX_M rows the forward is one launch (lora_decode_kernel; lora_gemv_kernel for one row) instead of
# cuBLAS's x A^T, a cast and the fused GEMM, which took 2.13x F.linear at M = 16, 4096 x 4096 on an H200 (the
# GEMM alone 1.03x). At 64 rows the one-launch kernel was slower than those three (18.5 vs 12.0 us): the MMA on
# A beside W's costs more than a launch there (results/logs/explore-lora-decode-*-h200.log).
DECODE_MAX_M = 16


def _decode_config(M: int, N: int, dtype: torch.dtype) -> dict:
    """Tiles for the decode kernels (results/logs/explore-lora-decode-*-h200.log): narrow column strips so that
    every SM streams W. One row: lora_gemv_kernel, 16 columns x 128 of K per step, 8 warps (9.5 us at 4096 x 4096,
    0.93x F.linear). 16 rows: 32 columns, and by the number of strips: 256 of K per step with 2 warps where they
    fill about one wave (11.7 us, 1.22x, at N = 4096; 28.6 us, 1.00x, at 11008 -> 4096), 128 with 1 warp where
    there are many (25.2 us, 1.00x, at 4096 -> 11008; 34.5 us, 1.38x, with the other tile)."""
    if triton_interpret():
        return dict(BLOCK_M=M if M == 1 else 16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
    if M == 1:
        return dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=128, num_warps=8, num_stages=3)
    if dtype == torch.float32 or N > 8192:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=1, num_stages=4)
    return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, num_warps=2, num_stages=4)


def decode_forward(x: torch.Tensor, w: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                   bias: Optional[torch.Tensor] = None, dropout_p: float = 0.0, seed: int = 0,
                   config: Optional[dict] = None, xa_dtype: torch.dtype = torch.float32
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, xa) by lora_decode_kernel: y (M, N) = x W^T (+ b) + s xa B^T, xa (M, r) = drop(x) A^T, summed in float32
    and stored in xa_dtype. w is the (N, K) weight view, any strides."""
    M, K = x.shape
    N = w.shape[0]
    R = lora_A.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    xa = torch.empty((M, R), device=x.device, dtype=xa_dtype)
    cfg = dict(config or _decode_config(M, N, x.dtype))
    if M == 1 and cfg["BLOCK_M"] == 1:
        cfg.pop("BLOCK_M")
        launch(
            lora_gemv_kernel, (cdiv(N, cfg["BLOCK_N"]),), x, w, lora_A, lora_B,
            bias if bias is not None else y, y, xa, N, K, R,
            x.stride(1), w.stride(0), w.stride(1), lora_A.stride(0), lora_A.stride(1),
            lora_B.stride(0), lora_B.stride(1), float(scaling), float(dropout_p), int(seed),
            HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0.0, EVEN_K=K % cfg["BLOCK_K"] == 0,
            BLOCK_R=_block_r(R), **cfg,
        )
        return y, xa
    grid = (cdiv(N, cfg["BLOCK_N"]), cdiv(M, cfg["BLOCK_M"]))
    launch(
        lora_decode_kernel, grid, x, w, lora_A, lora_B, bias if bias is not None else y, y, xa, M, N, K, R,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1),
        float(scaling), float(dropout_p), int(seed),
        HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0.0, EVEN_K=K % cfg["BLOCK_K"] == 0,
        DOT_PRECISION=_dot_precision(x.dtype), BLOCK_R=_block_r(R), **cfg,
    )
    return y, xa


def mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with a float32 result: for 16-bit CUDA operands cuBLAS's float32 accumulator is written as it is
    (torch.mm's out_dtype), so the kernels that read it see what their own loops would have summed."""
    if a.dtype == torch.float32 or a.dtype == torch.float64:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()  # the CPU has no 16-bit mm with a float32 result (the interpreter's tests)

def persistent_gemm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """What the persistent TMA GEMMs (y = x w^T, w an (N, K) view) need of x: 16 bits, rows of x and of y
    16-byte lines, x row-major, Hopper and newer (or the interpreter). w's layout is each kernel's to check."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        return False
    if (x.shape[1] * x.element_size()) % 16 or (w.shape[0] * x.element_size()) % 16:
        return False
    if not triton_interpret() and (not x.is_cuda or _facts(x.device)[1] < 9):
        return False
    return _tma_layout(x) == "row"


# The epilogue adds the low-rank term in slices of at most 64 ranks (R_CHUNKS), so r = 128 fits the shared memory of r =
# 64 (xa's float32 slice and B's beside the main loop's stages). Measured at r = 128 on an H200 (explore_lora.py
# --wide-ranks, logs/explore-lora-wide-ranks-20261203-h200.log; M = 8192, 4096^2): forward 1.154x F.linear vs 1.163x for
# cuBLAS's beta mode, backward 1.255x vs 1.267x (cuBLAS dx + addmm_); in the op's benchmark a tie (1.20x both ways). The
# slice loop costs more than r = 64's single slice (1.099x forward): in the IR compiled for sm_90
# (scripts/compile_report.py) it stops the tile loop's flattening, so the epilogue no longer overlaps the next tile's
# loads (NOTES-lora.md, seventh session). Unrolled slices (tl.static_range) ask for 377 KB of shared memory: more than
# an SM has.
# Since 2026-12-03 (eighth session) the default config does not flatten the walk above 64 ranks and adds the whole rank
# in one slice (_persistent_config); the slice loop serves flattened configs given explicitly.
PERSISTENT_MAX_RANK = 128
_PERSISTENT_RANK_SLICE = 64
# Pipeline stages of the unflattened walk (r > 64) from 1024 rows: 4 fit beside the whole-rank epilogue (224 KB at
# r = 128, compiled for sm_90 by Triton 3.6), the flattened r <= 64 walk takes 3 (4 would need 236 KB).
WIDE_RANK_STAGES = int(os.environ.get("PEFTKERN_LORA_WIDE_STAGES", "3"))


def persistent_forward_ok(x: torch.Tensor, w: torch.Tensor, lora_A: torch.Tensor) -> bool:
    """Whether `persistent_forward` takes these operands: persistent_gemm_ok, w TMA-able either way, a rank whose
    rows of B are 16-byte lines (r a multiple of 8) and at most PERSISTENT_MAX_RANK."""
    R = lora_A.shape[0]
    return R % 8 == 0 and R <= PERSISTENT_MAX_RANK and persistent_gemm_ok(x, w) and _tma_layout(w) is not None


_persistent_configs: dict = {}


def _persistent_config(M: int, R: int = 16) -> dict:
    """The persistent kernel's config for M rows and rank R (a fresh dict each call: callers pop from it)."""
    key = (M >= 1024, R <= _PERSISTENT_RANK_SLICE, WIDE_RANK_STAGES, PERSISTENT_GROUP_M, triton_interpret())
    cfg = _persistent_configs.get(key)
    if cfg is None:
        cfg = _persistent_configs[key] = _make_persistent_config(M, R)
    return dict(cfg)


# Row tiles a group of the walk's tile order takes from 1024 rows (_tile_coords). PEFTKERN_LORA_GROUP_M overrides it.
# Timed on an H200 (explore_lora.py --narrow-configs, the kernel alone, r = 16 unless said; logs/explore-lora-narrow-
# configs-*-h200.log): 4 gained 3-8 us a GEMM at the 1b model's 5632-wide shapes, tied at 2048^2, 4096^2 and r = 128,
# and lost 26-32 us in the 4096 -> 11008 forward and 16-23 us in the 11008 -> 4096 dx; 2 lost nearly everywhere, 16
# tied 8. No single value wins, and a rule by shape would fit these few shapes only: 8 stays. The config and plan memos
# key on it, so a change between calls (scripts/step_ab.py's group-m-4) is seen at the next launch.
PERSISTENT_GROUP_M = int(os.environ.get("PEFTKERN_LORA_GROUP_M", "8"))


def _make_persistent_config(M: int, R: int) -> dict:
    if triton_interpret():
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, FLATTEN=False, SUBTILE=True, XA_GIVEN=True,
                    num_warps=4, num_stages=1)
    # Measured on an H100, bf16, r = 16 (scripts/explore_lora_persistent.py, results/logs/explore-lora-persistent-
    # h100.log): 128x256x64, 3 stages, 8 warps, flattened, half-tile stores from M = 1024 (1.10x F.linear at
    # M = 8192 and 2048, 1.14x at 1024); below that 128x128x64 with 4 stages fills more SMs (1.40x vs 1.79x at
    # M = 512, where cuBLAS's add mode is 1.51x).
    # Above one slice of ranks the walk is not flattened, and the epilogue adds the whole rank at once: the flattened
    # walk's pipeliner would give the epilogue's xa and B tiles a buffer per stage (r = 128: 288 KB with 64-wide
    # slices unrolled), and a loop over slices stops the flattening anyway. Unflattened, those tiles reuse the main
    # loop's buffers: 176 KB, compiled for sm_90 by Triton 3.6 and 3.9 (scripts/compile_report.py).
    flatten = R <= _PERSISTENT_RANK_SLICE
    if M < 1024:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, FLATTEN=flatten, SUBTILE=False, XA_GIVEN=True,
                    num_warps=8, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=PERSISTENT_GROUP_M, FLATTEN=flatten, SUBTILE=True,
                XA_GIVEN=True, num_warps=8, num_stages=3 if flatten else WIDE_RANK_STAGES)


def _persistent_block_r(R: int, flatten: bool, xa_given: bool = True) -> int:
    """The epilogue's slice of ranks: the whole rank where the walk is not flattened (its tiles then reuse the main
    loop's buffers), else at most _PERSISTENT_RANK_SLICE, added in a loop of R_CHUNKS slices."""
    if xa_given and not flatten:
        return _block_r(R)
    return min(_block_r(R), _PERSISTENT_RANK_SLICE)


# xa made inside the persistent kernel by programs of its own (XA_WORKERS), where the tile walk leaves SMs free
# without a round more. PEFTKERN_LORA_XA_WORKERS=0 turns it off (cuBLAS makes xa and dyb beforehand, as before).
XA_WORKERS = os.environ.get("PEFTKERN_LORA_XA_WORKERS", "1") != "0"
_MAX_XA_WORKERS = 16


# Up to this rank: above it the workers' products are too much tensor work for the few SMs they get (r = 128 at
# M = 8192, 4096^2: 4 workers, 2.1 GFLOP each, made the forward 1.37x F.linear against 1.12x without them).
XA_WORKERS_MAX_RANK = 64
# The backward's dx takes them up to this many rows. Timed on an H200 (explore_lora.py --workers,
# logs/explore-lora-workers-59b8084-h200.log), the backward alone: 118 vs 122 us at M = 2048, 239-240 vs 241-242 us at
# 4096, but 470 vs 462-463 us at 8192 (4096^2, r = 16), where dA, which needs dyb, can only follow the dx kernel,
# while without workers dA and dB both fill the SMs its last round of tiles leaves idle.
XA_WORKERS_DX_MAX_M = 4096
# A worker makes a 128-row block of xa (r <= 64) in about the time a walking program computes this many columns of
# its output tiles (K cancels: both scale with it), so the workers keep up where blocks per worker x this <= rounds x
# BLOCK_N. From the 1b training step's trace on an H200 (scripts/step_trace.py, NOTES-lora.md, twelfth session): at
# M = 8192, 2048 -> 2048 the forward with 4 workers took 158 us (16 blocks each, 4 rounds of 256 columns: 2048 > 1024)
# where the same GEMM without them took 98 us; 5632 -> 2048 357 us against ~270. Where workers were measured to gain
# (4096^2 at M = 2048, 4096 and 8192; 11008 -> 4096; 2048 -> 5632 in that trace) the rule holds, at 4096^2 exactly.
XA_WORKER_COLUMNS_PER_BLOCK = 128
_WORKER_SMEM = 200 * 1024  # bytes of the workers' pipeline buffers (the GEMM programs' own take ~188-224 KB)


def _worker_stages(bm: int, bk: int, block_r: int, pairs: bool = False) -> int:
    """Pipeline stages of the xa workers' loop: as many x and A tiles in flight as _WORKER_SMEM holds, at most 10.
    pairs: the helpers' loop, two x tiles a stage (_xa_pairs)."""
    return max(2, min(10, _WORKER_SMEM // (((2 if pairs else 1) * bm + block_r) * bk * 2)))


def _gemm_programs(tiles: int, sms: int) -> int:
    """The fewest programs that walk `tiles` in as few rounds as `sms` programs would."""
    return cdiv(tiles, cdiv(tiles, sms))


def _xa_walk(M: int, N: int, R: int, device: torch.device,
             config: Optional[dict]) -> Optional[tuple[int, int, int]]:
    """(row blocks of xa, output tiles, BLOCK_N) of a persistent kernel that may make xa itself, or None where it may
    not: XA_WORKERS off, not a GPU (nor the interpreter), or an epilogue that does not read the whole rank at once."""
    if not XA_WORKERS or device.type != "cuda" and not triton_interpret():
        return None
    cfg = config or _persistent_config(M, R)
    if cdiv(R, _persistent_block_r(R, cfg["FLATTEN"])) != 1:
        return None
    num_m = cdiv(M, cfg["BLOCK_M"])
    return num_m, num_m * cdiv(N, cfg["BLOCK_N"]), cfg["BLOCK_N"]


def xa_workers(M: int, N: int, R: int, device: torch.device, config: Optional[dict] = None) -> int:
    """How many of the persistent kernel's programs make xa (0: none; cuBLAS makes it beforehand): the SMs that
    the walk over (M, N)'s tiles leaves free, at most one per row block of xa and _MAX_XA_WORKERS. Needs the
    epilogue to read the whole rank at once (R_CHUNKS = 1)."""
    walk = _xa_walk(M, N, R, device, config) if R <= XA_WORKERS_MAX_RANK else None
    if walk is None:
        return 0
    num_m, tiles, block_n = walk
    sms = _sm_count(device)
    workers = min(sms - _gemm_programs(tiles, sms), num_m, _MAX_XA_WORKERS)
    # Each worker's row blocks must be made in the time the others walk their rounds of tiles
    if workers and not triton_interpret() and (
            cdiv(num_m, workers) * XA_WORKER_COLUMNS_PER_BLOCK > cdiv(tiles, sms - workers) * block_n):
        return 0
    return workers


# xa made inside the persistent kernel by helpers (XA_HELPERS): where the walk gives some programs a tile fewer than the
# rest, those programs make xa's row blocks before walking their tiles. Unlike the workers, they take no program
# from the walk, and their products may be as much tensor work as a tile (r = 128 at M = 8192, 4096^2: 32 of 132
# programs walk 7 tiles, not 8, and make two 128-row blocks of xa each, half a 128x256 tile's MMA work apiece).
# Where both apply the workers go first (xa_plan). PEFTKERN_LORA_XA_HELPERS=0 turns them off (PEFTKERN_LORA_XA_WORKERS=0 both).
XA_HELPERS = os.environ.get("PEFTKERN_LORA_XA_HELPERS", "1") != "0"
# A helper makes at most this many row blocks (a pair, _xa_pairs): two of r = 128 are the MMA work of the tile it
# walks fewer.
XA_HELPER_MAX_BLOCKS = 2


def xa_helpers(M: int, N: int, R: int, device: torch.device, config: Optional[dict] = None) -> int:
    """How many of the persistent kernel's programs make xa before their tiles (0: none): the programs the walk
    over (M, N)'s tiles gives a tile fewer, if that makes each at most XA_HELPER_MAX_BLOCKS row blocks of xa. Needs
    the epilogue to read the whole rank at once (R_CHUNKS = 1)."""
    walk = _xa_walk(M, N, R, device, config) if XA_HELPERS else None
    if walk is None:
        return 0
    num_m, tiles, _ = walk
    programs = min(_sm_count(device), tiles)
    helpers = programs - tiles % programs if tiles % programs else 0
    if not helpers or 2 * cdiv(num_m, 2 * helpers) > XA_HELPER_MAX_BLOCKS:
        return 0
    return helpers


def xa_plan(M: int, N: int, R: int, device: torch.device, config: Optional[dict] = None) -> tuple[int, int]:
    """(workers, helpers) of a persistent kernel asked to make xa itself: workers where they apply, else helpers,
    else neither (0, 0: cuBLAS makes xa beforehand). Workers first: at r = 16 the forward took 435-439 us with them
    against 440-444 with helpers (M = 8192, 4096^2, H200, explore_lora.py --helpers); helpers serve the ranks above
    XA_WORKERS_MAX_RANK, where a few workers cannot do the tensor work in time."""
    if config is None:  # the default config's plan, memoised: it costs the host ~5 us a launch to work out
        key = (M, N, R, device, XA_WORKERS, XA_HELPERS, XA_WORKERS_MAX_RANK, XA_HELPER_MAX_BLOCKS,
               XA_WORKER_COLUMNS_PER_BLOCK, WIDE_RANK_STAGES, triton_interpret())
        plan = _xa_plans.get(key)
        if plan is None:
            if len(_xa_plans) >= 4096:
                _xa_plans.clear()
            plan = _xa_plans[key] = _make_xa_plan(M, N, R, device, None)
        return plan
    return _make_xa_plan(M, N, R, device, config)


_xa_plans: dict = {}


def _make_xa_plan(M: int, N: int, R: int, device: torch.device, config: Optional[dict]) -> tuple[int, int]:
    workers = xa_workers(M, N, R, device, config)
    return (workers, 0) if workers else (0, xa_helpers(M, N, R, device, config))


# The backward's dx kernel makes dyb itself up to XA_WORKERS_DX_MAX_M rows, and above that where helpers do it above
# XA_WORKERS_MAX_RANK (there the last round's idle SMs could not hold dA and dB anyway: r = 128 gained nothing from
# TAIL_OVERLAP, NOTES-lora.md, ninth session). lora_backward asks only above SKINNY_MAX_RANK (or without skinny_grads).
def dx_makes_dyb(M: int, K: int, R: int, device: torch.device) -> bool:
    """Whether the backward's persistent dx kernel (output M x K) makes dyb = s dy B itself."""
    workers, helpers = xa_plan(M, K, R, device)
    return bool(workers or helpers) and (M <= XA_WORKERS_DX_MAX_M or (helpers and R > XA_WORKERS_MAX_RANK))


_persistent_plans: dict = {}


class _PersistentPlan:
    """What persistent_forward decides on the host before a launch: tiles, grid, the xa plan, how xa is made, the
    operands' layouts and the kernel's constexprs. Each depends only on shapes, strides, dtypes, 16-byte alignment,
    the flags and the module's switches; persistent_forward memoises a plan on them for the default config (working it
    out cost the host ~10 us a call on a fast CPU). key: that memo's key, None for a config given by the caller."""

    __slots__ = ("bm", "bn", "bk", "block_r", "store_n", "grid", "make_xa", "scale_b", "no_scale", "b_rmajor",
                 "w_kmajor", "a_layout", "flags", "buffers", "meta", "key")

    def __init__(self, x, w, lora_A, lora_B, scaling, bias, config, xa_dtype, xa, xa_scaled, prescale_b, workers, key):
        M, K = x.shape
        N = w.shape[0]
        R = lora_A.shape[0]
        cfg = dict(config or _persistent_config(M, R))
        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        a = lora_A.to(x.dtype)
        xa_given = cfg.pop("XA_GIVEN", True)
        block_r = _persistent_block_r(R, cfg["FLATTEN"], xa_given)
        if not xa_given and block_r < R:
            raise ValueError(f"persistent_forward: xa made in the kernel needs r <= {block_r}, got r = {R}")
        if xa is not None and not xa_given:
            raise ValueError("persistent_forward: a given xa needs a config with XA_GIVEN")
        if _tma_layout(x) != "row" or _tma_layout(w) is None:
            raise ValueError("persistent_forward: x must be row-major and x and w TMA-able (persistent_forward_ok)")
        n_workers, n_helpers = xa_plan(M, N, R, x.device, config) if workers and xa_given and xa is None else (0, 0)
        if workers and xa is not None:
            raise ValueError("persistent_forward: workers make xa; none may be given")
        if workers:
            if xa_scaled and xa_dtype != x.dtype:
                raise ValueError("persistent_forward: xa_scaled needs xa in x's dtype")
        elif xa_scaled and (xa is None or xa.dtype != x.dtype):
            raise ValueError("persistent_forward: xa_scaled needs xa given in x's dtype")
        if not xa_given or n_workers or n_helpers:
            self.make_xa, made_dtype = "kernel", xa_dtype
        elif xa is None and xa_scaled:
            self.make_xa, made_dtype = "scaled", x.dtype
        elif xa is None:
            self.make_xa = "float32" if xa_dtype == torch.float32 else "mm"
            made_dtype = torch.float32 if xa_dtype == torch.float32 else x.dtype
        else:
            self.make_xa, made_dtype = "given", xa.dtype
        # The epilogue adds xa's tile as it is where the scaling is in xa already, goes into B here, or is 1.
        xa_plain = xa_given and made_dtype == x.dtype
        self.scale_b = prescale_b and xa_plain and not xa_scaled and scaling != 1.0
        b = (lora_B * scaling).to(x.dtype) if self.scale_b else lora_B.to(x.dtype)
        self.no_scale = xa_scaled or self.scale_b or (xa_plain and scaling == 1.0)
        self.b_rmajor = _tma_layout(b) == "col"
        self.w_kmajor = _tma_layout(w) == "row"
        store_n = bn // 2 if cfg["SUBTILE"] else bn
        sms = _sm_count(x.device)
        tiles = cdiv(M, bm) * cdiv(N, bn)
        self.grid = (n_workers + _gemm_programs(tiles, sms),) if n_workers else (min(sms, tiles),)
        a_kmajor = True
        if n_workers or n_helpers:
            a_kmajor = _tma_layout(a) != "col"
            self.a_layout = "row" if a_kmajor else "col"
        else:
            self.a_layout = None if xa_given else "row"
        self.flags = cdiv(M, bm) if n_workers or n_helpers else 0
        # what the kernel writes into, made in one call where xa is the kernel's too (_launch.empty_buffers)
        self.buffers = None
        if self.make_xa == "kernel":
            self.buffers = (((M, N), x.dtype, False), ((M, R), made_dtype, False))
            if self.flags:
                self.buffers += (((self.flags,), torch.int32, True),)
        self.bm, self.bn, self.bk, self.block_r, self.store_n, self.key = bm, bn, bk, block_r, store_n, key
        self.meta = dict(
            XA_GIVEN=xa_given, XA_SCALED=self.no_scale, W_KMAJOR=self.w_kmajor, HAS_BIAS=bias is not None,
            BLOCK_R=block_r, B_RMAJOR=self.b_rmajor, R_CHUNKS=cdiv(R, block_r), XA_WORKERS=n_workers,
            A_KMAJOR=a_kmajor, SPIN=not triton_interpret(),
            WORKER_STAGES=_worker_stages(bm, bk, block_r, n_helpers > 0) if n_workers or n_helpers else 3,
            XA_HELPERS=n_helpers, **cfg)


def persistent_forward(x: torch.Tensor, w: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                       scaling: float, bias: Optional[torch.Tensor] = None,
                       config: Optional[dict] = None, xa_dtype: torch.dtype = torch.float32,
                       xa: Optional[torch.Tensor] = None, xa_scaled: bool = False, prescale_b: bool = False,
                       workers: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, xa) = (x w^T + b + s (x A^T) B^T, x A^T) by lora_forward_persistent_kernel; w an (N, K) view, K-major
    (nn.Linear) or N-major (Conv1D's stored (K, N)). Needs persistent_forward_ok. xa comes in xa_dtype: the op's
    forward saves it in lora_xa_dtype (x's), and the backward's dx makes its dyb in x's dtype, which dA's cuBLAS
    call takes as it is. Either way the kernel adds s xa B^T from xa rounded to x's dtype. A given xa (M, r), x A^T
    made beforehand in x's dtype and row-major, is used as it is (the backward makes dyb first, so that dA's product
    can be queued beside the dx kernel). xa_scaled: that xa is s x A^T already (cuBLAS's alpha), in x's dtype.
    prescale_b: B is multiplied by s before the kernel (one small launch), so the epilogue need not scale xa's tile;
    taken where xa is in x's dtype.
    workers: xa is made inside the kernel by its workers or helpers where the tile walk leaves room
    (xa_plan(...) != (0, 0); else cuBLAS makes it beforehand, as without), in xa_dtype, as s x A^T where xa_scaled
    (the backward's dyb), else x A^T. No xa may be given then."""
    M, K = x.shape
    N = w.shape[0]
    R = lora_A.shape[0]
    if config is None:  # the host-side decisions, memoised on everything they depend on (NOTES-lora.md, twelfth session)
        key = (M, N, K, R, x.dtype, w.dtype, x.stride(), x.data_ptr() % 16, x.device, xa_dtype, xa_scaled, prescale_b,
               workers, scaling == 1.0, w.stride(), w.data_ptr() % 16, lora_A.dtype, lora_A.stride(),
               lora_A.data_ptr() % 16, lora_B.dtype, lora_B.stride(), lora_B.data_ptr() % 16,
               None if bias is None else bias.dtype,
               None if xa is None else (xa.dtype, xa.stride()), XA_WORKERS, XA_HELPERS, XA_WORKERS_MAX_RANK,
               XA_HELPER_MAX_BLOCKS, XA_WORKER_COLUMNS_PER_BLOCK, WIDE_RANK_STAGES, PERSISTENT_GROUP_M,
               triton_interpret())
        plan = _persistent_plans.get(key)
        if plan is None:
            plan = _PersistentPlan(x, w, lora_A, lora_B, scaling, bias, None, xa_dtype, xa, xa_scaled, prescale_b,
                                   workers, key)
            if len(_persistent_plans) >= 4096:  # shapes that never repeat (varying sequence lengths): start again
                _persistent_plans.clear()
            _persistent_plans[key] = plan
    else:
        plan = _PersistentPlan(x, w, lora_A, lora_B, scaling, bias, config, xa_dtype, xa, xa_scaled, prescale_b,
                               workers, None)
    bm, bn, bk, block_r = plan.bm, plan.bn, plan.bk, plan.block_r
    # A and B as they come where they can: the backward's dx passes B^T and A^T, views whose copies would cost a
    # launch each. cuBLAS takes A in any layout; B's TMA tiles come from B (N, r) or from B^T (r, N) row-major.
    # A is cast only where something reads it (a given xa with no workers needs none: float32 adapters' cast kernel).
    make_xa = plan.make_xa
    a = lora_A.to(x.dtype) if make_xa != "given" or plan.a_layout is not None else None
    flags = None
    if plan.buffers is not None:  # y, xa and the zeroed flags in one call
        y, xa, *flags = empty_buffers(x, *plan.buffers)
    else:
        y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if make_xa == "scaled":  # workers asked for where the walk leaves no SM free: s x A^T by cuBLAS
        xa = scaled_mm(x, a.t(), scaling, x.dtype)
    elif make_xa == "float32":
        xa = mm_float32(x, a.t())
    elif make_xa == "mm":
        xa = torch.mm(x, a.t())
    b = (lora_B * scaling).to(x.dtype) if plan.scale_b else lora_B.to(x.dtype)
    b_desc = Descriptor(b.t(), [block_r, bn]) if plan.b_rmajor else Descriptor(b.contiguous(), [bn, block_r])
    w_desc = Descriptor(w, [bn, bk]) if plan.w_kmajor else Descriptor(w.t(), [bk, bn])
    # Every descriptor costs the host a Python call and a driver encode per launch (scripts/host_costs.py): A's
    # only when xa is made in the kernel. (Loading xa and B by plain loads instead of TMA saved 40 us of host
    # time but made the forward 12% slower on the GPU at M = 2048: the epilogue waited on them, NOTES-lora.md.)
    a_desc = None
    if plan.a_layout == "row":
        a_desc = Descriptor(a.contiguous(), [block_r, bk])
    elif plan.a_layout == "col":  # A^T (K, r) row-major: the backward's dx passes B^T, a view of B
        a_desc = Descriptor(a.t(), [bk, block_r])
    flags = flags[0] if flags else xa
    args = (
        Descriptor(x, [bm, bk]), w_desc, Descriptor(y, [bm, plan.store_n]), a_desc, b_desc, Descriptor(xa, [bm, block_r]),
        xa, bias if bias is not None else y,
        # flags and xa_scale by position, as every argument that is not a constexpr: _launch's fast path takes a
        # kernel only so (a keyword one sent every launch through Triton's dispatch, ~100 us of host time a layer)
        M, N, K, R, xa.stride(0), 1.0 if plan.no_scale else float(scaling), plan.grid[0], flags,
        float(scaling) if xa_scaled else 1.0,
    )
    if plan.key is None:
        launch(lora_forward_persistent_kernel, plan.grid, *args, **plan.meta)
    else:  # the plan's key names every argument's class but the alignment of xa and the bias, made or given here
        launch_planned(lora_forward_persistent_kernel, plan.grid,
                       (plan.key, xa.data_ptr() % 16, None if bias is None else bias.data_ptr() % 16), *args,
                       **plan.meta)
    return y, xa


def down_project(a: torch.Tensor, down: torch.Tensor, dropout_p: float = 0.0, seed: int = 0,
                 config: Optional[tuple] = None) -> torch.Tensor:
    """low (M, R) float32 = drop(a) (M, K) @ down^T, down given as an (R, K) view."""
    M, K = a.shape
    R = down.shape[0]
    block_r = _block_r(R)
    if config is not None:
        block_m, block_k, warps, stages, target = config
    elif triton_interpret():
        block_m, block_k, warps, stages, target = 16, 32, 4, 1, 2
    else:
        # ~4 programs per SM, each streaming a (block_m x k_per_split) slab of a.
        block_m, block_k, warps, stages, target = 64, 64, 4, 4, 4 * _sm_count(a.device)
    n_m = cdiv(M, block_m)
    splits = max(1, min(target // n_m, cdiv(K, 8 * block_k)))
    k_per_split = cdiv(cdiv(K, splits), block_k) * block_k
    splits = cdiv(K, k_per_split)
    part = torch.empty((splits, M, block_r), device=a.device, dtype=torch.float32)
    launch(lora_down_kernel, (n_m, splits),
        a, down, part, M, K, R, k_per_split,
        a.stride(0), a.stride(1), down.stride(0), down.stride(1),
        float(dropout_p), int(seed),
        HAS_DROPOUT=dropout_p > 0.0, EVEN_K=K % block_k == 0 and k_per_split % block_k == 0,
        DOT_PRECISION=_dot_precision(a.dtype),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=warps, num_stages=stages,
    )
    low = part[0] if splits == 1 else part.sum(0)
    return low[:, :R].contiguous() if block_r != R else low


def adapter_grad(big: torch.Tensor, small: torch.Tensor, dropout_p: float = 0.0, seed: int = 0,
                 colsum: bool = False, config: Optional[tuple] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(P, R) float32 = drop(big)^T (M, P) @ small (M, R), and optionally big's column sums (P,)."""
    M, P = big.shape
    R = small.shape[1]
    block_r = _block_r(R)
    if config is not None:
        block_m, block_p, warps, stages = config
    elif triton_interpret():
        block_m, block_p, warps, stages = 16, 32, 4, 1
    else:
        # 128x64 tiles read big at ~2.3 TB/s on an H100 and keep the column sums cheapest (NOTES-lora.md);
        # wide ranks halve the rows so the pipelined buffers fit in shared memory.
        block_m, block_p, warps, stages = (128, 64, 4, 3) if block_r <= 32 else (64, 64, 4, 3)
    n_p = cdiv(P, block_p)
    target = 2 * _sm_count(big.device)
    splits = max(1, min(cdiv(target, n_p), cdiv(M, block_m)))
    rows_per_split = cdiv(cdiv(M, splits), block_m) * block_m
    splits = cdiv(M, rows_per_split)
    part = torch.empty((splits, P, block_r), device=big.device, dtype=torch.float32)
    sums = torch.empty((splits, P), device=big.device, dtype=torch.float32) if colsum else part
    launch(lora_adapter_grad_kernel, (n_p, splits),
        big, small, part, sums, M, P, R, rows_per_split,
        big.stride(0), big.stride(1), small.stride(0), small.stride(1),
        float(dropout_p), int(seed),
        HAS_DROPOUT=dropout_p > 0.0, COLSUM=colsum, DOT_PRECISION=_dot_precision(big.dtype),
        BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_R=block_r, num_warps=warps, num_stages=stages,
    )
    grad = part.sum(0)[:, :R]
    if dropout_p > 0.0:
        grad = grad / (1.0 - dropout_p)
    return grad, (sums.sum(0) if colsum else None)


# skinny_grads: the backward's dA, dB and bias gradient up to rank SKINNY_MAX_RANK without dropout (SKINNY_GRADS below).
# One launch on the main stream replaces two cuBLAS calls and a side stream's fork and join, which the host paid most
# for. `python scripts/explore_lora.py --skinny-grads` times the kernel against the cuBLAS calls, `--skinny-op` the op.
@functools.lru_cache(maxsize=4096)
def _skinny_plan(M: int, K: int, N: int, R: int, need_a: bool, need_b: bool, device: torch.device,
                 config: Optional[tuple]) -> tuple:
    """skinny_grads' tiles and grid, memoised per shape: (BLOCK_M, BLOCK_C, warps, stages, BLOCK_R, dA's column blocks,
    all column blocks, M splits, rows a split)."""
    block_r = _block_r(R)
    if config is not None:
        block_m, block_c, warps, stages = config
    elif triton_interpret():
        block_m, block_c, warps, stages = 16, 32, 4, 1
    else:  # adapter_grad's tiles (NOTES-lora.md), untimed here
        block_m, block_c, warps, stages = (128, 64, 4, 3) if block_r <= 32 else (64, 64, 4, 3)
    blocks_a = cdiv(K, block_c) if need_a else 0
    slots = blocks_a + (cdiv(N, block_c) if need_b else 0)
    splits = max(1, min(cdiv(2 * _sm_count(device), slots), cdiv(M, block_m)))
    rows_per_split = cdiv(cdiv(M, splits), block_m) * block_m
    return block_m, block_c, warps, stages, block_r, blocks_a, slots, cdiv(M, rows_per_split), rows_per_split


@functools.lru_cache(maxsize=4096)
def _skinny_buffers(partials: int, block_c: int, block_r: int, slots: int, R: int, K: int, N: int, a_dtype: torch.dtype,
                    b_dtype: torch.dtype, need_a: bool, need_b: bool, need_bias: bool) -> tuple:
    """skinny_grads' buffers as _launch.empty_buffers specs, made in one call: the float32 partials, the column sums'
    partials, the zeroed counters, dA, dB and the bias gradient, each where it is needed; and which of the six those
    are."""
    wanted = (True, need_bias, True, need_a, need_b, need_bias)
    specs = (((partials * block_c * block_r,), torch.float32, False), ((partials * block_c,), torch.float32, False),
             ((slots,), torch.int32, True), ((R, K), a_dtype, False), ((N, R), b_dtype, False),
             ((N,), torch.float32, False))
    return tuple(spec for spec, want in zip(specs, wanted) if want), wanted


@functools.lru_cache(maxsize=4096)
def skinny_partials_fit(M: int, K: int, N: int, R: int, need_a: bool, need_b: bool, need_bias: bool,
                        elem_size: int, device: torch.device) -> bool:
    """Whether skinny_grads' float32 partials (and the column sums' where the bias has a gradient) take no more bytes
    than dx (M x K in dy's dtype), which the backward allocates after they are freed: then the fwd+bwd peak stays the
    Unsloth-style path's (issue 2), whose cuBLAS products need no partials. Below that, at a few rows, the partials
    were the peak: one split of 128 slots x 64 x 16 float32 (0.5 MB) at M = 1 and 16, 4096^2, r = 16, against
    dx's 8 and 128 KB (bench lora on an H200 at d977eed: 0.767 and 1.001 MB against 0.267 and 0.501). Where none of
    the three is asked for (only x requires grad), skinny_grads makes nothing and needs no partials."""
    if not (need_a or need_b or need_bias):
        return True
    _, block_c, _, _, block_r, _, slots, splits, _ = _skinny_plan(M, K, N, R, need_a, need_b or need_bias, device,
                                                                  None)
    partials = slots * splits * block_c * (block_r + (1 if need_bias else 0)) * 4
    return partials <= M * K * elem_size


def skinny_grads(x: torch.Tensor, dyb: Optional[torch.Tensor], dy: torch.Tensor, xa: Optional[torch.Tensor],
                 scale_a: float, scale_b: float, a_dtype: torch.dtype, b_dtype: torch.dtype,
                 need_a: bool = True, need_b: bool = True, need_bias: bool = False,
                 config: Optional[tuple] = None) -> tuple:
    """(dA, dB, dbias) = (scale_a dyb^T x (r, K) in a_dtype, scale_b dy^T xa (N, r) in b_dtype, dy's column sums (N,)
    float32), each None where not asked for, by one launch of lora_skinny_grads_kernel (on GPUs the bias gradient by a
    column sum of its own). x (M, K), dy (M, N), dyb and xa (M, r), any strides. The sums over M are split and added in
    a fixed order: the same bits every run. config: (BLOCK_M, BLOCK_C, warps, stages)."""
    M, K = x.shape
    N = dy.shape[1]
    if not (need_a or need_b or need_bias):
        return None, None, None
    if need_bias and dy.is_cuda:
        # On GPUs the bias gradient is a reduction of its own. Summed in the kernel, beside dB's MMA, the dy tile feeds
        # both, and Triton 3.6's pipeliner gives that tile one buffer fewer while the async MMA reading it stays in
        # flight: the next tile's copy can overwrite it (seen in the IR, scripts/compile_report.py; the same pattern
        # made the bottleneck adapter's LN product wrong on an H200, NOTES-adapter.md).
        da, db, _ = skinny_grads(x, dyb, dy, xa, scale_a, scale_b, a_dtype, b_dtype, need_a, need_b, False, config)
        return da, db, dy.sum(0, dtype=torch.float32)
    R = (dyb if need_a else xa).shape[1]
    plan_key = (M, K, N, R, need_a, need_b or need_bias, x.device, config)
    block_m, block_c, warps, stages, block_r, blocks_a, slots, splits, rows_per_split = _skinny_plan(*plan_key)
    specs, wanted = _skinny_buffers(slots * splits, block_c, block_r, slots, R, K, N, a_dtype, b_dtype, need_a, need_b,
                                    need_bias)
    made = iter(empty_buffers(x, *specs))
    part, sums, counts, da, db, dbias = (next(made) if want else None for want in wanted)
    sums = sums if sums is not None else part
    dyb_ = dyb if need_a else dy  # stand-ins a branch never taken reads nothing from
    xa_ = xa if (need_b or need_bias) and xa is not None else dyb_
    da_ = da if da is not None else part
    db_ = db if db is not None else part
    # the launch's class: the plan, what is asked for, the operands' dtypes, strides and 16-byte alignment (the buffers
    # made here are the allocator's, aligned)
    dot = _dot_precision(x.dtype)  # reads allow_tf32 now: a float32 backward after it changes is another launch
    key = (plan_key, need_b, need_bias, a_dtype, b_dtype, x.dtype, dy.dtype, dyb_.dtype, xa_.dtype, x.stride(),
           dy.stride(), dyb_.stride(), xa_.stride(), x.data_ptr() % 16, dy.data_ptr() % 16, dyb_.data_ptr() % 16,
           xa_.data_ptr() % 16, dot)
    launch_planned(lora_skinny_grads_kernel, (slots, splits), key,
           x, dyb_, da_, dy, xa_, db_, dbias if dbias is not None else part, part, sums, counts,
           M, K, N, R, rows_per_split, splits, blocks_a, float(scale_a), float(scale_b),
           x.stride(0), x.stride(1), dyb_.stride(0), dyb_.stride(1),
           1 if da is None else da.stride(1), 1 if da is None else da.stride(0),
           dy.stride(0), dy.stride(1), xa_.stride(0), xa_.stride(1),
           1 if db is None else db.stride(0), 1 if db is None else db.stride(1),
           STORE_DB=need_b, COLSUM=need_bias, DOT_PRECISION=dot,
           BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_R=block_r, num_warps=warps, num_stages=stages)
    return da, db, dbias


# dyb_db: the backward's dyb = dy B and dB = s dy^T xa from one read of dy (lora_dyb_db_kernel, then
# lora_dyb_db_finish_kernel for the partial sums), up to rank DYB_DB_MAX_RANK without dropout, where the persistent dx
# kernel takes dyb as given (lora_backward). It replaces torch.mm's dyb before that kernel and skinny_grads' dB after
# it, which read dy once each. Timed on an H100 (scripts/explore_lora_dyb_db.py,
# logs/explore-lora-dyb-db-5e94abb+dybdb2-h100.log), M = 8192, r = 16: 37.1 against cuBLAS's 50.2 us for the two at
# 4096^2, and the op's backward 476-482 against 490-495 us; 338-340 against 354 us at 2048 -> 5632; 354 against 357-358
# at 5632 -> 2048. PEFTKERN_LORA_DYB_DB=0 turns it off.
DYB_DB = os.environ.get("PEFTKERN_LORA_DYB_DB", "1") != "0"
DYB_DB_MAX_RANK = 16
# (BLOCK_M, BLOCK_C, warps, stages) on a GPU: explore_lora_dyb_db.py's configs came within 3 us of the best at each of
# its three shapes but one (5632 wide)
DYB_DB_CONFIG = (64, 256, 4, 3)


@functools.lru_cache(maxsize=4096)
def _dyb_db_plan(M: int, N: int, R: int, device: torch.device, config: Optional[tuple]) -> tuple:
    """dyb_db's tiles and grid, memoised per shape: (BLOCK_M, BLOCK_C, warps, stages, BLOCK_R, column blocks, M
    splits, rows a split)."""
    if config is not None:
        block_m, block_c, warps, stages = config
    elif triton_interpret():
        block_m, block_c, warps, stages = 16, 32, 4, 1
    else:
        block_m, block_c, warps, stages = DYB_DB_CONFIG
    num_cb = cdiv(N, block_c)
    splits = max(1, min(cdiv(2 * _sm_count(device), num_cb), cdiv(M, block_m)))
    rows_per_split = cdiv(cdiv(M, splits), block_m) * block_m
    return block_m, block_c, warps, stages, _block_r(R), num_cb, cdiv(M, rows_per_split), rows_per_split


@functools.lru_cache(maxsize=4096)
def dyb_db_fits(M: int, N: int, K: int, R: int, elem: int, device: torch.device) -> bool:
    """Whether dyb_db's float32 partials (column blocks x M x BLOCK_R for dyb, splits x N x BLOCK_R for dB) take no
    more memory than the backward's dx (M x K), which is allocated after them: else they raise the step's peak above
    the Unsloth-style path's (issue 2). They hold ~M N / 4 bytes at BLOCK_C = 256, so this rules out N > ~8 K (an
    lm_head's vocabulary), and keeps every shape of the benchmarks."""
    if M == 0 or N == 0:
        return True
    plan = _dyb_db_plan(M, N, R, device, DYB_DB_CONFIG)  # the GPU's tiles, also under the interpreter
    block_r, num_cb, splits = plan[4], plan[5], plan[6]
    return 4 * block_r * (num_cb * M + splits * N) <= M * K * elem


def dyb_db(dy: torch.Tensor, lora_B: torch.Tensor, xa: torch.Tensor, scale_b: float, b_dtype: torch.dtype,
           config: Optional[tuple] = None) -> tuple:
    """(dyb = dy B (M, r) in dy's dtype, dB = scale_b dy^T xa (N, r) in b_dtype): lora_dyb_db_kernel reads dy once and
    leaves float32 partials, lora_dyb_db_finish_kernel adds them in a fixed order (the same bits every run). dy (M, N),
    lora_B (N, r) and xa (M, r) in any dtypes and strides (B and xa are taken in dy's dtype). config: (BLOCK_M,
    BLOCK_C, warps, stages)."""
    M, N = dy.shape
    R = lora_B.shape[1]
    if M == 0:  # no rows: dyb is empty and dB zero (the plan would divide by the rows a split)
        return dy.new_empty((0, R)), torch.zeros((N, R), device=dy.device, dtype=b_dtype)
    block_m, block_c, warps, stages, block_r, num_cb, splits, rows_per_split = _dyb_db_plan(M, N, R, dy.device, config)
    dyb_part, db_part, dyb, db = empty_buffers(
        dy, ((num_cb * M * block_r,), torch.float32, False), ((splits * N * block_r,), torch.float32, False),
        ((M, R), dy.dtype, False), ((N, R), b_dtype, False))
    dot = _dot_precision(dy.dtype)
    key = (M, N, R, dy.device, config, b_dtype, dy.dtype, lora_B.dtype, xa.dtype, dy.stride(), lora_B.stride(),
           xa.stride(), dy.data_ptr() % 16, lora_B.data_ptr() % 16, xa.data_ptr() % 16, dot)
    launch_planned(lora_dyb_db_kernel, (num_cb, splits), key,
                   dy, lora_B, xa, dyb_part, db_part, M, N, R, rows_per_split, dy.stride(0), dy.stride(1),
                   lora_B.stride(0), lora_B.stride(1), xa.stride(0), xa.stride(1),
                   DOT_PRECISION=dot, BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_R=block_r, STAGES=stages,
                   num_warps=warps, num_stages=stages)
    rows = 16 if triton_interpret() else 32
    dyb_programs = cdiv(M, rows)
    launch_planned(lora_dyb_db_finish_kernel, (dyb_programs + cdiv(N, rows),), ("finish", *key),
                   dyb_part, db_part, dyb, db, M, N, R, num_cb, splits, float(scale_b), dyb_programs,
                   dyb.stride(0), dyb.stride(1), db.stride(0), db.stride(1), BLOCK_ROWS=rows, BLOCK_R=block_r,
                   num_warps=4)
    return dyb, db


# column_grad: dA = s dyb^T x behind the persistent dx kernel on the side stream (TAIL_DA), by lora_column_grad_kernel
# (PEFTKERN_LORA_TAIL_DA_BY=triton, the default) or by cuBLAS ("cublas", 32613e4's). At 4096^2 the dx kernel's walk of
# 1024 tiles on 132 SMs leaves 32 SMs idle for its last round (~50 us): 32 programs of 128 columns each read a 2 MB
# strip of x there. cuBLAS's dA kernel is cut for the whole GPU and hid only 5-7 us of its ~28 there. Measured on an
# H100 (NOTES-lora.md, forty-second session), M = 8192, r = 16, two rounds: the backward 455-457 us against cuBLAS's
# 466-467 at 4096^2, 1177 against 1183-1191 at 4096 -> 11008, 140.5 against 143.5 at 2048^2; alone (no dx kernel
# beside it) it is slower than cuBLAS, 30 against 28 us at 4096^2. The compiled 1b step: 0.930x the frozen one's
# against 0.921x with cuBLAS.
TAIL_DA_BY = os.environ.get("PEFTKERN_LORA_TAIL_DA_BY", "triton")
# (BLOCK_M, BLOCK_C, warps, stages) on a GPU: 32 KB of x a stage, 4 stages in flight per SM. Of the four configs timed
# in the tail (explore_lora.py --tail-da) it was the steadiest: the best or within 4 us of it in five of the six
# shape-rounds; 128x64 with 6 stages was fastest alone (24.5 us at 4096^2) but spread by 26 us in the tail
COLUMN_GRAD_CONFIG = (128, 128, 4, 4)


def column_grad(big: torch.Tensor, small: torch.Tensor, scale: float, out_dtype: torch.dtype,
                config: Optional[tuple] = None) -> torch.Tensor:
    """scale small^T big (R, C) in out_dtype from big (M, C) and small (M, R), in any strides (small is taken in big's
    dtype): lora_column_grad_kernel, one program per BLOCK_C columns over all M rows, no partial sums. config:
    (BLOCK_M, BLOCK_C, warps, stages)."""
    M, C = big.shape
    R = small.shape[1]
    out = torch.empty((R, C), device=big.device, dtype=out_dtype)
    if M == 0 or C == 0:
        return out.zero_()
    if config is None:
        config = (16, 32, 4, 1) if triton_interpret() else COLUMN_GRAD_CONFIG
    block_m, block_c, warps, stages = config
    dot = _dot_precision(big.dtype)
    block_r = _block_r(R)
    key = ("column_grad", M, C, R, big.device, config, out_dtype, big.dtype, small.dtype, big.stride(), small.stride(),
           big.data_ptr() % 16, small.data_ptr() % 16, dot)
    launch_planned(lora_column_grad_kernel, (cdiv(C, block_c),), key,
                   big, small, out, M, C, R, float(scale), big.stride(0), big.stride(1), small.stride(0),
                   small.stride(1), out.stride(0), out.stride(1),
                   DOT_PRECISION=dot, BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_R=block_r, num_warps=warps,
                   num_stages=stages)
    return out


def dropout_mask(seed: int, shape: tuple, p: float, device: torch.device) -> torch.Tensor:
    """The keep-mask (M, K) bool that this backend's kernels use for (seed, shape, p): for tests."""
    M, K = shape
    keep = torch.empty((M, K), device=device, dtype=torch.int8)
    block = 16 if triton_interpret() else 64
    lora_dropout_mask_kernel[(cdiv(M, block), cdiv(K, block))](
        keep, M, K, float(p), int(seed), BLOCK_M=block, BLOCK_K=block)
    return keep.bool()


# ------------------------------------------------------------------------------------------- the op

def _w_nk(weight: torch.Tensor, weight_transposed: bool) -> torch.Tensor:
    return weight.t() if weight_transposed else weight


_side_cache = threading.local()


def _side_stream(device: torch.device, priority: int, main: torch.cuda.Stream) -> torch.cuda.Stream:
    """_Overlap's side stream for this thread and main stream, made once. Per thread: a stream that waits on a
    capturing stream's event joins its capture until the capture ends, so one side stream shared with a thread
    capturing a graph (cudagraph trees) would pull another thread's eager kernels into that graph. Never the main
    stream itself: torch.cuda.Stream hands out a pool of 32 streams per priority in turn, and a side stream that
    was the caller's would run the overlap serially, and silently (a review of the stream use, 2026-12-05)."""
    streams = getattr(_side_cache, "streams", None)
    if streams is None:
        streams = _side_cache.streams = {}
    key = (device, priority, main.cuda_stream)
    stream = streams.get(key)
    if stream is None:
        stream = torch.cuda.Stream(device, priority=priority)
        while stream.cuda_stream == main.cuda_stream:
            stream = torch.cuda.Stream(device, priority=priority)
        streams[key] = stream
    return stream


class _Overlap:
    """Run a memory-bound kernel on a side stream while the main stream runs a compute-bound GEMM.

    A GEMM at ~800 TFLOP/s leaves most of the DRAM bandwidth idle; the skinny down projection needs that
    bandwidth and little else. The side stream starts after everything already queued on the main stream,
    the main stream waits for it at exit, and tensors made or read on the side stream are marked as used by
    the main one for the caching allocator.

        with _Overlap(device) as ov:
            with ov.side():
                small = ov.keep(reduction(big), big)
            gemm(...)            # main stream, concurrently

    priority=-1 makes the side stream a high-priority one: then the GEMM goes there and the memory-bound kernels queue
    behind it on the main stream, and the block scheduler hands SMs to the GEMM's blocks first whenever both wait.
    """

    def __init__(self, device: torch.device, enabled: bool = True, priority: int = 0):
        self.enabled = enabled and device.type == "cuda" and not triton_interpret()
        self.device = device
        self.priority = priority

    def __enter__(self):
        if self.enabled:
            self.main = torch.cuda.current_stream(self.device)
            self.stream = _side_stream(self.device, self.priority, self.main)
            self.events = _overlap_events(self.device, self.priority)
            self.events[0].record(self.main)  # Stream.wait_stream would make an Event (and a driver event) per call
            self.stream.wait_event(self.events[0])
        return self

    def side(self):
        return torch.cuda.stream(self.stream) if self.enabled else contextlib.nullcontext()

    def keep(self, *tensors):
        """Mark tensors allocated or read on the side stream as used by the main stream; returns the first."""
        if self.enabled and not torch.cuda.is_current_stream_capturing():
            for t in tensors:
                if t is not None:
                    t.record_stream(self.main)
        return tensors[0]

    def __exit__(self, *exc):
        if self.enabled:
            self.events[1].record(self.stream)
            self.main.wait_event(self.events[1])
        return False


_event_cache = threading.local()


def _overlap_events(device: torch.device, priority: int) -> tuple:
    """Two events for _Overlap's fork and join, made once per thread, device and side stream: a wait takes the event's
    last record at the time of the call, so reuse is safe within a thread, and autograd's device threads and the
    caller's each have their own pair."""
    events = getattr(_event_cache, "events", None)
    if events is None:
        events = _event_cache.events = {}
    pair = events.get((device, priority))
    if pair is None:
        pair = events[device, priority] = (torch.cuda.Event(), torch.cuda.Event())
    return pair


# cuBLAS runs the frozen forward GEMM (x W^T, K-major W) about 1.25x faster than this file's Triton GEMM on
# an H100 (802 vs ~640 TFLOP/s measured, NOTES-lora.md), which outweighs the extra pass over y that adding
# the low-rank term costs. From M = 4096 the term is best written first and added by cuBLAS's epilogue
# (beta = 1: 1.22x vs 1.28x in place afterwards at M = 8192); below that, in place afterwards with xa made on a
# side stream (1.19x vs 1.21x at M = 2048). Small M stays on the Triton path, where launches dominate.
CUBLAS_FORWARD_MIN_M = 128
CUBLAS_BETA_MIN_M = 4096
# From PERSISTENT_MIN_M rows (16-bit, no dropout, TMA-able strides) the forward is one persistent Triton GEMM
# with the low-rank term in its epilogue, xa = x A^T from cuBLAS beforehand: 1.10x F.linear at M = 8192 and
# 2048 against cublas-beta's 1.17x / 1.21x, 1.07x vs 1.12x at 11008 -> 4096, 1.14x vs 1.31x at M = 1024,
# 1.40x vs 1.51x (cublas-add) at M = 512 (H100, results/logs/explore-lora-persistent-h100.log).
# PEFTKERN_LORA_PERSISTENT=0 turns it off (the cuBLAS modes then run, as before).
PERSISTENT_FORWARD = os.environ.get("PEFTKERN_LORA_PERSISTENT", "1") != "0"
PERSISTENT_MIN_M = 512
# The backward's dx = dy W + s dyb A by the same persistent kernel (dy for x, W^T for w, B^T for A, A^T for B; its x A^T
# from cuBLAS is then dyb), where it applies: no dropout, 16-bit, r <= PERSISTENT_MAX_RANK, from PERSISTENT_DX_MIN_M
# rows. Timed on an H200 (explore_lora.py --persistent-dx, logs/explore-lora-pdx-20261203-h200.log), the backward
# against cuBLAS's dy @ W alone: 1.173x vs 1.211x (fused GEMM) at M = 8192, 4096^2, r = 16; 1.164x vs 1.170x at
# 4096 -> 11008; 1.060x vs 1.097x at 11008 -> 4096;
# 1.214x vs 1.267x at r = 64 (cuBLAS dx + addmm_); 1.229x vs 1.220x at M = 2048 (a tie). Below 2048 rows it was not
# timed. PEFTKERN_LORA_PERSISTENT_DX=0 turns it off.
PERSISTENT_DX_MIN_M = 2048
PERSISTENT_DX = os.environ.get("PEFTKERN_LORA_PERSISTENT_DX", "1") != "0"
# With the persistent dx, dA = s dyb^T x, dB = s dy^T xa and the bias gradient go on a side stream queued behind the dx
# kernel: its one program per SM leaves SMs idle in its last round of tiles (1024 tiles on 132 SMs at M = 8192,
# 4096^2: 32 idle for an eighth of the kernel), and the reductions, memory-bound, fill them. Measured on an H200
# (explore_lora.py --tail, logs/explore-lora-tail-b431645-h200.log, the op's fwd+bwd): 900-902 vs 914-918 us at r = 16,
# 1.063x vs 1.072-1.075x at 4096 -> 11008; r = 128 unchanged. "priority" (the dx kernel on a high-priority side stream,
# the reductions behind it on the main one) tied with "side". PEFTKERN_LORA_TAIL_OVERLAP=0 runs them after dx on the
# main stream. Since the fifteenth session this applies above rank SKINNY_MAX_RANK, or with PEFTKERN_LORA_SKINNY_GRADS=0:
# up to rank 64 skinny_grads follows the dx kernel on the main stream, since the side stream's fork and join cost a
# training step's host more than the overlap saves its GPU.
TAIL_OVERLAP = os.environ.get("PEFTKERN_LORA_TAIL_OVERLAP", "side")  # "side", "priority" or "0" (off)
PRESCALED_DYB = os.environ.get("PEFTKERN_LORA_PRESCALED_DYB", "1") != "0"  # with TAIL_OVERLAP: dyb = s dy B
# The persistent forward takes s B (one small launch more) from PRESCALED_B_MIN_RANK: 2-5 us less at r = 64 and 128 on an
# H200, nothing measurable at r = 16, where the launch would cost the host for no gain (NOTES-lora.md, ninth session).
PRESCALED_B = os.environ.get("PEFTKERN_LORA_PRESCALED_B", "1") != "0"
PRESCALED_B_MIN_RANK = 64
# PEFTKERN_LORA_SKINNY_GRADS: the backward's dA, dB and bias gradient by one skinny_grads launch instead of cuBLAS calls,
# up to rank SKINNY_MAX_RANK (at r = 128 the kernel takes 49 us against cuBLAS's 44, NOTES-lora.md, fourteenth session).
# "main" (the default; "1" too): after the dx kernel on the main stream, with no side stream to fork and join. The fork
# and join are what the host pays most for: on a slow host (F.linear queued in 32 us) the 1b step ran at 74.4-75.7 ms
# this way against 84.5-90.0 ms with the cuBLAS calls on the side stream, and 82.6-87.5 with skinny_grads there
# (scripts/step_ab.py, alternated in one process; NOTES-lora.md, fifteenth session). On the GPU it is within +-8 us of
# the cuBLAS calls from 2048 to 4096 wide (`explore_lora.py --skinny-op`). "side": beside the dx kernel on the side
# stream, as the cuBLAS calls go; "0": the cuBLAS calls.
_SKINNY_SETTING = os.environ.get("PEFTKERN_LORA_SKINNY_GRADS", "main")
SKINNY_GRADS = _SKINNY_SETTING not in ("0", "")
SKINNY_MAX_RANK = 64
SKINNY_SIDE = _SKINNY_SETTING == "side"  # with SKINNY_GRADS: on the side stream beside the dx kernel, not after it
# PEFTKERN_LORA_TAIL_DA: where dyb_db has made dyb and dB, dA = s dyb^T x (one read of x, memory-bound) on the side
# stream, queued behind the persistent dx kernel, whose one program per SM leaves SMs idle in its last round of tiles
# (TAIL_OVERLAP's reasoning, for dA alone), instead of skinny_grads before the dx kernel on the main stream. By
# column_grad (TAIL_DA_BY) or cuBLAS, not skinny_grads: its float32 partials would be alive beside dx and raise the
# peak (issue 2). The fork and join cost the host (SKINNY_GRADS above), so "auto" takes it only where the layer's GEMMs
# are large enough that the GPU, not the host, sets the pace: M N K >= TAIL_DA_MIN_WORK. "1": always (where dyb_db
# ran), "0": never. Measured on an H100 with cuBLAS (NOTES-lora.md, forty-first session): the backward 5-7 us shorter
# at M = 8192, 4096^2, 3 us longer at 2048 -> 8192; the compiled 1b step 0.929x the frozen one's against 0.922x
# without it. With column_grad (forty-second session): "auto" 0.930x, "1" 0.924x.
_TAIL_DA_SETTING = os.environ.get("PEFTKERN_LORA_TAIL_DA", "auto")
TAIL_DA_MIN_WORK = 2**36  # M = 8192 at 4096^2 is 2^37; the 1b model's 2048^2 projections 2^35


# Without dropout, the skinny products (x A^T, dy B, dyb^T x, dy^T xa) go to cuBLAS: on the GPU they cost about
# what this file's reductions cost (28-30 us per 64 MB operand), while each Triton launch costs the CPU several
# times a cuBLAS call, which a training step of many small layers feels (NOTES-lora.md: the step was CPU-bound).
# The Triton reductions serve dropout, whose mask they regenerate from the seed.
def _cublas_skinny(dropout_p: float, device: torch.device) -> bool:
    return device.type == "cuda" and dropout_p == 0.0 and not triton_interpret()


_addmm_out_dtype = [True]  # cleared the first time torch's addmm refuses out_dtype (older releases)


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scaling: float, out_dtype: torch.dtype) -> torch.Tensor:
    """scaling * a @ b in out_dtype by one cuBLAS call: alpha carries the scaling (a separate mul_ cost the host as
    much as the product, scripts/host_costs.py), and a float32 result (PEFT's float32 adapters) is cuBLAS's float32
    accumulator rather than a 16-bit product widened."""
    # addmm's input, never read (beta = 0): a 0-dim view of a, not a cached tensor. A tensor cached across calls,
    # first made while torch.compile(mode="reduce-overhead") recorded its CUDA graphs, stayed alive in the graphs'
    # memory pool, and cudagraph trees refused the step ("tensor(s) in the cudagraph pool not tracked").
    if scaling == 1.0 and out_dtype == a.dtype:  # no alpha to carry: mm, without addmm's ignored input (two views)
        return torch.mm(a, b)
    if scaling == 0.0:  # addmm reads no operand at alpha = 0 (BLAS): a nan or inf in a or b gave 0, not 0 * nan = nan.
        # The product in float32, as the reference's: a 16-bit one that overflowed gave inf * 0 = nan (a review)
        return torch.mm(a.float(), b.float()).mul_(0.0).to(out_dtype)
    zero = a[0, 0]
    if out_dtype == torch.float32 and a.dtype != torch.float32 and a.is_cuda and _addmm_out_dtype[0]:
        try:
            return torch.addmm(zero, a, b, beta=0, alpha=scaling, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            _addmm_out_dtype[0] = False
    return torch.addmm(zero, a, b, beta=0, alpha=scaling).to(out_dtype)


# The fused dx GEMM keeps the low-rank epilogue's operands in registers beside a 128x256 accumulator: from
# r = 64 that spills, so wide ranks take cuBLAS's dx and one in-place addmm instead.
_MAX_EPILOGUE_RANK = 32


def lora_xa_dtype(x_dtype: torch.dtype, dropout_p: float) -> torch.dtype:
    """The dtype of the xa = drop(x) A^T that lora_forward returns and the op saves for backward: x's own for a
    16-bit x without dropout, float32 otherwise. Without dropout the backward's cuBLAS products read xa in x's dtype
    anyway (dB = s dy^T xa), so a float32 xa only cost M r 4 bytes of memory across the step and a cast kernel per
    backward; with dropout the Triton reductions read the float32 xa that lora_down_kernel writes."""
    if dropout_p == 0.0 and x_dtype in (torch.float16, torch.bfloat16):
        return x_dtype
    return torch.float64 if x_dtype == torch.float64 else torch.float32


def xa_made_apart(M: int, N: int, R: int, device: torch.device) -> bool:
    """Whether lora_forward (no dropout, no xa given) would make xa by a product of its own (lora_down) for x (M, K)
    and an output N wide, not inside its GEMM kernel (decode_forward's single launch, the persistent kernel's
    workers or helpers). Conservative: False wherever the kernel might make it. The compiled path's group_xa pass
    (ops/_compile_passes.py) makes the xa of layers that share x in one product where this holds for each."""
    if M <= DECODE_MAX_M:
        return False
    return device.type != "cuda" or xa_plan(M, N, R, device) == (0, 0)


def lora_down(x, lora_A, dropout_p, seed):
    """xa = drop(x) A^T (M, r) in lora_xa_dtype, made as lora_forward makes it where xa is not made inside the
    persistent kernel: cuBLAS on a GPU without dropout, else lora_down_kernel (the dropout mask from the seed)."""
    if _cublas_skinny(dropout_p, x.device):
        xa = x @ lora_A.t().to(x.dtype)
    else:
        xa = down_project(x, lora_A, dropout_p, seed)
    return xa.to(lora_xa_dtype(x.dtype, dropout_p))  # a cast only in the interpreter or with dropout


def lora_forward(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed, weight_transposed,
                 mode: Optional[str] = None, xa: Optional[torch.Tensor] = None):
    """(y, xa): y = x W^T + b + s xa B^T with xa = drop(x) A^T (M, r), saved for backward in lora_xa_dtype.
    xa: made beforehand by lora_down (the op's compiled path), and then used as it is.

    mode: "triton" (the fused Triton GEMM), "cublas-add" (cuBLAS x W^T, then y += s xa B^T in place, xa on a
    side stream), "cublas-beta" (C = s xa B^T + b first, then cuBLAS C += x W^T in its epilogue),
    "persistent" (one persistent Triton kernel computes xa and y; without dropout, where persistent_forward_ok,
    else the default); None picks the fastest measured for the shape (NOTES-lora.md).
    """
    w = _w_nk(weight, weight_transposed)
    default = mode is None
    if mode == "persistent" and not (dropout_p == 0.0 and persistent_forward_ok(x, w, lora_A)):
        default = True  # the default stands in, but never picks "persistent" again
    if default:
        large = x.is_cuda and x.shape[0] >= CUBLAS_FORWARD_MIN_M and x.dtype != torch.float32
        if (mode is None and large and PERSISTENT_FORWARD and x.shape[0] >= PERSISTENT_MIN_M and dropout_p == 0.0
                and persistent_forward_ok(x, w, lora_A)):
            mode = "persistent"
        else:
            mode = ("cublas-beta" if x.shape[0] >= CUBLAS_BETA_MIN_M else "cublas-add") if large else "triton"
    xa_dtype = lora_xa_dtype(x.dtype, dropout_p)
    given = xa is not None
    if mode == "persistent":
        return persistent_forward(x, w, lora_A, lora_B, scaling, bias, xa_dtype=xa_dtype, xa=xa,
                                  prescale_b=PRESCALED_B and lora_A.shape[0] >= PRESCALED_B_MIN_RANK,
                                  workers=not given)
    skinny = _cublas_skinny(dropout_p, x.device)
    if mode == "triton" and x.shape[0] <= DECODE_MAX_M and not given:
        return decode_forward(x, w, lora_A, lora_B, scaling, bias, dropout_p, seed, xa_dtype=xa_dtype)
    if mode == "triton":
        xa = xa if given else lora_down(x, lora_A, dropout_p, seed)
        return fused_matmul(x, w, lora_B, xa, scaling, bias), xa
    with _Overlap(x.device, enabled=mode == "cublas-add" and not skinny and not given) as ov:
        if not given:
            with ov.side():
                xa = ov.keep(lora_down(x, lora_A, dropout_p, seed), x, lora_A)
        if mode == "cublas-add":
            y = torch.nn.functional.linear(x, w, bias)
    xa_s, b_t = (xa * scaling).to(x.dtype), lora_B.t().to(x.dtype)
    if mode == "cublas-add":
        return y.addmm_(xa_s, b_t), xa
    y = torch.addmm(bias, xa_s, b_t) if bias is not None else torch.mm(xa_s, b_t)
    return y.addmm_(x, w.t()), xa


def tail_da(M: int, K: int, N: int) -> bool:
    """Whether lora_backward makes dA behind the dx kernel on the side stream (PEFTKERN_LORA_TAIL_DA) for x (M, K)
    and dy (M, N)."""
    if _TAIL_DA_SETTING == "auto":
        return M * K * N >= TAIL_DA_MIN_WORK
    return _TAIL_DA_SETTING not in ("0", "")


def lora_backward(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, weight_transposed, needs):
    """(dx, dA, dB, dbias, dweight) as in reference.lora_backward.

    dyb = dy B (one read of dy); dx = dy W + s mask (dyb A), the forward's fused GEMM with W read N-major
    (Triton matches cuBLAS on this layout), or with PERSISTENT_DX the persistent forward kernel, dyb included;
    dA = s dyb^T drop(x) (one read of x); dB = s dy^T xa and the bias gradient (one more read of dy). Beside the
    non-persistent dx GEMM the two reductions on a side stream were measured slower (0.72 vs 0.57 ms at M=8192,
    4096x4096, H100): its blocks and theirs contend from the start. Behind the persistent dx kernel (TAIL_OVERLAP)
    they only find the SMs its last round of tiles leaves idle, and run there (15 us less at r = 16, H200).
    Up to DYB_DB_MAX_RANK, before the persistent dx kernel, dyb_db makes dyb and dB from one read of dy (DYB_DB).
    """
    need_x, need_a, need_b, need_bias, need_w = needs
    dx = da = db = dbias = dw = dyb = None
    # skinny_grads stands in for cuBLAS's skinny products (GPU, no dropout), where its partials fit beside dx's size
    skinny = (SKINNY_GRADS and lora_A.shape[0] <= SKINNY_MAX_RANK and _cublas_skinny(dropout_p, grad_y.device)
              and skinny_partials_fit(grad_y.shape[0], lora_A.shape[1], grad_y.shape[1], lora_A.shape[0], need_a,
                                      need_b, need_bias, grad_y.element_size(), grad_y.device))
    # Above SKINNY_MAX_RANK the cuBLAS products stay on TAIL_OVERLAP's side stream: at r = 128 on the main stream the
    # op's backward took 11 us more (bench lora: 1.174x against 1.158x; NOTES-lora.md, fifteenth session).
    w_kn = _w_nk(weight, weight_transposed).t()
    dt = grad_y.dtype
    persistent_dx = (need_x and PERSISTENT_DX and dropout_p == 0.0 and grad_y.shape[0] >= PERSISTENT_DX_MIN_M
                     and persistent_forward_ok(grad_y, w_kn, lora_B.t()))
    if (persistent_dx and TAIL_OVERLAP != "0" and _cublas_skinny(dropout_p, grad_y.device) and not skinny
            and dx_makes_dyb(grad_y.shape[0], w_kn.shape[0], lora_A.shape[0], grad_y.device)):
        # dyb = s dy B made inside the dx kernel by its xa workers or helpers; dB and the bias gradient, which need no
        # dyb, queued beside it on a side stream (they take the workers' SMs once dyb is made, and the last round's
        # idle ones); dA behind it, by cuBLAS.
        # Not with skinny_grads (rank <= SKINNY_MAX_RANK): there dA, which needs dyb, could only follow the dx kernel,
        # and its float32 partials (1.25 MB at 4096 wide) were allocated while dx was alive, which put the fwd+bwd
        # peak 1.5 MB over the Unsloth-style path's at M = 2048, 4096^2, r = 16 (issue 2; NOTES-lora.md, fortieth
        # session). The path below makes dyb first and finishes skinny_grads before dx is allocated. The workers had
        # saved 4 us of 122 at M = 2048 before dyb_db (H200, logs/explore-lora-workers-59b8084-h200.log); the two
        # orders were not timed against each other since.
        with _Overlap(grad_y.device) as ov:
            dx, dyb = persistent_forward(grad_y, w_kn, lora_B.t(), lora_A.t(), scaling, xa_dtype=dt, xa_scaled=True,
                                         workers=True)
            with ov.side():
                db = scaled_mm(grad_y.t(), xa.to(dt), scaling, lora_B.dtype) if need_b else None
                dbias = grad_y.sum(0, dtype=torch.float32) if need_bias else None
            ov.keep(db, dbias)
            da = scaled_mm(dyb.t(), x, 1.0, lora_A.dtype) if need_a else None
        return dx, da, db, dbias, _weight_grad(grad_y, x, weight_transposed) if need_w else None
    if persistent_dx and TAIL_OVERLAP != "0" and _cublas_skinny(dropout_p, grad_y.device):
        # dyb first; then the dx kernel, and queued behind it the skinny reductions, which take the SMs that the
        # persistent kernel's last round of tiles leaves idle: on a side stream ("side"), or with the dx kernel on a
        # high-priority side stream and the reductions on the main one ("priority").
        # dyb is made as s dy B (cuBLAS's alpha): the kernel's epilogue then feeds its tile to the tensor cores as it
        # is, and dA = dyb^T x needs no scaling either.
        if skinny and not SKINNY_SIDE:
            # One launch on the main stream: nothing to fork. dyb = dy B by a plain mm: the dx kernel's epilogue and
            # skinny_grads both scale by s themselves (a prescaled dyb, made by addmm's alpha, measured within 3 us of
            # it on the GPU, NOTES-lora.md, and costs the host an addmm's extra input). Up to DYB_DB_MAX_RANK dyb_db
            # makes dyb and dB from one read of dy instead, and skinny_grads dA alone. skinny_grads runs before the dx
            # kernel, not after it: on one stream the order costs the GPU nothing, and its float32 partials (1.25-1.5
            # MB at 4096 wide) are then freed before dx (M x K) is allocated, which kept the step's peak 1.25-1.5 MB
            # above the Unsloth-style path's from 91bf7e6 to 345304b (NOTES-lora.md, thirty-ninth session).
            one_read = (DYB_DB and need_b and lora_A.shape[0] <= DYB_DB_MAX_RANK
                        and dyb_db_fits(grad_y.shape[0], grad_y.shape[1], w_kn.shape[0], lora_A.shape[0],
                                        grad_y.element_size(), grad_y.device))
            if one_read:
                dyb, db = dyb_db(grad_y, lora_B, xa, scaling, lora_B.dtype)
            else:
                dyb = torch.mm(grad_y, lora_B.to(dt))
            if one_read and need_a and tail_da(grad_y.shape[0], w_kn.shape[0], grad_y.shape[1]):
                with _Overlap(grad_y.device) as ov:
                    dx, _ = persistent_forward(grad_y, w_kn, lora_B.t(), lora_A.t(), scaling, xa=dyb)
                    with ov.side():
                        da = (column_grad(x, dyb, scaling, lora_A.dtype) if TAIL_DA_BY == "triton"
                              else scaled_mm(dyb.t(), x, scaling, lora_A.dtype))
                        dbias = grad_y.sum(0, dtype=torch.float32) if need_bias else None
                    ov.keep(da, dbias)
                return dx, da, db, dbias, _weight_grad(grad_y, x, weight_transposed) if need_w else None
            da, db_skinny, dbias = skinny_grads(x, dyb, grad_y, xa, scaling, scaling, lora_A.dtype, lora_B.dtype,
                                                need_a, need_b and not one_read, need_bias)
            db = db if one_read else db_skinny
            dx, _ = persistent_forward(grad_y, w_kn, lora_B.t(), lora_A.t(), scaling, xa=dyb)
            return dx, da, db, dbias, _weight_grad(grad_y, x, weight_transposed) if need_w else None
        sc = 1.0 if PRESCALED_DYB else scaling
        dyb = scaled_mm(grad_y, lora_B.to(dt), scaling, dt) if PRESCALED_DYB else grad_y @ lora_B.to(dt)
        first = TAIL_OVERLAP == "priority"
        with _Overlap(grad_y.device, priority=-1 if first else 0) as ov:
            gemm_stream, rest_stream = (ov.side(), contextlib.nullcontext()) if first else (
                contextlib.nullcontext(), ov.side())
            with gemm_stream:
                dx, _ = persistent_forward(grad_y, w_kn, lora_B.t(), lora_A.t(), scaling, xa=dyb,
                                           xa_scaled=PRESCALED_DYB)
            with rest_stream:
                if skinny:
                    da, db, dbias = skinny_grads(x, dyb, grad_y, xa, sc, scaling, lora_A.dtype, lora_B.dtype, need_a,
                                                 need_b, need_bias)
                else:
                    da = scaled_mm(dyb.t(), x, sc, lora_A.dtype) if need_a else None
                    db = scaled_mm(grad_y.t(), xa.to(dt), scaling, lora_B.dtype) if need_b else None
                    dbias = grad_y.sum(0, dtype=torch.float32) if need_bias else None
            # what a side stream made, the main one uses; what it read came from main, which waits for it at exit
            if first:
                ov.keep(dx)
            else:
                ov.keep(da, db, dbias)
        return dx, da, db, dbias, _weight_grad(grad_y, x, weight_transposed) if need_w else None
    if persistent_dx:
        dx, dyb = persistent_forward(grad_y, w_kn, lora_B.t(), lora_A.t(), scaling, xa_dtype=dt)  # dyb: (M, r)
        need_x = False
    if _cublas_skinny(dropout_p, grad_y.device):
        if dyb is None and (need_x or need_a):
            dyb = grad_y @ lora_B.to(dt)
        if need_x and _block_r(lora_A.shape[0]) > _MAX_EPILOGUE_RANK:
            dx = (grad_y @ w_kn.t()).addmm_(dyb, lora_A.to(dt), alpha=scaling)
        elif need_x:
            dx = fused_matmul(grad_y, w_kn, lora_A.t(), dyb, scaling)
        if skinny:
            da, db, dbias = skinny_grads(x, dyb, grad_y, xa, scaling, scaling, lora_A.dtype, lora_B.dtype, need_a,
                                         need_b, need_bias)
        else:
            da = scaled_mm(dyb.t().to(dt), x, scaling, lora_A.dtype) if need_a else None
            dyb = None  # freed before dB's product: the step's peak holds one skinny transient fewer
            db = scaled_mm(grad_y.t(), xa.to(dt), scaling, lora_B.dtype) if need_b else None
            dbias = grad_y.sum(0, dtype=torch.float32) if need_bias else None
    else:
        if dyb is None and (need_x or need_a):
            dyb = down_project(grad_y, lora_B.t())
        if need_x:
            dx = fused_matmul(grad_y, w_kn, lora_A.t(), dyb, scaling, dropout_p=dropout_p, seed=seed)
        if need_a:
            grad, _ = adapter_grad(x, dyb, dropout_p, seed)
            da = (grad.t() * scaling).to(lora_A.dtype)
        if need_b or need_bias:
            grad, sums = adapter_grad(grad_y, xa, colsum=need_bias)
            db = (grad * scaling).to(lora_B.dtype) if need_b else None
            dbias = sums
    if need_w:
        dw = _weight_grad(grad_y, x, weight_transposed)
    return dx, da, db, dbias, dw


def _weight_grad(grad_y, x, weight_transposed):
    """The frozen weight's gradient, only when the user unfroze it: cuBLAS, float32, no fp32 copies."""
    dw = (grad_y.t() @ x).float()
    return dw.t() if weight_transposed else dw


def lora_merge_(weight, lora_A, lora_B, scaling, sign, weight_transposed=False):
    """weight += sign * scaling * B A in place (weight (N, K), or (K, N) if weight_transposed)."""
    w = _w_nk(weight, weight_transposed)
    N, K = w.shape
    R = lora_A.shape[0]
    block_n, block_k = (16, 32) if triton_interpret() else (64, 64)
    lora_merge_kernel[(cdiv(N, block_n), cdiv(K, block_k))](
        w, lora_A, lora_B, N, K, R,
        w.stride(0), w.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
        float(sign * scaling),
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=_block_r(R), num_warps=4,
    )
    return weight

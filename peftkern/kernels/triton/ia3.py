"""IA3 in Triton: the rescaling and the gradient of l ride on passes that happen anyway.

Math (x: M x K, W: N x K frozen, l: the learned vector):
    output form  y = (x W^T + b) * l        (l: N)   dx = (dy * l) W      dl = sum_m dy * z,  z = x W^T + b
    input form   y = (x * l) W^T + b        (l: K)   dx = l * (dy W)      dl = sum_m x * (dy W)
z is saved by the output form (y / l would divide by zero where l is 0; eager PyTorch saves it too).

Floor (bf16, M=8192, N=K=4096): two GEMMs (forward, dx), 2MNK = 275 GFLOP each, ~0.39 ms each on an H100.
The rescaling is M*N multiplies: nothing. What costs is memory: one pass over an activation is 64 MB, ~22 us
at the ~3 TB/s a device copy reaches. Extra passes over the floor, forward + backward:
  * output form: `ia3_output_persistent_kernel`, a persistent TMA GEMM (lora.py's walk), stores
    z = x W^T + b and y = z * l from its epilogue (+1: z's store). Below PERSISTENT_MIN_M rows, or where
    TMA cannot take the strides, cuBLAS writes z and `ia3_scale_kernel` reads it and writes y (+2).
    Backward (default "split"): `ia3_scale_reduce_kernel` reads dy and z, writes g = dy * l and dl's partial
    sums, then cuBLAS dx = g W (+3). `ia3_dx_output_form_kernel` (mode "fused": l applied to each dy tile
    on its way to the tensor cores, z read beside dy for dl) measured slower (NOTES-ia3.md).
  * input form: l is folded into a transient W' = W * l (an N x K read + write, one activation pass when
    M = 2K; x itself is scaled instead when M <= N), y = x W'^T + b by cuBLAS (+1). Backward: the dx GEMM
    whose epilogue multiplies by l and reads x's tile for dl's partial sums, so dy W never reaches memory
    (+1): `ia3_dx_input_persistent_kernel` (persistent, TMA) from PERSISTENT_DX_MIN_M rows on a GPU,
    `ia3_dx_input_form_kernel` (pointer loads) otherwise. Total +2: ~1.05x predicted, 1.06x measured (H200).
  * mode "split" (version 1, kept to measure against): cuBLAS dx and a separate `ia3_scale_reduce_kernel`
    pass (read two activations, write one: +3 backward).
The input form's forward GEMM stays on cuBLAS: on the x W^T layout only the persistent TMA kernel matches
cuBLAS, and the input form has nothing to put in its epilogue. On the dx = dy W layout the plain Triton GEMM
matches cuBLAS (NOTES-lora.md). Every scaling is computed in float32 (l may be float32 beside
a bf16 base, as PEFT keeps it) and rounded once: no float32 copy of any activation. dl's partial sums (one row
per row block, float32) are summed afterwards in a fixed order: deterministic.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..._backend import triton_interpret
from ._launch import cdiv, launch
from .lora import (
    _dot_precision,
    _grouped_pid,
    _matmul_config,
    _sm_count,
    _store_tile,
    _tile_coords,
    _tile_counts,
    _tma_layout,
    persistent_gemm_ok,
)

# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _dx_mainloop(a_ptr, w_ptr, scale_ptr, rows, cols, K, stride_am, stride_ak, stride_wn, stride_wk,
                 SCALE_A: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc = a[rows] w[cols]^T over all of K, float32; with SCALE_A each a tile is first scaled by l[k]
    (in float32, rounded to a's dtype once: the tensor cores take it from registers)."""
    offs_k = tl.arange(0, BLOCK_K)
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
        if SCALE_A:
            s = tl.load(scale_ptr + k * BLOCK_K + offs_k, mask=offs_k < K - k * BLOCK_K, other=0.0)
            a = (a.to(tl.float32) * s.to(tl.float32)[None, :]).to(w.dtype)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    return acc


@triton.jit
def _tile_rows_cols(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _grouped_pid(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Out-of-range rows/cols read row 0 instead of being masked (as in lora.py): unpredicated, vectorised
    # loads; the garbage lands only where the stores and the reductions mask it out.
    rows = tl.max_contiguous(tl.multiple_of(tl.where(offs_m < M, offs_m, 0), BLOCK_M), BLOCK_M)
    cols = tl.max_contiguous(tl.multiple_of(tl.where(offs_n < N, offs_n, 0), BLOCK_N), BLOCK_N)
    return pid_m, pid_n, offs_m, offs_n, rows, cols


@triton.jit
def ia3_dx_input_form_kernel(
    a_ptr, w_ptr, scale_ptr, x_ptr, out_ptr, part_ptr,
    M, N, K,
    stride_am, stride_ak, stride_wn, stride_wk, stride_xm, stride_xn, stride_om, stride_on,
    WRITE_OUT: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """acc = a w^T; out = acc * l[n] (if WRITE_OUT) and part[pid_m, n] = sum over the tile's rows of acc * x.
    Input-form backward: a = dy (M x N_layer), w = W^T, so acc = dy W (M x K_layer), out = dx, part -> dl."""
    pid_m, pid_n, offs_m, offs_n, rows, cols = _tile_rows_cols(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _dx_mainloop(a_ptr, w_ptr, scale_ptr, rows, cols, K, stride_am, stride_ak, stride_wn, stride_wk,
                       False, EVEN_K, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    # x reads 0 outside the matrix, so the stand-in rows of acc add nothing to dl.
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xn, mask=mask, other=0.0)
    tl.store(part_ptr + pid_m * N + offs_n, tl.sum(acc * x.to(tl.float32), axis=0), mask=offs_n < N)
    if WRITE_OUT:
        s = tl.load(scale_ptr + cols).to(tl.float32)
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
                 (acc * s[None, :]).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def ia3_dx_output_form_kernel(
    a_ptr, w_ptr, scale_ptr, z_ptr, out_ptr, part_ptr, colsum_ptr,
    M, N, K,
    stride_am, stride_ak, stride_wn, stride_wk, stride_zm, stride_zk, stride_om, stride_on,
    COLSUM: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out = (a * l[k]) w^T; then part[pid_m, k] = sum over the row block of a * z for the BLOCK_N-wide
    column chunks of a that fall to this program (chunk c to pid_n = c mod the number of column tiles), and
    colsum[pid_m, k] = sum of a there too (COLSUM). Output-form backward: a = dy (M x N_layer), w = W^T,
    out = dx (M x K_layer), part -> dl, colsum -> the bias gradient / l."""
    pid_m, pid_n, offs_m, offs_n, rows, cols = _tile_rows_cols(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _dx_mainloop(a_ptr, w_ptr, scale_ptr, rows, cols, K, stride_am, stride_ak, stride_wn, stride_wk,
                       True, EVEN_K, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))
    # The whole row block of a was just streamed through this SM and its neighbours in the group (L2-hot);
    # spreading its column chunks over the row block's programs reads z once in all, with no extra launch.
    m_mask = offs_m < M
    for c in range(pid_n, tl.cdiv(K, BLOCK_N), tl.cdiv(N, BLOCK_N)):
        offs_k = c * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = m_mask[:, None] & (offs_k[None, :] < K)
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak, mask=mask, other=0.0)
        z = tl.load(z_ptr + offs_m[:, None] * stride_zm + offs_k[None, :] * stride_zk, mask=mask, other=0.0)
        a = a.to(tl.float32)
        tl.store(part_ptr + pid_m * K + offs_k, tl.sum(a * z.to(tl.float32), axis=0), mask=offs_k < K)
        if COLSUM:
            tl.store(colsum_ptr + pid_m * K + offs_k, tl.sum(a, axis=0), mask=offs_k < K)


@triton.jit
def ia3_scale_kernel(
    in_ptr, scale_ptr, out_ptr, R, C,
    stride_ir, stride_ic, stride_or, stride_oc,
    SCALE_COLS: tl.constexpr, DIVIDE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[r, c] = in[r, c] * l[c] (SCALE_COLS) or * l[r] (or / l with DIVIDE), in float32, rounded once to
    out's dtype."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_r[:, None] < R) & (offs_c[None, :] < C)
    v = tl.load(in_ptr + offs_r[:, None] * stride_ir + offs_c[None, :] * stride_ic, mask=mask, other=0.0)
    if SCALE_COLS:
        s = tl.load(scale_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)[None, :]
    else:
        s = tl.load(scale_ptr + offs_r, mask=offs_r < R, other=0.0).to(tl.float32)[:, None]
    if DIVIDE:
        # div_rn: Triton's `/` on float32 is the GPU's approximate division (2 ulp), which drifted an unmerge by ~1 ulp
        # per merge / unmerge cycle on an H100; the interpreter divides exactly and cannot show it
        v = tl.where(mask, tl.math.div_rn(v.to(tl.float32), tl.where(mask, s, 1.0)), 0.0)
    else:
        v = v.to(tl.float32) * s
    tl.store(out_ptr + offs_r[:, None] * stride_or + offs_c[None, :] * stride_oc, v.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def ia3_scale_reduce_kernel(
    a_ptr, b_ptr, scale_ptr, out_ptr, part_ptr, M, C, rows_per_split,
    stride_am, stride_ac, stride_bm, stride_bc, stride_om, stride_oc,
    WRITE_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out = a * l[c] (if WRITE_OUT) and part[split, c] = sum over this split's rows of a * b: one read of a
    and b. Output-form backward: a = dy, b = z; input-form backward: a = dy W, b = x."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    pid_s = tl.program_id(1)
    c_mask = offs_c < C
    s = tl.load(scale_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m_start = pid_s * rows_per_split
    m_end = min(m_start + rows_per_split, M)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask = (offs_m[:, None] < m_end) & c_mask[None, :]
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_c[None, :] * stride_ac, mask=mask, other=0.0)
        b = tl.load(b_ptr + offs_m[:, None] * stride_bm + offs_c[None, :] * stride_bc, mask=mask, other=0.0)
        a = a.to(tl.float32)
        acc += tl.sum(a * b.to(tl.float32), axis=0)
        if WRITE_OUT:
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_c[None, :] * stride_oc,
                     (a * s[None, :]).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(part_ptr + pid_s * C + offs_c, acc, mask=c_mask)


@triton.jit
def _persistent_mainloop(a_desc, w_desc, pid_m, pid_n, k_tiles, W_KMAJOR: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One output tile's a w^T over all of K by TMA tiles (float32): w_desc holds w (N, K) row-major (W_KMAJOR,
    tiles [BLOCK_N, BLOCK_K]) or w^T (K, N) row-major (tiles [BLOCK_K, BLOCK_N])."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in tl.range(k_tiles):
        a = a_desc.load([pid_m * BLOCK_M, kk * BLOCK_K])
        if W_KMAJOR:
            acc = tl.dot(a, w_desc.load([pid_n * BLOCK_N, kk * BLOCK_K]).T, acc)
        else:
            acc = tl.dot(a, w_desc.load([kk * BLOCK_K, pid_n * BLOCK_N]), acc)
    return acc


@triton.jit
def ia3_output_persistent_kernel(
    x_desc, w_desc, y_desc, z_desc, l_ptr, bias_ptr, M, N, K, NUM_SMS,
    HAS_BIAS: tl.constexpr, FLATTEN: tl.constexpr, SUBTILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """The output form's forward: z = x W^T + b and y = z * l, both stored by TMA from one persistent GEMM's
    epilogue (float32 math, each rounded once to the base dtype), W K-major, one program per SM walking the
    output tiles in lora.py's grouped order. SUBTILE stores each tile as two halves (less shared memory)."""
    start = tl.program_id(0)
    num_m, num_n, num_tiles, k_tiles = _tile_counts(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K)
    out_tile = start - NUM_SMS
    for tile in tl.range(start, num_tiles, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
        acc = _persistent_mainloop(x_desc, w_desc, pid_m, pid_n, k_tiles, True, BLOCK_M, BLOCK_N, BLOCK_K)
        # the epilogue's tile, counted apart from the loop's: flattening pipelines it into the next tile's loop
        out_tile += NUM_SMS
        out_m, out_n = _tile_coords(out_tile, num_m, num_n, GROUP_M)
        cols = out_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        scaled = acc * tl.load(l_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        row, col = out_m * BLOCK_M, out_n * BLOCK_N
        _store_tile(y_desc, row, col, scaled, SUBTILE, BLOCK_M, BLOCK_N)
        _store_tile(z_desc, row, col, acc, SUBTILE, BLOCK_M, BLOCK_N)


@triton.jit
def ia3_dx_input_persistent_kernel(
    dy_desc, w_desc, x_desc, dx_desc, l_ptr, part_ptr, M, N, K, NUM_SMS,
    W_KMAJOR: tl.constexpr, WRITE_OUT: tl.constexpr, FLATTEN: tl.constexpr, SUBTILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """The input form's backward as one persistent GEMM: acc = dy W (M x N here, N the layer's in-features,
    K its out-features), dx = acc * l stored by TMA (if WRITE_OUT), and part[tile row, n] = sum over the
    tile's rows of acc * x, x's tile loaded by TMA in the epilogue (dl's partial sums). w_desc holds W (K, N)
    row-major (nn.Linear's weight, tiles [BLOCK_K, BLOCK_N]), or with W_KMAJOR W^T (N, K) row-major (Conv1D's
    stored weight, tiles [BLOCK_N, BLOCK_K]). Rows and columns outside the matrices load as zeros by TMA, so
    they add nothing to dl, and TMA stores none of them."""
    start = tl.program_id(0)
    num_m, num_n, num_tiles, k_tiles = _tile_counts(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K)
    out_tile = start - NUM_SMS
    for tile in tl.range(start, num_tiles, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
        acc = _persistent_mainloop(dy_desc, w_desc, pid_m, pid_n, k_tiles, W_KMAJOR, BLOCK_M, BLOCK_N, BLOCK_K)
        out_tile += NUM_SMS
        out_m, out_n = _tile_coords(out_tile, num_m, num_n, GROUP_M)
        row, col = out_m * BLOCK_M, out_n * BLOCK_N
        if SUBTILE:  # two halves: x's tile and dx's staging buffer take half the shared memory each
            left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            _input_dx_epilogue(left, x_desc, dx_desc, l_ptr, part_ptr + out_m * N, row, col, N, WRITE_OUT,
                               BLOCK_N // 2)
            _input_dx_epilogue(right, x_desc, dx_desc, l_ptr, part_ptr + out_m * N, row, col + BLOCK_N // 2, N,
                               WRITE_OUT, BLOCK_N // 2)
        else:
            _input_dx_epilogue(acc, x_desc, dx_desc, l_ptr, part_ptr + out_m * N, row, col, N, WRITE_OUT, BLOCK_N)


@triton.jit
def _input_dx_epilogue(acc, x_desc, dx_desc, l_ptr, part_row_ptr, row, col, N, WRITE_OUT: tl.constexpr,
                       WIDTH: tl.constexpr):
    """dl's partial sums over the tile's rows of acc * x, and dx = acc * l, for WIDTH columns from col."""
    cols = col + tl.arange(0, WIDTH)
    x = x_desc.load([row, col]).to(tl.float32)
    tl.store(part_row_ptr + cols, tl.sum(acc * x, axis=0), mask=cols < N)
    if WRITE_OUT:
        scaled = acc * tl.load(l_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        dx_desc.store([row, col], scaled.to(dx_desc.dtype))


# ------------------------------------------------------------------------------------------- launchers


def _gemm_config(M: int, dtype: torch.dtype, config: Optional[dict]) -> tuple[int, int, dict]:
    """(num_warps, num_stages, tile sizes): lora.py's measured GEMM configs. Float32 tiles are twice as big:
    beyond 3 stages they overflow the 228 KB of shared memory of an H100 SM (tf32 path)."""
    cfg = dict(config or _matmul_config(M))
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    if dtype.itemsize == 4:
        num_stages = min(num_stages, 3)
    return num_warps, num_stages, cfg


def dx_input_form(grad_y: torch.Tensor, w_kn: torch.Tensor, scale_vec: torch.Tensor, x: torch.Tensor,
                  write_dx: bool = True, config: Optional[dict] = None
                  ) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """(dx = (dy W) * l (M, K) if write_dx, dl = sum_m x * (dy W) float32 (K,)): one GEMM, dy W never stored.
    grad_y (M, N); w_kn (K, N) any strides (W.t() for an (N, K) weight); l (K,); x (M, K)."""
    M, N = grad_y.shape
    K = w_kn.shape[0]
    dx = torch.empty((M, K), device=x.device, dtype=x.dtype) if write_dx else x
    num_warps, num_stages, cfg = _gemm_config(M, grad_y.dtype, config)
    n_m = cdiv(M, cfg["BLOCK_M"])
    part = torch.empty((n_m, K), device=x.device, dtype=torch.float32)
    launch(ia3_dx_input_form_kernel, (n_m * cdiv(K, cfg["BLOCK_N"]),),
        grad_y, w_kn, scale_vec, x, dx, part, M, K, N,
        grad_y.stride(0), grad_y.stride(1), w_kn.stride(0), w_kn.stride(1), x.stride(0), x.stride(1),
        dx.stride(0), dx.stride(1),
        WRITE_OUT=write_dx, EVEN_K=N % cfg["BLOCK_K"] == 0, DOT_PRECISION=_dot_precision(grad_y.dtype),
        num_warps=num_warps, num_stages=num_stages, **cfg)
    return (dx if write_dx else None), part.sum(0)


def persistent_dx_input_ok(grad_y: torch.Tensor, w_kn: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether `persistent_dx_input_form` takes these operands: dy 16-bit row-major TMA-able with TMA-able rows
    of dx (lora's persistent_gemm_ok, which also asks for a GPU or the interpreter), x row-major in dy's dtype
    (its rows are dx's), W in dy's dtype with TMA-able rows one way or the other."""
    return (w_kn.dtype == grad_y.dtype and x.dtype == grad_y.dtype and persistent_gemm_ok(grad_y, w_kn)
            and _tma_layout(x) == "row" and _tma_layout(w_kn) is not None)


def persistent_dx_input_form(grad_y: torch.Tensor, w_kn: torch.Tensor, scale_vec: torch.Tensor, x: torch.Tensor,
                             write_dx: bool = True, config: Optional[dict] = None
                             ) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """dx_input_form's answer by ia3_dx_input_persistent_kernel; needs persistent_dx_input_ok."""
    M, N = grad_y.shape
    K = w_kn.shape[0]
    # x's tile beside the stages leaves no room for whole-tile stores: always half tiles by default
    cfg = dict(config or {**_persistent_config(M), "SUBTILE": True})
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    store_n = bn // 2 if cfg["SUBTILE"] else bn
    dx = torch.empty((M, K), device=x.device, dtype=x.dtype) if write_dx else x
    part = torch.empty((cdiv(M, bm), K), device=x.device, dtype=torch.float32)
    w_kmajor = _tma_layout(w_kn) == "row"  # (K, N) row-major: Conv1D's stored weight
    w_desc = TensorDescriptor.from_tensor(w_kn, [bn, bk]) if w_kmajor else TensorDescriptor.from_tensor(
        w_kn.t(), [bk, bn])
    grid = (min(_sm_count(x.device), cdiv(M, bm) * cdiv(K, bn)),)
    launch(ia3_dx_input_persistent_kernel, grid,
        TensorDescriptor.from_tensor(grad_y, [bm, bk]), w_desc, TensorDescriptor.from_tensor(x, [bm, store_n]),
        TensorDescriptor.from_tensor(dx, [bm, store_n]), scale_vec.contiguous(), part, M, K, N, grid[0],
        W_KMAJOR=w_kmajor, WRITE_OUT=write_dx, **cfg,
    )
    return (dx if write_dx else None), part.sum(0)


def dx_output_form(grad_y: torch.Tensor, w_kn: torch.Tensor, scale_vec: torch.Tensor, z: torch.Tensor,
                   colsum: bool = False, config: Optional[dict] = None
                   ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(dx = (dy * l) W (M, K), dl = sum_m dy * z float32 (N,), sum_m dy float32 (N,) if colsum): one GEMM,
    dy * l never stored. grad_y, z (M, N); w_kn (K, N) any strides; l (N,)."""
    M, N = grad_y.shape
    K = w_kn.shape[0]
    dx = torch.empty((M, K), device=grad_y.device, dtype=grad_y.dtype)
    num_warps, num_stages, cfg = _gemm_config(M, grad_y.dtype, config)
    n_m = cdiv(M, cfg["BLOCK_M"])
    part = torch.empty((n_m, N), device=grad_y.device, dtype=torch.float32)
    sums = torch.empty((n_m, N), device=grad_y.device, dtype=torch.float32) if colsum else part
    launch(ia3_dx_output_form_kernel, (n_m * cdiv(K, cfg["BLOCK_N"]),),
        grad_y, w_kn, scale_vec, z, dx, part, sums, M, K, N,
        grad_y.stride(0), grad_y.stride(1), w_kn.stride(0), w_kn.stride(1), z.stride(0), z.stride(1),
        dx.stride(0), dx.stride(1),
        COLSUM=colsum, EVEN_K=N % cfg["BLOCK_K"] == 0, DOT_PRECISION=_dot_precision(grad_y.dtype),
        num_warps=num_warps, num_stages=num_stages, **cfg)
    return dx, part.sum(0), (sums.sum(0) if colsum else None)


def persistent_output_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `persistent_output_form` takes these operands: lora.persistent_gemm_ok, and w (N, K) K-major
    (nn.Linear's layout) in x's dtype."""
    return w.dtype == x.dtype and persistent_gemm_ok(x, w) and _tma_layout(w) == "row"


def _persistent_config(M: int) -> dict:
    """The persistent kernels' tiles (the output form's forward; the input form's dx takes them with SUBTILE)."""
    if triton_interpret():
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, FLATTEN=False, SUBTILE=True, num_warps=4,
                    num_stages=1)
    # Measured on an H100, bf16 (scripts/explore_ia3_persistent.py, results/logs/explore-ia3-persistent-h100.log):
    # 128x256x64, 3 stages, half-tile stores: 1.099x F.linear at M = 8192, 4096 x 4096 (op before: 1.148x) and
    # 1.044x at 4096 -> 11008 (1.095x); full-tile stores at M = 2048: 1.051x (1.081x). 128x128 was slower.
    return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, FLATTEN=True, SUBTILE=M >= 4096, num_warps=8,
                num_stages=3)


def persistent_output_form(x: torch.Tensor, w: torch.Tensor, scale_vec: torch.Tensor,
                           bias: Optional[torch.Tensor] = None,
                           config: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, z) = ((x w^T + b) * l, x w^T + b) by ia3_output_persistent_kernel; needs persistent_output_ok."""
    M, K = x.shape
    N = w.shape[0]
    cfg = dict(config or _persistent_config(M))
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    store_n = bn // 2 if cfg["SUBTILE"] else bn
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    z = torch.empty((M, N), device=x.device, dtype=x.dtype)
    grid = (min(_sm_count(x.device), cdiv(M, bm) * cdiv(N, bn)),)
    launch(ia3_output_persistent_kernel, grid,
        TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk]),
        TensorDescriptor.from_tensor(y, [bm, store_n]), TensorDescriptor.from_tensor(z, [bm, store_n]),
        scale_vec.contiguous(), bias.contiguous() if bias is not None else y, M, N, K, grid[0],
        HAS_BIAS=bias is not None, **cfg,
    )
    return y, z


def scale(t: torch.Tensor, vec: torch.Tensor, cols: bool = True,
          out_dtype: Optional[torch.dtype] = None, divide: bool = False) -> torch.Tensor:
    """t (R, C) * vec (or / vec if divide) along columns (vec: (C,)) or rows (vec: (R,)), float32 math, one
    rounding to out_dtype."""
    R, C = t.shape
    out = torch.empty((R, C), device=t.device, dtype=out_dtype or t.dtype)
    block_r, block_c = (16, 32) if triton_interpret() else (32, 256)
    launch(ia3_scale_kernel, (cdiv(R, block_r), cdiv(C, block_c)),
        t, vec, out, R, C, t.stride(0), t.stride(1), out.stride(0), out.stride(1),
        SCALE_COLS=cols, DIVIDE=divide, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    return out


def scale_reduce(a: torch.Tensor, b: torch.Tensor, vec: torch.Tensor, write_out: bool = True,
                 out_dtype: Optional[torch.dtype] = None) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """(a * vec if write_out, sum_m a * b as float32 (C,)) with one read of a and b, both (M, C)."""
    M, C = a.shape
    out = torch.empty((M, C), device=a.device, dtype=out_dtype or a.dtype) if write_out else a
    block_m, block_c = (16, 32) if triton_interpret() else (32, 256)
    n_c = cdiv(C, block_c)
    splits = max(1, min(cdiv(4 * _sm_count(a.device), n_c), cdiv(M, block_m)))
    rows_per_split = cdiv(cdiv(M, splits), block_m) * block_m
    splits = cdiv(M, rows_per_split)
    part = torch.empty((splits, C), device=a.device, dtype=torch.float32)
    launch(ia3_scale_reduce_kernel, (n_c, splits),
        a, b, vec, out, part, M, C, rows_per_split,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        WRITE_OUT=write_out, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=4)
    return (out if write_out else None), part.sum(0)


# ------------------------------------------------------------------------------------------- the op


def _w_nk(weight: torch.Tensor, weight_transposed: bool) -> torch.Tensor:
    return weight.t() if weight_transposed else weight


# From PERSISTENT_MIN_M rows (16-bit, TMA-able strides, nn.Linear's K-major W) the output form's forward is one
# persistent GEMM storing z and y (measured from M = 2048 on; below, unmeasured, cuBLAS and the scale pass stay).
# PEFTKERN_IA3_PERSISTENT=0 turns it off.
PERSISTENT_FORWARD = os.environ.get("PEFTKERN_IA3_PERSISTENT", "1") != "0"
PERSISTENT_MIN_M = 2048


def ia3_forward(x, weight, scale_vec, bias, scale_input, weight_transposed, mode: Optional[str] = None):
    """(y, z) as reference.ia3_forward: z = x W^T + b for the output form, an empty tensor for the input form.

    mode (output form): "persistent" (one persistent Triton GEMM stores z and y, where persistent_output_ok),
    "cublas" (cuBLAS z, then the scale pass); None picks persistent on a GPU from PERSISTENT_MIN_M rows."""
    w = _w_nk(weight, weight_transposed)
    if scale_input:
        M, N = x.shape[0], w.shape[0]
        if M > N:  # fold l into a transient W' = W * l: an N x K pass instead of an M x K one
            y = torch.nn.functional.linear(x, scale(w, scale_vec, cols=True), bias)
        else:
            y = torch.nn.functional.linear(scale(x, scale_vec, cols=True), w, bias)
        return y, x.new_empty((0,))
    if mode is None:
        mode = "persistent" if PERSISTENT_FORWARD and x.is_cuda and x.shape[0] >= PERSISTENT_MIN_M else "cublas"
    if mode == "persistent" and persistent_output_ok(x, w):
        return persistent_output_form(x, w, scale_vec, bias)
    z = torch.nn.functional.linear(x, w, bias)
    return scale(z, scale_vec, cols=True), z


# "fused": the dx GEMMs above, with the scaling and dl inside; "split": cuBLAS dx plus one scale_reduce pass
# (version 1: +2 activation passes; kept to measure the fused kernels against, `bench ia3 --variants`).
# Measured on an H100 (bf16, M=8192, 4096x4096, benchmarks/results/ia3-*-20261123-002822.json, NOTES-ia3.md):
# output form fused 1.32x vs split 1.16x of the frozen layer; input form fused 1.14x (129 MB peak) vs split
# 1.13x (193 MB): the default per form is the faster one, the input form's fused kernel for its memory.
BACKWARD_MODES = ("fused", "split")
DEFAULT_BACKWARD_MODE = {"input": "fused", "output": "split"}
# The input form's fused backward by the persistent TMA GEMM (ia3_dx_input_persistent_kernel: x's tile comes by TMA in
# an epilogue that overlaps the next tile's loads) from PERSISTENT_DX_MIN_M rows, 16-bit, TMA-able strides. Measured on
# an H200 (explore_lora.py --ia3-input-dx, logs/explore-ia3-input-dx-20261203-h200.log), the op's backward against
# cuBLAS's dy @ W alone: 1.131x vs 1.228x (pointer-based kernel) at M = 8192, 4096^2; 1.069x vs 1.134x at 4096 -> 11008;
# 1.126x vs 1.299x at M = 2048 (128x128 tiles with 4 stages: 1.27-1.28x). Below 2048 rows it was not timed.
# PEFTKERN_IA3_PERSISTENT_DX=0 turns it off (the pointer-based ia3_dx_input_form_kernel then runs).
PERSISTENT_DX = os.environ.get("PEFTKERN_IA3_PERSISTENT_DX", "1") != "0"
PERSISTENT_DX_MIN_M = 2048


def ia3_backward(grad_y, x, weight, scale_vec, z, scale_input, weight_transposed, needs,
                 mode: Optional[str] = None):
    """(dx, dl, dbias, dweight) as reference.ia3_backward; mode: one of BACKWARD_MODES (None: the default)."""
    need_x, need_l, need_bias, need_w = needs
    fused = (mode or DEFAULT_BACKWARD_MODE["input" if scale_input else "output"]) == "fused"
    w = _w_nk(weight, weight_transposed)
    dx = dl = dbias = dw = None
    if scale_input:
        if (fused and (need_x or need_l) and PERSISTENT_DX and grad_y.shape[0] >= PERSISTENT_DX_MIN_M
                and persistent_dx_input_ok(grad_y, w.t(), x)):
            dx, dl = persistent_dx_input_form(grad_y, w.t(), scale_vec, x, write_dx=need_x)
        elif fused and (need_x or need_l):
            dx, dl = dx_input_form(grad_y, w.t(), scale_vec, x, write_dx=need_x)
        elif need_x or need_l:
            dx, dl = scale_reduce(grad_y @ w, x, scale_vec, write_out=need_x, out_dtype=x.dtype)
        dbias = grad_y.sum(0, dtype=torch.float32) if need_bias else None
        if need_w:
            dw = (grad_y.t() @ scale(x, scale_vec, cols=True)).float()
    elif fused and need_x and not need_w:
        dx, dl, colsum = dx_output_form(grad_y, w.t(), scale_vec, z, colsum=need_bias)
        dbias = colsum * scale_vec.float() if need_bias else None
    else:
        g, dl = scale_reduce(grad_y, z, scale_vec, write_out=need_x or need_bias or need_w)
        dx = g @ w if need_x else None
        dbias = g.sum(0, dtype=torch.float32) if need_bias else None
        dw = (g.t() @ x).float() if need_w else None
    if dw is not None and weight_transposed:
        dw = dw.t()
    return dx, (dl.to(scale_vec.dtype) if dl is not None and need_l else None), dbias, dw


def ia3_merge_(weight, scale_vec, bias, scale_input, inverse=False, weight_transposed=False):
    """W <- W * l (or / l) in place by the scale kernel; b <- b * l (or / l) for the output form."""
    w = _w_nk(weight, weight_transposed)
    w.copy_(scale(w, scale_vec, cols=scale_input, divide=inverse))
    if bias is not None and not scale_input:
        bias.copy_(scale(bias[None, :], scale_vec, cols=True, divide=inverse)[0])
    return weight

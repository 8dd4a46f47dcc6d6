"""IA3 in Triton around cuBLAS: the rescaling and the gradient of l ride on passes that happen anyway.

Math (x: M x K, W: N x K frozen, l: the learned vector):
    output form  y = (x W^T + b) * l        (l: N)   dx = (dy * l) W      dl = sum_m dy * z,  z = x W^T + b
    input form   y = (x * l) W^T + b        (l: K)   dx = l * (dy W)      dl = sum_m x * (dy W)
z is saved by the output form (y / l would divide by zero where l is 0; eager PyTorch saves it too).

Floor (bf16, M=8192, N=K=4096): two GEMMs (forward, dx), 2MNK = 275 GFLOP each, ~0.39 ms each on an H100.
The rescaling itself is M*N multiplies: nothing. What costs is memory (64 MB per activation pass, ~22 us):
  * output form: cuBLAS z = x W^T + b, then `ia3_scale_kernel` writes y = z * l (read z, write y); backward:
    `ia3_scale_reduce_kernel` reads dy and z once, writes g = dy * l and the partial sums of dl, then cuBLAS
    dx = g W. Extra traffic: ~3 passes forward + backward (eager: ~6, plus an fp32 copy with fp32 l).
  * input form: l is folded into the weight, W' = W * l (an N x K pass, cheaper than an M x K one when M > N),
    and y = x W'^T + b is one cuBLAS GEMM; backward: cuBLAS dy W, then `ia3_scale_reduce_kernel` reads it and
    x once, writes dx = (dy W) * l and dl. Extra traffic: the W' pass + ~3 activation passes.
The scaling is computed in float32 (l may be float32 beside a bf16 base, as PEFT keeps it) and rounded once to
the base dtype: no float32 copy of any activation.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..._backend import triton_interpret

# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def ia3_scale_kernel(
    in_ptr, scale_ptr, out_ptr, R, C,
    stride_ir, stride_ic, stride_or, stride_oc,
    SCALE_COLS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[r, c] = in[r, c] * l[c] (SCALE_COLS) or * l[r], in float32, rounded once to out's dtype."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_r[:, None] < R) & (offs_c[None, :] < C)
    v = tl.load(in_ptr + offs_r[:, None] * stride_ir + offs_c[None, :] * stride_ic, mask=mask, other=0.0)
    if SCALE_COLS:
        s = tl.load(scale_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)[None, :]
    else:
        s = tl.load(scale_ptr + offs_r, mask=offs_r < R, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + offs_r[:, None] * stride_or + offs_c[None, :] * stride_oc,
             (v.to(tl.float32) * s).to(out_ptr.dtype.element_ty), mask=mask)


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


# ------------------------------------------------------------------------------------------- launchers


def scale(t: torch.Tensor, vec: torch.Tensor, cols: bool = True,
          out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """t (R, C) * vec along columns (vec: (C,)) or rows (vec: (R,)), float32 math, one rounding to out_dtype."""
    R, C = t.shape
    out = torch.empty((R, C), device=t.device, dtype=out_dtype or t.dtype)
    block_r, block_c = (16, 32) if triton_interpret() else (32, 256)
    ia3_scale_kernel[(triton.cdiv(R, block_r), triton.cdiv(C, block_c))](
        t, vec, out, R, C, t.stride(0), t.stride(1), out.stride(0), out.stride(1),
        SCALE_COLS=cols, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    return out


def scale_reduce(a: torch.Tensor, b: torch.Tensor, vec: torch.Tensor, write_out: bool = True,
                 out_dtype: Optional[torch.dtype] = None) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """(a * vec if write_out, sum_m a * b as float32 (C,)) with one read of a and b, both (M, C)."""
    M, C = a.shape
    out = torch.empty((M, C), device=a.device, dtype=out_dtype or a.dtype) if write_out else a
    block_m, block_c = (16, 32) if triton_interpret() else (32, 256)
    n_c = triton.cdiv(C, block_c)
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count if a.is_cuda else 2
    splits = max(1, min(triton.cdiv(4 * sms, n_c), triton.cdiv(M, block_m)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), block_m) * block_m
    splits = triton.cdiv(M, rows_per_split)
    part = torch.empty((splits, C), device=a.device, dtype=torch.float32)
    ia3_scale_reduce_kernel[(n_c, splits)](
        a, b, vec, out, part, M, C, rows_per_split,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        WRITE_OUT=write_out, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=4)
    return (out if write_out else None), part.sum(0)


# ------------------------------------------------------------------------------------------- the op


def _w_nk(weight: torch.Tensor, weight_transposed: bool) -> torch.Tensor:
    return weight.t() if weight_transposed else weight


def ia3_forward(x, weight, scale_vec, bias, scale_input, weight_transposed):
    """(y, z) as reference.ia3_forward: z = x W^T + b for the output form, an empty tensor for the input form."""
    w = _w_nk(weight, weight_transposed)
    if scale_input:
        M, N = x.shape[0], w.shape[0]
        if M > N:  # fold l into a transient W' = W * l: an N x K pass instead of an M x K one
            y = torch.nn.functional.linear(x, scale(w, scale_vec, cols=True), bias)
        else:
            y = torch.nn.functional.linear(scale(x, scale_vec, cols=True), w, bias)
        return y, x.new_empty((0,))
    z = torch.nn.functional.linear(x, w, bias)
    return scale(z, scale_vec, cols=True), z


def ia3_backward(grad_y, x, weight, scale_vec, z, scale_input, weight_transposed, needs):
    """(dx, dl, dbias, dweight) as reference.ia3_backward."""
    need_x, need_l, need_bias, need_w = needs
    w = _w_nk(weight, weight_transposed)
    dx = dl = dbias = dw = None
    if scale_input:
        dyw = grad_y @ w
        if need_x or need_l:
            dx, dl = scale_reduce(dyw, x, scale_vec, write_out=need_x, out_dtype=x.dtype)
        dbias = grad_y.sum(0, dtype=torch.float32) if need_bias else None
        if need_w:
            dw = (grad_y.t() @ scale(x, scale_vec, cols=True)).float()
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
    factor = 1.0 / scale_vec.float() if inverse else scale_vec
    w = _w_nk(weight, weight_transposed)
    w.copy_(scale(w, factor, cols=scale_input))
    if bias is not None and not scale_input:
        bias.copy_(scale(bias[None, :], factor, cols=True)[0])
    return weight

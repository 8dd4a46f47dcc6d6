"""LoRA in Triton: the low-rank term rides inside the frozen GEMM instead of costing passes of its own.

Math (x: M x K, W: N x K frozen, A: r x K, B: N x r, s = scaling, p = dropout):
    forward   y  = x W^T + b + s (drop(x) A^T) B^T          xa = drop(x) A^T  (M x r, saved, fp32)
    backward  dx = dy W + s * drop'((dy B) A)                dyb = dy B        (M x r, fp32)
              dA = s dyb^T drop(x)      dB = s dy^T xa       db = sum_m dy

Floor (bf16, M=8192, N=K=4096): the base GEMM is 2MNK = 275 GFLOP each way, ~0.35 ms at ~790 TFLOP/s;
the whole LoRA term adds 2Mr(N+K) = 4.3 GFLOP (1.6%) forward and twice that backward, but in eager PyTorch
it also costs passes over x, y and dy (64 MB each, ~22 us each at ~3 TB/s) -- that is where the time goes.
Here:
  * `lora_fused_matmul_kernel` computes one output tile of x W^T and adds (s xa) B^T in its epilogue:
    y is written once.  With COMPUTE_LOW the tile also accumulates xa = x A^T from the x tiles it loads
    anyway (r/BLOCK_N extra MMA work, no extra pass over x); otherwise xa comes from `lora_down_kernel`.
    The backward dx uses the same kernel with the roles swapped (dy, W^T, B^T, A^T), the dropout mask
    regenerated from the seed on the low-rank term.
  * `lora_down_kernel`: xa = drop(x) A^T (or dyb = dy B): one read of x, dropout mask from a seed.
  * `lora_adapter_grad_kernel`: dA and dB (and the bias gradient) as skinny reductions over M, split
    over M into partial sums that a small deterministic sum finishes: one read of x, one of dy.
Extra memory traffic of a training step beyond the two base GEMMs: one read of x and one of dy (~6%).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..._backend import triton_interpret

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
def lora_fused_matmul_kernel(
    a_ptr, w_ptr, down_ptr, up_ptr, low_ptr, bias_ptr, out_ptr,
    M, N, K, R,
    stride_am, stride_ak, stride_wn, stride_wk, stride_dr, stride_dk, stride_un, stride_ur,
    stride_lm, stride_lr, stride_om, stride_on,
    scaling, dropout_p, seed,
    COMPUTE_LOW: tl.constexpr, STORE_LOW: tl.constexpr, HAS_BIAS: tl.constexpr,
    DROPOUT_OUT: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out = a w^T (+ bias) + s * [mask] (low up^T), low = a down^T computed here or loaded from low_ptr."""
    pid = tl.program_id(0)
    pid_m, pid_n = _grouped_pid(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    # Out-of-range rows/cols read row 0 instead of being masked: the loads stay unpredicated and the
    # garbage lands only in rows/cols the final store skips.
    rows = tl.where(offs_m < M, offs_m, 0)
    cols = tl.where(offs_n < N, offs_n, 0)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk
    d_ptrs = down_ptr + offs_r[None, :] * stride_dr + offs_k[:, None] * stride_dk
    r_mask = offs_r < R

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    low = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_mask = offs_k < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        if COMPUTE_LOW:
            if EVEN_K:
                d = tl.load(d_ptrs, mask=r_mask[None, :], other=0.0)
            else:
                d = tl.load(d_ptrs, mask=r_mask[None, :] & k_mask[:, None], other=0.0)
            low = tl.dot(a, d.to(a.dtype), low, input_precision=DOT_PRECISION)
            d_ptrs += BLOCK_K * stride_dk
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    if COMPUTE_LOW:
        if STORE_LOW:
            if pid_n == 0:
                l_ptrs = low_ptr + offs_m[:, None] * stride_lm + offs_r[None, :] * stride_lr
                tl.store(l_ptrs, low, mask=(offs_m[:, None] < M) & r_mask[None, :])
    else:
        l_ptrs = low_ptr + rows[:, None] * stride_lm + offs_r[None, :] * stride_lr
        low = tl.load(l_ptrs, mask=r_mask[None, :], other=0.0)

    u_ptrs = up_ptr + cols[None, :] * stride_un + offs_r[:, None] * stride_ur
    up = tl.load(u_ptrs, mask=r_mask[:, None], other=0.0)
    low_s = (low * scaling).to(a_ptr.dtype.element_ty)
    if DROPOUT_OUT:
        lr = tl.dot(low_s, up.to(a_ptr.dtype.element_ty), input_precision=DOT_PRECISION)
        keep = _keep_mask(seed, offs_m, offs_n, N, dropout_p)
        acc += tl.where(keep, lr / (1.0 - dropout_p), 0.0)
    else:
        acc = tl.dot(low_s, up.to(a_ptr.dtype.element_ty), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]

    o_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def lora_down_kernel(
    a_ptr, down_ptr, low_ptr,
    M, K, R,
    stride_am, stride_ak, stride_dr, stride_dk, stride_lm, stride_lr,
    dropout_p, seed,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """low = drop(a) down^T, (M, R) in float32: one read of a."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    rows = tl.where(offs_m < M, offs_m, 0)
    r_mask = offs_r < R
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    d_ptrs = down_ptr + offs_r[None, :] * stride_dr + offs_k[:, None] * stride_dk
    low = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = _keep_mask(seed, offs_m, k * BLOCK_K + offs_k, K, dropout_p)
            a = tl.where(keep, a, 0.0)
        d = tl.load(d_ptrs, mask=r_mask[None, :] & k_mask[:, None], other=0.0)
        low = tl.dot(a, d.to(a.dtype), low, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        d_ptrs += BLOCK_K * stride_dk
    if HAS_DROPOUT:
        low = low / (1.0 - dropout_p)
    l_ptrs = low_ptr + offs_m[:, None] * stride_lm + offs_r[None, :] * stride_lr
    tl.store(l_ptrs, low, mask=(offs_m[:, None] < M) & r_mask[None, :])


@triton.jit
def lora_adapter_grad_kernel(
    big_ptr, small_ptr, part_ptr, colsum_ptr,
    M, P, R, rows_per_split,
    stride_bm, stride_bp, stride_sm, stride_sr,
    dropout_p, seed,
    HAS_DROPOUT: tl.constexpr, COLSUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """part[split, p, r] = sum over this split's rows m of drop(big)[m, p] * small[m, r]; colsum[split, p] too."""
    pid_p = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = tl.arange(0, BLOCK_R)
    offs_mb = tl.arange(0, BLOCK_M)
    p_mask = offs_p < P
    r_mask = offs_r < R
    acc = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
    colsum = tl.zeros((BLOCK_P,), dtype=tl.float32)
    m_start = pid_s * rows_per_split
    m_end = min(m_start + rows_per_split, M)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + offs_mb
        m_mask = offs_m < m_end
        big = tl.load(big_ptr + offs_m[:, None] * stride_bm + offs_p[None, :] * stride_bp,
                      mask=m_mask[:, None] & p_mask[None, :], other=0.0)
        if HAS_DROPOUT:
            big = tl.where(_keep_mask(seed, offs_m, offs_p, P, dropout_p), big, 0.0)
        small = tl.load(small_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                        mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        acc = tl.dot(tl.trans(big), small.to(big.dtype), acc, input_precision=DOT_PRECISION)
        if COLSUM:
            colsum += tl.sum(big.to(tl.float32), axis=0)
    base = part_ptr + pid_s * P * BLOCK_R
    tl.store(base + offs_p[:, None] * BLOCK_R + offs_r[None, :], acc, mask=p_mask[:, None] & r_mask[None, :])
    if COLSUM:
        tl.store(colsum_ptr + pid_s * P + offs_p, colsum, mask=p_mask)


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


def _block_r(r: int) -> int:
    # tl.dot needs every dimension >= 16.
    return max(16, triton.next_power_of_2(r))


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype != torch.float32:
        return "ieee"  # unused for 16-bit operands
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _matmul_config(M: int, N: int, block_r: int, compute_low: bool) -> dict:
    """Tile shapes for the fused GEMM (H100/H200, bf16/fp16), chosen by shape class:
    - large M: 128x256x64 tiles, 8 warps, 3 stages (the cuBLAS-class shape for 4k-11k GEMMs); 128x128 when
      the in-loop low-rank accumulator is wide (r > 32) so registers do not spill;
    - medium M (<= 2048): 128x128, to put more tiles than SMs on the chip;
    - small M (decode, <= 64): 64-row tiles over narrow column strips so all SMs stream W.
    """
    if triton_interpret():
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    if M <= 64:
        return dict(BLOCK_M=max(16, min(64, triton.next_power_of_2(M))), BLOCK_N=64, BLOCK_K=128,
                    GROUP_M=1, num_warps=4, num_stages=4)
    if M <= 2048 or (compute_low and block_r > 32):
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def fused_matmul(
    a: torch.Tensor, w: torch.Tensor, down: Optional[torch.Tensor], up: torch.Tensor,
    low: Optional[torch.Tensor], scaling: float, bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0, seed: int = 0, compute_low: bool = False, store_low: bool = False,
    config: Optional[dict] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """out (M, N) = a (M, K) @ w^T + s [mask] low @ up^T (+ bias).

    w is given as an (N, K) view (any strides); down (R, K) and up (N, R) likewise. With compute_low,
    low = a @ down^T is accumulated in the GEMM (and stored if store_low); otherwise `low` (M, R) is read.
    dropout_p > 0 applies the seed's (M, N) keep-mask to the low-rank term (the backward of input dropout).
    """
    M, K = a.shape
    N = w.shape[0]
    R = up.shape[1]
    block_r = _block_r(R)
    out = torch.empty((M, N), device=a.device, dtype=a.dtype)
    if compute_low and store_low:
        low = torch.empty((M, R), device=a.device, dtype=torch.float32)
    cfg = dict(config or _matmul_config(M, N, block_r, compute_low))
    num_warps = cfg.pop("num_warps")
    num_stages = cfg.pop("num_stages")
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    down_arg = down if down is not None else up
    low_arg = low if low is not None else out
    lora_fused_matmul_kernel[grid](
        a, w, down_arg, up, low_arg, bias if bias is not None else out, out,
        M, N, K, R,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1),
        down_arg.stride(0) if down is not None else 0, down_arg.stride(1) if down is not None else 0,
        up.stride(0), up.stride(1),
        low_arg.stride(0) if low is not None else 0, low_arg.stride(1) if low is not None else 0,
        out.stride(0), out.stride(1),
        float(scaling), float(dropout_p), int(seed),
        COMPUTE_LOW=compute_low, STORE_LOW=compute_low and store_low, HAS_BIAS=bias is not None,
        DROPOUT_OUT=dropout_p > 0.0, EVEN_K=K % cfg["BLOCK_K"] == 0, DOT_PRECISION=_dot_precision(a.dtype),
        BLOCK_R=block_r, num_warps=num_warps, num_stages=num_stages, **cfg,
    )
    return out, (low if store_low else None)


def down_project(a: torch.Tensor, down: torch.Tensor, dropout_p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """low (M, R) float32 = drop(a) (M, K) @ down^T, down given as an (R, K) view."""
    M, K = a.shape
    R = down.shape[0]
    low = torch.empty((M, R), device=a.device, dtype=torch.float32)
    if triton_interpret():
        block_m, block_k, warps = 16, 32, 4
    else:
        # 32-row strips: 256 programs at M=8192, enough to keep every SM streaming a.
        block_m, block_k, warps = (32, 128, 4) if M > 64 else (16, 256, 4)
    lora_down_kernel[(triton.cdiv(M, block_m),)](
        a, down, low, M, K, R,
        a.stride(0), a.stride(1), down.stride(0), down.stride(1), low.stride(0), low.stride(1),
        float(dropout_p), int(seed),
        HAS_DROPOUT=dropout_p > 0.0, DOT_PRECISION=_dot_precision(a.dtype),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=_block_r(R), num_warps=warps,
    )
    return low


def adapter_grad(big: torch.Tensor, small: torch.Tensor, dropout_p: float = 0.0, seed: int = 0,
                 colsum: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(P, R) float32 = drop(big)^T (M, P) @ small (M, R), and optionally big's column sums (P,)."""
    M, P = big.shape
    R = small.shape[1]
    block_r = _block_r(R)
    if triton_interpret():
        block_m, block_p, warps = 16, 32, 4
    else:
        block_m, block_p, warps = 64, 128, 8
    n_p = triton.cdiv(P, block_p)
    target = 2 * (torch.cuda.get_device_properties(big.device).multi_processor_count if big.is_cuda else 4)
    splits = max(1, min(triton.cdiv(target, n_p), triton.cdiv(M, block_m)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), block_m) * block_m
    splits = triton.cdiv(M, rows_per_split)
    part = torch.empty((splits, P, block_r), device=big.device, dtype=torch.float32)
    sums = torch.empty((splits, P), device=big.device, dtype=torch.float32) if colsum else part
    lora_adapter_grad_kernel[(n_p, splits)](
        big, small, part, sums, M, P, R, rows_per_split,
        big.stride(0), big.stride(1), small.stride(0), small.stride(1),
        float(dropout_p), int(seed),
        HAS_DROPOUT=dropout_p > 0.0, COLSUM=colsum, DOT_PRECISION=_dot_precision(big.dtype),
        BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_R=block_r, num_warps=warps,
    )
    grad = part.sum(0)[:, :R]
    if dropout_p > 0.0:
        grad = grad / (1.0 - dropout_p)
    return grad, (sums.sum(0) if colsum else None)


def dropout_mask(seed: int, shape: tuple, p: float, device: torch.device) -> torch.Tensor:
    """The keep-mask (M, K) bool that this backend's kernels use for (seed, shape, p): for tests."""
    M, K = shape
    keep = torch.empty((M, K), device=device, dtype=torch.int8)
    block = 16 if triton_interpret() else 64
    lora_dropout_mask_kernel[(triton.cdiv(M, block), triton.cdiv(K, block))](
        keep, M, K, float(p), int(seed), BLOCK_M=block, BLOCK_K=block)
    return keep.bool()


# ------------------------------------------------------------------------------------------- the op

# Above this padded rank the in-GEMM down projection costs more MMA work (r/BLOCK_N) than one read of x.
_MAX_IN_GEMM_RANK = 32


def _w_nk(weight: torch.Tensor, weight_transposed: bool) -> torch.Tensor:
    return weight.t() if weight_transposed else weight


def lora_forward(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed, weight_transposed):
    """(y, xa): y = x W^T + b + s xa B^T with xa = drop(x) A^T (M, r) float32, saved for backward."""
    w = _w_nk(weight, weight_transposed)
    in_gemm = dropout_p == 0.0 and _block_r(lora_A.shape[0]) <= _MAX_IN_GEMM_RANK
    if in_gemm:
        return fused_matmul(x, w, lora_A, lora_B, None, scaling, bias, compute_low=True, store_low=True)
    xa = down_project(x, lora_A, dropout_p, seed)
    y, _ = fused_matmul(x, w, None, lora_B, xa, scaling, bias)
    return y, xa


def lora_backward(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, weight_transposed, needs):
    """(dx, dA, dB, dbias, dweight) as in reference.lora_backward."""
    need_x, need_a, need_b, need_bias, need_w = needs
    dx = da = db = dbias = dw = None
    # dx = dy W + s mask ((dy B) A): the same fused GEMM with W^T (K, N), B^T (r, N) and A^T (K, r).
    w_kn = _w_nk(weight, weight_transposed).t()
    dyb = None
    if need_x:
        in_gemm = _block_r(lora_A.shape[0]) <= _MAX_IN_GEMM_RANK
        if in_gemm:
            dx, dyb = fused_matmul(grad_y, w_kn, lora_B.t(), lora_A.t(), None, scaling, None, dropout_p, seed,
                                   compute_low=True, store_low=need_a)
        else:
            dyb = down_project(grad_y, lora_B.t())
            dx, _ = fused_matmul(grad_y, w_kn, None, lora_A.t(), dyb, scaling, None, dropout_p, seed)
    if need_a:
        if dyb is None:
            dyb = down_project(grad_y, lora_B.t())
        grad, _ = adapter_grad(x, dyb, dropout_p, seed)
        da = (grad.t() * scaling).to(lora_A.dtype)
    if need_b or need_bias:
        grad, sums = adapter_grad(grad_y, xa, colsum=need_bias)
        if need_b:
            db = (grad * scaling).to(lora_B.dtype)
        dbias = sums
    if need_w:
        dw = grad_y.t().float() @ x.float()
        dw = dw.t() if weight_transposed else dw
    return dx, da, db, dbias, dw


def lora_merge_(weight, lora_A, lora_B, scaling, sign, weight_transposed=False):
    """weight += sign * scaling * B A in place (weight (N, K), or (K, N) if weight_transposed)."""
    w = _w_nk(weight, weight_transposed)
    N, K = w.shape
    R = lora_A.shape[0]
    block_n, block_k = (16, 32) if triton_interpret() else (64, 64)
    lora_merge_kernel[(triton.cdiv(N, block_n), triton.cdiv(K, block_k))](
        w, lora_A, lora_B, N, K, R,
        w.stride(0), w.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
        float(sign * scaling),
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=_block_r(R), num_warps=4,
    )
    return weight

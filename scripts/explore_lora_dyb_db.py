"""Exploration on the GPU: dyb = dy B and dB = s dy^T xa from one read of dy, for the LoRA backward.

The backward at r = 16 (M = 8192, 4096^2) reads dy three times: cuBLAS's dyb before the dx kernel, the dx kernel
itself, and skinny_grads' dB after it. On an H100 each of those skinny passes is ~6 us longer than on an H200 (3.0
against 4.2 TB/s), which is what keeps r = 16 at 1.13x there (NOTES-lora.md, 2026-12-06). This kernel makes dyb and
dB in one pass over dy: a program takes a column block of dy and a split of its rows, adds dy^T xa for dB over its
rows, and stores dy B for each row block as a partial over its columns; torch sums the two small partial buffers
(dyb's: column blocks x M x 16 float32, 8 MB at 4096^2 with 256-column blocks). It is not in peftkern: this times it
against cuBLAS's two products, and the backward with it against the op's own backward.

    python scripts/explore_lora_dyb_db.py            # GPU: each config, then the backward with the best one
    TRITON_INTERPRET=1 python scripts/explore_lora_dyb_db.py --check   # CPU: the kernel against torch, small shapes
    python scripts/explore_lora_dyb_db.py --compile  # no GPU needed: each config compiled for sm_90a

One dy tile feeds two MMAs here. Triton 3.6's pipeliner mishandled that pattern in skinny_grads (kernels/triton/
lora.py, skinny_grads' bias gradient) and in the adapter's LN product (NOTES-adapter.md), so every config is checked
against cuBLAS before it is timed, and the configs include num_stages 1 and 2.
"""
import sys

import torch
import triton
import triton.language as tl


@triton.jit
def dyb_db_kernel(dy_ptr, b_ptr, xa_ptr, dyb_part_ptr, db_part_ptr, M, N, R, rows_per_split,
                  stride_dym, stride_dyn, stride_bn, stride_br, stride_xam, stride_xar,
                  BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, STAGES: tl.constexpr,
                  DOT_PRECISION: tl.constexpr = "tf32"):
    """Program (cb, split): dB's partial for columns cb over the split's rows, (BLOCK_C, BLOCK_R) float32 into
    db_part[split]; for each of its row blocks, dy[rows, cb] B[cb] as (BLOCK_M, BLOCK_R) float32 into
    dyb_part[cb, rows] (each (cb, row) written by one program, once)."""
    cb = tl.program_id(0)
    split = tl.program_id(1)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    c_mask = offs_c < N
    r_mask = offs_r < R
    b = tl.load(b_ptr + offs_c[:, None] * stride_bn + offs_r[None, :] * stride_br,
                mask=c_mask[:, None] & r_mask[None, :], other=0.0)
    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    m_start = split * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    for m0 in tl.range(m_start, m_end, BLOCK_M, num_stages=STAGES):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_end
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_c[None, :] * stride_dyn,
                     mask=m_mask[:, None] & c_mask[None, :], other=0.0)
        xa = tl.load(xa_ptr + offs_m[:, None] * stride_xam + offs_r[None, :] * stride_xar,
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        acc = tl.dot(tl.trans(dy), xa.to(dy.dtype), acc, input_precision=DOT_PRECISION)
        part = tl.dot(dy, b.to(dy.dtype), input_precision=DOT_PRECISION)
        tl.store(dyb_part_ptr + cb * M * BLOCK_R + offs_m[:, None] * BLOCK_R + offs_r[None, :], part,
                 mask=m_mask[:, None])
    tl.store(db_part_ptr + split * N * BLOCK_R + offs_c[:, None] * BLOCK_R + offs_r[None, :], acc,
             mask=c_mask[:, None])


def dyb_db(dy: torch.Tensor, B: torch.Tensor, xa: torch.Tensor, scaling: float, config: tuple,
           precision: str = "tf32"):
    """(dyb = dy B (M, r), dB = scaling dy^T xa (N, r)), both in dy's dtype. config: (BLOCK_M, BLOCK_C, splits,
    warps, stages); precision: tl.dot's for float32 operands ("ieee" for the check)."""
    block_m, block_c, splits, warps, stages = config
    M, N = dy.shape
    R = B.shape[1]
    block_r = max(16, triton.next_power_of_2(R))
    num_cb = triton.cdiv(N, block_c)
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), block_m) * block_m
    splits = triton.cdiv(M, rows_per_split)
    dyb_part = torch.empty(num_cb, M, block_r, device=dy.device, dtype=torch.float32)
    db_part = torch.empty(splits, N, block_r, device=dy.device, dtype=torch.float32)
    dyb_db_kernel[(num_cb, splits)](
        dy, B, xa, dyb_part, db_part, M, N, R, rows_per_split,
        dy.stride(0), dy.stride(1), B.stride(0), B.stride(1), xa.stride(0), xa.stride(1),
        BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_R=block_r, STAGES=stages, DOT_PRECISION=precision,
        num_warps=warps)
    dyb = dyb_part.sum(0)[:, :R].to(dy.dtype)
    db = (db_part.sum(0)[:, :R] * scaling).to(dy.dtype)
    return dyb, db


# (BLOCK_M, BLOCK_C, splits, warps, stages). Compiled for sm_90a with Triton 3.6 on a CPU (scripts/compile_report.py's
# compile_sm90, 2026-12-06): 43-225 KB of shared memory, 58-160 registers, no spills, and none with compile_report's
# MMA-operand hazard; (32, 256, 16, 4, 4) had it (the dy tile) and is left out.
CONFIGS = [(64, 256, 16, 4, 3), (64, 256, 16, 8, 3), (128, 256, 8, 8, 3), (64, 128, 8, 4, 3), (64, 512, 32, 8, 3),
           (64, 256, 16, 4, 2), (64, 256, 16, 4, 1), (64, 256, 32, 4, 3)]


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


def check(device: str = "cpu"):
    """Against torch in float32 (the interpreter mishandles bf16), tl.dot in IEEE float32: shapes with ragged row and
    column blocks, r below 16, and a split that ends inside a row block."""
    torch.manual_seed(0)
    worst = 0.0
    for M, N, R, config in [(96, 80, 8, (32, 32, 2, 4, 1)), (130, 64, 16, (32, 64, 3, 4, 2)),
                            (64, 48, 4, (16, 32, 5, 4, 1))]:
        dy, B, xa = (torch.randn(*shape, device=device) for shape in ((M, N), (N, R), (M, R)))
        dyb, db = dyb_db(dy, B, xa, 0.5, config, precision="ieee")
        dy64, B64, xa64 = dy.double(), B.double(), xa.double()
        errs = (_rel(dyb, dy64 @ B64), _rel(db, 0.5 * dy64.t() @ xa64))
        print(f"M={M} N={N} r={R} {config}: relative errors dyb {errs[0]:.1e}, dB {errs[1]:.1e}")
        assert max(errs) < 1e-5, f"wrong at M={M} N={N} r={R} {config}: {errs}"
        worst = max(worst, *errs)
    print(f"all shapes match torch (worst relative error {worst:.1e})")
    return worst


def compile_configs() -> dict:
    """Each of CONFIGS compiled for sm_90a without a GPU (compile_report.compile_sm90, bf16 operands, unit strides as
    a launch specialises them): {config: {'shared', 'registers', 'local', 'hazards'}}."""
    import compile_report as cr  # this folder

    args = {"dy_ptr": "*bf16", "b_ptr": "*bf16", "xa_ptr": "*bf16", "dyb_part_ptr": "*fp32", "db_part_ptr": "*fp32",
            "M": "i32", "N": "i32", "R": "i32", "rows_per_split": "i32", "stride_dym": "i32", "stride_bn": "i32",
            "stride_xam": "i32"}
    out = {}
    for cfg in CONFIGS:
        block_m, block_c, _, warps, stages = cfg
        const = dict(stride_dyn=1, stride_br=1, stride_xar=1, BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_R=16,
                     STAGES=stages, DOT_PRECISION="tf32")
        out[cfg] = cr.compile_sm90(dyb_db_kernel, args, const, warps, stages)
    return out


def main():
    from explore_lora import _op_operands, copy_bandwidth, ms  # this folder

    from peftkern.kernels.triton import lora as kl

    dt = torch.bfloat16
    bw = copy_bandwidth()
    for M, K, N, r in [(8192, 4096, 4096, 16), (8192, 2048, 5632, 16), (8192, 5632, 2048, 16)]:
        x, W, A, B, dy, xa = _op_operands(M, K, N, r, dt)[:6]
        read_us = M * N * 2 / bw / 1e3
        ref_dyb, ref_db = dy @ B, kl.scaled_mm(dy.t(), xa, 2.0, dt)
        t_cublas = ms(lambda: (torch.mm(dy, B), kl.scaled_mm(dy.t(), xa, 2.0, dt))) * 1e3
        print(f"\n== M={M} {K}->{N} r={r}: copy {bw:.0f} GB/s, one read of dy {read_us:.1f} us; cuBLAS dyb + dB "
              f"{t_cublas:.1f} us", flush=True)
        best = None
        for cfg in CONFIGS:
            try:
                dyb, db = dyb_db(dy, B, xa, 2.0, cfg)
                errs = (_rel(dyb, ref_dyb), _rel(db, ref_db))
                if max(errs) > 2e-2:
                    print(f"  {cfg}: WRONG, relative errors dyb {errs[0]:.1e}, dB {errs[1]:.1e}", flush=True)
                    continue
                t = ms(lambda cfg=cfg: dyb_db(dy, B, xa, 2.0, cfg)) * 1e3
            except Exception as e:  # a config that does not fit
                print(f"  {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:80]}", flush=True)
                continue
            print(f"  {cfg}: {t:6.1f} us ({t / read_us:.2f}x one read of dy; errors {errs[0]:.1e}, {errs[1]:.1e})",
                  flush=True)
            if best is None or t < best[0]:
                best = (t, cfg)
        if best is None:
            continue
        cfg = best[1]

        def op_backward():
            return kl.lora_backward(dy, x, W, A, B, xa, 2.0, 0.0, 0, False, (1, 1, 1, 0, 0))

        def one_read_backward():
            # the op's default order at r = 16 (dyb, the persistent dx kernel, then skinny_grads), with dyb and dB
            # from one pass over dy and skinny_grads making dA alone
            dyb, db = dyb_db(dy, B, xa, 2.0, cfg)
            dx, _ = kl.persistent_forward(dy, W.t(), B.t(), A.t(), 2.0, xa=dyb)
            da, _, _ = kl.skinny_grads(x, dyb, dy, xa, 2.0, 2.0, dt, dt, True, False, False)
            return dx, da, db

        ref = op_backward()
        got = one_read_backward()
        errs = [_rel(g, e) for g, e in zip(got, ref[:3])]
        t_dx = ms(lambda: dy @ W) * 1e3
        for rnd in range(2):
            t_op, t_one = ms(op_backward) * 1e3, ms(one_read_backward) * 1e3
            print(f"  round {rnd}: backward, the op's {t_op:6.1f} us ({t_op / t_dx:.4f}x cuBLAS dy @ W {t_dx:.1f}); "
                  f"with {cfg} {t_one:6.1f} us ({t_one / t_dx:.4f}x); dx, dA, dB against the op's {errs}",
                  flush=True)


def compile_main() -> int:
    """Exit status 1 if a config takes more shared memory than an SM has, spills, or has the MMA-operand hazard."""
    import compile_report as cr  # this folder

    bad = 0
    for cfg, res in compile_configs().items():
        fits = res["shared"] <= cr.SMEM_LIMIT and res["local"] == 0 and not res["hazards"]
        bad += not fits
        print(f"{cfg}: {res}{'' if fits else '  <- does not fit, spills or has the hazard'}")
    return 1 if bad else 0


if __name__ == "__main__":
    if "--check" in sys.argv[1:]:
        check()
    elif "--compile" in sys.argv[1:]:
        sys.exit(compile_main())
    else:
        main()

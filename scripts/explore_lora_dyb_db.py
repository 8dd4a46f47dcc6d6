"""Exploration on the GPU: dyb = dy B and dB = s dy^T xa from one read of dy, for the LoRA backward.

The backward at r = 16 (M = 8192, 4096^2) read dy three times: cuBLAS's dyb before the dx kernel, the dx kernel
itself, and skinny_grads' dB after it. On an H100 each of those skinny passes is ~6 us longer than on an H200 (3.0
against 4.2 TB/s), which is what kept r = 16 at 1.13x there (NOTES-lora.md, 2026-12-06). peftkern's dyb_db
(kernels/triton/lora.py) makes dyb and dB in one pass over dy: a program takes a column block of dy and a split of its
rows, adds dy^T xa for dB over its rows, and stores dy B for each row block as a partial over its columns; a second
launch adds both partial buffers. This times its configs against cuBLAS's two products, and the op's backward with it
(DYB_DB) against the op's backward without it. (Its first version, 3d4f414, had the kernel here with torch summing the
partials: logs/explore-lora-dyb-db-5e94abb-h100.log.)

    python scripts/explore_lora_dyb_db.py            # GPU: each config, then the backward with and without dyb_db
    TRITON_INTERPRET=1 python scripts/explore_lora_dyb_db.py --check   # CPU: each config at small shapes
    python scripts/explore_lora_dyb_db.py --compile  # no GPU needed: each config compiled for sm_90a

One dy tile feeds two MMAs here. Triton 3.6's pipeliner mishandled that pattern in skinny_grads (kernels/triton/
lora.py, skinny_grads' bias gradient) and in the adapter's LN product (NOTES-adapter.md), so every config is checked
against cuBLAS before it is timed, and the configs include num_stages 1 and 2.
"""
import sys

import torch

from peftkern.kernels.triton import lora as kl

# (BLOCK_M, BLOCK_C, warps, stages), dyb_db's config; the splits follow from the SM count. The first is its default.
# 3d4f414's configs with the splits left to dyb_db; (32, 256, 4, 4) had compile_report's MMA-operand hazard there.
CONFIGS = [kl.DYB_DB_CONFIG, (64, 256, 8, 3), (128, 256, 8, 3), (64, 128, 4, 3), (64, 512, 8, 3), (64, 256, 4, 2),
           (64, 256, 4, 1)]


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


def check(device: str = "cpu"):
    """Each config against float64 at small shapes, ragged row and column blocks, r below 16, splits that end inside
    a row block: in float32 on a CPU (the interpreter mishandles bf16), in float16 on a GPU (the configs are sized
    for 16-bit tiles: in float32 the widest ask an SM for 288 KB). Returns the largest relative error."""
    torch.manual_seed(0)
    dtype = torch.float32 if torch.device(device).type == "cpu" else torch.float16
    limit = 1e-5 if dtype == torch.float32 else 2e-3
    worst = 0.0
    for M, N, R in [(96, 80, 8), (130, 600, 16), (64, 48, 4)]:
        dy, B, xa = (torch.randn(*shape, device=device, dtype=dtype) for shape in ((M, N), (N, R), (M, R)))
        dy64, B64, xa64 = dy.double(), B.double(), xa.double()
        for config in CONFIGS:
            dyb, db = kl.dyb_db(dy, B, xa, 0.5, torch.float32, config)
            errs = (_rel(dyb, dy64 @ B64), _rel(db, 0.5 * dy64.t() @ xa64))
            assert max(errs) < limit, f"wrong at M={M} N={N} r={R} {config} {dtype}: {errs}"
            worst = max(worst, *errs)
        print(f"M={M} N={N} r={R} {dtype}: every config matches float64")
    print(f"worst relative error {worst:.1e}")
    return worst


def compile_configs() -> dict:
    """Each of CONFIGS compiled for sm_90a without a GPU (compile_report's dyb_db signature, bf16 operands, unit strides
    as a launch specialises them): {config: {'shared', 'registers', 'local', 'hazards'}}."""
    import compile_report as cr  # this folder

    fn, args, const, _, _ = cr.dyb_db(16)
    out = {}
    for cfg in CONFIGS:
        block_m, block_c, warps, stages = cfg
        out[cfg] = cr.compile_sm90(fn, args, dict(const, BLOCK_M=block_m, BLOCK_C=block_c, STAGES=stages), warps,
                                   stages)
    return out


def main():
    from explore_lora import _op_operands, copy_bandwidth, ms  # this folder

    dt = torch.bfloat16
    bw = copy_bandwidth()
    for M, K, N, r in [(8192, 4096, 4096, 16), (8192, 2048, 5632, 16), (8192, 5632, 2048, 16)]:
        x, W, A, B, dy, xa = _op_operands(M, K, N, r, dt)[:6]
        read_us = M * N * 2 / bw / 1e3
        ref_dyb, ref_db = dy @ B, kl.scaled_mm(dy.t(), xa, 2.0, dt)
        t_cublas = ms(lambda: (torch.mm(dy, B), kl.scaled_mm(dy.t(), xa, 2.0, dt))) * 1e3
        print(f"\n== M={M} {K}->{N} r={r}: copy {bw:.0f} GB/s, one read of dy {read_us:.1f} us; cuBLAS dyb + dB "
              f"{t_cublas:.1f} us", flush=True)
        for cfg in CONFIGS:
            try:
                dyb, db = kl.dyb_db(dy, B, xa, 2.0, dt, cfg)
                errs = (_rel(dyb, ref_dyb), _rel(db, ref_db))
                if max(errs) > 2e-2:
                    print(f"  {cfg}: WRONG, relative errors dyb {errs[0]:.1e}, dB {errs[1]:.1e}", flush=True)
                    continue
                t = ms(lambda cfg=cfg: kl.dyb_db(dy, B, xa, 2.0, dt, cfg)) * 1e3
            except Exception as e:  # a config that does not fit
                print(f"  {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:80]}", flush=True)
                continue
            print(f"  {cfg}: {t:6.1f} us ({t / read_us:.2f}x one read of dy; errors {errs[0]:.1e}, {errs[1]:.1e})",
                  flush=True)

        def op_with(dyb_db_on):
            def run():
                saved, kl.DYB_DB = kl.DYB_DB, dyb_db_on
                try:
                    return kl.lora_backward(dy, x, W, A, B, xa, 2.0, 0.0, 0, False, (1, 1, 1, 0, 0))
                finally:
                    kl.DYB_DB = saved
            return run

        variants = {"dyb_db": op_with(True), "cuBLAS dyb + skinny_grads dB": op_with(False)}
        ref = op_with(False)()
        errs = [f"{_rel(g, e):.1e}" for g, e in zip(op_with(True)(), ref[:3])]
        t_dx = ms(lambda: dy @ W) * 1e3
        print(f"  the op's dx, dA, dB with dyb_db against without: relative differences {errs}")
        for rnd in range(2):
            for name, fn in variants.items():
                t = ms(fn) * 1e3
                print(f"  round {rnd}: the op's backward, {name:30s} {t:6.1f} us ({t / t_dx:.4f}x cuBLAS dy @ W "
                      f"{t_dx:.1f})", flush=True)


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

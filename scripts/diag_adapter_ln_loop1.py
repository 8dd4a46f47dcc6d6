"""The known LN failure of the bottleneck adapter (NOTES-adapter.md): the two-pass schedule with LN's statistics summed
inside loop 1, at d = 4096, b = 256, M = 2000 (test_ln_at_d4096_in_the_schedule_that_failed's config), against the
float64 reference: which of out, z, mean and rstd is off, and whether fewer pipeline stages, more warps, the fused
schedule or statistics from a pass of their own (separate_stats) change it. The inputs are drawn as tests/test_adapter.py
draws them (h with a 0.5 mean offset, gamma around 1). Usage: python scripts/diag_adapter_ln_loop1.py"""

import torch

from peftkern import reference as R
from peftkern.kernels.triton import adapter as K

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: run under TRITON_INTERPRET=1, at a small shape
FAILING = dict(block_m=64, block_k=64, block_n=64, warps=4, stages=3, split_n=9, two_pass=True)
VARIANTS = {
    "sums in loop 1": dict(loop1_sums=True),  # the schedule as it failed (PEFTKERN_ADAPTER_LOOP1_SUMS=1)
    "as in the test": {},  # the default since: the statistics from row_stats_kernel on GPUs
    "1 stage": dict(stages=1),
    "2 stages": dict(stages=2),
    "8 warps": dict(warps=8),
    "fused, split 9": dict(two_pass=False),
    "separate stats": dict(separate_stats=True),
}


def err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def main():
    M, D, B = (2000, 4096, 256) if DEV == "cuda" else (70, 256, 64)
    for dt in [torch.float16, torch.bfloat16] if DEV == "cuda" else [torch.float16]:
        for act in ("gelu",):  # the activation of the failures on record
            torch.manual_seed(1)
            h = (torch.randn(M, D) + 0.5).to(DEV, dt)
            wd, bd = (torch.randn(B, D) * D**-0.5).to(DEV, dt), torch.randn(B).to(DEV, dt)
            wu, bu = (torch.randn(D, B) * B**-0.5).to(DEV, dt), torch.randn(D).to(DEV, dt)
            gam, bet = (torch.randn(D) + 1).to(DEV, dt), torch.randn(D).to(DEV, dt)
            ref = R.adapter_forward(*(t.double() for t in (h, wd, bd, wu, bu)), None, None, gam.double(),
                                    bet.double(), act, 0.8, True, 1e-5)
            same = R.adapter_forward(h, wd, bd, wu, bu, None, None, gam, bet, act, 0.8, True, 1e-5)
            print(f"{M}x{D}b{B} {str(dt)[6:]} {act}: the {str(dt)[6:]} reference: out {err(same[0], ref[0]):.1e} "
                  f"z {err(same[1], ref[1]):.1e}", flush=True)
            for name, change in VARIANTS.items():
                cfg = dict(FAILING, **change)
                K.LOOP1_SUMS = cfg.pop("loop1_sums", False)
                if DEV == "cpu":
                    cfg.update(block_m=16, block_k=32, block_n=32, stages=1, split_n=3)
                try:
                    out, z, st = K.adapter_forward(h, wd, bd, wu, bu, None, None, gam, bet, act, 0.8, True, 1e-5,
                                                   config=cfg)
                    torch.cuda.synchronize() if DEV == "cuda" else None
                    bad = (out.float() - ref[0].float()).abs().amax(1) > 0.05 * ref[0].float().abs().amax()
                    print(f"  {name:16s} out {err(out, ref[0]):.1e} z {err(z, ref[1]):.1e} mean "
                          f"{err(st[:, 0], ref[2][:, 0]):.1e} rstd {err(st[:, 1], ref[2][:, 1]):.1e}; rows far off: "
                          f"{bad.sum().item()} (first {bad.nonzero()[:4, 0].tolist()})", flush=True)
                except Exception as e:  # a variant that does not compile or fit
                    print(f"  {name:16s} {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
            K.LOOP1_SUMS = False
        backward(M, D, B, dt)


def backward(M, D, B, dt):
    """The backward's loop 1 with a learned scale and an up bias (g . bu summed beside g Wu), no LN, against float64:
    summed in loop 1 (LOOP1_SUMS) and from cuBLAS's g [Wu, bu] (the default on GPUs)."""
    torch.manual_seed(2)
    h = (torch.randn(M, D) + 0.5).to(DEV, dt)
    wd, bd = (torch.randn(B, D) * D**-0.5).to(DEV, dt), torch.randn(B).to(DEV, dt)
    wu, bu = (torch.randn(D, B) * B**-0.5).to(DEV, dt), torch.randn(D).to(DEV, dt)
    scale, g = torch.tensor(1.3).to(DEV, dt), torch.randn(M, D).to(DEV, dt)
    needs = (True,) * 6 + (False, False)
    _, z, st = R.adapter_forward(h, wd, bd, wu, bu, scale, None, None, None, "gelu", 0.8, False, 1e-5)
    ref = R.adapter_backward(*(t.double() for t in (g, h, wd, bd, wu, bu, scale, z, st)), None, None, "gelu", 0.8,
                             True, False, needs)
    for sums in (True, False):
        K.LOOP1_SUMS = sums
        cfg = dict(FAILING) if DEV == "cuda" else dict(FAILING, block_m=16, block_k=32, block_n=32, stages=1, split_n=3)
        got = K.adapter_backward(g, h, wd, bd, wu, bu, scale, z, st, None, None, "gelu", 0.8, True, False, needs,
                                 config=cfg)
        names = ("dh", "dWd", "dbd", "dWu", "dbu", "dscale")
        print(f"  backward, learned scale, sums in loop 1 {sums}: " + " ".join(
            f"{n} {err(a, b):.1e}" for n, a, b in zip(names, got, ref) if b is not None), flush=True)
    K.LOOP1_SUMS = False


if __name__ == "__main__":
    main()

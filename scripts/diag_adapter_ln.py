"""Diagnose the bottleneck-adapter LN path on a GPU: forward/backward errors against reference.py for each
schedule (stages, fused vs two-pass) and dtype. Usage: python scripts/diag_adapter_ln.py"""

import itertools

import torch

from peftkern import reference as R
from peftkern.kernels.triton import adapter as K

ACT = "gelu"  # the activation of the test case that failed on the GPU (fp16)
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: run under TRITON_INTERPRET=1


def err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def main():
    torch.manual_seed(0)
    for (M, D, B), dt in itertools.product([(2000, 4096, 256), (387, 520, 33)] if DEV == "cuda" else [(70, 256, 64)], [torch.float16, torch.bfloat16] if DEV == "cuda" else [torch.float16]):
        h = (torch.randn(M, D, device=DEV) + 0.5).to(dt)
        wd = (torch.randn(B, D, device=DEV) * D**-0.5).to(dt)
        bd = torch.randn(B, device=DEV).to(dt)
        wu = (torch.randn(D, B, device=DEV) * B**-0.5).to(dt)
        bu = torch.randn(D, device=DEV).to(dt)
        gam = (torch.randn(D, device=DEV) + 1).to(dt)
        bet = torch.randn(D, device=DEV).to(dt)
        g = torch.randn(M, D, device=DEV).to(dt)
        base = K.default_config(M, D, B, h.device)
        ro, rz, rst = R.adapter_forward(h, wd, bd, wu, bu, None, None, gam, bet, ACT, 0.8, True, 1e-5)
        needs = (True,) * 5 + (False, True, True)
        rg = R.adapter_backward(g, h, wd, bd, wu, bu, None, rz, rst, gam, bet, ACT, 0.8, True, True, needs)
        for stages, two_pass, split in [(3, base["two_pass"], base["split_n"]), (1, base["two_pass"], base["split_n"]),
                                        (2, base["two_pass"], base["split_n"]), (3, False, 1), ("separate", 0, 0)]:
            if stages == "separate":
                stages, two_pass, split = base["stages"], base["two_pass"], base["split_n"]
                cfg = dict(base, separate_stats=True)
            else:
                cfg = dict(base, stages=stages, two_pass=two_pass, split_n=split)
            o, z, st = K.adapter_forward(h, wd, bd, wu, bu, None, None, gam, bet, ACT, 0.8, True, 1e-5, config=cfg)
            gr = K.adapter_backward(g, h, wd, bd, wu, bu, None, rz, rst, gam, bet, ACT, 0.8, True, True, needs,
                                    config=cfg)
            names = ["dh", "dWd", "dbd", "dWu", "dbu", "dscale", "dgamma", "dbeta"]
            gerr = " ".join(f"{n}={err(a, b):.1e}" for n, a, b in zip(names, gr, rg) if a is not None)
            print(f"{M}x{D}b{B} {str(dt)[6:]} sep={cfg.get('separate_stats', False)} stages={stages} two_pass={two_pass} split={split}: out={err(o, ro):.1e} "
                  f"z={err(z, rz):.1e} mean={err(st[:, 0], rst[:, 0]):.1e} rstd={err(st[:, 1], rst[:, 1]):.1e} "
                  f"| {gerr}")
        # the same without LN, for comparison
        o, z, st = K.adapter_forward(h, wd, bd, wu, bu, None, None, None, None, ACT, 0.8, False, 1e-5)
        ro2, _, _ = R.adapter_forward(h, wd, bd, wu, bu, None, None, None, None, ACT, 0.8, False, 1e-5)
        print(f"   no LN: out={err(o, ro2):.1e}")


if __name__ == "__main__":
    main()

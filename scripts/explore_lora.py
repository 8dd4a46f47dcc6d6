"""Exploration on the GPU: variants of the LoRA forward/backward against cuBLAS (F.linear), one run.

Not part of the test suite: it prints ms per variant so the choices in kernels/triton/lora.py can be made.
    python scripts/explore_lora.py
"""
import torch
import torch.nn.functional as F
import triton.testing as tt

import peftkern
from peftkern.kernels.triton import lora as kl


def ms(fn):
    return tt.do_bench(fn, warmup=25, rep=150, return_mode="median")


def main():
    torch.manual_seed(0)
    dt = torch.bfloat16
    shapes = [(8192, 4096, 4096, 16), (8192, 4096, 11008, 16), (8192, 11008, 4096, 16), (2048, 4096, 4096, 16),
              (8192, 4096, 4096, 128), (16, 4096, 4096, 16)]
    src = torch.empty(2**28, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    t_copy = ms(lambda: dst.copy_(src))
    bw = 2 * src.numel() / t_copy / 1e9  # GB/s, read + write
    print(f"device-to-device copy: {bw:.0f} GB/s (read+write)")
    side_cfgs = [(64, 64, 4, 4, 4 * 132), (32, 128, 4, 3, 4 * 132), (64, 128, 4, 3, 2 * 132), (128, 64, 8, 3, 4 * 132)]
    grad_cfgs = [(64, 128, 8, 3), (64, 64, 4, 4), (128, 64, 4, 4), (32, 128, 4, 4)]
    for M, K, N, r in shapes:
        x = torch.randn(M, K, device="cuda", dtype=dt, requires_grad=True)
        W = torch.randn(N, K, device="cuda", dtype=dt) * K ** -0.5
        A = (torch.randn(r, K, device="cuda", dtype=dt) * K ** -0.5).requires_grad_()
        B = (torch.randn(N, r, device="cuda", dtype=dt) * 0.01).requires_grad_()
        dy = torch.randn(M, N, device="cuda", dtype=dt)
        xd = x.detach()
        f_fwd = ms(lambda: F.linear(xd, W))
        f_dx = ms(lambda: dy @ W)
        f_all = ms(lambda: torch.autograd.grad(F.linear(x, W), [x], dy))
        rx, rdy = M * K * 2 / bw / 1e6 * 1e3, M * N * 2 / bw / 1e6 * 1e3
        print(f"\n== M={M} K={K} N={N} r={r}: cuBLAS fwd {f_fwd:.4f} ms ({2*M*N*K/f_fwd/1e9:.0f} TFLOP/s) dx {f_dx:.4f}"
              f" fwd+bwd {f_all:.4f}; read x {rx:.4f} ms, read dy {rdy:.4f} ms at copy bandwidth", flush=True)
        if M >= 128:
            for c in side_cfgs:
                t1 = ms(lambda: kl.down_project(xd, A.detach(), config=c))
                print(f"  down_project {c}: x {t1:.4f}", flush=True)
            xa = kl.down_project(xd, A.detach())
            for c in grad_cfgs:
                t1 = ms(lambda: kl.adapter_grad(xd, xa, config=c))
                t2 = ms(lambda: kl.adapter_grad(dy, xa, config=c))
                print(f"  adapter_grad {c}: x {t1:.4f}  dy {t2:.4f}", flush=True)
        xa = kl.down_project(xd, A.detach())
        Ad, Bd = A.detach(), B.detach()
        for cb in (False, True):
            t = ms(lambda: kl.lora_forward(xd, W, Ad, Bd, 2.0, None, 0.0, 0, False, cublas_base=cb))
            print(f"  forward cublas_base={cb}: {t:.4f} ({t/f_fwd:.3f}x)", flush=True)
        for ov in (False, True):
            t = ms(lambda: kl.lora_backward(dy, xd, W, Ad, Bd, xa, 2.0, 0.0, 0, False, (1, 1, 1, 0, 0), overlap=ov))
            print(f"  backward overlap={ov}: {t:.4f} ({t/f_dx:.3f}x of dx)", flush=True)
        peftkern.set_backend("triton")
        t = ms(lambda: torch.autograd.grad(peftkern.lora_linear(x, W, A, B, 2.0), [x, A, B], dy))
        with torch.no_grad():
            tf = ms(lambda: peftkern.lora_linear(xd, W, Ad, Bd, 2.0))
        peftkern.set_backend(None)
        print(f"  lora_linear fwd {tf:.4f} ({tf/f_fwd:.3f}x)  fwd+bwd {t:.4f} ({t/f_all:.3f}x)", flush=True)


if __name__ == "__main__":
    main()

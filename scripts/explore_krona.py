"""Exploration on the GPU: the KronA op's pieces against cuBLAS and the copy bandwidth, one run.

Not part of the test suite: it prints microseconds per piece so the choices in kernels/triton/krona.py can be made.
    python scripts/explore_krona.py                  # each piece of the forward and backward, per case
    python scripts/explore_krona.py --fused-configs  # krona_grad_fused_kernel: tokens a step, warps, stages, splits
    python scripts/explore_krona.py --term-configs   # krona_term_whole_kernel's warps, stages and splits
    python scripts/explore_krona.py --route          # sums of low rank: the LoRA route or the Kronecker kernels
    python scripts/explore_krona.py --tma            # token blocks by TMA against plain loads, and TMA's configs
    python scripts/explore_krona.py --cuda           # the cuda backend's pieces (csrc/krona.cu) against the Triton op
    python scripts/explore_krona.py --cuda-once      # its forward and backward a few times, M = 8192, 64 x 64, for ncu:
        ncu --clock-control none -k regex:krona_ --launch-skip 4 --launch-count 3 --section SpeedOfLight \
            --section Occupancy --section WarpStateStats python scripts/explore_krona.py --cuda-once
"""
import sys

import torch
import torch.nn.functional as F
import triton.testing as tt

import peftkern
from peftkern.kernels.triton import krona as kk

# (M, n1, k1, n2, k2, terms): PEFT LoKr's factorisations of the shapes (4096 = 64 x 64, 11008 = 86 x 128)
CASES = [(8192, 64, 64, 64, 64, 1), (8192, 86, 64, 128, 64, 1), (8192, 64, 86, 64, 128, 1), (2048, 64, 64, 64, 64, 1),
         (8192, 64, 64, 64, 64, 4)]


def us(fn):
    return 1e3 * tt.do_bench_cudagraph(fn, rep=100, return_mode="median")


def copy_us(t: torch.Tensor) -> float:
    out = torch.empty_like(t)
    return us(lambda: out.copy_(t))


def make(M, n1, k1, n2, k2, T, dt=torch.bfloat16):
    N, K = n1 * n2, k1 * k2
    x = torch.randn(M, K, device="cuda", dtype=dt)
    W = torch.randn(N, K, device="cuda", dtype=dt) * K ** -0.5
    A = torch.randn(T, n1, k1, device="cuda", dtype=dt) * k1 ** -0.5
    B = torch.randn(T, n2, k2, device="cuda", dtype=dt) * k2 ** -0.5
    dy = torch.randn(M, N, device="cuda", dtype=dt)
    return x, W, A, B, dy


def op_us(x, W, A, B, dy, fused: bool) -> tuple:
    """(forward, backward, fwd+bwd through autograd) of the op, us."""
    kk.FUSED_GRAD[0] = fused
    needs = (True, True, False, True, False, False, False)
    t_f = us(lambda: kk.krona_forward(x, W, A, None, B, None, 2.0, None))
    t_b = us(lambda: kk.krona_backward(dy, x, W, A, None, B, None, 2.0, needs))
    xr, Ar, Br = x.detach().requires_grad_(), A.detach().requires_grad_(), B.detach().requires_grad_()

    def step():
        y = peftkern.krona_linear(xr, W, Ar, Br, 2.0)
        torch.autograd.grad(y, [xr, Ar, Br], dy)

    t_fb = us(step)
    kk.FUSED_GRAD[0] = True
    return t_f, t_b, t_fb


def pieces():
    for M, n1, k1, n2, k2, T in CASES:
        x, W, A, B, dy = make(M, n1, k1, n2, k2, T)
        f_fwd, f_dx = us(lambda: F.linear(x, W)), us(lambda: dy @ W)
        floor = f_fwd + f_dx
        print(f"\n== M={M} A {n1}x{k1} B {n2}x{k2} T={T}: cuBLAS fwd {f_fwd:.1f} us, dx {f_dx:.1f} us; copy x "
              f"{copy_us(x):.1f} us, copy dy {copy_us(dy):.1f} us", flush=True)
        C = torch.empty(M, n1 * n2, device="cuda", dtype=x.dtype)
        Cx = torch.empty_like(x)
        At, Bt = A.transpose(1, 2), B.transpose(1, 2)
        rows = [
            ("term kernel fwd (x -> C)", lambda: kk.kron_term(x, A, B, None, 2.0)),
            ("tiled term kernel fwd", lambda: kk.kron_term(x, A, B, None, 2.0, config=kk._term_config(n1, k1, n2, k2))),
            ("cuBLAS C.addmm_(x, W^T)", lambda: C.addmm_(x, W.t())),
            ("term kernel dx (dy -> C')", lambda: kk.kron_term(dy, At, Bt, None, 2.0)),
            ("cuBLAS C'.addmm_(dy, W)", lambda: Cx.addmm_(dy, W)),
            ("grad_outer (dA)", lambda: kk.grad_outer(dy, x, n1, k1, B)),
            ("grad_inner (dB)", lambda: kk.grad_inner(dy, x, A, n2)),
        ]
        if kk.whole_factors_fit(n1, k1, n2, k2):
            rows += [("grad_fused (dA, dB, dx term)", lambda: kk.grad_fused(dy, x, A, B, 2.0, True)),
                     ("grad_fused (dA, dB)", lambda: kk.grad_fused(dy, x, A, B, 2.0, False))]
        for name, fn in rows:
            print(f"  {name:34s} {us(fn):8.1f} us", flush=True)
        for fused in (False, True):
            t_f, t_b, t_fb = op_us(x, W, A, B, dy, fused)
            print(f"  op fused_grad={fused!s:5s}: fwd {t_f:.1f} ({t_f / f_fwd:.3f}x)  bwd {t_b:.1f} ({t_b / f_dx:.3f}x)"
                  f"  fwd+bwd autograd {t_fb:.1f} ({t_fb / floor:.3f}x)", flush=True)


def fused_configs():
    for M, n1, k1, n2, k2, T in CASES[:3]:
        x, W, A, B, dy = make(M, n1, k1, n2, k2, T)
        base = kk._fused_config(n1, k1, n2, k2)
        print(f"\n== M={M} A {n1}x{k1} B {n2}x{k2}: default {base}", flush=True)
        sweep_fused(x, A, B, dy, base, [(w, st, per_sm) for w in (4, 8) for st in (3, 4) for per_sm in (1, 2, 3)])


def sweep_fused(x, A, B, dy, base: dict, variants: list, label: str = ""):
    """Times grad_fused (with the dx term) at each (warps, stages, programs an SM) of variants, from config base."""
    for warps, stages, per_sm in variants:
        cfg = {**base, "num_warps": warps, "num_stages": stages}
        name = f"{label}BT={cfg['BT']} warps={warps} stages={stages} per_sm={per_sm}"
        try:
            t = us(lambda: kk.grad_fused(dy, x, A, B, 2.0, True, config=cfg, programs_per_sm=per_sm))
        except Exception as e:  # a config that does not fit
            print(f"  {name}: {type(e).__name__}")
            continue
        print(f"  {name}: {t:.1f} us", flush=True)


def term_configs():
    for M, n1, k1, n2, k2, T in CASES[:3]:
        x, W, A, B, dy = make(M, n1, k1, n2, k2, T)
        out = torch.empty(M, n1 * n2, device="cuda", dtype=x.dtype)
        base = kk._whole_config(n1, k1, n2, k2)
        print(f"\n== M={M} A {n1}x{k1} B {n2}x{k2}: krona_term_whole_kernel, default {base}: "
              f"{us(lambda: kk.kron_term(x, A, B, None, 2.0)):.1f} us", flush=True)
        for warps in (4, 8):
            for stages in (2, 3, 4):
                for per_sm in (1, 2, 4):
                    cfg = {"num_warps": warps, "num_stages": stages}
                    label = f"warps={warps} stages={stages} per_sm={per_sm}"
                    try:
                        t = us(lambda: kk._kron_term_whole(x, A, B, 2.0, None, out, cfg, per_sm))
                    except Exception as e:  # a config that does not fit
                        print(f"  {label}: {type(e).__name__}")
                        continue
                    print(f"  {label}: {t:.1f} us", flush=True)


def tma():
    """The whole-factor kernels (term forward, grad_fused) and the op with token blocks by TMA (kk.TMA_TOKENS) and with
    plain loads, then the TMA kernels' warps, stages and programs an SM."""
    for M, n1, k1, n2, k2, T in CASES:
        x, W, A, B, dy = make(M, n1, k1, n2, k2, T)
        f_fwd, f_dx = us(lambda: F.linear(x, W)), us(lambda: dy @ W)
        print(f"\n== M={M} A {n1}x{k1} B {n2}x{k2} T={T}: cuBLAS fwd {f_fwd:.1f} us, dx {f_dx:.1f} us; copy x "
              f"{copy_us(x):.1f} us, copy dy {copy_us(dy):.1f} us", flush=True)
        for on in (False, True):
            kk.TMA_TOKENS[0] = on
            t_term = us(lambda: kk.kron_term(x, A, B, None, 2.0))
            t_grad = us(lambda: kk.grad_fused(dy, x, A, B, 2.0, True))
            t_f, t_b, t_fb = op_us(x, W, A, B, dy, True)
            print(f"  TMA={on!s:5s} term fwd {t_term:7.1f} us  grad_fused {t_grad:7.1f} us  op fwd {t_f:.1f} "
                  f"({t_f / f_fwd:.3f}x) bwd {t_b:.1f} ({t_b / f_dx:.3f}x) fwd+bwd {t_fb:.1f} "
                  f"({t_fb / (f_fwd + f_dx):.3f}x)", flush=True)
        kk.TMA_TOKENS[0] = True
        if T > 1 or M < 8192:
            continue
        out = torch.empty(M, n1 * n2, device="cuda", dtype=x.dtype)
        for warps, stages in ((4, 2), (4, 3), (4, 4), (8, 3)):
            for per_sm in (1, 2, 3):
                label = f"term warps={warps} stages={stages} per_sm={per_sm}"
                try:
                    t = us(lambda: kk._kron_term_whole(x, A, B, 2.0, None, out, dict(num_warps=warps,
                                                                                     num_stages=stages), per_sm))
                except Exception as e:  # a config that does not fit
                    print(f"  {label}: {type(e).__name__}")
                    continue
                print(f"  {label}: {t:.1f} us", flush=True)
        sweep_fused(x, A, B, dy, kk._fused_config(n1, k1, n2, k2),
                    [(w, st, per_sm) for w, st in ((4, 2), (4, 3), (8, 2), (8, 3)) for per_sm in (1, 2)], "grad_fused ")


def route():
    from peftkern.ops import krona as ok

    dt = torch.bfloat16
    for M, T, (n1, k1), (n2, k2), r in [(8192, 4, (4, 4), (1024, 1024), 4), (2048, 4, (4, 4), (1024, 1024), 4),
                                        (8192, 1, (64, 64), (64, 64), 2)]:
        N, K = n1 * n2, k1 * k2
        x = torch.randn(M, K, device="cuda", dtype=dt, requires_grad=True)
        W = torch.randn(N, K, device="cuda", dtype=dt) * K ** -0.5
        A = (torch.randn(T, n1, k1, device="cuda", dtype=dt) * k1 ** -0.5).requires_grad_()
        Ba = (torch.randn(T, n2, r, device="cuda", dtype=dt) * r ** -0.5).requires_grad_()
        Bb = (torch.randn(T, r, k2, device="cuda", dtype=dt) * k2 ** -0.5).requires_grad_()
        dy = torch.randn(M, N, device="cuda", dtype=dt)
        xf = x.detach().requires_grad_()

        def frozen():
            torch.autograd.grad(F.linear(xf, W), [xf], dy)

        def step():
            y = peftkern.krona_linear(x, W, A, (Ba, Bb), 2.0)
            torch.autograd.grad(y, [x, A, Ba, Bb], dy)

        rmat, lmat = (t.detach().requires_grad_() for t in ok.lora_route_factors(A, None, Ba, Bb))

        def lora_alone():
            y = peftkern.lora_linear(x, W, rmat, lmat, 2.0)
            torch.autograd.grad(y, [x, rmat, lmat], dy)

        t0 = us(frozen)
        print(f"\n== M={M} T={T} A {n1}x{k1} B {n2}x{k2} rank {r}: route rank {ok.lora_route_rank(A, None, Ba, Bb)}; "
              f"frozen fwd+bwd {t0:.1f} us", flush=True)
        for limit in (0, 128):
            ok.LORA_ROUTE_MAX_RANK[0] = limit
            t = us(step)
            print(f"  {'LoRA route' if limit else 'Kronecker kernels':18s} fwd+bwd {t:.1f} us ({t / t0:.3f}x)", flush=True)
        ok.LORA_ROUTE_MAX_RANK[0] = 128
        t = us(lora_alone)
        print(f"  {'LoRA op alone':18s} fwd+bwd {t:.1f} us ({t / t0:.3f}x): L, R made beforehand", flush=True)


def cuda_pieces():
    """The cuda backend's forward and its backward with and without each piece (the term kernel with the factors
    transposed for dx alone; the grad kernel alone; both in one pass; the grad kernel's dA and dB accumulators in
    registers, the default where they fit, or in shared memory), against cuBLAS and the Triton op."""
    from peftkern.kernels import cuda as kc

    ext = kc._ext()
    for M, n1, k1, n2, k2, T in CASES[:4]:
        x, W, A, B, dy = make(M, n1, k1, n2, k2, T)
        f_fwd, f_dx = us(lambda: F.linear(x, W)), us(lambda: dy @ W)
        print(f"\n== cuda, M={M} A {n1}x{k1} B {n2}x{k2} T={T}: cuBLAS fwd {f_fwd:.1f} us, dx {f_dx:.1f} us; copy x "
              f"{copy_us(x):.1f} us", flush=True)
        C = torch.empty(M, n1 * n2, device="cuda", dtype=x.dtype)
        rows = [
            ("forward (term kernel + cuBLAS)", f_fwd, lambda: ext.krona_forward(x, W, A, B, 2.0, None, False)),
            ("forward, cuBLAS GEMMs on views", f_fwd, lambda: ext.krona_forward(x, W, A, B, 2.0, None, True)),
            ("cuBLAS C.addmm_(x, W^T) alone", f_fwd, lambda: C.addmm_(x, W.t())),
            ("bwd dx only (term kernel on dy)", f_dx,
             lambda: ext.krona_backward(dy, x, W, A, B, 2.0, True, False, False, False, False, False)),
            ("bwd dA, dB only (grad kernel)", f_dx,
             lambda: ext.krona_backward(dy, x, W, A, B, 2.0, False, True, True, False, False, False)),
            ("bwd all (grad kernel with dx)", f_dx,
             lambda: ext.krona_backward(dy, x, W, A, B, 2.0, True, True, True, False, False, False)),
            ("bwd all, dA dB accumulators shared", f_dx,
             lambda: ext.krona_backward(dy, x, W, A, B, 2.0, True, True, True, False, False, False, False)),
            ("bwd dA, dB only, accumulators shared", f_dx,
             lambda: ext.krona_backward(dy, x, W, A, B, 2.0, False, True, True, False, False, False, False)),
            ("bwd all, cuBLAS GEMMs on views", f_dx,
             lambda: ext.krona_backward(dy, x, W, A, B, 2.0, True, True, True, False, False, True)),
            ("Triton op backward", f_dx,
             lambda: kk.krona_backward(dy, x, W, A, None, B, None, 2.0,
                                       (True, True, False, True, False, False, False))),
        ]
        for name, ref, fn in rows:
            t = us(fn)
            print(f"  {name:34s} {t:8.1f} us  ({t / ref:.3f}x its cuBLAS GEMM, +{t - ref:.1f} us)", flush=True)


def cuda_once():
    from peftkern.kernels import cuda as kc

    ext = kc._ext()
    x, W, A, B, dy = make(8192, 64, 64, 64, 64, 1)
    for _ in range(3):
        ext.krona_forward(x, W, A, B, 2.0, None, False)
        ext.krona_backward(dy, x, W, A, B, 2.0, True, True, True, False, False, False)
    torch.cuda.synchronize()


if __name__ == "__main__":
    torch.manual_seed(0)
    arg = sys.argv[1] if len(sys.argv) > 1 else ""
    modes = {"--fused-configs": fused_configs, "--term-configs": term_configs, "--route": route, "--tma": tma,
             "--cuda": cuda_pieces, "--cuda-once": cuda_once}
    modes.get(arg, pieces)()

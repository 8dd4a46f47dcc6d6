"""Exploration on the GPU: variants of the LoRA forward/backward pieces against cuBLAS, one run.

Not part of the test suite: it prints ms per variant so the choices in kernels/triton/lora.py can be made.
    python scripts/explore_lora.py              # side kernels, forward modes, the backward, three shapes
    python scripts/explore_lora.py --dx-tiles   # the backward's dx GEMM per tile shape and M against cuBLAS
    python scripts/explore_lora.py --persistent-dx   # the backward with dx by the persistent kernel, or not
    python scripts/explore_lora.py --ia3-dx-tiles    # IA3's dx GEMMs per tile shape and M against cuBLAS
    python scripts/explore_lora.py --wide-ranks      # r = 64, 128: persistent forward and dx, or cuBLAS
    python scripts/explore_lora.py --ia3-input-dx    # IA3's input-form backward: persistent GEMM or not
    python scripts/explore_lora.py --pieces          # each kernel of the op's forward and backward, r = 16, 128
    python scripts/explore_lora.py --tail            # the backward with dA, dB beside the dx kernel's last round or after
    python scripts/explore_lora.py --wide-stages     # r = 128: the persistent forward and dx with 3 or 4 stages
    python scripts/explore_lora.py --r128-configs    # r = 128: tiles, warps, grouping of the unflattened walk
    python scripts/explore_lora.py --skinny          # the four skinny cuBLAS products, each way of asking for them
    python scripts/explore_lora.py --workers         # xa and dyb made by the persistent kernel's own workers, or not
    python scripts/explore_lora.py --helpers [M,K,N,r ...]  # the same by nobody, workers, or helpers (a tile short)
    python scripts/explore_lora.py --skinny-grads    # dA and dB by skinny_grads (one launch) or by two cuBLAS calls
    python scripts/explore_lora.py --skinny-op [M,K,N,r ...]  # the op with PEFTKERN_LORA_SKINNY_GRADS 0/main/side
    python scripts/explore_lora.py --tail-da [M,K,N,r ...]    # dA behind the dx kernel (column_grad or cuBLAS), or before it
    python scripts/explore_lora.py --narrow-configs [M,K,N,r ...] [--configs=0,3]  # the persistent kernel's configs
"""
import sys

import torch
import torch.nn.functional as F
import triton.testing as tt

from peftkern.kernels.triton import lora as kl


def ms(fn):
    return tt.do_bench_cudagraph(fn, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    """GB/s (read + write) of a 256 MB device-to-device copy: bytes / ms / 1e6."""
    src = torch.empty(2**28, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    return 2 * src.numel() / ms(lambda: dst.copy_(src)) / 1e6


def main():
    torch.manual_seed(0)
    dt = torch.bfloat16
    bw = copy_bandwidth()
    print(f"device-to-device copy: {bw:.0f} GB/s (read+write)")
    for M, K, N, r in [(8192, 4096, 4096, 16), (8192, 4096, 11008, 16), (2048, 4096, 4096, 16)]:
        x = torch.randn(M, K, device="cuda", dtype=dt)
        W = torch.randn(N, K, device="cuda", dtype=dt) * K ** -0.5
        A = torch.randn(r, K, device="cuda", dtype=dt) * K ** -0.5
        B = torch.randn(N, r, device="cuda", dtype=dt) * 0.01
        dy = torch.randn(M, N, device="cuda", dtype=dt)
        f_fwd = ms(lambda: F.linear(x, W))
        rx, rdy = M * K * 2 / bw / 1e3, M * N * 2 / bw / 1e3
        print(f"\n== M={M} K={K} N={N} r={r}: cuBLAS fwd {f_fwd:.4f} ms; read x {rx:.4f} ms, read dy {rdy:.4f} ms", flush=True)
        for c in [(32, 128, 4, 3, 528), (64, 64, 4, 4, 528), (128, 64, 4, 3, 264), (128, 128, 8, 3, 264), (64, 256, 4, 3, 528)]:
            print(f"  down_project {c}: x {ms(lambda: kl.down_project(x, A, config=c)):.4f}", flush=True)
        xa = kl.down_project(x, A)
        for c in [(64, 128, 8, 3), (64, 64, 4, 4), (128, 128, 8, 3), (64, 256, 8, 3), (128, 64, 4, 3)]:
            t1 = ms(lambda: kl.adapter_grad(x, xa, config=c))
            t2 = ms(lambda: kl.adapter_grad(dy, xa, config=c, colsum=True))
            print(f"  adapter_grad {c}: x {t1:.4f}  dy+colsum {t2:.4f}", flush=True)
        for mode in ("triton", "cublas-add", "cublas-beta"):
            t = ms(lambda: kl.lora_forward(x, W, A, B, 2.0, None, 0.0, 0, False, mode=mode))
            print(f"  forward {mode}: {t:.4f} ({t / f_fwd:.3f}x)", flush=True)
        t_dx = ms(lambda: dy @ W)
        t_b = ms(lambda: kl.lora_backward(dy, x, W, A, B, xa, 2.0, 0.0, 0, False, (1, 1, 1, 0, 0)))
        print(f"  backward {t_b:.4f} ({t_b / t_dx:.3f}x of cuBLAS dx {t_dx:.4f})", flush=True)


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): the tiles _matmul_config chooses among, and two neighbours
DX_TILES = [(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 256, 32, 8, 5),
            (256, 128, 64, 8, 3)]


def _tile_ratios(fn, t_ref: float, chosen: dict) -> list:
    """'BMxBNxBKsS ratio' per tile of DX_TILES: fn(config) timed against t_ref, the chosen tile starred, a tile
    that does not fit (shared memory, registers) named with its error."""
    out = []
    for bm, bn, bk, warps, stages in DX_TILES:
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
        try:
            t = ms(lambda: fn(cfg))
        except Exception as e:  # out of shared memory or registers
            out.append(f"{bm}x{bn}x{bk}s{stages} {type(e).__name__}")
            continue
        mark = "*" if cfg == chosen else " "
        out.append(f"{bm}x{bn}x{bk}s{stages}{mark} {t / t_ref:.3f}x")
    return out


def dx_tiles(K: int = 4096, N: int = 4096, r: int = 16):
    """dx = dy W + s dyb A (fused_matmul, W read N-major) per tile and M, against cuBLAS's dy @ W; the tile the
    op picks is marked. 94ea202 moved 1024 < M <= 2048 to 128x256x64 x 3 from one measurement at M = 2048."""
    dt = torch.bfloat16
    W = torch.randn(N, K, device="cuda", dtype=dt) * K ** -0.5
    A = torch.randn(r, K, device="cuda", dtype=dt) * K ** -0.5
    for M in (512, 1024, 1536, 2048, 4096, 8192):
        dy = torch.randn(M, N, device="cuda", dtype=dt)
        dyb = (dy @ torch.randn(N, r, device="cuda", dtype=dt)).float()
        t_cublas = ms(lambda: dy @ W)
        chosen = kl._matmul_config(M, dt, torch.device("cuda"))
        line = [f"M={M:5d} cuBLAS dx {t_cublas:.4f} ms:"]
        line += _tile_ratios(lambda c: kl.fused_matmul(dy, W.t(), A.t(), dyb, 2.0, config=c), t_cublas, chosen)
        print("  ".join(line), flush=True)


def ia3_dx_tiles(K: int = 4096, N: int = 4096):
    """IA3's two dx GEMMs (ia3.dx_input_form, ia3.dx_output_form: W read N-major as in LoRA's dx, with their own
    epilogues) per tile of DX_TILES and M, against cuBLAS's dy @ W; the tile they take today (_matmul_config(M),
    the H100's LoRA tiles before 94ea202) is marked."""
    from peftkern.kernels.triton import ia3 as ki

    dt = torch.bfloat16
    W = torch.randn(N, K, device="cuda", dtype=dt) * K ** -0.5
    for M in (2048, 8192):
        dy = torch.randn(M, N, device="cuda", dtype=dt)
        x = torch.randn(M, K, device="cuda", dtype=dt)
        z = torch.randn(M, N, device="cuda", dtype=dt)
        l_in, l_out = torch.rand(K, device="cuda", dtype=dt), torch.rand(N, device="cuda", dtype=dt)
        t_cublas = ms(lambda: dy @ W)
        chosen = kl._matmul_config(M)
        for name, fn in [("input form", lambda c: ki.dx_input_form(dy, W.t(), l_in, x, config=c)),
                         ("output form", lambda c: ki.dx_output_form(dy, W.t(), l_out, z, config=c))]:
            line = [f"M={M:5d} IA3 {name} dx, cuBLAS dx {t_cublas:.4f} ms:"] + _tile_ratios(fn, t_cublas, chosen)
            print("  ".join(line), flush=True)


def ia3_input_dx():
    """IA3's input-form backward (dx = (dy W) * l, dl = sum_m x * (dy W)): the pointer-based fused GEMM
    (ia3.dx_input_form, the op's default) against the persistent TMA kernel (ia3.persistent_dx_input_form) in two
    tilings, each against cuBLAS's dy @ W alone; then the op's whole backward with ia3.PERSISTENT_DX off and on."""
    from peftkern.kernels.triton import ia3 as ki

    dt, default = torch.bfloat16, ki.PERSISTENT_DX
    half = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, FLATTEN=True, SUBTILE=True, num_warps=8,
                num_stages=3)
    whole = {**half, "BLOCK_N": 128, "SUBTILE": False, "num_stages": 4}
    for M, K, N in [(8192, 4096, 4096), (8192, 4096, 11008), (2048, 4096, 4096)]:
        W = torch.randn(N, K, device="cuda", dtype=dt) * K ** -0.5
        dy = torch.randn(M, N, device="cuda", dtype=dt)
        x = torch.randn(M, K, device="cuda", dtype=dt)
        lv = torch.rand(K, device="cuda", dtype=dt)
        t_cublas = ms(lambda: dy @ W)
        line = [f"M={M} K={K} N={N}: cuBLAS dx {t_cublas:.4f} ms;"]
        for name, fn in [("fused", lambda: ki.dx_input_form(dy, W.t(), lv, x)),
                         ("persistent 128x256 half-tiles", lambda: ki.persistent_dx_input_form(dy, W.t(), lv, x,
                                                                                               config=half)),
                         ("persistent 128x128 s4", lambda: ki.persistent_dx_input_form(dy, W.t(), lv, x,
                                                                                       config=whole))]:
            try:
                line.append(f"{name} {ms(fn) / t_cublas:.3f}x;")
            except Exception as e:  # out of shared memory or registers
                line.append(f"{name} {type(e).__name__};")
        for on in (False, True):
            ki.PERSISTENT_DX = on
            t = ms(lambda: ki.ia3_backward(dy, x, W, lv, None, True, False, (1, 1, 0, 0)))
            line.append(f"backward {'persistent' if on else 'fused'} {t / t_cublas:.3f}x")
        ki.PERSISTENT_DX = default
        print(" ".join(line), flush=True)


def persistent_dx():
    """The backward with its dx from the fused GEMM (the default) and from the persistent forward kernel
    (kl.PERSISTENT_DX), per shape and rank; the dx piece alone against cuBLAS's dy @ W beside it."""
    dt, default = torch.bfloat16, kl.PERSISTENT_DX
    for M, K, N, r in [(8192, 4096, 4096, 16), (8192, 4096, 11008, 16), (8192, 11008, 4096, 16),
                       (2048, 4096, 4096, 16), (8192, 4096, 4096, 64)]:
        x = torch.randn(M, K, device="cuda", dtype=dt)
        W = torch.randn(N, K, device="cuda", dtype=dt) * K ** -0.5
        A = torch.randn(r, K, device="cuda", dtype=dt) * K ** -0.5
        B = torch.randn(N, r, device="cuda", dtype=dt) * 0.01
        dy = torch.randn(M, N, device="cuda", dtype=dt)
        xa = (x @ A.t()).float()
        dyb = (dy @ B).float()
        t_cublas = ms(lambda: dy @ W)
        t_fused = ms(lambda: kl.fused_matmul(dy, W.t(), A.t(), dyb, 2.0))
        t_pers = ms(lambda: kl.persistent_forward(dy, W.t(), B.t(), A.t(), 2.0))  # dyb by cuBLAS included
        t_dyb = ms(lambda: kl.mm_float32(dy, B))
        line = [f"M={M} K={K} N={N} r={r}: cuBLAS dx {t_cublas:.4f} ms; fused dx {t_fused / t_cublas:.3f}x "
                f"(+ dyb {t_dyb / t_cublas:.3f}x); persistent dx with dyb {t_pers / t_cublas:.3f}x;"]
        for on in (False, True):
            kl.PERSISTENT_DX = on
            t = ms(lambda: kl.lora_backward(dy, x, W, A, B, xa, 2.0, 0.0, 0, False, (1, 1, 1, 0, 0)))
            line.append(f"backward {'persistent' if on else 'default'} {t:.4f} ms ({t / t_cublas:.3f}x)")
        kl.PERSISTENT_DX = default
        print(" ".join(line), flush=True)


def wide_ranks():
    """r = 64 and 128 at M = 8192, 4096^2: the persistent kernel (xa by cuBLAS included) flattened with the rank in
    a loop of 64-wide slices, or unflattened with the whole rank at once; the op's forward by the persistent kernel
    (its default config) against cuBLAS's beta mode, and the backward with dx by the persistent kernel or by cuBLAS's
    dx and an addmm_, each against F.linear's forward (x W^T) and backward (dy W)."""
    dt, default = torch.bfloat16, kl.PERSISTENT_DX
    M, K, N = 8192, 4096, 4096
    x = torch.randn(M, K, device="cuda", dtype=dt)
    W = torch.randn(N, K, device="cuda", dtype=dt) * K ** -0.5
    dy = torch.randn(M, N, device="cuda", dtype=dt)
    t_fwd, t_dx = ms(lambda: x @ W.t()), ms(lambda: dy @ W)
    for r in (64, 128):
        A = torch.randn(r, K, device="cuda", dtype=dt) * K ** -0.5
        B = torch.randn(N, r, device="cuda", dtype=dt) * 0.01
        xa = x @ A.t()  # in x's dtype, as the op saves it
        line = [f"M={M} K={K} N={N} r={r}: F.linear fwd {t_fwd:.4f} ms, dx {t_dx:.4f} ms;"]
        for flat in (True, False):  # the walk flattened, ranks in a loop of 64-wide slices; or not, the whole rank
            cfg = {**kl._persistent_config(M, r), "FLATTEN": flat}
            tf = ms(lambda: kl.persistent_forward(x, W, A, B, 2.0, config=cfg, xa_dtype=dt))
            tb = ms(lambda: kl.persistent_forward(dy, W.t(), B.t(), A.t(), 2.0, config=cfg, xa_dtype=dt))
            line.append(f"{'flattened, slices' if flat else 'whole rank'}: fwd {tf / t_fwd:.3f}x dx {tb / t_dx:.3f}x;")
        for mode in ("persistent", "cublas-beta"):
            t = ms(lambda: kl.lora_forward(x, W, A, B, 2.0, None, 0.0, 0, False, mode=mode))
            line.append(f"forward {mode} {t / t_fwd:.3f}x;")
        for on in (True, False):
            kl.PERSISTENT_DX = on
            t = ms(lambda: kl.lora_backward(dy, x, W, A, B, xa, 2.0, 0.0, 0, False, (1, 1, 1, 0, 0)))
            line.append(f"backward {'persistent' if on else 'cublas+addmm'} {t / t_dx:.3f}x")
        kl.PERSISTENT_DX = default
        print(" ".join(line), flush=True)


def pieces():
    """Each piece of the op's default forward and backward at M = 8192, 4096^2, timed alone (CUDA-graph replays),
    against F.linear's forward and cuBLAS's dy @ W and against the time to read one 64 MB operand (a copy's
    bandwidth): where the fwd+bwd's excess over the frozen layer goes, rank by rank."""
    dt = torch.bfloat16
    M, K, N = 8192, 4096, 4096
    bw = copy_bandwidth()
    x = torch.randn(M, K, device="cuda", dtype=dt)
    W = torch.randn(N, K, device="cuda", dtype=dt) * K ** -0.5
    dy = torch.randn(M, N, device="cuda", dtype=dt)
    t_fwd, t_dx = ms(lambda: x @ W.t()), ms(lambda: dy @ W)
    print(f"copy {bw:.0f} GB/s: reading 64 MB takes {M * K * 2 / bw / 1e3:.1f} us; F.linear fwd "
          f"{t_fwd * 1e3:.1f} us, dy @ W {t_dx * 1e3:.1f} us", flush=True)
    for r in (16, 128):
        A = torch.randn(r, K, device="cuda", dtype=dt) * K ** -0.5
        B = torch.randn(N, r, device="cuda", dtype=dt) * 0.01
        xa = x @ A.t()
        dyb = dy @ B
        parts = {
            "xa = x A^T (cuBLAS)": lambda: torch.mm(x, A.t()),
            "forward (xa + persistent)": lambda: kl.lora_forward(x, W, A, B, 2.0, None, 0.0, 0, False),
            "dyb = dy B (cuBLAS)": lambda: torch.mm(dy, B),
            "dx (dyb + persistent)": lambda: kl.persistent_forward(dy, W.t(), B.t(), A.t(), 2.0, xa_dtype=dt),
            "dA = s dyb^T x (cuBLAS)": lambda: kl.scaled_mm(dyb.t(), x, 2.0, dt),
            "dB = s dy^T xa (cuBLAS)": lambda: kl.scaled_mm(dy.t(), xa, 2.0, dt),
            "dA by adapter_grad (Triton)": lambda: kl.adapter_grad(x, dyb),
            "dB by adapter_grad (Triton)": lambda: kl.adapter_grad(dy, xa),
            "backward (all)": lambda: kl.lora_backward(dy, x, W, A, B, xa, 2.0, 0.0, 0, False, (1, 1, 1, 0, 0)),
        }
        if r <= 64:
            cfg = {**kl._persistent_config(M), "XA_GIVEN": False}
            parts["forward, xa inside the kernel"] = lambda: kl.persistent_forward(x, W, A, B, 2.0, config=cfg,
                                                                                  xa_dtype=dt)
        for name, fn in parts.items():
            t = ms(fn)
            print(f"  r={r:3d} {name:32s} {t * 1e3:7.1f} us", flush=True)


def _op_operands(M: int, K: int, N: int, r: int, dt):
    """x, W, A, B, dy, xa = x A^T, leaf copies of x, A, B for autograd, and F.linear's forward and fwd+bwd (ms)."""
    torch.manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=dt)
    W = torch.randn(N, K, device="cuda", dtype=dt) * K ** -0.5
    A = torch.randn(r, K, device="cuda", dtype=dt) * K ** -0.5
    B = torch.randn(N, r, device="cuda", dtype=dt) * 0.01
    dy = torch.randn(M, N, device="cuda", dtype=dt)
    xg = x.clone().requires_grad_(True)
    Ag, Bg = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    t_fwd = ms(lambda: F.linear(x, W))
    t_base = ms(lambda: torch.autograd.grad(F.linear(xg, W), (xg,), dy))
    return x, W, A, B, dy, x @ A.t(), xg, Ag, Bg, t_fwd, t_base


def _op_times(x, W, A, B, dy, xa, xg, Ag, Bg, t_fwd, t_base) -> str:
    """The backward alone, the forward alone and the op's fwd+bwd through autograd.grad (as the benchmark times it),
    CUDA-graph replays, as one line: us, and the forward's and the op's ratios to F.linear's."""
    import peftkern
    t_b = ms(lambda: kl.lora_backward(dy, x, W, A, B, xa, 2.0, 0.0, 0, False, (1, 1, 1, 0, 0)))
    t_f = ms(lambda: kl.lora_forward(x, W, A, B, 2.0, None, 0.0, 0, False))
    t_op = ms(lambda: torch.autograd.grad(peftkern.lora_linear(xg, W, Ag, Bg, 2.0), (xg, Ag, Bg), dy))
    return (f"bwd {t_b * 1e3:6.1f} us, fwd {t_f * 1e3:6.1f} us ({t_f / t_fwd:.4f}x), "
            f"op fwd+bwd {t_op * 1e3:6.1f} us ({t_op / t_base:.4f}x)")


def tail():
    """The backward with dA, dB and the bias gradient behind the persistent dx kernel (TAIL_OVERLAP "side" or
    "priority") or after it ("0"), with dyb made as s dy B (PRESCALED_DYB) or not, and the forward with s B
    (PRESCALED_B) or not: the backward alone, the forward alone, and the op's fwd+bwd through autograd.grad (as the
    benchmark times it) against F.linear's, each as CUDA-graph replays."""
    dt = torch.bfloat16
    saved = kl.TAIL_OVERLAP, kl.PRESCALED_DYB, kl.PRESCALED_B
    variants = [("0", False, False), ("side", False, False), ("side", True, False), ("side", True, True)]
    for M, K, N, r in [(8192, 4096, 4096, 16), (8192, 4096, 4096, 128), (8192, 4096, 4096, 64),
                       (8192, 4096, 11008, 16)]:
        x, W, A, B, dy, xa, xg, Ag, Bg, t_fwd, t_base = _op_operands(M, K, N, r, dt)
        print(f"M={M} {K}->{N} r={r}: F.linear fwd {t_fwd * 1e3:.1f} us, fwd+bwd {t_base * 1e3:.1f} us", flush=True)
        for _ in range(2):
            for tail_mode, dyb_s, b_s in variants:
                kl.TAIL_OVERLAP, kl.PRESCALED_DYB, kl.PRESCALED_B = tail_mode, dyb_s, b_s
                times = _op_times(x, W, A, B, dy, xa, xg, Ag, Bg, t_fwd, t_base)
                print(f"  tail={tail_mode:5s} s*dyb={dyb_s:d} s*B={b_s:d}: {times}", flush=True)
    kl.TAIL_OVERLAP, kl.PRESCALED_DYB, kl.PRESCALED_B = saved


def _big_operands(dt):
    """x, W, dy at M = 8192, 4096^2, with F.linear's forward and cuBLAS's dy @ W timed (ms) and printed."""
    M, K, N = 8192, 4096, 4096
    x = torch.randn(M, K, device="cuda", dtype=dt)
    W = torch.randn(N, K, device="cuda", dtype=dt) * K ** -0.5
    dy = torch.randn(M, N, device="cuda", dtype=dt)
    t_fwd, t_dx = ms(lambda: x @ W.t()), ms(lambda: dy @ W)
    print(f"F.linear fwd {t_fwd * 1e3:.1f} us, dy @ W {t_dx * 1e3:.1f} us", flush=True)
    return x, W, dy, t_fwd, t_dx


def _scaled_epilogue_times(x, W, dy, A, B, cfg: dict) -> tuple[float, float]:
    """(forward, dx) in ms of the persistent kernel with the scaling outside its epilogue, as the op runs them: s B for
    the forward, dyb = s dy B by cuBLAS before the dx (timed with it)."""
    dt = x.dtype

    def dx():
        dyb = kl.scaled_mm(dy, B, 2.0, dt)
        return kl.persistent_forward(dy, W.t(), B.t(), A.t(), 2.0, config=cfg, xa=dyb, xa_scaled=True)

    return ms(lambda: kl.persistent_forward(x, W, A, B, 2.0, config=cfg, xa_dtype=dt, prescale_b=True)), ms(dx)


def wide_stages():
    """r = 128 (and 96), M = 8192, 4096^2: the persistent forward (s B given) and dx (s dyb given) with 3 or 4 pipeline
    stages against F.linear's forward and cuBLAS's dy @ W, cuBLAS's skinny product included, as the op runs them."""
    dt = torch.bfloat16
    x, W, dy, t_fwd, t_dx = _big_operands(dt)
    M, K = x.shape
    for r in (128, 96):
        A = torch.randn(r, K, device="cuda", dtype=dt) * K ** -0.5
        B = torch.randn(W.shape[0], r, device="cuda", dtype=dt) * 0.01
        for _ in range(2):
            for stages in (3, 4):
                tf, tb = _scaled_epilogue_times(x, W, dy, A, B, {**kl._persistent_config(M, r), "num_stages": stages})
                print(f"  r={r} stages={stages}: forward {tf * 1e3:.1f} us ({tf / t_fwd:.4f}x), dx {tb * 1e3:.1f} us "
                      f"({tb / t_dx:.4f}x)", flush=True)


# Unflattened r = 128 configs over the default (_persistent_config(8192, 128)), each compiled for sm_90 here by Triton
# 3.6 with the scaling outside the epilogue (scripts/compile_report.py's lora_forward case): 160-225 KB of shared
# memory, 100-167 registers, no spills. Not yet timed (written 2026-12-03, when the device time had run out).
R128_CONFIGS = [
    dict(BLOCK_N=256, num_warps=8, num_stages=3, GROUP_M=8, SUBTILE=True),  # the default
    dict(BLOCK_N=128, num_warps=8, num_stages=4, GROUP_M=8, SUBTILE=False),
    dict(BLOCK_N=128, num_warps=4, num_stages=4, GROUP_M=8, SUBTILE=False),
    dict(BLOCK_N=256, num_warps=8, num_stages=3, GROUP_M=16, SUBTILE=True),
    dict(BLOCK_N=256, BLOCK_K=128, num_warps=8, num_stages=2, GROUP_M=8, SUBTILE=True),
    dict(BLOCK_N=256, num_warps=8, num_stages=3, GROUP_M=8, SUBTILE=False),
]


def r128_configs():
    """r = 128, M = 8192, 4096^2: the persistent forward (s B) and dx (s dyb given) per config of R128_CONFIGS against
    F.linear's forward and cuBLAS's dy @ W, the skinny cuBLAS product included as the op runs it; two rounds."""
    dt = torch.bfloat16
    x, W, dy, t_fwd, t_dx = _big_operands(dt)
    M, K = x.shape
    A = torch.randn(128, K, device="cuda", dtype=dt) * K ** -0.5
    B = torch.randn(W.shape[0], 128, device="cuda", dtype=dt) * 0.01
    for _ in range(2):
        for change in R128_CONFIGS:
            tf, tb = _scaled_epilogue_times(x, W, dy, A, B, {**kl._persistent_config(M, 128), **change})
            print(f"  {change}: forward {tf / t_fwd:.4f}x, dx {tb / t_dx:.4f}x", flush=True)


def skinny():
    """M = 8192, 4096^2, r = 16 and 128: the op's four skinny products (x A^T, dy B, dA = s dyb^T x, dB = s dy^T xa),
    each as the op asks cuBLAS for it and as the transposed problem (cuBLAS's heuristics see another shape), against the
    time to read one 64 MB operand at the copy bandwidth; and dA, dB one after the other or on two streams."""
    dt = torch.bfloat16
    bw = copy_bandwidth()
    M, K, N = 8192, 4096, 4096
    x = torch.randn(M, K, device="cuda", dtype=dt)
    dy = torch.randn(M, N, device="cuda", dtype=dt)
    print(f"copy {bw:.0f} GB/s: reading 64 MB takes {M * K * 2 / bw / 1e3 * 1e3:.1f} us", flush=True)
    side = torch.cuda.Stream()

    def both():
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        da = kl.scaled_mm(dyb.t(), x, 2.0, dt)
        with torch.cuda.stream(side):
            db = kl.scaled_mm(dy.t(), xa, 2.0, dt)
        main.wait_stream(side)
        return da, db

    for r in (16, 128):
        A = torch.randn(r, K, device="cuda", dtype=dt) * K ** -0.5
        B = torch.randn(N, r, device="cuda", dtype=dt) * 0.01
        xa, dyb = x @ A.t(), dy @ B
        variants = {
            "xa  x @ A^T (op)": lambda: x @ A.t(),
            "xa  (A @ x^T)^T": lambda: (A @ x.t()).t(),
            "dyb s dy @ B (op)": lambda: kl.scaled_mm(dy, B, 2.0, dt),
            "dyb (s B^T @ dy^T)^T": lambda: kl.scaled_mm(B.t(), dy.t(), 2.0, dt).t(),
            "dA  s dyb^T @ x (op)": lambda: kl.scaled_mm(dyb.t(), x, 2.0, dt),
            "dA  (s x^T @ dyb)^T": lambda: kl.scaled_mm(x.t(), dyb, 2.0, dt).t(),
            "dB  s dy^T @ xa (op)": lambda: kl.scaled_mm(dy.t(), xa, 2.0, dt),
            "dB  (s xa^T @ dy)^T": lambda: kl.scaled_mm(xa.t(), dy, 2.0, dt).t(),
            "dA then dB (op, one stream)": lambda: (kl.scaled_mm(dyb.t(), x, 2.0, dt), kl.scaled_mm(dy.t(), xa, 2.0, dt)),
            "dA beside dB (two streams)": both,
        }
        for _ in range(2):
            for name, fn in variants.items():
                print(f"  r={r:3d} {name:30s} {ms(fn) * 1e3:6.1f} us", flush=True)


SKINNY_CONFIGS = [None, (128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3), (256, 64, 8, 3), (64, 64, 4, 4)]


def skinny_grads():
    """dA = dyb^T x and dB = s dy^T xa as the backward makes them (two cuBLAS calls, dyb prescaled) against
    kl.skinny_grads (one launch, M split, a fixed-order sum) in each of SKINNY_CONFIGS (None: its default), at the 1b
    model's shapes and 4096^2; GPU time against reading x and dy once at the copy bandwidth, and the host's time to
    queue each (cpu_overhead.per_call_us's enqueue-only timing)."""
    from cpu_overhead import per_call_us  # this folder

    dt = torch.bfloat16
    bw = copy_bandwidth()
    print(f"copy {bw:.0f} GB/s (read + write)", flush=True)

    for M, K, N, r in [(8192, 2048, 2048, 16), (8192, 2048, 5632, 16), (8192, 5632, 2048, 16), (8192, 4096, 4096, 16),
                       (8192, 4096, 4096, 128)]:
        x = torch.randn(M, K, device="cuda", dtype=dt)
        dy = torch.randn(M, N, device="cuda", dtype=dt)
        dyb = torch.randn(M, r, device="cuda", dtype=dt)
        xa = torch.randn(M, r, device="cuda", dtype=dt)
        floor_us = (M * K + M * N) * 2 / bw / 1e3  # bytes read once, at the copy's read + write rate (GB/s)
        print(f"\n== M={M} K={K} N={N} r={r}: reading x and dy once takes {floor_us:.1f} us", flush=True)

        def cublas():
            return kl.scaled_mm(dyb.t(), x, 1.0, dt), kl.scaled_mm(dy.t(), xa, 2.0, dt)

        ref_a, ref_b = cublas()
        t = ms(cublas) * 1e3
        print(f"  two cuBLAS calls             {t:7.1f} us ({t / floor_us:.2f}x the read)  host {per_call_us(cublas, host_only=True):6.1f} us",
              flush=True)
        for cfg in SKINNY_CONFIGS:
            def one(cfg=cfg):
                return kl.skinny_grads(x, dyb, dy, xa, 1.0, 2.0, dt, dt, True, True, False, config=cfg)

            try:
                da, db, _ = one()
                err = max(((da.float() - ref_a.float()).norm() / ref_a.float().norm()).item(),
                          ((db.float() - ref_b.float()).norm() / ref_b.float().norm()).item())
                t = ms(one) * 1e3
                print(f"  skinny_grads {str(cfg):16s} {t:7.1f} us ({t / floor_us:.2f}x the read)  host "
                      f"{per_call_us(one, host_only=True):6.1f} us  rel. diff to cuBLAS {err:.1e}", flush=True)
            except Exception as e:  # a config that does not fit
                print(f"  skinny_grads {str(cfg):16s} {type(e).__name__}: {str(e).splitlines()[0][:80]}", flush=True)


def workers():
    """XA_WORKERS on and off: the forward, the backward and the op's fwd+bwd (through autograd.grad, as the benchmark
    times it) against F.linear's, CUDA-graph replays, two rounds; the number of workers each shape gets."""
    dt = torch.bfloat16
    saved = kl.XA_WORKERS
    for M, K, N, r in [(8192, 4096, 4096, 16), (8192, 4096, 4096, 64), (2048, 4096, 4096, 16),
                       (4096, 4096, 4096, 16), (8192, 11008, 4096, 16), (8192, 4096, 11008, 16)]:
        x, W, A, B, dy, xa, xg, Ag, Bg, t_fwd, t_base = _op_operands(M, K, N, r, dt)
        kl.XA_WORKERS = True
        n_fwd, n_dx = kl.xa_workers(M, N, r, x.device), kl.xa_workers(M, K, r, x.device)
        print(f"M={M} {K}->{N} r={r}: F.linear fwd {t_fwd * 1e3:.1f} us, fwd+bwd {t_base * 1e3:.1f} us; workers "
              f"{n_fwd} (forward), {n_dx} (dx)", flush=True)
        outs = {}
        for on in (False, True):
            kl.XA_WORKERS = on
            outs[on] = kl.lora_forward(x, W, A, B, 2.0, None, 0.0, 0, False) + tuple(
                kl.lora_backward(dy, x, W, A, B, xa, 2.0, 0.0, 0, False, (1, 1, 1, 0, 0))[:3])
        diffs = [(a.float() - b.float()).abs().max().item() / b.float().abs().max().item()
                 for a, b in zip(outs[True], outs[False])]
        print("  workers on vs off, max |diff| / max |off| of y, xa, dx, dA, dB: "
              + ", ".join(f"{d:.1e}" for d in diffs), flush=True)
        for _ in range(2):
            for on in (False, True):
                kl.XA_WORKERS = on
                print(f"  workers={on:d}: {_op_times(x, W, A, B, dy, xa, xg, Ag, Bg, t_fwd, t_base)}", flush=True)
    kl.XA_WORKERS = saved


def helpers():
    """xa and dyb made inside the persistent kernel by nobody (cuBLAS beforehand), by workers (programs of their own),
    by helpers (the programs the walk gives a tile fewer, before their tiles), and by helpers in the dx kernel at every
    M as well: the forward, the backward and the op's fwd+bwd (through autograd.grad, as the benchmark times it)
    against F.linear's, CUDA-graph replays, two rounds; each shape's plan, and each variant's largest difference."""
    dt = torch.bfloat16
    saved = kl.XA_WORKERS, kl.XA_HELPERS, kl.XA_WORKERS_DX_MAX_M
    variants = {"off": (False, False, saved[2]), "workers": (True, False, saved[2]), "helpers": (True, True, saved[2]),
                "helpers, dx at any M": (True, True, 1 << 30), "helpers, forward only": (True, True, -1)}
    dx_makes_dyb = kl.dx_makes_dyb

    def only_forward(M, *rest):  # a negative row limit: the dx kernel never makes dyb
        return kl.XA_WORKERS_DX_MAX_M >= 0 and dx_makes_dyb(M, *rest)
    kl.dx_makes_dyb = only_forward
    shapes = [tuple(map(int, a.split(","))) for a in sys.argv[1:] if a.count(",") == 3] or [
        (8192, 4096, 4096, 128), (8192, 4096, 4096, 16), (8192, 4096, 4096, 64), (2048, 4096, 4096, 16),
        (4096, 4096, 4096, 16), (8192, 11008, 4096, 16), (8192, 4096, 11008, 16)]
    for M, K, N, r in shapes:  # M,K,N,r arguments pick some
        x, W, A, B, dy, xa, xg, Ag, Bg, t_fwd, t_base = _op_operands(M, K, N, r, dt)
        kl.XA_WORKERS = kl.XA_HELPERS = True
        print(f"M={M} {K}->{N} r={r}: F.linear fwd {t_fwd * 1e3:.1f} us, fwd+bwd {t_base * 1e3:.1f} us; plan (workers, "
              f"helpers) {kl.xa_plan(M, N, r, x.device)} forward, {kl.xa_plan(M, K, r, x.device)} dx", flush=True)
        outs = {}
        for name, v in variants.items():
            kl.XA_WORKERS, kl.XA_HELPERS, kl.XA_WORKERS_DX_MAX_M = v
            outs[name] = kl.lora_forward(x, W, A, B, 2.0, None, 0.0, 0, False) + tuple(
                kl.lora_backward(dy, x, W, A, B, xa, 2.0, 0.0, 0, False, (1, 1, 1, 0, 0))[:3])
        for name in list(variants)[1:]:
            diffs = [(a.float() - b.float()).abs().max().item() / b.float().abs().max().item()
                     for a, b in zip(outs[name], outs["off"])]
            print(f"  {name} vs off, max |diff| / max |off| of y, xa, dx, dA, dB: "
                  + ", ".join(f"{d:.1e}" for d in diffs), flush=True)
        for _ in range(2):
            for name, v in variants.items():
                kl.XA_WORKERS, kl.XA_HELPERS, kl.XA_WORKERS_DX_MAX_M = v
                print(f"  {name:20s}: {_op_times(x, W, A, B, dy, xa, xg, Ag, Bg, t_fwd, t_base)}", flush=True)
    kl.XA_WORKERS, kl.XA_HELPERS, kl.XA_WORKERS_DX_MAX_M = saved
    kl.dx_makes_dyb = dx_makes_dyb


def _backward_ab(shapes, variants: dict, apply, baseline: str, label: str, peak: bool = False):
    """The op under each of `variants` (name -> value, set by apply(value)), per shape: each variant's dx, dA, dB
    against the baseline's, then two alternated rounds of GPU time (the backward alone and the op's fwd+bwd through
    autograd.grad, CUDA-graph replays), host time (enqueue only, cpu_overhead.per_call_us) and, with peak, the op's
    fwd+bwd peak over its inputs. label formats a variant's name for its timing line."""
    from cpu_overhead import per_call_us  # this folder

    import peftkern

    dt = torch.bfloat16
    for M, K, N, r in shapes:
        x, W, A, B, dy, xa, xg, Ag, Bg, t_fwd, t_base = _op_operands(M, K, N, r, dt)
        print(f"M={M} {K}->{N} r={r}: F.linear fwd {t_fwd * 1e3:.1f} us, fwd+bwd {t_base * 1e3:.1f} us", flush=True)

        def bwd():
            return kl.lora_backward(dy, x, W, A, B, xa, 2.0, 0.0, 0, False, (1, 1, 1, 0, 0))

        def op():
            return torch.autograd.grad(peftkern.lora_linear(xg, W, Ag, Bg, 2.0), (xg, Ag, Bg), dy)

        def peak_mb():
            op()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            op()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - before) / 2**20

        outs = {}
        for name, v in variants.items():
            apply(v)
            outs[name] = bwd()[:3]
        for name in variants:
            if name == baseline:
                continue
            diffs = [(a.float() - b.float()).abs().max().item() / b.float().abs().max().item()
                     for a, b in zip(outs[name], outs[baseline])]
            print(f"  {name} vs {baseline}, max |diff| / max |{baseline}| of dx, dA, dB: "
                  + ", ".join(f"{d:.1e}" for d in diffs), flush=True)
        for _ in range(2):
            for name, v in variants.items():
                apply(v)
                t_b, t_op = ms(bwd) * 1e3, ms(op) * 1e3
                h_b, h_op = per_call_us(bwd, host_only=True), per_call_us(op, host_only=True)
                print(f"  {label(name)}: GPU bwd {t_b:6.1f} us, op fwd+bwd {t_op:6.1f} us ({t_op / t_base / 1e3:.4f}x); "
                      f"host bwd {h_b:6.1f} us, op {h_op:6.1f} us" + (f"; peak {peak_mb():.4f} MB" if peak else ""),
                      flush=True)


def _shapes_or(default: list) -> list:
    """The M,K,N,r arguments, or default."""
    return [tuple(map(int, a.split(","))) for a in sys.argv[1:] if a.count(",") == 3] or default


def skinny_op():
    """The op with the backward's dA, dB by cuBLAS on the side stream (the default), by skinny_grads after the dx kernel
    on the main stream ("main") or beside it on the side stream ("side"): _backward_ab's times, without the peak.
    The 1b model's shapes first, then 4096^2."""
    saved = kl.SKINNY_GRADS, kl.SKINNY_SIDE

    def apply(v):
        kl.SKINNY_GRADS, kl.SKINNY_SIDE = v

    shapes = _shapes_or([(8192, 2048, 2048, 16), (8192, 2048, 5632, 16), (8192, 5632, 2048, 16),
                         (8192, 4096, 4096, 16), (2048, 4096, 4096, 16), (8192, 4096, 4096, 128)])
    _backward_ab(shapes, {"cublas": (False, False), "main": (True, False), "side": (True, True)}, apply, "cublas",
                 lambda name: f"{name:7s}")
    apply(saved)


def tail_da_op():
    """The op with the backward's dA by skinny_grads before the dx kernel on the main stream (PEFTKERN_LORA_TAIL_DA=0)
    or on the side stream behind it ("1"), by column_grad's strips of x (PEFTKERN_LORA_TAIL_DA_BY=triton, in each of
    COLUMN_GRAD_CONFIGS) or by cuBLAS, where dyb_db made dyb and dB (r <= 16): first dA alone each way (no dx kernel
    beside it), then _backward_ab's times and the fwd+bwd peak. 4096^2 and its MLP's shapes, M = 2048, then the
    1b-like 2048-wide ones."""
    saved = kl._TAIL_DA_SETTING, kl.TAIL_DA_BY, kl.COLUMN_GRAD_CONFIG

    def apply(v):
        kl._TAIL_DA_SETTING, kl.TAIL_DA_BY, kl.COLUMN_GRAD_CONFIG = v

    shapes = _shapes_or([(8192, 4096, 4096, 16), (8192, 4096, 11008, 16), (8192, 11008, 4096, 16),
                         (2048, 4096, 4096, 16), (8192, 2048, 2048, 16), (8192, 2048, 8192, 16),
                         (8192, 8192, 2048, 16)])
    dt = torch.bfloat16
    for M, K, _, r in dict.fromkeys((M, K, 0, r) for M, K, _, r in shapes):
        x = torch.randn(M, K, device="cuda", dtype=dt)
        dyb = torch.randn(M, r, device="cuda", dtype=dt)
        want = kl.scaled_mm(dyb.t(), x, 2.0, torch.float32)
        line = f"dA alone, M={M} K={K} r={r}: cuBLAS {ms(lambda: kl.scaled_mm(dyb.t(), x, 2.0, torch.float32)) * 1e3:5.1f} us"
        for cfg in COLUMN_GRAD_CONFIGS:
            got = kl.column_grad(x, dyb, 2.0, torch.float32, cfg)
            err = ((got - want).abs().max() / want.abs().max()).item()
            line += f"; {cfg} {ms(lambda: kl.column_grad(x, dyb, 2.0, torch.float32, cfg)) * 1e3:5.1f} us ({err:.0e})"
        print(line, flush=True)
    variants = {"main": ("0", "triton", kl.COLUMN_GRAD_CONFIG), "cublas": ("1", "cublas", kl.COLUMN_GRAD_CONFIG)}
    variants.update({"x".join(map(str, cfg)): ("1", "triton", cfg) for cfg in COLUMN_GRAD_CONFIGS})
    _backward_ab(shapes, variants, apply, "main", lambda name: f"TAIL_DA {name:14s}", peak=True)
    apply(saved)


# (BLOCK_M, BLOCK_C, warps, stages) for column_grad, the default first; compiled for sm_90a by Triton 3.6 and 3.9:
# 72-216 KB of shared memory, 40-64 registers, no spills or MMA-operand hazards (scripts/compile_report.py's case)
COLUMN_GRAD_CONFIGS = [kl.COLUMN_GRAD_CONFIG, (64, 128, 4, 6), (128, 64, 4, 6), (256, 128, 8, 3)]


# r = 16 configs of the flattened walk over the default (_persistent_config(8192, 16)), for the 1b model's 2048- and
# 5632-wide GEMMs. There the persistent kernel took ~10% longer than cuBLAS on the same GEMMs in the compiled 1b
# step's trace (18.40 ms against ~16.7 ms a step, NOTES-lora.md, twentieth session); the default was picked on an
# H100 at 4096^2. Each was compiled for sm_90 by Triton 3.6 on a machine without a GPU, through
# scripts/compile_report.py's lora_forward case with W read K-major (forward) and N-major (dx). Two first picks, 4
# stages of 128x256x64 and 2 of 128x256x128, needed 236 KB, more than an SM's 227, and were replaced. Not yet timed.
NARROW_CONFIGS = [  # shared memory and registers a thread, forward / dx (Triton 3.6, sm_90a); none spills
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, SUBTILE=True, num_warps=8, num_stages=3),  # default, 188 KB, 162/166
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=32, GROUP_M=8, SUBTILE=True, num_warps=8, num_stages=6),  # 188 KB, 163/168
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=16, SUBTILE=True, num_warps=8, num_stages=3),  # 188 KB, 162/166
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=4, SUBTILE=True, num_warps=8, num_stages=3),  # 188 KB, 162/166
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SUBTILE=False, num_warps=8, num_stages=4),  # 168 KB, 97/104
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SUBTILE=False, num_warps=4, num_stages=5),  # 200 KB, 168/172
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SUBTILE=True, num_warps=8, num_stages=3),  # 188 KB, 170/174
    dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, SUBTILE=True, num_warps=8, num_stages=4),  # 208 KB, 120/121
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=2, SUBTILE=True, num_warps=8, num_stages=3),  # 188 KB, 162/166
]


def narrow_configs():
    """The persistent kernel alone, per config of NARROW_CONFIGS, at the 1b model's shapes (M,K,N,r arguments pick
    others): the forward with xa given (x A^T made beforehand, as where the walk leaves the workers no SM) against
    F.linear, and the dx with dyb given (the op's order at r <= 64) against cuBLAS's dy @ W; two rounds. The LoRA
    term is in both, so ~1-2% over cuBLAS is its epilogue; the rest is the GEMM itself."""
    dt = torch.bfloat16
    shapes = [tuple(map(int, a.split(","))) for a in sys.argv[1:] if a.count(",") == 3 and not a.startswith("--")] or [
        (8192, 2048, 2048, 16), (8192, 2048, 5632, 16), (8192, 5632, 2048, 16)]
    # --configs i,j,...: only those of NARROW_CONFIGS
    picked = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--configs=")), None)
    wanted = set(map(int, picked.split(","))) if picked else set(range(len(NARROW_CONFIGS)))
    for M, K, N, r in shapes:
        torch.manual_seed(0)
        x = torch.randn(M, K, device="cuda", dtype=dt)
        W = torch.randn(N, K, device="cuda", dtype=dt) * K ** -0.5
        dy = torch.randn(M, N, device="cuda", dtype=dt)
        A = torch.randn(r, K, device="cuda", dtype=dt) * K ** -0.5
        B = torch.randn(N, r, device="cuda", dtype=dt) * 0.01
        xa, dyb = x @ A.t(), dy @ B
        t_fwd, t_dx = ms(lambda: x @ W.t()), ms(lambda: dy @ W)
        flops = 2 * M * K * N
        print(f"M={M} {K}->{N} r={r}: F.linear {t_fwd * 1e3:.1f} us ({flops / t_fwd / 1e9:.0f} TFLOP/s), dy @ W "
              f"{t_dx * 1e3:.1f} us ({flops / t_dx / 1e9:.0f} TFLOP/s)", flush=True)
        ref_y, ref_dx = x @ W.t() + 2.0 * (xa @ B.t()), dy @ W + 2.0 * (dyb @ A)
        for rnd in range(2):
            for i, cfg in enumerate(NARROW_CONFIGS):
                if i not in wanted:
                    continue
                cfg = {**kl._persistent_config(M, r), **cfg}

                def fwd(cfg=cfg):
                    return kl.persistent_forward(x, W, A, B, 2.0, config=cfg, xa=xa)

                def dx(cfg=cfg):
                    return kl.persistent_forward(dy, W.t(), B.t(), A.t(), 2.0, config=cfg, xa=dyb)

                try:
                    if rnd == 0:  # each config's answer once, against cuBLAS's
                        errs = [((got[0].float() - ref.float()).norm() / ref.float().norm()).item()
                                for got, ref in ((fwd(), ref_y), (dx(), ref_dx))]
                        assert max(errs) < 2e-2, f"config {i} is wrong: relative errors {errs}"
                    tf, tb = ms(fwd), ms(dx)
                except Exception as e:  # a config the GPU refuses (shared memory) is reported, not fatal
                    print(f"  config {i}: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
                    continue
                print(f"  config {i} {cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} G{cfg['GROUP_M']} "
                      f"w{cfg['num_warps']} s{cfg['num_stages']}{' sub' if cfg['SUBTILE'] else ''}: forward "
                      f"{tf * 1e3:6.1f} us ({tf / t_fwd:.4f}x), dx {tb * 1e3:6.1f} us ({tb / t_dx:.4f}x)", flush=True)


MODES = {"--helpers": helpers, "--workers": workers, "--skinny": skinny, "--r128-configs": r128_configs, "--wide-stages": wide_stages,
         "--tail": tail, "--dx-tiles": dx_tiles, "--persistent-dx": persistent_dx, "--ia3-dx-tiles": ia3_dx_tiles,
         "--wide-ranks": wide_ranks, "--ia3-input-dx": ia3_input_dx, "--pieces": pieces, "--skinny-grads": skinny_grads,
         "--skinny-op": skinny_op, "--narrow-configs": narrow_configs, "--tail-da": tail_da_op}


if __name__ == "__main__":
    next((fn for flag, fn in MODES.items() if flag in sys.argv[1:]), main)()

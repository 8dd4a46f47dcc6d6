"""KronA linear: peftkern against the frozen base GEMM (the floor) and the anchors, all in one run.

Anchors: HF PEFT LoKr eager with its default float32 factors and with bf16 factors (autocast_adapter_dtype=False),
PEFT LoKr (bf16) under torch.compile -- PEFT builds the full N x K delta every step -- and an eager PyTorch layer
using the reshape identity (A (x) B) vec(X) = vec(B X A^T) per token (batched matmuls, autograd's backward).
PEFT's factors are its own `factorization` of each dimension (4096 = 64 x 64, 11008 = 86 x 128); its rank is
set so that w2 is dense where the case says so (r >= max(w2's shape) / 2) and low-rank otherwise (PEFT's
default r = 8 gives a rank-8 w2). Sums of terms (Compacter's PHM layer) have no PEFT counterpart: floor, peftkern
and the eager identity only. Forward is timed under no_grad; forward+backward as torch.autograd.grad of (x, factors)
(weight frozen), as CUDA-graph replays by default (benchmarks/common.time_fn); `--eager` times plain calls.

    python -m peftkern bench krona [--quick] [--shapes M,K,N[,terms[,n1,k1[,rank]]] ...] [--no-compile]
                                   [--eager] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PartialResults,
    Row,
    bench_device,
    compiled,
    note_gpu_only,
    note_spread,
    peft_single_layer,
    print_table,
    progress,
    reference_rows_only,
    time_layer_impls,
    timing_label,
)

import peftkern  # noqa: E402
from peftkern.nn.krona import krona_factor_shapes  # noqa: E402

# (M, K, N, terms, A's shape or None for PEFT's factorization, rank of B or None for a dense B).
# The targets first: one 64 x 64 term at M = 8192 on 4096 x 4096 and 4096 -> 11008 (PEFT's 86 x 128),
# M = 2048, and four terms (Compacter-style: dense 64 x 64 terms, and 4 x 4 A_i with rank-4 1024 x 1024 B_i).
DEFAULT_CASES = [
    (8192, 4096, 4096, 1, None, None), (8192, 4096, 11008, 1, None, None), (2048, 4096, 4096, 1, None, None),
    (8192, 4096, 4096, 4, None, None), (8192, 4096, 4096, 4, (4, 4), 4),
    (8192, 4096, 4096, 1, None, 8), (8192, 11008, 4096, 1, None, None), (16, 4096, 4096, 1, None, None),
]
# --quick: PEFT LoKr's default 64 x 64 factorisation at two M (the Compacter case's eager anchor alone takes
# seconds a call and runs out of memory backward: it stays in the default run)
QUICK_CASES = [(8192, 4096, 4096, 1, None, None), (2048, 4096, 4096, 1, None, None)]
CPU_CASES = [(256, 256, 256, 1, None, None), (256, 256, 256, 4, (4, 4), 4)]


def case_name(M, K, N, terms, a_shape, rank) -> str:
    (n1, k1), (n2, k2) = krona_factor_shapes(K, N, a_shape)
    terms_ = f"{terms}x" if terms > 1 else ""
    return f"M={M} {K}->{N} {terms_}A{n1}x{k1} B{n2}x{k2}" + (f"r{rank}" if rank else "")


def make_factors(K, N, terms, a_shape, rank, dtype, device, gen):
    """(A, B) in krona_linear's stacked form, requiring grad: A (T, n1, k1), B (T, n2, k2) or a low-rank pair."""
    (n1, k1), (n2, k2) = krona_factor_shapes(K, N, a_shape)

    def leaf(*shape, fan):
        return (torch.randn(*shape, device=device, dtype=dtype, generator=gen) * fan ** -0.5).requires_grad_()

    A = leaf(terms, n1, k1, fan=k1)
    B = leaf(terms, n2, k2, fan=k2) if rank is None else (leaf(terms, n2, rank, fan=rank),
                                                          leaf(terms, rank, k2, fan=k2))
    return A, B


def eager_identity(x, W, A, B, s):
    """y = x W^T + s sum_t vec(A_t X_m B_t^T), term by term: X B_t^T as one GEMM over every row of every token, then
    A_t on the result (2 M (K n2 + N k1) FLOPs a term); autograd does the backward. (A broadcast product over the
    terms, (M, T, ...) @ B_t^T, made torch copy B to (M, T, n2, k2): 69 GB a call for Compacter's 1024 x 1024 B_t.)"""
    Bd = B if isinstance(B, torch.Tensor) else B[0] @ B[1]
    T, n1, k1 = A.shape
    M = x.shape[0]
    X = x.reshape(M * k1, -1)
    term = None
    for t in range(T):
        part = (A[t] @ (X @ Bd[t].t()).reshape(M, k1, -1)).reshape(M, -1)
        term = part if term is None else term + part
    return torch.addmm(term, x, W.t(), alpha=1.0, beta=s)


def _peft_lokr(W: torch.Tensor, K, N, rank: Optional[int], fp32_factors: bool):
    """A PEFT LoKr layer on a frozen linear holding W, with its default factorization; w2 dense unless rank."""
    from peft import LoKrConfig

    (_, _), (n2, k2) = krona_factor_shapes(K, N)
    # PEFT makes w2 dense where r >= max(n2, k2) / 2: rounded up, so an odd size is dense too (it made w2 low-rank,
    # against the case's label and the peftkern row's dense B; a review, 2026-12-05)
    r = rank if rank is not None else (max(n2, k2) + 1) // 2
    base = torch.nn.Linear(K, N, bias=False, device=W.device, dtype=W.dtype)
    base.weight = torch.nn.Parameter(W, requires_grad=False)
    layer = peft_single_layer(base, LoKrConfig(r=r, alpha=r, target_modules=["proj"]), fp32_factors)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    return layer, [p for p in layer.parameters() if p.requires_grad]


def implementations(M, K, N, terms, a_shape, rank, dtype, device, compile_anchor: bool) -> dict:
    """name -> (forward fn(x), list of trainable tensors) for one case; the floor first."""
    gen = torch.Generator(device=device).manual_seed(0)
    W = torch.randn(N, K, device=device, dtype=dtype, generator=gen) * K ** -0.5
    s = 1.0
    impls = {"floor (F.linear)": (lambda x: F.linear(x, W), [])}
    factor_dtypes = [dtype] + ([torch.float32] if dtype != torch.float32 else [])
    backends = [b for b in ("triton", "cuda") if peftkern._backend.available(b, torch.device(device), "krona")]
    if device == "cpu":
        backends = ["torch"]
    for backend in backends:
        for fdt in factor_dtypes:
            A, B = make_factors(K, N, terms, a_shape, rank, fdt, device, gen)

            def run(x, backend=backend, A=A, B=B):
                peftkern.set_backend(backend)
                try:
                    return peftkern.krona_linear(x, W, A, B, s)
                finally:
                    peftkern.set_backend(None)
            params = [A, *(B if isinstance(B, tuple) else (B,))]
            suffix = "" if fdt == dtype else f" ({str(fdt).replace('torch.', '')} factors)"
            impls[f"peftkern {backend}{suffix}"] = (run, params)
    A, B = make_factors(K, N, terms, a_shape, rank, dtype, device, gen)
    impls["eager reshape identity"] = (lambda x: eager_identity(x, W, A, B, s),
                                       [A, *(B if isinstance(B, tuple) else (B,))])
    if terms != 1 or a_shape is not None:
        return impls
    try:
        import peft  # noqa: F401
    except ImportError:
        return impls
    dname = str(dtype).replace("torch.", "")
    layer32, p32 = _peft_lokr(W, K, N, rank, fp32_factors=True)
    impls["PEFT LoKr eager (float32 factors)"] = (layer32, p32)
    layer16, p16 = _peft_lokr(W, K, N, rank, fp32_factors=False)
    impls[f"PEFT LoKr eager ({dname} factors)"] = (layer16, p16)
    if compile_anchor and device == "cuda":
        impls[f"PEFT LoKr + torch.compile ({dname} factors)"] = (compiled(layer16), p16)
    return impls


def bench_case(case, dtype, device, compile_anchor: bool, eager: bool = False) -> list[Row]:
    M, K, N, terms, a_shape, rank = case
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(M, K, device=device, dtype=dtype, generator=gen).requires_grad_()
    dy = torch.randn(M, N, device=device, dtype=dtype, generator=gen)
    impls = implementations(M, K, N, terms, a_shape, rank, dtype, device, compile_anchor)
    return time_layer_impls("krona", case_name(*case), impls, x, dy, eager)


def parse_case(spec: str) -> tuple:
    """M,K,N[,terms[,n1,k1[,rank]]], every value a positive integer and n1, k1 dividing N, K: else a usage error
    (a letter, a 0 or a factor that does not divide gave a traceback, or a run with 0 tokens; a review,
    2026-12-05)."""
    usage = f"--shapes takes M,K,N[,terms[,n1,k1[,rank]]] of positive integers, got {spec!r}"
    try:
        v = [int(t) for t in spec.split(",")]
    except ValueError:
        raise SystemExit(usage) from None
    if len(v) not in (3, 4, 6, 7) or min(v) < 1:
        raise SystemExit(usage)
    terms = v[3] if len(v) > 3 else 1
    a_shape = (v[4], v[5]) if len(v) > 5 else None
    if a_shape is not None and (v[2] % v[4] or v[1] % v[5]):
        raise SystemExit(f"--shapes {spec!r}: n1 = {v[4]} must divide N = {v[2]} and k1 = {v[5]} divide K = {v[1]}")
    return (v[0], v[1], v[2], terms, a_shape, v[6] if len(v) > 6 else None)


def main(argv=None) -> list[Row]:
    parser = argparse.ArgumentParser(prog="peftkern bench krona", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two cases only (64 x 64 factors, M = 8192 and 2048)")
    parser.add_argument("--shapes", nargs="*", help="cases as M,K,N[,terms[,n1,k1[,rank]]]")
    parser.add_argument("--no-compile", action="store_true", help="skip the PEFT LoKr + torch.compile anchor")
    parser.add_argument("--eager", action="store_true", help="time eager calls instead of CUDA-graph replays")
    parser.add_argument("--out", help="directory for the JSON (default $PEFTKERN_RESULTS_DIR, else "
                                          "benchmarks/results/)")
    args = parser.parse_args(argv)
    device, dtype = bench_device()
    note_gpu_only(device, eager=args.eager, quick=args.quick)
    reference_rows_only(device, "krona")
    if args.shapes:
        cases = [parse_case(s) for s in args.shapes]
    else:
        cases = CPU_CASES if device == "cpu" else (QUICK_CASES if args.quick else DEFAULT_CASES)
    timing = timing_label(device, args.eager)
    results = PartialResults("krona", {"cases": [list(c) for c in cases], "dtype": str(dtype), "timing": timing},
                             args.out)
    rows = []
    for i, case in enumerate(cases):
        progress(f"[{i + 1}/{len(cases)}] krona {case_name(*case)}")
        rows += bench_case(case, dtype, device, compile_anchor=not args.no_compile, eager=args.eager)
        results.save(rows)
    note_spread(rows)
    print_table(rows, f"KronA, {str(dtype).replace('torch.', '')}: ms and ratio to the frozen F.linear")
    path = results.finish(rows)
    progress(f"saved {path}")
    return rows


if __name__ == "__main__":
    main()

"""The layer benchmarks as pytest-benchmark tests, to save and compare runs with pytest-benchmark's tools:

    pytest benchmarks/ --benchmark-only                       # table
    pytest benchmarks/ --benchmark-only --benchmark-autosave  # .benchmarks/, then pytest-benchmark compare

Each measured call ends with a device synchronisation, so pytest-benchmark's clock sees the GPU time; the
CUDA-event median (triton.testing.do_bench) and the ratio to the frozen F.linear of the same shape are put in
extra_info. Methods: LoRA r=16, IA3 (output form), KronA (64 x 64 factor), a bottleneck adapter (its floor is
bench adapter's memory floor, the others' the frozen F.linear). Without a GPU the cases run small on the CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bench_adapter import MemoryFloor  # this folder: pytest puts it on sys.path for its test files

import peftkern
from peftkern import reference

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
SHAPES = [(8192, 4096, 4096), (2048, 4096, 4096)] if HAS_CUDA else [(128, 128, 128)]


def _synced(fn):
    def run():
        out = fn()
        if HAS_CUDA:
            torch.cuda.synchronize()
        return out
    return run


def _event_ms(fn) -> float:
    if not HAS_CUDA:
        return float("nan")
    import triton.testing as tt

    return tt.do_bench(fn, return_mode="median")


def _run(forward, inputs, dy):
    """The timed call: forward, then the gradients of inputs; returns the output and the gradients, so the check
    below compares the forward too (LoRA's and IA3's gradients do not depend on it)."""
    y = forward()
    return (y, *torch.autograd.grad(y, inputs, dy))


def _lora(x, K, N):
    W = torch.randn(N, K, device=DEVICE, dtype=DTYPE) * K ** -0.5
    A = (torch.randn(16, K, device=DEVICE, dtype=DTYPE) * K ** -0.5).requires_grad_()
    B = (torch.randn(N, 16, device=DEVICE, dtype=DTYPE) * 0.01).requires_grad_()
    dy = torch.randn(x.shape[0], N, device=DEVICE, dtype=DTYPE)
    floor = lambda: _run(lambda: F.linear(x, W), [x], dy)
    fused = lambda: _run(lambda: peftkern.lora_linear(x, W, A, B, 2.0), [x, A, B], dy)
    ref = lambda: _run(lambda: reference.lora_linear(x, W, A, B, 2.0), [x, A, B], dy)
    return floor, fused, ref


def _ia3(x, K, N):
    W = torch.randn(N, K, device=DEVICE, dtype=DTYPE) * K ** -0.5
    # the vector in the activations' dtype, as bench ia3's peftkern rows time it (float32 here timed another case than
    # the README's IA3 numbers, a review of the benchmarks, 2026-12-07)
    scale = (1.0 + 0.1 * torch.randn(N, device=DEVICE, dtype=DTYPE)).requires_grad_()
    dy = torch.randn(x.shape[0], N, device=DEVICE, dtype=DTYPE)
    floor = lambda: _run(lambda: F.linear(x, W), [x], dy)
    fused = lambda: _run(lambda: peftkern.ia3_linear(x, W, scale), [x, scale], dy)
    ref = lambda: _run(lambda: reference.ia3_linear(x, W, scale), [x, scale], dy)
    return floor, fused, ref


def _krona(x, K, N):
    W = torch.randn(N, K, device=DEVICE, dtype=DTYPE) * K ** -0.5
    n1 = k1 = 64 if HAS_CUDA else 8  # PEFT LoKr's default factorisation at these sizes
    A = (torch.randn(n1, k1, device=DEVICE, dtype=DTYPE) * 0.1).requires_grad_()
    B = (torch.randn(N // n1, K // k1, device=DEVICE, dtype=DTYPE) * 0.01).requires_grad_()
    dy = torch.randn(x.shape[0], N, device=DEVICE, dtype=DTYPE)
    floor = lambda: _run(lambda: F.linear(x, W), [x], dy)
    fused = lambda: _run(lambda: peftkern.krona_linear(x, W, A, B, 1.0), [x, A, B], dy)
    ref = lambda: _run(lambda: reference.krona_linear(x, W, A[None], None, B[None], None, 1.0), [x, A, B], dy)
    return floor, fused, ref


def _adapter(x, K, N):
    """A Pfeiffer bottleneck (reduction 16) on x; the floor is bench adapter's memory floor (the adapter is
    memory-bound): a copy of x forward, and backward's copy of the gradient plus the read of x that dWd needs."""

    b = K // 16
    Wd = (torch.randn(b, K, device=DEVICE, dtype=DTYPE) * K ** -0.5).requires_grad_()
    Wu = (torch.randn(K, b, device=DEVICE, dtype=DTYPE) * b ** -0.5).requires_grad_()
    dy = torch.randn_like(x)
    floor = lambda: _run(lambda: MemoryFloor.apply(x, None), [x], dy)
    fused = lambda: _run(lambda: peftkern.bottleneck_adapter(x, Wd, None, Wu, None), [x, Wd, Wu], dy)
    ref = lambda: _run(lambda: reference.bottleneck_adapter(x, Wd, None, Wu, None), [x, Wd, Wu], dy)
    return floor, fused, ref


METHODS = {"lora": _lora, "ia3": _ia3, "krona": _krona, "adapter": _adapter}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}_K{}_N{}".format(*s))
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("impl", ["floor", "peftkern"])
def test_layer_fwd_bwd(benchmark, method, impl, shape):
    M, K, N = shape
    x = torch.randn(M, K, device=DEVICE, dtype=DTYPE, requires_grad=True)
    floor, fused, ref = METHODS[method](x, K, N)
    fn = floor if impl == "floor" else fused
    got = fn()  # compile and autotune outside the timing
    if impl == "peftkern" and HAS_CUDA:  # what is timed computes the op (on the CPU both are reference.py's)
        want = ref()
        assert len(got) == len(want)
        for i, (g, r) in enumerate(zip(got, want)):
            err = ((g.double() - r.double()).norm() / r.double().norm()).item()
            name = "output" if i == 0 else f"gradient {i - 1}"
            assert err < (2e-2 if DTYPE == torch.bfloat16 else 1e-4), f"{method} {name}: relative error {err:.2e}"
    benchmark.extra_info.update(method=method, impl=impl, device=torch.cuda.get_device_name() if HAS_CUDA else "cpu")
    if HAS_CUDA:
        ms, floor_ms = _event_ms(fn), _event_ms(floor)
        benchmark.extra_info.update(event_median_ms=ms, ratio_to_floor=ms / floor_ms)
    benchmark.pedantic(_synced(fn), rounds=20, warmup_rounds=3, iterations=1)

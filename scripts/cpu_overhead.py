"""Where the host time of a LoRA layer goes: the training step of the Llama workload was bound by the CPU with the
fused layers (bench e2e, 2026-11-23: 82 ms a step against 67 ms of GPU kernels), so this times what one layer's
forward + backward costs the CPU, with the GPU kept idle enough (M = 64) that the wall clock is the host's time.

    python scripts/cpu_overhead.py [--m 64 --k 2048 --n 2048]   # a GPU run: us per call for each variant, then
                                                                # the top host costs

Variants: the frozen F.linear; PEFT's LoRA layer (bf16 and fp32 adapters); the same layer after peftkern.fuse;
peftkern.nn.LoRALinear; the bare lora_linear op. Then cProfile of the fused PEFT layer (Python functions by own
time) and torch.profiler's CPU view (aten ops by self time).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import pstats
import sys
import time

import torch

import peftkern


def add_layer_shape_args(parser, m: int = 8192) -> None:
    """--m --k --n --r: the one layer that host_costs.py and host_trace.py time (the 1b model's q projection)."""
    parser.add_argument("--m", type=int, default=m)
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--r", type=int, default=16)


def add_step_args(parser, steps: int) -> None:
    """--method --impl --shape --steps --checkpointing --compile: the training step (peftkern.workloads) that
    step_trace.py and host_profile.py look at."""
    parser.add_argument("--method", default="lora")
    parser.add_argument("--impl", default="fused", choices=["fused", "peft", "frozen", "frozen-norm"])
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--checkpointing", action="store_true", help="the model with gradient checkpointing")
    parser.add_argument("--compile", action="store_true", help="the model under torch.compile (default mode)")


def layer_tensors(args) -> tuple:
    """(x, W, A, B, dy) in bf16 on the GPU for add_layer_shape_args's shape, seeded: x (M, K), W (N, K), A (r, K),
    B (N, r) scaled to unit-size products, dy (M, N)."""
    M, K, N, R = args.m, args.k, args.n, args.r
    torch.manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    return rnd(M, K), rnd(N, K) / K**0.5, rnd(R, K) / K**0.5, rnd(N, R) / R**0.5, rnd(M, N)


def per_call_us(fn, iters: int = 300, host_only: bool = False) -> float:
    """Wall time per call; host_only stops the clock before synchronising (the calls only enqueue work), with
    few enough calls that the launch queue never fills: the host's cost even where the GPU's work is larger."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    if host_only:  # the median of 7 batches of 30 calls: one batch alone moved +-30% between runs
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(30):
                fn()
            times.append((time.perf_counter() - t0) / 30 * 1e6)
            torch.cuda.synchronize()
        return sorted(times)[3]
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e6


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a GPU: it measures the host's share of a GPU layer")
        return 0
    from peft import LoraConfig, get_peft_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--m", type=int, default=64, help="rows; from a few hundred the GPU's work is not idle")
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--n", type=int, default=2048)
    args = parser.parse_args()
    dev, dt, M, K, N = "cuda", torch.bfloat16, args.m, args.k, args.n
    host_only = M > 256  # the GPU's share is no longer negligible: time the enqueueing alone
    torch.manual_seed(0)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(K, N, bias=False, device=dev, dtype=dt)

        def forward(self, x):
            return self.proj(x)

    def peft_layer(fp32: bool):
        model = get_peft_model(Wrap(), LoraConfig(r=16, lora_alpha=32, target_modules=["proj"]),
                               autocast_adapter_dtype=fp32)
        return model

    x = torch.randn(M, K, device=dev, dtype=dt, requires_grad=True)
    dy = torch.randn(M, N, device=dev, dtype=dt)
    frozen = Wrap()
    frozen.requires_grad_(False)
    variants = {"frozen F.linear": frozen}
    for fp32 in (False, True):
        tag = "fp32 adapters" if fp32 else "bf16 adapters"
        model = peft_layer(fp32)
        variants[f"PEFT LoRA ({tag})"] = model
        fused = copy.deepcopy(model)
        peftkern.fuse(fused)
        variants[f"peftkern.fuse(PEFT) ({tag})"] = fused
    variants["peftkern.nn.LoRALinear"] = peftkern.nn.LoRALinear.from_linear(Wrap().proj, r=16, alpha=32)
    W = frozen.proj.weight
    A = (torch.randn(16, K, device=dev, dtype=dt) * 0.01).requires_grad_()
    B = (torch.randn(N, 16, device=dev, dtype=dt) * 0.01).requires_grad_()
    variants["lora_linear op"] = lambda t: peftkern.lora_linear(t, W, A, B, 2.0)

    def step_of(layer):
        params = [p for p in (layer.parameters() if isinstance(layer, torch.nn.Module) else [A, B])
                  if p.requires_grad]
        return lambda: torch.autograd.grad(layer(x), [x, *params], dy)

    how = "host time to enqueue, no sync" if host_only else "GPU nearly idle: wall = host"
    print(f"host time per forward + backward, M={M} K={K} N={N} r=16 ({how})")
    results = {}
    for name, layer in variants.items():
        results[name] = per_call_us(step_of(layer), host_only=host_only)
        print(f"  {name:34s} {results[name]:8.1f} us   (+{results[name] - results['frozen F.linear']:.1f})")
    fwd_only = {name: per_call_us(lambda layer=layer: layer(x.detach()), host_only=host_only)
                for name, layer in variants.items()
                if name in ("frozen F.linear", "PEFT LoRA (bf16 adapters)", "peftkern.fuse(PEFT) (bf16 adapters)")}
    print("forward alone (no grad graph):", ", ".join(f"{k} {v:.1f} us" for k, v in fwd_only.items()))

    fused_step = step_of(variants["peftkern.fuse(PEFT) (bf16 adapters)"])
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(30 if host_only else 200):
        fused_step()
    torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(28)
    print(f"\ncProfile of {30 if host_only else 200} fused PEFT layer steps, by own time:")
    print("\n".join(line[:150] for line in out.getvalue().splitlines()[6:40]))

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as tp:
        for _ in range(50):
            fused_step()
        torch.cuda.synchronize()
    print("\ntorch.profiler CPU view of 50 fused steps (self CPU time):")
    print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())

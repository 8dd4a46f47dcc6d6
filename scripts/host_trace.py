"""Where one fused LoRA layer's host time goes once autograd runs it, thread by thread.

host_costs.py times each piece from the main thread: the backend's lora_forward and lora_backward add up to ~450 us
of host time, while the bare op's forward + autograd.grad took 1193 us on an H200 machine (NOTES-lora.md, eleventh
session). autograd runs a CUDA backward on its own device thread, which cProfile does not see. This prints:

1. host us per call: the op's fwd + grad with autograd's device threads on and off
   (torch.autograd.set_multithreading_enabled), its forward alone, its backward alone (autograd.grad with
   retain_graph), and PEFT's bf16 LoRA layer's fwd + grad beside it;
2. torch.profiler's CPU + CUDA-runtime view of fused steps: self time per (thread, event), the runtime calls
   (cudaLaunchKernel, cudaEventRecord, cudaMalloc, ...) included, and Python functions by inclusive time per thread
   (with_stack's Python tracer), read from the exported trace; the trace itself goes to $OUT/host-trace.json.gz.

    python scripts/host_trace.py [--m 8192 --k 2048 --n 2048 --r 16]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import sys
import tempfile

import torch
from cpu_overhead import add_layer_shape_args, layer_tensors, per_call_us  # this folder: the same enqueue-only timing

import peftkern


def _python_functions(trace_path: str, top: int) -> None:
    """Python functions of the exported trace by inclusive time, per thread (summed over calls)."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    per_thread = collections.defaultdict(lambda: collections.defaultdict(lambda: [0.0, 0]))
    for e in events:
        if e.get("cat") != "python_function" or "dur" not in e:
            continue
        slot = per_thread[e.get("tid")][e["name"]]
        slot[0] += e["dur"]
        slot[1] += 1
    for tid, funcs in per_thread.items():
        total = max(v[0] for v in funcs.values())
        print(f"\n-- thread {tid}: Python functions by inclusive time (us, summed; calls), largest {total:.0f} us")
        for name, (dur, calls) in sorted(funcs.items(), key=lambda kv: -kv[1][0])[:top]:
            print(f"  {dur:10.0f} {calls:6d}  {name[:110]}")


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a GPU")
        return 0
    from peft import LoraConfig, get_peft_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_layer_shape_args(parser)
    parser.add_argument("--steps", type=int, default=10, help="fused steps under the profiler")
    args = parser.parse_args()
    M, K, N, R = args.m, args.k, args.n, args.r
    dev, dt = "cuda", torch.bfloat16
    x, W, A, B, dy = layer_tensors(args)
    for t in (x, A, B):
        t.requires_grad_()

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(K, N, bias=False, device=dev, dtype=dt)

        def forward(self, t):
            return self.proj(t)

    peft_model = get_peft_model(Wrap(), LoraConfig(r=R, lora_alpha=2 * R, target_modules=["proj"]),
                                autocast_adapter_dtype=False)
    peft_params = [p for p in peft_model.parameters() if p.requires_grad]

    def op_step():
        torch.autograd.grad(peftkern.lora_linear(x, W, A, B, 2.0), [x, A, B], dy)

    def single_thread(fn):
        def run():
            with torch.autograd.set_multithreading_enabled(False):
                fn()
        return run

    y_kept = peftkern.lora_linear(x, W, A, B, 2.0)

    timings = {
        "F.linear fwd + grad (x only)": lambda: torch.autograd.grad(torch.nn.functional.linear(x, W), [x], dy),
        "lora_linear fwd + grad": op_step,
        "lora_linear fwd + grad, autograd in this thread": single_thread(op_step),
        "lora_linear fwd alone (grad mode)": lambda: peftkern.lora_linear(x, W, A, B, 2.0),
        "lora_linear grad alone (retain_graph)": lambda: torch.autograd.grad(y_kept, [x, A, B], dy, retain_graph=True),
        "same, autograd in this thread": single_thread(
            lambda: torch.autograd.grad(y_kept, [x, A, B], dy, retain_graph=True)),
        "PEFT LoRA bf16 fwd + grad": lambda: torch.autograd.grad(peft_model(x), [x, *peft_params], dy),
    }
    print(f"host us per call (enqueue only), M={M} K={K} N={N} r={R}, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}")
    for _ in range(2):  # twice: the host drifts
        for name, fn in timings.items():
            print(f"  {name:48s} {per_call_us(fn, host_only=True):8.1f}")

    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    for _ in range(5):
        op_step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=acts, with_stack=True) as prof:
        for _ in range(args.steps):
            op_step()
        torch.cuda.synchronize()
    per = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CPU:
            slot = per[(e.thread, e.name)]
            slot[0] += e.self_cpu_time_total
            slot[1] += 1
    print(f"\ntorch.profiler, {args.steps} fused op steps (fwd + autograd.grad): self CPU us per step by (thread, event)")
    for (thread, name), (us, calls) in sorted(per.items(), key=lambda kv: -kv[1][0])[:45]:
        print(f"  thread {thread:>8}  {us / args.steps:9.1f} us  {calls / args.steps:5.1f}/step  {name[:90]}")
    out = os.environ.get("OUT", tempfile.mkdtemp())
    path = os.path.join(out, "host-trace.json")
    prof.export_chrome_trace(path)
    _python_functions(path, top=40)
    with open(path, "rb") as f, gzip.open(path + ".gz", "wb") as g:
        g.write(f.read())
    os.remove(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

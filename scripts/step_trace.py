"""Is a training step bound by the host, or does it wait somewhere? A trace of a few steps, read for that.

bench e2e found the fused 1b step's host time equal to its GPU time (NOTES-lora.md, eleventh session): either the GPU
starves while the host enqueues, or the host waits for the GPU inside the step (a synchronising call). This profiles
a few steps of one workload (CPU + CUDA activities, no Python stacks) and prints:

1. the GPU's busy time over the profiled span, and how many kernels started within a few us of the end of their
   launch call: a kernel the GPU waited for (the queue was empty), as a host-bound step shows;
2. CUDA runtime / driver calls that took long (a synchronisation, cudaMalloc, cudaFree, event waits), by name;
3. per thread, the CPU ops at the top of their stacks by total time, and the peftkern op ranges' durations;
4. the GPU's time by kernel name (template arguments dropped), so that two workloads' traces show where one spends
   more.

    python scripts/step_trace.py [--method lora] [--impl fused|peft|frozen] [--steps 2] [--trace PATH.json.gz]
                                 [--checkpointing] [--compile]
    python scripts/step_trace.py --read A.json.gz [--against B.json.gz] [--steps 2]   # a kept trace, or two compared
"""

from __future__ import annotations

import argparse
import collections
import gc
import gzip
import json
import os
import sys
import tempfile
import time

import torch
from cpu_overhead import add_step_args  # this folder

STARVED_US = 10.0  # a kernel that starts within this of its launch call's end found the GPU idle


KERNEL_ROWS = int(os.environ.get("STEP_TRACE_KERNEL_ROWS", "24"))  # how many kernel families to print


def kernel_family(name: str) -> str:
    """A kernel's name without its template arguments and launch details, so that one GEMM's tile variants add up."""
    name = name.split("(")[0].split("<")[0]
    return name[:90]


def kernel_time(events: list) -> collections.defaultdict:
    """Each kernel family's [launches, GPU us] over a trace's kernel events (a missing family reads [0, 0.0])."""
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for k in events:
        if k.get("cat") == "kernel" and "dur" in k:
            s = by_name[kernel_family(k["name"])]
            s[0] += 1
            s[1] += k["dur"]
    return by_name


def analyse(events: list, steps: int) -> None:
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    runtime = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver") and "dur" in e]
    if not kernels:
        print("no kernels in the trace")
        return
    by_corr = {e["args"].get("correlation"): e for e in runtime if "args" in e}
    spans = sorted((k["ts"], k["ts"] + k["dur"], kernel_family(k["name"])) for k in kernels)
    busy, cur_s, cur_e, cur_name = 0.0, spans[0][0], spans[0][1], spans[0][2]
    gaps = []  # (idle us, when it began, the kernel before it, the kernel after it)
    for s, e, name in spans[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            gaps.append((s - cur_e, cur_e, cur_name, name))
            cur_s, cur_e, cur_name = s, e, name
        elif e > cur_e:
            cur_e, cur_name = e, name
    busy += cur_e - cur_s
    span = spans[-1][1] - spans[0][0]
    print(f"GPU: {len(kernels)} kernels, busy {busy / 1e3:.2f} ms of a {span / 1e3:.2f} ms span "
          f"({100 * busy / span:.1f}%), per step {busy / 1e3 / steps:.2f} busy / {span / 1e3 / steps:.2f} ms")
    big = sorted(gaps, reverse=True)
    print(f"  idle gaps: {len(gaps)}, {sum(g[0] for g in gaps) / 1e3:.2f} ms in all; over 50 us: "
          f"{sum(1 for g in gaps if g[0] > 50)} ({sum(g[0] for g in gaps if g[0] > 50) / 1e3:.2f} ms); largest (us): "
          f"{[round(g[0]) for g in big[:8]]}")
    for g, at, before, after in big[:8]:  # where the large ones fall: the kernels either side
        if g > 50:
            print(f"    {g:7.0f} us at +{(at - spans[0][0]) / 1e3:8.2f} ms, after {before[:60]} / before {after[:60]}")
    starved, waited, lag = 0, 0, []
    for k in kernels:
        launch = by_corr.get(k.get("args", {}).get("correlation"))
        if launch is None:
            continue
        delay = k["ts"] - (launch["ts"] + launch["dur"])
        lag.append(k["ts"] - launch["ts"])
        waited += 1
        starved += delay < STARVED_US
    lag.sort()
    if waited:
        print(f"  kernels that started within {STARVED_US:.0f} us of their launch's end (the GPU waited for the host): "
              f"{starved} of {waited} ({100 * starved / waited:.0f}%); launch-to-start lag median "
              f"{lag[len(lag) // 2]:.0f} us, 90th percentile {lag[int(len(lag) * 0.9)]:.0f} us")
    print(f"GPU time by kernel (per step: launches, ms), the largest {KERNEL_ROWS}:")
    for name, (n, tot) in sorted(kernel_time(kernels).items(), key=lambda kv: -kv[1][1])[:KERNEL_ROWS]:
        print(f"  {n / steps:7.1f} {tot / 1e3 / steps:8.3f}  {name}")
    slow = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for e in runtime:
        if e["dur"] > 50:
            s = slow[e["name"]]
            s[0] += 1
            s[1] += e["dur"]
            s[2] = max(s[2], e["dur"])
    print("runtime/driver calls over 50 us (count, total ms, longest us):")
    for name, (n, tot, mx) in sorted(slow.items(), key=lambda kv: -kv[1][1])[:12]:
        print(f"  {n:6d} {tot / 1e3:9.2f} ms {mx:9.0f} us  {name}")
    cpu = sorted((e for e in events if e.get("cat") in ("cpu_op", "user_annotation") and "dur" in e),
                 key=lambda e: (e["tid"], e["ts"]))
    top = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0.0]))
    end_by_tid: dict = {}
    for e in cpu:  # outermost ops only: those that start after the previous outermost one ended
        if e["ts"] >= end_by_tid.get(e["tid"], -1):
            s = top[e["tid"]][e["name"]]
            s[0] += 1
            s[1] += e["dur"]
            end_by_tid[e["tid"]] = e["ts"] + e["dur"]
    for tid, ops in top.items():
        total = sum(v[1] for v in ops.values())
        print(f"thread {tid}: outermost CPU ops {total / 1e3 / steps:.2f} ms per step; largest (per step: calls, ms):")
        for name, (n, tot) in sorted(ops.items(), key=lambda kv: -kv[1][1])[:14]:
            print(f"  {n / steps:7.1f} {tot / 1e3 / steps:8.2f}  {name[:100]}")
    for name in ("peftkern::lora_fwd", "peftkern::lora_bwd"):
        d = sorted(e["dur"] for e in events if e.get("name") == name and e.get("cat") in ("user_annotation", "cpu_op"))
        if d:
            print(f"{name}: {len(d)} ranges, median {d[len(d) // 2]:.0f} us, 90th percentile {d[int(len(d) * .9)]:.0f},"
                  f" max {d[-1]:.0f}")


def read_trace(path: str) -> list:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def compare(events: list, other: list, steps: int) -> None:
    """Per step, each kernel family's launches and GPU ms in two traces, largest difference first: where one
    workload's extra GPU time goes (e.g. the fused model's trace against the frozen model's)."""
    ms = 1e3 * steps  # us in the trace to ms a step
    a, b = kernel_time(events), kernel_time(other)
    print(f"GPU time by kernel, this trace against --against's (per step: launches, ms; "
          f"{sum(v[1] for v in a.values()) / ms:.2f} against {sum(v[1] for v in b.values()) / ms:.2f} ms of kernel "
          f"time, streams added up):")
    for name in sorted(set(a) | set(b), key=lambda k: -abs(a[k][1] - b[k][1]))[:KERNEL_ROWS]:
        print(f"  {a[name][0] / steps:6.1f} {a[name][1] / ms:7.3f} | {b[name][0] / steps:6.1f} {b[name][1] / ms:7.3f} | "
              f"{(a[name][1] - b[name][1]) / ms:+7.3f}  {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_step_args(parser, steps=2)
    parser.add_argument("--trace", help="where to write the gzipped Chrome trace (default: not kept)")
    parser.add_argument("--history", action="store_true",
                        help="build, run and drop bench e2e's earlier rows (frozen, PEFT bf16 and fp32) first")
    parser.add_argument("--sync-debug", action="store_true",
                        help="warn at every CUDA call that synchronises with the GPU during the timed steps")
    parser.add_argument("--read", help="analyse this trace (.json or .json.gz) instead of running")
    parser.add_argument("--against", help="with --read: a second trace, and the GPU time by kernel family of each")
    args = parser.parse_args()
    if args.read:
        events = read_trace(args.read)
        analyse(events, args.steps)
        if args.against:
            compare(events, read_trace(args.against), args.steps)
        return 0
    if not torch.cuda.is_available():
        print("needs a GPU")
        return 0
    from peftkern import workloads

    if args.history:  # bench e2e's rows before the fused ones, each built, run and dropped as bench_e2e does
        for impl, fp32 in (("frozen", False), ("peft", False), ("peft", True)):
            model = workloads.build(args.method, impl, args.shape, "cuda", torch.bfloat16, 16, fp32, max_positions=2048)
            step = workloads.training_step(model, 4, 2048, "cuda")
            for _ in range(5):
                step()
            torch.cuda.synchronize()
            del model, step
            gc.collect()
            torch.cuda.empty_cache()
        print("history: frozen, PEFT bf16 and PEFT fp32 models built, run 5 steps and dropped first")
    model = workloads.build(args.method, args.impl, args.shape, "cuda", torch.bfloat16, 16, False, max_positions=2048)
    step = workloads.training_step(model, 4, 2048, "cuda", args.compile, args.checkpointing)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    if args.sync_debug:  # a warning for every CUDA call that makes the host wait for the GPU
        torch.cuda.set_sync_debug_mode("warn")
    for _ in range(3):  # as bench e2e times: GPU events around the steps, and the host's time until they are queued
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        marks = [t0]
        start.record()
        for _ in range(5):
            step()
            marks.append(time.perf_counter())
        end.record()
        host = (time.perf_counter() - t0) / 5 * 1e3
        torch.cuda.synchronize()
        each = ", ".join(f"{(b - a) * 1e3:.1f}" for a, b in zip(marks, marks[1:]))
        print(f"{args.method} {args.impl}: {start.elapsed_time(end) / 5:.1f} ms a step (GPU events), host {host:.1f} ms,"
              f" no profiler; host ms of each step: {each}")
    torch.cuda.set_sync_debug_mode(0)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    events = read_trace(path)
    analyse(events, args.steps)
    if args.trace:
        with open(path, "rb") as f, gzip.open(args.trace, "wb") as g:
            g.write(f.read())
    os.remove(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

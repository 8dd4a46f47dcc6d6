"""Why the same training step's host time varies from round to round: the garbage collector, the CPU, waiting.

The same fused 1b step with gradient checkpointing queued in 77 ms a step under host_profile.py and ran at 103 ms
under step_ab.py in the same device call (2026-12-04, NOTES-lora.md). A step allocates thousands of Python
containers (autograd's contexts, the checkpoint's hooks and frames, the layers' launch arguments); every 700 of them
start a collection, and a full one walks every object the process tracks. This times the step with the collector as
it comes, disabled, or with the objects alive at the time frozen out of it (gc.freeze), and with autograd's backward
in the calling thread, alternated round by round with the frozen model's step; it counts the collections and their
time a step (gc.callbacks). Beside each sample: the main thread's CPU time a step (time.thread_time: near the wall
time when the host computes all along, below it when the thread waits, on the driver's queue, a lock or the GIL),
the whole process's (time.process_time, autograd's device thread included), and a fixed pure-Python workload timed
just before (the CPU's pace for interpreted code at that moment).

    python scripts/step_host.py [--checkpointing] [--compile] [--rounds 3] [--steps 5] [--impls fused peft]
                                [--settings default gc-off gc-frozen autograd-1-thread]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from bench_e2e import _repeats  # noqa: E402  (the benchmark's own timing of a step)

from peftkern import workloads  # noqa: E402


class GcClock:
    """The collector's time and collections by generation, from gc.callbacks."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self.ms = 0.0
        self.by_gen = [0, 0, 0]
        gc.callbacks.append(self)

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.t0 = time.perf_counter()
        else:
            self.ms += (time.perf_counter() - self.t0) * 1e3
            self.by_gen[info["generation"]] += 1

    def reset(self) -> None:
        self.ms, self.by_gen = 0.0, [0, 0, 0]


def python_pace() -> float:
    """ms for a fixed pure-Python loop (best of 3): the CPU's pace for interpreted code right now."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        total = 0
        for i in range(100_000):
            total += i * i % 7
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def cpu_ticks() -> tuple:
    """(steal, user + system) clock ticks of all CPUs so far (/proc/stat; zeros where there is none). Steal is the time
    a virtual machine's CPUs were ready to run and the hypervisor ran something else."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), fields[0] + fields[2]


def timed(step, steps: int, clock: GcClock) -> tuple:
    """(GPU ms, host ms, GC ms, full collections, collections, main thread's CPU ms, process CPU ms, Python pace ms):
    per step, the medians of bench e2e's three repeats after 2 warm-ups; the CPU times over all three."""
    pace = python_pace()
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    clock.reset()
    host: list = []
    thread0, proc0, ticks0 = time.thread_time(), time.process_time(), cpu_ticks()
    gpu = _repeats(step, steps, "cuda", host)
    n = 3 * steps
    thread_ms, proc_ms = (time.thread_time() - thread0) * 1e3 / n, (time.process_time() - proc0) * 1e3 / n
    ticks1 = cpu_ticks()
    steal = (ticks1[0] - ticks0[0]) / max(1, ticks1[1] - ticks0[1] + ticks1[0] - ticks0[0])
    return (statistics.median(gpu), statistics.median(host), clock.ms / n, clock.by_gen[2] / n, sum(clock.by_gen) / n,
            thread_ms, proc_ms, pace, steal)


def run(setting: str, step, steps: int, clock: GcClock) -> tuple:
    if setting == "gc-off":
        gc.disable()
    elif setting == "gc-frozen":
        gc.freeze()
    elif setting == "autograd-1-thread":
        torch.autograd.set_multithreading_enabled(False)
    try:
        return timed(step, steps, clock)
    finally:
        gc.enable()
        gc.unfreeze()
        torch.autograd.set_multithreading_enabled(True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--impls", nargs="+", default=["fused"], choices=["fused", "peft"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--settings", nargs="+", default=["default", "gc-off", "autograd-1-thread"],
                        choices=["default", "gc-off", "gc-frozen", "autograd-1-thread"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a GPU")
        return 0
    steps = {}
    for impl in ("frozen", *args.impls):
        torch.manual_seed(0)
        model = workloads.build("none" if impl == "frozen" else "lora", impl, args.shape, "cuda", torch.bfloat16, 16,
                                False, max_positions=2048)
        steps[impl] = workloads.training_step(model, 4, 2048, "cuda", args.compile, args.checkpointing)
    clock = GcClock()
    what = f"lora {args.shape}" + (" +ckpt" if args.checkpointing else "") + (" compiled" if args.compile else "")
    print(f"{what}: {torch.cuda.get_device_name()}, torch {torch.__version__}, Python {sys.version.split()[0]}; "
          f"gc thresholds {gc.get_threshold()}, {len(gc.get_objects())} objects tracked", flush=True)
    results: dict = {}
    for rnd in range(args.rounds):
        print(f"round {rnd}")
        for impl in steps:
            for setting in ("default",) if impl == "frozen" else args.settings:
                label = f"{impl}, {setting}"
                r = run(setting, steps[impl], args.steps, clock)
                results.setdefault(label, []).append(r)
                print(f"  {label:28s} GPU {r[0]:7.2f} ms  host {r[1]:7.2f} ms  gc {r[2]:5.2f} ms a step "
                      f"({r[4]:.1f} collections, {r[3]:.2f} full); CPU: main thread {r[5]:6.2f} ms, process "
                      f"{r[6]:6.2f} ms; Python pace {r[7]:.2f} ms; steal {100 * r[8]:.0f}% of busy CPU", flush=True)
    print(f"medians over {args.rounds} rounds:")
    frozen = statistics.median(r[0] for r in results["frozen, default"])
    for label, rows in results.items():
        med = [statistics.median(r[i] for r in rows) for i in range(8)]
        print(f"  {label:28s} GPU {med[0]:7.2f} ms ({frozen / med[0]:.3f}x)  host {med[1]:7.2f} ms  gc {med[2]:5.2f} ms; "
              f"CPU: main thread {med[5]:6.2f} ms, process {med[6]:6.2f} ms")
    print(f"CPUs this process may run on: {sorted(os.sched_getaffinity(0))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

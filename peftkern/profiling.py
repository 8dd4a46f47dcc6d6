"""Profiling a training step: where the GPU time goes (frozen GEMMs, peftkern kernels, everything else).

    with peftkern.profile(trace="step.json") as prof:
        train_step()
    print(prof.summary())          # the split, also prof.split (a dict of ms)

    python -m peftkern profile --shape 1b --method lora --steps 5 --trace trace.json

Kernels launched inside a peftkern op (each op opens a profiler range while torch.profiler runs) count as
peftkern's, whichever library ran them; the others are classified by name: the frozen GEMMs are cuBLAS /
CUTLASS kernels (gemm, nvjet, sm90_xmma, cutlass). NVTX ranges (peftkern.set_nvtx(True)) name the ops in
Nsight Systems.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from .ops._common import set_nvtx

# peftkern's Triton kernels by their names, the CUDA extension's by its namespace ("void peftkern::(anonymous
# namespace)::lora_down_kernel<...>")
PEFTKERN_KERNEL = re.compile(r"^(lora_|ia3_|krona_|adapter_|row_stats_kernel|peftkern)|\bpeftkern::", re.IGNORECASE)
# inductor names its Triton GEMM templates triton_tem_fused_<ops>: mm, addmm, bmm (under --compile max-autotune the
# frozen layers' GEMMs ran as those and were filed as everything else, a review, 2026-12-05)
GEMM_KERNEL = re.compile(r"(gemm|nvjet|xmma|cutlass|cublas|wgmma|matmul|aten::(mm|addmm|bmm|linear)|^triton_tem_\w*mm)",
                         re.IGNORECASE)
ATTENTION_KERNEL = re.compile(r"(fmha|sdpa|flash|attention)", re.IGNORECASE)  # CUTLASS / cuDNN attention: not GEMMs


def classify(kernel_name: str) -> str:
    if PEFTKERN_KERNEL.search(kernel_name):
        return "peftkern kernels"
    if GEMM_KERNEL.search(kernel_name) and not ATTENTION_KERNEL.search(kernel_name):
        return "other GEMMs (outside peftkern ops)"
    return "everything else"


@dataclass
class ProfileResult:
    split: dict = field(default_factory=dict)       # category -> ms of GPU kernel time
    kernels: dict = field(default_factory=dict)     # kernel name -> ms
    trace: Optional[str] = None
    unit: str = "GPU kernel time"

    def summary(self, top: int = 8) -> str:
        total = sum(self.split.values())
        lines = [f"{self.unit}: {total:.3f} ms (peftkern kernels: everything a peftkern op runs, the frozen base GEMM "
                 "it fuses or calls included; other GEMMs: the frozen layers and the head, by kernel name)"]
        for cat, ms in sorted(self.split.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {cat:38s} {ms:9.3f} ms  {100 * ms / (total or 1.0):5.1f}%")
        lines.append(f"top {top} kernels:")
        for name, ms in sorted(self.kernels.items(), key=lambda kv: -kv[1])[:top]:
            cat = "peftkern kernels" if name.endswith("(in a peftkern op)") else classify(name)
            lines.append(f"  {ms:9.3f} ms  [{cat}] {name[:110]}")
        if self.trace:
            lines.append(f"Chrome trace: {self.trace}")
        return "\n".join(lines)


def _is_peftkern_range(evt) -> bool:
    return evt.name.startswith("peftkern::")


# CUPTI's overhead activities, as the profiler names them
_CUPTI_OVERHEAD = {"Activity Buffer Request", "Buffer Flush", "Lazy Function Loading",
                   "Runtime Triggered Module Loading", "Resource", "Instrumentation", "Command Buffer Full",
                   "UVM Activity Init"}


def _profiler_own(evt) -> bool:
    """Host events the profiler records of itself where CUDA is profiled: CUPTI's overhead and CUDA runtime / driver
    calls. A profile with no GPU kernel (a model on the CPU, on a machine with a GPU) is the CPU's work alone: an
    empty block on an H100 said 2 ms, all "Activity Buffer Request" and the profiler's cudaDeviceSynchronize. A
    user's own range (record_function("cuGraph step")) is never one of them."""
    if getattr(evt, "is_user_annotation", False):
        return False
    return evt.name in _CUPTI_OVERHEAD or re.fullmatch(r"cu(da)?[A-Z]\w*", evt.name) is not None


def _split(prof) -> tuple[dict, dict, bool]:
    """(time by category, time by kernel name, whether it is GPU time), in ms. Where the profile holds GPU kernels:
    kernel time, where kernels launched inside a peftkern op (its profiler range) count as peftkern whatever library
    ran them (cuBLAS skinny products too); other kernels are classified by name. Else: the self time of every CPU
    event (operators, compiled graphs' calls, autograd nodes, the optimizer's Python), likewise."""
    from torch.autograd import DeviceType

    events = prof.events()
    gpu = any(e.device_type == DeviceType.CUDA for e in events)
    inside: set = set()

    def mark(evt):
        for child in evt.cpu_children:
            inside.add(id(child))
            mark(child)

    for evt in events:
        if evt.device_type == DeviceType.CPU and _is_peftkern_range(evt):
            inside.add(id(evt))
            mark(evt)
    by_cat: dict = {}
    by_kernel: dict = {}

    def add(cat, name, ms):
        by_cat[cat] = by_cat.get(cat, 0.0) + ms
        key = f"{name} (in a peftkern op)" if cat == "peftkern kernels" else name
        by_kernel[key] = by_kernel.get(key, 0.0) + ms

    for evt in events:
        if evt.device_type != DeviceType.CPU:
            continue
        owned = id(evt) in inside
        if gpu:
            for k in evt.kernels:
                add("peftkern kernels" if owned else classify(k.name), k.name, k.duration / 1e3)
        elif evt.self_cpu_time_total > 0 and not _profiler_own(evt):
            add("peftkern kernels" if owned else classify(evt.name), evt.name, evt.self_cpu_time_total / 1e3)
    return by_cat, by_kernel, gpu


def _synchronize_used_devices() -> None:
    """Wait for every GPU in use (with a CUDA context) inside the profile: kernels still queued when the
    profiler stops are not in it. torch's profiler synchronises the current device only, and the synchronize here
    ran after the profile had stopped (a review, 2026-12-05: a model on cuda:1 with cuda:0 current). A device with no
    CUDA context is left alone (synchronizing it would make one there)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    for i in range(torch.cuda.device_count()):
        if torch._C._cuda_hasPrimaryContext(i):
            torch.cuda.synchronize(i)


def _check_trace_path(trace: str) -> None:
    """Refuse, before the block runs, a trace path the export after it would fail on; make its folder."""
    if os.path.isdir(trace) or trace.endswith((os.sep, "/")):  # the exporter would log its failure and go on
        raise IsADirectoryError(f"peftkern.profile: the trace path {trace} is a directory")
    if os.path.exists(trace) and not os.path.isfile(trace):  # the exporter renames its file over the path:
        # as root, trace="/dev/null" replaced the device with a regular file
        raise ValueError(f"peftkern.profile: the trace path {trace} is not a regular file (trace=None, or --trace '', "
                         "writes no trace)")
    folder = os.path.dirname(os.path.abspath(trace))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:  # a part of it is a file, or no permission: found after the block ran, before
        raise OSError(f"peftkern.profile: cannot make the trace's folder {folder}: {exc}") from exc
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"peftkern.profile: the trace's folder {folder} is not writable")


@contextlib.contextmanager
def profile(trace: Optional[str] = None, nvtx: bool = True):
    """Profile the GPU kernels of the enclosed code (e.g. a few training steps) with torch.profiler.

    Yields a ProfileResult that is filled when the block exits: the time split, the per-kernel times and,
    with `trace`, the path of a Chrome trace (open in chrome://tracing or Perfetto). `nvtx` names the ops in NVTX
    ranges too while it runs (set_nvtx), for a run under Nsight Systems; the setting before is restored.
    torch runs one profiler session at a time: a profile inside another torch.profiler session (or with one inside
    it) raises RuntimeError rather than report an empty split.
    """
    trace = os.fspath(trace) if trace else None  # a pathlib.Path failed in the exporter, after the block had run
    if trace:
        _check_trace_path(trace)
    if torch._C._autograd._profiler_enabled():
        # torch runs one profiler session at a time: the inner one's exit ends the outer one's, which then reports
        # nothing (or, inside a user's scheduled profiler, the process crashed at its exit; a review, 2026-12-05)
        raise RuntimeError("peftkern.profile: another torch.profiler session is running; torch runs one at a time, "
                           "so profile outside it (or read that profiler's own results)")
    result = ProfileResult(trace=trace)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    previous = set_nvtx(nvtx)
    ended = False  # a torch.profiler session inside the block ended this one
    try:
        try:
            with torch.profiler.profile(activities=activities) as prof:
                yield result
                _synchronize_used_devices()
                ended = not torch._C._autograd._profiler_enabled()
        except RuntimeError:
            # with CUDA activities torch's exit then raised "Can't disable Kineto profiler when it's not running"
            # (torch 2.11 on the H100, 2026-12-05); on the CPU it returned
            if not ended:
                raise
        if ended:
            raise RuntimeError("peftkern.profile: a torch.profiler session inside the block ended this one's "
                               "(torch runs one at a time): its split would be empty")
    finally:
        set_nvtx(previous)
    result.split, result.kernels, gpu = _split(prof)
    result.unit = "GPU kernel time" if gpu else "CPU self time (no GPU kernel in the profile)"
    if trace:
        if os.path.isfile(trace):  # an earlier run's trace would stand for this one if the export failed
            os.remove(trace)
        prof.export_chrome_trace(trace)
        if not os.path.isfile(trace):  # the exporter logs its failure and returns
            result.trace = None
            raise OSError(f"peftkern.profile: the Chrome trace could not be written to {trace}")


def cli_main(argv=None) -> int:
    from . import workloads

    parser = argparse.ArgumentParser(prog="python -m peftkern profile",
                                     description="profile a few training steps and print the GPU time split")
    parser.add_argument("--shape", default="1b", choices=["1b", "7b", "tiny"],
                        help="1b: Llama-style hidden 2048, 8 layers (the issues' model); 7b: Llama-2-7B layer "
                             "shapes, 4 layers; tiny: a toy config (peftkern/workloads.py)")
    parser.add_argument("--method", default="lora", choices=[*workloads.METHODS, "none"],
                        help="none: the frozen model, the floor to compare with")
    parser.add_argument("--impl", default="fused", choices=["fused", "peft"],
                        help="fused: PEFT + peftkern.fuse (peftkern's adapters for 'adapter'); peft: PEFT's own "
                             "layers (for 'adapter', which PEFT lacks: the same adapters as eager PyTorch ops)")
    parser.add_argument("--fp32-adapters", action="store_true", help="adapter weights in float32 (PEFT's default)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--trace", default="peftkern-profile.json",
                        help="Chrome trace path (default: %(default)s; --trace '' writes none)")
    parser.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                        help="torch.compile the model first (MODE: default, reduce-overhead, max-autotune, "
                        "max-autotune-no-cudagraphs)")
    args = parser.parse_args(argv)
    for name in ("rank", "batch", "seq", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.compile not in (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        parser.error(f"--compile MODE must be default, reduce-overhead, max-autotune or max-autotune-no-cudagraphs, "
                     f"got {args.compile!r}")
    if args.trace:
        # checked here, not only by profile() after the model is built and warmed up: a directory, /dev/null or an
        # unwritable folder gave a traceback after minutes of compiling (a review, 2026-12-06)
        try:
            _check_trace_path(args.trace)
        except (OSError, ValueError) as exc:
            parser.error(f"--trace: {exc}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.method != "none" and args.impl == "fused":
        from . import _backend

        try:  # a forced backend that cannot run here (PEFTKERN_BACKEND=triton without a GPU) raised in the first step
            _backend.resolve({"lokr": "krona"}.get(args.method, args.method), torch.device(device))
        except (RuntimeError, ValueError) as exc:  # ValueError: PEFTKERN_BACKEND names no backend
            parser.error(str(exc))
    if device == "cpu":
        print("no GPU: profiling the tiny config on the CPU (2 x 64 tokens) instead; --shape, --batch and --seq "
              "apply on a GPU", file=sys.stderr)
        args.shape, args.seq, args.batch = "tiny", 64, 2
    impl = "frozen" if args.method == "none" else args.impl
    model = workloads.build(args.method, impl, args.shape, device, dtype, args.rank, args.fp32_adapters,
                            max_positions=args.seq)
    compile_ = {None: False, "default": True}.get(args.compile, args.compile)
    step = workloads.training_step(model, args.batch, args.seq, device, compile_=compile_)
    for _ in range(3 if compile_ else 1):  # warm-up: compilation, autotuning, allocations outside the profile
        step()
    # the step's wall time without the profiler, to set beside its kernel time (on the CPU too: the README promises it,
    # and the CPU run printed none, a documentation audit, 2026-12-07)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    print(f"wall time per step (no profiler): {(time.perf_counter() - t0) / args.steps * 1e3:.1f} ms")
    with profile(trace=args.trace) as prof:
        for _ in range(args.steps):
            step()
    name = workloads.describe(args.method, impl, args.fp32_adapters, compiled=compile_,
                              model_dtype=str(dtype).replace("torch.", ""))
    # the rank the run used: LoKr's is half of --rank, and IA3, adapters and none have none (the header said r=16 for
    # each; an exploratory test, 2026-12-07)
    rank = {"lora": f" r={args.rank}", "lokr": f" r={max(1, args.rank // 2)}"}.get(args.method, "")
    steps = f"{args.steps} step" + ("s" if args.steps != 1 else "")
    print(f"llama-{args.shape} {name}{rank}, {args.batch}x{args.seq} tokens, {steps}, {device}")
    print(prof.summary())
    return 0

"""A whole training step of a Llama-style model: the frozen model against each method as PEFT runs it and as
peftkern runs it (peftkern.fuse of the same PEFT model; peftkern's own bottleneck adapters).

Models are built from configs (peftkern/workloads.py): "1b" is hidden 2048, intermediate 5632, 8 layers,
16 heads, vocab 32000 (the fuse issue's model); "7b" is Llama-2-7B's layer shapes (hidden 4096, intermediate
11008, 32 heads), 4 layers. bf16, AdamW with torch's defaults (--optimizer adamw-fused: AdamW(fused=True), Hugging
Face Trainer's default). The floor is the same model with no adapters and a frozen body, its embedding trainable so
that backward runs through every layer. That floor also pays for the embedding's gradient and
AdamW over its parameters, which no adapter model does (~2-3% of the 1b step on an H200). The second row, the frozen
model with only the first layer's input norm trainable, does nearly a LoRA or IA3 model's frozen work (it adds the
first layer's q, k and v input gradients; a bottleneck adapter model's backward stops at its first adapter), and the
eager rows' ratio to it is reported beside the floor's ("vs frozen, embedding frozen"). Each sequence length runs with
batch = tokens // seq (8192 tokens by default: GEMMs of 8192 rows fill an H100). Steps are timed eagerly (CUDA
events around several steps after warm-up), three repeats: the median and the spread. Python overhead counts
here, as it does in training. Anchors: PEFT eager with bf16 and with its default fp32 adapters; with --compile
also the compiled frozen model and PEFT LoRA / fused LoRA under torch.compile.

    python -m peftkern bench e2e [--method lora|ia3|lokr|adapter|all] [--shape 1b 7b] [--seq 1024 2048 4096]
                                 [--tokens 8192 | --batch B] [--quick] [--compile]
                                 [--compile-mode reduce-overhead] [--compiled-only]
                                 [--checkpointing | --checkpointing-only] [--optimizer adamw-fused] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PartialResults,
    Row,
    bench_device,
    note_gpu_only,
    note_spread,
    positive_ints,
    print_table,
    progress,
    progress_rows,
    report_failure,
)

from peftkern import workloads  # noqa: E402


def settle_compile() -> None:
    """Stop inductor's compile workers once a compiled model is warm: left running, they kept the CPU busy while
    the compiled rows were timed (a compiled fused step measured 67 ms with a spread of 24 ms across repeats)."""
    try:
        from torch._inductor.async_compile import shutdown_compile_workers
    except ImportError:
        return
    shutdown_compile_workers()


def host_probe_us(device, calls: int = 200) -> Optional[float]:
    """What enqueueing one small CUDA op costs this machine's CPU (us, median of five rounds): the fused steps are
    bound by the host, and machines of one kind differed 2x here (NOTES-lora.md), so every run records it."""
    if device != "cuda":
        return None
    a = torch.ones(16, device="cuda")
    rounds = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            torch.add(a, a, out=a)
        rounds.append((time.perf_counter() - t0) / calls * 1e6)
    torch.cuda.synchronize()
    return statistics.median(rounds)


class GcWatch:
    """Python's garbage collections while the block runs: how many per generation and the pause they took.
    The fused rows had one slow repeat of three (spreads of 20-40 ms a step on 2026-11-23) where PEFT's rows
    mostly had none; a full (generation 2) collection of a process holding transformers and torch takes tens of
    milliseconds, so every timed row now records them."""

    def __init__(self):
        self.collections = [0, 0, 0]
        self.pause_ms = 0.0
        self._t0 = 0.0

    def _callback(self, phase, info):
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.collections[info["generation"]] += 1
            self.pause_ms += (time.perf_counter() - self._t0) * 1e3

    def __enter__(self):
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self._callback)
        return False


def time_training(step, steps: int, warmup: int, device, compiled: bool = False) -> tuple[float, float, float, dict]:
    """(median ms per step, spread ms, peak MB, diagnostics) of `step` over three repeats of `steps` steps;
    diagnostics: each repeat's ms per step and the garbage collections during the repeats (GcWatch)."""
    for _ in range(warmup):
        step()
    if compiled:
        settle_compile()
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    host: list = []
    with GcWatch() as watch:
        times = _repeats(step, steps, device, host)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    diagnostics = {"repeat_ms": [round(t, 3) for t in times], "host_ms": [round(t, 3) for t in host],
                   "gc_collections": watch.collections, "gc_pause_ms": round(watch.pause_ms, 2)}
    return statistics.median(times), max(times) - min(times), peak, diagnostics


def _repeats(step, steps: int, device, host: Optional[list] = None) -> list[float]:
    """ms per step in each of three repeats of `steps` steps. host, if given, receives each repeat's host time per
    step on a GPU: the wall time until the last step has been queued (the GPU's time near it: the host is the bound)."""
    times = []
    for _ in range(3):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            for _ in range(steps):
                step()
            end.record()
            if host is not None:
                host.append((time.perf_counter() - t0) * 1e3 / steps)
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / steps)
        else:
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            times.append((time.perf_counter() - t0) * 1e3 / steps)
    return times


def run_case(shape: str, batch: int, seq: int, methods, args, device, dtype) -> list[Row]:
    """Every variant of one (shape, batch, seq): one model in memory at a time."""
    steps, warmup = (3, 2) if args.quick else (5, 3)
    if device != "cuda":
        steps, warmup = 2, 1
    settings = [True] if args.checkpointing_only else ([False, True] if args.checkpointing else [False])
    case = f"llama-{shape} {batch}x{seq}"
    model_dtype = str(dtype).replace("torch.", "").replace("bfloat16", "bf16")
    rows = []
    for ckpt in settings:
        floors: dict = {}
        for method, impl, fp32, compiled in workloads.variants(methods, args.compile and device == "cuda"):
            if args.compiled_only and compiled is False and (method != "none" or impl != "frozen"):
                continue  # the eager floor stays: every ratio is taken against it
            if fp32 and dtype == torch.float32:
                continue  # a float32 model's adapters are float32 either way: the same row twice, under two labels
            compiled = args.compile_mode if (compiled and args.compile_mode) else compiled
            name = workloads.describe(method, impl, fp32, compiled, model_dtype)
            pass_ = "train step" + (" +ckpt" if ckpt else "")
            progress(f"e2e {case} {pass_}: {name}")
            model = step = None
            try:
                if compiled:
                    # each compiled row from an empty dynamo cache, as the layer benchmarks' anchors (common.compiled):
                    # shared across rows and cases, the compiled rows (the compiled floor too) of every sequence
                    # length after the first ran automatic dynamic shapes' graphs, not the static ones a run at one
                    # length compiles, and past the recompile limit (8) a frame ran eagerly under the compiled label
                    # (a review, 2026-12-06)
                    torch._dynamo.reset()
                torch._dynamo.utils.counters.clear()
                model = workloads.build(method, impl, shape, device, dtype, args.rank, fp32, max_positions=seq)
                step = workloads.training_step(model, batch, seq, device, compiled, ckpt, optimizer=args.optimizer)
                ms, spread, peak, diagnostics = time_training(step, steps, warmup, device, compiled)
                workloads.check_fused(model)
                if compiled:  # a compiled row with graph breaks runs part of the model eagerly: say so
                    diagnostics["graph_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values())
                    if diagnostics["graph_breaks"]:
                        progress(f"  {diagnostics['graph_breaks']} graph breaks under torch.compile")
            except Exception as exc:  # an anchor that cannot run here is reported, not fatal
                report_failure(f"e2e {case} {pass_} {name}", exc,
                               ours=impl in ("fused", *workloads.FROZEN_IMPLS) or method == "none")
                continue
            finally:
                # the step closure holds the model and its optimizer: left alive, the next row's peak memory
                # would count this model too (seen on the H100: a fused row below the frozen floor)
                del model, step
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
            if method == "none" and impl == "frozen" and not compiled:
                floors["floor"] = (ms, peak)
            if "floor" not in floors:  # the floor failed: no ratio (the next row became the floor at 1.00x)
                progress(f"  no frozen floor in this case: {name} is left out")
                continue
            eager_floor = floors["floor"]
            if impl == "frozen-norm" and not compiled:
                floors["equal"] = (ms, peak)
            if compiled and method == "none" and impl == "frozen":
                floors["compiled"] = (ms, peak)
            # compiled rows against the compiled frozen model (what issue 7 compares), the rest against the eager one
            floor = floors.get("compiled", eager_floor) if compiled else eager_floor
            # against the frozen model that trains no embedding, as none of the adapters' models does: eager rows
            equal = floors.get("equal") if not compiled else None
            extra = {"tokens_per_s": batch * seq / ms * 1e3, "throughput_vs_floor": floor[0] / ms,
                     "floor": "compiled frozen model" if floor is not eager_floor else "frozen model (eager)",
                     "ratio_to_eager_floor": ms / eager_floor[0],
                     "throughput_vs_equal_floor": equal[0] / ms if equal else None,
                     "peak_vs_floor": (peak / floor[1]) if peak and floor[1] else None,
                     "peak_vs_equal_floor": (peak / equal[1]) if equal and peak and equal[1] else None,
                     "adapter_dtype": "float32" if fp32 else model_dtype, "compiled": compiled,
                     "checkpointing": ckpt, "optimizer": args.optimizer, "shape": shape, "batch": batch, "seq": seq,
                     **diagnostics}
            rows.append(Row(method, case, name, pass_, ms, spread, ms / floor[0], peak, extra))
            progress_rows(rows[-1:])
    return rows


def main(argv=None) -> list[Row]:
    parser = argparse.ArgumentParser(prog="peftkern bench e2e", description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="all", choices=[*workloads.METHODS, "all"])
    parser.add_argument("--shape", nargs="*", default=["1b"], choices=["1b", "7b"])
    # positive integers, or a usage error (--seq 0 divided by zero, --tokens 0 and --batch 0 became batch 1)
    positive = lambda text: positive_ints(1)(text)[0]  # noqa: E731
    parser.add_argument("--seq", type=positive, nargs="*", default=[2048])
    parser.add_argument("--tokens", type=positive, default=8192, help="tokens per step: batch = tokens // seq")
    parser.add_argument("--batch", type=positive, help="a fixed batch size instead of --tokens // seq")
    parser.add_argument("--quick", action="store_true", help="fewer timed steps")
    parser.add_argument("--compile", action="store_true",
                        help="also the compiled frozen model and LoRA (PEFT, fused) under torch.compile")
    parser.add_argument("--compile-mode", help="torch.compile's mode for the compiled rows (e.g. reduce-overhead: "
                        "CUDA graphs); implies --compile")
    parser.add_argument("--compiled-only", action="store_true",
                        help="the eager floor and the compiled rows only; implies --compile")
    parser.add_argument("--checkpointing", action="store_true", help="also every row with gradient checkpointing")
    parser.add_argument("--checkpointing-only", action="store_true", help="only the rows with gradient checkpointing")
    parser.add_argument("--rank", type=positive, default=16)
    parser.add_argument("--optimizer", default="adamw", choices=workloads.OPTIMIZERS,
                        help="every row's optimizer: adamw (torch's defaults, foreach on CUDA) or adamw-fused "
                        "(fused=True, Hugging Face Trainer's default)")
    parser.add_argument("--out", help="directory for the JSON (default $PEFTKERN_RESULTS_DIR, else "
                                          "benchmarks/results/)")
    args = parser.parse_args(argv)
    args.compile = args.compile or bool(args.compile_mode) or args.compiled_only
    device, dtype = bench_device("the tiny Llama config on the CPU (2 x 64 tokens) so you can see it work")
    methods = workloads.METHODS if args.method == "all" else (args.method,)
    cases = []
    for shape in args.shape:
        for seq in args.seq:
            cases.append((workloads.resolve_shape(shape, device), args.batch or max(1, args.tokens // seq), seq))
    note_gpu_only(device, shape=args.shape != ["1b"], seq=args.seq != [2048], tokens=args.tokens != 8192,
                  batch=args.batch is not None)
    if device != "cuda":
        cases = [("tiny", 2, 64)]
        if args.compile:  # inductor on the CPU compiles for minutes and times nothing the issues ask about
            progress("no GPU: the compiled rows are GPU-only; --compile, --compile-mode and --compiled-only are "
                     "ignored here")
            args.compile = args.compiled_only = False
    probe = host_probe_us(device)
    if probe is not None:
        progress(f"host: {probe:.1f} us to enqueue a small CUDA op")
    results = PartialResults("e2e", {"methods": list(methods), "cases": cases, "rank": args.rank,
                                     "models": {s: workloads.SHAPES[s] for s, _, _ in cases},
                                     "timing": "steps between CUDA events" if device == "cuda" else
                                     "wall clock on the CPU", "optimizer": args.optimizer,
                                     "host_us_per_small_op": probe}, args.out)
    rows = []
    for shape, batch, seq in cases:
        rows += run_case(shape, batch, seq, methods, args, device, dtype)
        results.save(rows)
    note_spread(rows)
    print_table(rows, "Training step (ratio: step time over the frozen model's, the compiled frozen model's for "
                "compiled rows; lower is better)")
    print(f"\n| {'case':<22} | {'pass':<16} | {'implementation':<52} | {'tokens/s':>10} | {'vs frozen':>9} | "
          f"{'vs frozen, embedding frozen':>27} | {'peak vs frozen':>14} |")
    print(f"| {'-' * 22} | {'-' * 16} | {'-' * 52} | {'-' * 9}: | {'-' * 8}: | {'-' * 26}: | {'-' * 13}: |")
    for r in rows:
        peak = f"{r.extra['peak_vs_floor']:.3f}x" if r.extra.get("peak_vs_floor") else "-"
        equal = r.extra.get("throughput_vs_equal_floor")
        equal = f"{equal:.3f}x" if equal else "-"
        print(f"| {r.case:<22} | {r.pass_:<16} | {r.impl:<52} | {r.extra['tokens_per_s']:10,.0f} | "
              f"{r.extra['throughput_vs_floor']:8.3f}x | {equal:>27} | {peak:>14} |")
    path = results.finish(rows)
    progress(f"saved {path}")
    return rows


if __name__ == "__main__":
    main()

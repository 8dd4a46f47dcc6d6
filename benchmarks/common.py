"""What every benchmark shares: timing (median and spread), peak memory, the environment, JSON and tables.

Every row is timed against the floor measured in the same run, and ratios are what get reported.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SAVED: list[Path] = []  # every JSON save_results wrote in this process, in order (bench all plots them)


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# The rows of peftkern's own implementations, and the floors, that failed in this process: `python -m peftkern bench`
# exits 1 when any did. An anchor that cannot run here (PEFT's, torch.compile's) is reported and skipped, as before;
# peftkern's rows failed just as quietly, with exit status 0 (a review, 2026-12-05).
FAILED_OURS: list[str] = []


def report_failure(what: str, exc: Exception, ours: bool) -> None:
    """Say that `what` failed; remember it in FAILED_OURS where it is peftkern's own row or a floor."""
    progress(f"  {what}: failed ({type(exc).__name__}: {exc})")
    if ours:
        FAILED_OURS.append(f"{what}: {type(exc).__name__}: {exc}")


def bench_device(cpu_note: Optional[str] = "running a small CPU version (reference backend) so you can see it "
                                           "work") -> tuple[str, torch.dtype]:
    """(device, dtype) a benchmark runs in: the GPU in bf16, else the CPU in float32 (saying so, with cpu_note)."""
    if torch.cuda.is_available():
        return "cuda", torch.bfloat16
    if cpu_note:
        progress(f"no GPU: {cpu_note}")
    return "cpu", torch.float32


def note_gpu_only(device: str, **given: bool) -> None:
    """On the CPU, name the GPU-only options that were given (given: the option, with - as _, -> whether it was):
    --explore, --variants, --eager were accepted and ignored without a word (an exploratory test, 2026-12-07)."""
    named = [f"--{name.replace('_', '-')}" for name, on in given.items() if on]
    if device != "cuda" and named:
        progress(f"no GPU: {', '.join(named)} {'apply' if len(named) > 1 else 'applies'} on a GPU only, ignored here")


# the benchmarks that reference_rows_only named: the layer benchmarks' CPU versions run the reference whatever backend
# is forced, and their JSON says so instead of the forced backend's name. By name: one flag for the process made bench
# all's decoder and e2e pieces, which obey the forced backend, record torch after a layer piece (a review of the change)
_REFERENCE_ONLY: set = set()


def reference_rows_only(device: str, name: str) -> None:
    """A layer benchmark on the CPU: its peftkern rows run the reference, whatever PEFTKERN_BACKEND or set_backend
    forced (the kernels would run in Triton's interpreter, whose times say nothing). Say so where one was forced, and
    record "torch" as the JSON's backend: a forced triton was recorded while the reference ran (a documentation audit,
    2026-12-07)."""
    if device == "cuda":
        return
    _REFERENCE_ONLY.add(name)
    from peftkern import _backend

    forced = _backend.get_backend()
    if forced not in (None, "torch"):
        progress(f"no GPU: the forced backend {forced!r} is ignored here; the peftkern rows run the reference")


def positive_ints(count: int):
    """An argparse type: a comma-separated list of `count` positive integers ("8192,4096,4096,16"), or a usage
    error naming what was expected."""
    def parse(text: str) -> tuple:
        try:
            values = tuple(int(v) for v in text.split(","))
        except ValueError:
            values = ()
        if len(values) != count or min(values) < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: expected " + ("a positive integer" if count == 1 else
                                             f"{count} positive integers separated by commas"))
        return values

    return parse


def timing_label(device: str, eager: bool) -> str:
    """How a layer benchmark's rows were timed, for its JSON (time_fn's three ways)."""
    if device != "cuda":
        return "wall clock on the CPU"
    return "eager calls (do_bench)" if eager else "CUDA-graph replays (GPU time)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, warmup_ms: float = 25.0, rep_ms: float = 100.0,
            repeats: int = 3, cuda_graph: bool = True, info: Optional[dict] = None) -> tuple[float, float]:
    """(median ms, spread ms) of fn over `repeats` batches of timed calls.

    On a GPU, by default: replays of a CUDA graph of fn (triton.testing.do_bench_cudagraph), i.e. the GPU
    time of the kernels fn launches, without Python's launch overhead (which a training loop hides when the
    CPU runs ahead of the GPU, and which a per-call event timer would count). cuda_graph=False (or a fn that
    cannot be captured) times eager calls with triton.testing.do_bench. On the CPU: a wall clock.
    The spread is max - min over the batch medians. info, if given, gets "cuda_graph": whether CUDA-graph replays
    timed it (False where fn could not be captured and was timed eagerly), and "batches_ms": the batch medians.
    CUDA-graph replays run back to back with no L2 flush: a working set that fits in L2 (~50 MB on an H100 or H200:
    M <= 2048 at 4096 features, the 32 MB weight of a decode-sized call) stays warm from replay to replay, which a
    training step does not see; --eager times calls with triton's L2 flush between them.
    """
    if info is not None:
        info["cuda_graph"] = cuda_graph and device.type == "cuda"
    if device.type == "cuda":
        import triton.testing as tt

        meds = []
        while len(meds) < repeats:
            if cuda_graph:
                try:
                    meds.append(tt.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))
                    continue
                except Exception as exc:  # not capturable: time it eagerly instead, and say so
                    cuda_graph = False
                    if info is not None:
                        info["cuda_graph"] = False
                    progress(f"  not capturable in a CUDA graph ({type(exc).__name__}): timed as eager calls")
                    torch.cuda.synchronize(device)
                    # every batch eager: a capture that failed after an earlier one succeeded mixed replays and
                    # eager calls in one row's batches (a review of the benchmarks, 2026-12-07)
                    meds.clear()
            meds.append(tt.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
        if info is not None:
            info["batches_ms"] = sorted(meds)
        return statistics.median(meds), max(meds) - min(meds)
    fn()
    meds = []
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while n < 2 or (time.perf_counter() - t0) * 1e3 < rep_ms / 5:
            fn()
            n += 1
        meds.append((time.perf_counter() - t0) * 1e3 / n)
    if info is not None:
        info["batches_ms"] = sorted(meds)
    return statistics.median(meds), max(meds) - min(meds)


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak allocated memory (MB) above what was allocated before one call of fn. Whatever would be freed during the
    call is freed before the baseline is read: garbage (the collector is then off during the call), and blocks that
    wait for another stream's events after record_stream (empty_cache frees them). Either, freed inside the call, lowers
    the peak by its size: on an H200 (2026-12-06) a whole-file run of tests/test_lora.py read the Unsloth-style path
    at 64.5 MB instead of 128.75 after the fused op had run, and the same test passed alone."""
    if device.type != "cuda":
        return None
    gc.collect()
    _sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        fn()
        _sync(device)
    finally:
        if was_enabled:
            gc.enable()
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def compiled(module):
    """torch.compile(module) for an anchor, with dynamo's caches emptied first. Every case compiles the same class's
    forward again (new weights and shapes, and a forward and a fwd+bwd grad mode), which piles up entries for one
    code object: past dynamo's recompile limit (8) a call ran eager with a log line only, under the compiled row's
    label (a review found the lora / ia3 / krona / adapter anchors eager from the fourth case on, 2026-12-05, and
    the committed r = 64 / 128 rows of lora-...-20261122-185230.json at 0.99-1.00x their eager twins). One case
    compiles at most its forms times two grad modes, under the limit, and at its own static shapes."""
    torch._dynamo.reset()
    return torch.compile(module)


def git_revision(cwd: Optional[Path] = None) -> str:
    """$PEFTKERN_GIT_REV where it is set, before git: the GPU machine's copy of the tree can carry a .git whose HEAD
    is older than the files (2026-12-06: gpu_check.log named cd17f18 for 32613e4's files). Otherwise the checkout's
    revision, with "-dirty" where a tracked file outside benchmarks/results/ differs from it."""
    if os.environ.get("PEFTKERN_GIT_REV"):
        return os.environ["PEFTKERN_GIT_REV"]
    cwd = cwd or Path(__file__).parent
    try:
        rev = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, stderr=subprocess.DEVNULL,
                                      text=True).strip()
        changed = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                                           ":(top,exclude)benchmarks/results"], cwd=cwd, stderr=subprocess.DEVNULL,
                                          text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("-dirty" if changed.strip() else "")


def environment(benchmark: Optional[str] = None) -> dict:
    """GPU, driver and library versions: saved with every result. benchmark: its name, whose backend is recorded as
    torch where reference_rows_only named it."""
    env = {"python": platform.python_version(), "torch": torch.__version__, "git": git_revision(),
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           # float32 rows: torch's matmuls run TF32 when these say so, and so do peftkern's Triton kernels where
           # allow_tf32 is on (kernels/triton/lora.py _dot_precision)
           "float32_matmul_precision": torch.get_float32_matmul_precision(),
           "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    for name in ("triton", "transformers", "peft"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, sm_count=props.multi_processor_count, cuda=torch.version.cuda,
                   capability=f"{props.major}.{props.minor}")
        try:
            env["driver"] = subprocess.check_output(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], text=True).strip()
        except (OSError, subprocess.CalledProcessError):
            env["driver"] = None
    else:
        env.update(gpu=None, cpu=_cpu_model() or platform.processor() or platform.machine(),
                   # CPU timings depend on both, and on what else runs: two threads beside another process gave
                   # times in steps of ~8 ms (a review, 2026-12-05)
                   cpu_threads=torch.get_num_threads(), cpu_count=os.cpu_count())
    from peftkern import _backend

    env["backends"] = _backend.backend_status()
    # what changes which kernel runs without changing a row's label: the forced backend and peftkern's switches
    env["backend"] = "torch" if benchmark in _REFERENCE_ONLY else _backend.get_backend() or "auto"
    env["settings"] = {k: v for k, v in sorted(os.environ.items()) if _is_setting(k)}
    return env


# environment variables that change which kernel runs or how fast: peftkern's switches, Triton's, inductor's (the
# compiled anchors), torch's and CUDA's (CUDA_LAUNCH_BLOCKING serialises every launch, NVIDIA_TF32_OVERRIDE turns TF32
# off under torch's flags), the CPU's thread counts
_SETTING_PREFIXES = ("PEFTKERN_", "TRITON_", "TORCHINDUCTOR_", "TORCH_", "PYTORCH_", "CUDA_", "CUBLAS_", "NCCL_")
_SETTING_NAMES = ("NVIDIA_TF32_OVERRIDE", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _is_setting(name: str) -> bool:
    if any(word in name for word in ("TOKEN", "SECRET", "PASSWORD", "KEY")):
        return False
    return name in _SETTING_NAMES or name.startswith(_SETTING_PREFIXES)


def _cpu_model() -> Optional[str]:
    """The CPU's model name from /proc/cpuinfo (Linux), else None."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


@dataclass
class Row:
    """One timed case: `ms` is the median, `ratio` is ms over the floor's ms for the same case and pass."""
    method: str
    case: str
    impl: str
    pass_: str
    ms: float
    spread_ms: float
    ratio: float
    peak_mb: Optional[float] = None
    extra: dict = field(default_factory=dict)


def time_layer_impls(method: str, case: str, impls: dict, x: torch.Tensor, dy: torch.Tensor, eager: bool = False,
                     passes=("fwd", "fwd+bwd")) -> list[Row]:
    """Time each implementation name -> (fn(x), trainable tensors) forward (no_grad) and forward+backward
    (torch.autograd.grad of x and the trainables: no gradient accumulation in the loop). The first one must be
    the floor: ratios are to it, and each row's extra["ratio_range"] bounds its ratio by the batches' extremes (its
    slowest batch over the floor's fastest, and the reverse). An implementation that fails is reported and skipped;
    when the floor fails, so does that pass of the case (no row would have a floor). The floor is timed again after
    the other rows (_floor_again)."""
    dev = x.device
    graph = dev.type == "cuda" and not eager
    rows, floor, floor_batches, floor_steps = [], {}, {}, {}
    floor_name = next(iter(impls))
    for name, (fn, params) in impls.items():
        for pass_ in passes:
            if pass_ not in floor and name != floor_name:
                continue  # the floor of this pass failed
            if pass_ == "fwd":
                def step(fn=fn):
                    with torch.no_grad():
                        return fn(x)
            else:
                def step(fn=fn, params=params):
                    return torch.autograd.grad(fn(x), [x, *params], dy)
            if name == floor_name:
                floor_steps[pass_] = step
            info: dict = {}
            try:
                step()  # compile / autotune outside the timing
                ms, spread = time_fn(step, dev, cuda_graph=graph, info=info)
            except Exception as exc:  # an anchor that cannot run here is reported, not fatal
                report_failure(f"{method} {case} {pass_} {name}", exc,
                               ours=name == floor_name or name.startswith("peftkern"))
                continue
            if name == floor_name:
                floor[pass_], floor_batches[pass_] = ms, info["batches_ms"]
            mem = peak_memory_mb(step, dev) if pass_ == "fwd+bwd" else None
            tokens = x.numel() // x.shape[-1]
            fb, b = floor_batches[pass_], info["batches_ms"]
            rows.append(Row(method, case, name, pass_, ms, spread, ms / floor[pass_], mem,
                            {"cuda_graph": info["cuda_graph"], "tokens_per_s": tokens / ms * 1e3,
                             "ratio_range": [b[0] / fb[-1], b[-1] / fb[0]],
                             # the floor this ratio divides by: a variant row's floor is re-timed beside it and
                             # not kept as a row, so its ratio could not be recomputed from the JSON
                             "floor_ms": floor[pass_]}))
    if len(impls) > 1:
        _floor_again(rows, floor_steps, floor_batches, dev, graph)
    progress_rows(rows)
    return rows


def progress_rows(rows: list[Row]) -> None:
    """Each row's time and ratio on stderr as soon as its case is timed. The table and the JSON come only at the
    end of a run; a device step cut by its timeout lost every case of bench ia3 (2026-12-06: two cases in 138 s)."""
    for r in rows:
        progress(f"  {r.case} | {r.pass_} | {r.impl} | {r.ms:.4f} ms | {r.ratio:.3f}x")


def _floor_again(rows: list[Row], steps: dict, batches: dict, dev: torch.device, graph: bool) -> None:
    """Time each pass's floor once more, after the case's other rows: the clocks and the machine drift while a case
    runs (the floor was timed once, first, and every ratio divided by it). The ratio stays against the first timing;
    each row's extra["floor_ms_after"] records the second, and its ratio_range widens to both timings' batches, so
    a difference inside that range reads as one the run cannot tell apart. A drift over 2% is printed."""
    for pass_, step in steps.items():
        of_pass = [r for r in rows if r.pass_ == pass_]
        if len(of_pass) < 2:  # the floor alone, or every other row of the pass failed
            continue
        info: dict = {}
        try:
            after, _ = time_fn(step, dev, cuda_graph=graph, info=info)
        except Exception as exc:
            report_failure(f"{of_pass[0].method} {of_pass[0].case} {pass_} floor, timed again", exc, ours=True)
            continue
        first, both = batches[pass_], sorted(batches[pass_] + info["batches_ms"])
        for r in of_pass:
            lo, hi = r.extra["ratio_range"]  # fastest over the floor's slowest batch, and the reverse
            r.extra["floor_ms_after"] = after
            r.extra["ratio_range"] = [lo * first[-1] / both[-1], hi * first[0] / both[0]]
        drift = after / of_pass[0].extra["floor_ms"] - 1.0
        if abs(drift) > 0.02:
            progress(f"  the floor ({pass_}) timed {drift:+.1%} after the case's rows: ratios within that are noise")


def peft_single_layer(base: torch.nn.Module, config, fp32_adapters: bool):
    """A PEFT tuner layer around `base`: get_peft_model on a one-layer module whose layer is named proj
    (the config must target "proj"); autocast_adapter_dtype=fp32_adapters (PEFT's default is True)."""
    from peft import get_peft_model

    class Wrap(torch.nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.proj = lin

        def forward(self, x):
            return self.proj(x)

    return get_peft_model(Wrap(base), config, autocast_adapter_dtype=fp32_adapters).base_model.model.proj


def note_spread(rows: list[Row]) -> None:
    """Flag rows whose difference to an anchor of the same case is inside the timing spread."""
    by_case: dict = {}
    for r in rows:
        by_case.setdefault((r.method, r.case, r.pass_), []).append(r)
    for group in by_case.values():
        for r in group:
            close = [o.impl for o in group if o is not r and abs(o.ms - r.ms) < max(o.spread_ms, r.spread_ms)]
            if close:
                r.extra["within_spread_of"] = close


def print_table(rows: list[Row], title: str = "") -> None:
    """ms, ratio to the floor (and, for adapters, to the floor's byte count at copy bandwidth), tokens/s, peak MiB
    (the layer benchmarks': above what was allocated before the call; bench e2e's: the step's whole peak) to six
    significant digits, as the JSON holds it: whole MiB read 128.75 and 129.0 alike, where issue 2 compares peaks to
    a quarter of a MiB (a review, 2026-12-06); "~": within the spread of another row of the case."""
    if title:
        print(f"\n## {title}")
    by_bytes = any("ratio_to_bandwidth_floor" in r.extra for r in rows)
    # a row timed as eager calls beside graph replays (its capture failed): its ratio mixes the two ways, marked here
    # as in the JSON and report.py's table (a review of the benchmarks, 2026-12-07)
    mixed = {r.extra["cuda_graph"] for r in rows if "cuda_graph" in r.extra} == {True, False}
    extra_head, extra_rule = (f" {'vs bytes':>8} |", f"{'-' * 10}|") if by_bytes else ("", "")
    # the pass and impl columns as wide as their longest entry: bench e2e's "train step +ckpt" and its compiled rows'
    # names ran past 8 and 26 and pushed their rows out of line (a review of the benchmarks, 2026-12-07)
    wp, wi = max([8, *(len(r.pass_) for r in rows)]), max([26, *(len(r.impl) for r in rows)])
    print(f"| {'case':<34} | {'pass':<{wp}} | {'impl':<{wi}} | {'ms':>9} | {'ratio':>6} |{extra_head} {'tokens/s':>11} "
          f"| {'peak MiB':>8} |")
    print(f"|{'-' * 36}|{'-' * (wp + 2)}|{'-' * (wi + 2)}|{'-' * 11}|{'-' * 8}|{extra_rule}{'-' * 13}|{'-' * 10}|")
    for r in rows:
        mem = f"{r.peak_mb:8.6g}" if r.peak_mb is not None else f"{'-':>8}"
        tps = f"{r.extra['tokens_per_s']:11,.0f}" if r.extra.get("tokens_per_s") else f"{'-':>11}"
        flag = " ~" if r.extra.get("within_spread_of") else ""
        flag += " eager calls, not graph replays" if mixed and r.extra.get("cuda_graph") is False else ""
        vs_bytes = ""
        if by_bytes:
            b = r.extra.get("ratio_to_bandwidth_floor")
            vs_bytes = f" {b:7.2f}x |" if b is not None else f" {'-':>8} |"
        print(f"| {r.case:<34} | {r.pass_:<{wp}} | {r.impl:<{wi}} | {r.ms:9.4f} | {r.ratio:5.2f}x |{vs_bytes} {tps} | "
              f"{mem} |{flag}")
    sys.stdout.flush()


def _results_path(name: str, env: dict, out_dir: Optional[Path], suffix: str = ".json") -> Path:
    """<out_dir>/<name>-<gpu>-<time now><suffix>, out_dir defaulting to $PEFTKERN_RESULTS_DIR or benchmarks/results/."""
    out_dir = Path(out_dir or os.environ.get("PEFTKERN_RESULTS_DIR") or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = (env.get("gpu") or "cpu").replace(" ", "_").replace("/", "_")
    return out_dir / f"{name}-{gpu}-{time.strftime('%Y%m%d-%H%M%S')}{suffix}"


def _write_results(path: Path, name: str, rows: list[Row], config: dict, env: dict, complete: bool) -> None:
    rows_json = [{**asdict(r), "pass": r.pass_} for r in rows]
    for r in rows_json:
        r.pop("pass_")
    doc = {"benchmark": name, "environment": env, "config": config, "rows": rows_json}
    if not complete:
        doc["complete"] = False
    tmp = path.with_name(path.name + ".tmp")  # a run killed mid-write leaves the previous version whole
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)


def save_results(name: str, rows: list[Row], config: dict, out_dir: Optional[Path] = None) -> Path:
    """Write benchmarks/results/<name>-<gpu>-<time>.json (or under out_dir / $PEFTKERN_RESULTS_DIR)."""
    env = environment(name)
    path = _results_path(name, env, out_dir)
    _write_results(path, name, rows, config, env, complete=True)
    SAVED.append(path)
    return path


class PartialResults:
    """A benchmark's JSON kept up to date while it runs. save(rows), after each case, rewrites
    <name>-<gpu>-<start time>.partial.json with the rows so far and "complete": false. So a run stopped by a time limit
    still leaves the cases it finished, with the environment: on 2026-12-06 a `bench lora` cut by its device step's
    limit left its finished rows on stderr alone, and the JSON that would have been committed was never written.
    finish(rows) writes the usual JSON through save_results and removes the partial file. The partial file is not in
    SAVED (bench all plots what is there)."""

    def __init__(self, name: str, config: dict, out_dir: Optional[Path] = None):
        self.name, self.config, self.out_dir = name, config, out_dir
        self.path: Optional[Path] = None
        self._env: Optional[dict] = None

    def save(self, rows: list[Row]) -> Optional[Path]:
        if not rows:
            return None
        if self.path is None:
            self._env = environment(self.name)
            self.path = _results_path(self.name, self._env, self.out_dir, ".partial.json")
        _write_results(self.path, self.name, rows, self.config, self._env, complete=False)
        return self.path

    def finish(self, rows: list[Row]) -> Path:
        path = save_results(self.name, rows, self.config, self.out_dir)
        if self.path is not None:
            self.path.unlink(missing_ok=True)
        return path

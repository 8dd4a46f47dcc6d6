"""The user-facing tools: profiling, NVTX switch, `python -m peftkern info/bench`, benchmark reports."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEVICE, HAS_CUDA, INTERPRET, run_seed

import peftkern

ROOT = Path(__file__).resolve().parents[1]


def test_profile_splits_time_and_writes_a_trace(tmp_path):
    layer = peftkern.nn.LoRALinear(64, 48, r=4, device=DEVICE)
    x = torch.randn(32, 64, device=DEVICE, requires_grad=True)
    trace = tmp_path / "trace.json"
    with peftkern.profile(trace=str(trace)) as prof:
        layer(x).sum().backward()
    assert prof.split.get("peftkern kernels", 0.0) > 0.0, prof.summary()
    assert sum(prof.split.values()) > 0.0
    assert trace.exists() and json.loads(trace.read_text()), "the Chrome trace must be valid JSON"
    assert "peftkern kernels" in prof.summary()
    # every GEMM here runs inside the LoRA op (with profile()'s default NVTX on a GPU, the op's NVTX range replaced
    # its profiler range, and the op's cuBLAS calls counted as other GEMMs)
    assert "other GEMMs (outside peftkern ops)" not in prof.split, prof.summary()
    assert not peftkern.ops._common._nvtx_enabled, "profile() switches NVTX back off"


def test_profile_without_gpu_kernels_leaves_out_the_profilers_own_events():
    """Where CUDA is profiled but no kernel ran, the split is the CPU's self time, and the profiler's own host
    events are not part of it: an empty block on an H100 said 2 ms of "Activity Buffer Request" (CUPTI) and
    cudaDeviceSynchronize. Events as torch's profiler gives them, made up here so that the CPU runs it."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from peftkern import profiling

    def event(name, us, user=False):
        return SimpleNamespace(name=name, device_type=DeviceType.CPU, cpu_children=[], kernels=[],
                               self_cpu_time_total=us, is_user_annotation=user)

    events = [event("Activity Buffer Request", 1970.0), event("cudaDeviceSynchronize", 26.0),
              event("cuLaunchKernel", 3.0), event("Buffer Flush", 5.0), event("aten::mm", 500.0),
              event("custom_op", 250.0), event("cuGraph step", 40.0, user=True), event("cuDF merge", 10.0)]
    by_cat, by_kernel, gpu = profiling._split(SimpleNamespace(events=lambda: events))
    assert not gpu
    assert set(by_kernel) == {"aten::mm", "custom_op", "cuGraph step", "cuDF merge"}, by_kernel
    assert sum(by_cat.values()) == pytest.approx(0.8), by_cat


def test_profile_keeps_a_users_range_named_like_a_cuda_call():
    """record_function("cuGraph step") is the user's own range (the filter of the profiler's own events took any
    name starting cu + a capital letter, and dropped it), here through torch's real profiler on the CPU."""
    import time

    with peftkern.profile() as prof:
        with torch.profiler.record_function("cuGraph step"):
            time.sleep(0.002)
    assert prof.kernels.get("cuGraph step", 0.0) > 1.0, prof.summary()


def test_profile_restores_nvtx_and_refuses_a_directory(tmp_path):
    peftkern.set_nvtx(True)
    try:
        with peftkern.profile(nvtx=False) as prof:
            pass
        assert peftkern.ops._common._nvtx_enabled, "the user's NVTX setting is restored (it was switched off)"
    finally:
        peftkern.set_nvtx(False)
    assert prof.split == {} and " 0.000 ms" in prof.summary(), prof.summary()  # an empty profile said 1.000 ms
    ran = []
    with pytest.raises(IsADirectoryError):
        with peftkern.profile(trace=str(tmp_path)):
            ran.append(1)
    assert not ran, "refused before the block runs"
    fifo = tmp_path / "fifo"  # as /dev/null is: the exporter's rename replaced it with a regular file (as root)
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        with peftkern.profile(trace=str(fifo)):
            ran.append(1)
    assert not ran and not fifo.is_file()


def test_op_range_opens_the_profiler_range_beside_nvtx(monkeypatch):
    """With NVTX on and torch.profiler running, an op's body is in both ranges: peftkern.profile finds its ops by
    the profiler's range (the NVTX range alone hid them). The NVTX call is stubbed, so that this runs on a CPU."""
    from peftkern.ops import _common

    opened = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda.nvtx, "range", lambda name: opened.append(name) or contextlib.nullcontext())
    monkeypatch.setattr(_common, "_nvtx_enabled", True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with _common.op_range("peftkern::probe"):
            torch.ones(4).sum()
    assert opened == ["peftkern::probe"]
    assert any(e.name == "peftkern::probe" for e in prof.events())


def test_nvtx_switch_keeps_results():
    layer = peftkern.nn.LoRALinear(32, 16, r=2, device=DEVICE)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(8, 32, device=DEVICE)
    y0 = layer(x)
    peftkern.set_nvtx(True)
    try:
        y1 = layer(x)
    finally:
        peftkern.set_nvtx(False)
    assert torch.equal(y0, y1)


def _run(*args, env_extra=None, **kw):
    env = None
    if env_extra:
        import os

        env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-m", "peftkern", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env, **kw)


# The CLI's usage errors, all run in one fresh process (one import of torch and peftkern, ~3 s, instead of one for each
# case: 14 subprocesses were ~45 s of CI's CPU run, 2026-12-07). Each case calls peftkern.cli.main as `python -m
# peftkern` does, with stdout and stderr captured; a traceback in the case is printed to its stderr, as it would be.
BAD_ARGUMENTS = [("bench", "lora", "--shapes", "64,a,64,4"), ("bench", "ia3", "--shapes", "64,64"),
                 ("bench", "adapter", "--cases", "64,64,0"), ("bench", "decoder", "--tokens", "3000"),
                 ("profile", "--steps", "0"), ("profile", "--compile", "bogus"), ("bench", "all", "--skip", "lorax"),
                 ("bench", "--compare", "missing.json", "b")]
ZERO_ARGUMENTS = [("bench", "e2e", "--seq", "0"), ("bench", "e2e", "--tokens", "0"), ("bench", "e2e", "--rank", "0"),
                  ("bench", "adapter", "--cases", "64,64,128")]
BAD_TRACES = {name: ("profile", "--trace", trace, "--steps", "1") for name, trace in [("directory", "."),
                                                                                     ("device", "/dev/null")]}
_USAGE_RUNNER = """
import contextlib, io, json, sys, traceback
from peftkern.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append([argv, code, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def usage_runs():
    cases = BAD_ARGUMENTS + ZERO_ARGUMENTS + list(BAD_TRACES.values())
    run = subprocess.run([sys.executable, "-c", _USAGE_RUNNER, json.dumps(cases)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.splitlines()[-1])
    assert [tuple(r[0]) for r in results] == cases, "the runner skipped a case"
    return {tuple(argv): subprocess.CompletedProcess(argv, code, out, err) for argv, code, out, err in results}


def test_cli_info_lists_backends_and_methods():
    out = _run("info", "--json", "--model", "tiny")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    counts = data["trainable_parameters"]["methods"]
    # LoRA r=16 on the seven projections of 2 layers, hidden 64, intermediate 128: r (in + out) per projection
    assert counts["lora"]["trainable"] == 2 * 16 * (4 * (64 + 64) + 3 * (64 + 128)), counts
    # what was counted is said: a config file's count (PEFT's q, v defaults) was 10x the named shape's, unexplained
    assert "targets ['down_proj', 'gate_proj'" in counts["lora"]["setup"] and "r=16" in counts["lora"]["setup"]
    assert all(c.get("trainable", 0) > 0 for c in counts.values()), counts
    assert data["backends"]["torch"].startswith("available")
    assert "LoRALinear" in data["methods"]
    assert set(data["methods"]["LoRALinear"]) >= {"insertion_form", "integration_form", "workspace"}


def test_cli_bench_runs_and_saves_json(tmp_path):
    if torch.cuda.is_available():
        args = ("bench", "lora", "--shapes", "256,256,256,8", "--no-compile", "--out", str(tmp_path))
    else:
        args = ("bench", "lora", "--out", str(tmp_path))
    out = _run(*args, env_extra={"PEFTKERN_LORA_TAIL_OVERLAP": "side"})
    assert out.returncode == 0, out.stderr[-2000:]
    files = list(tmp_path.glob("lora-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["environment"]["torch"] == torch.__version__
    impls = {r["impl"] for r in data["rows"]}
    assert any(i.startswith("floor") for i in impls) and any(i.startswith("peftkern") for i in impls)
    floors = [r for r in data["rows"] if r["impl"].startswith("floor")]
    assert all(abs(r["ratio"] - 1.0) < 1e-9 for r in floors)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    assert "| case | implementation |" in report.table(data)
    assert "+0.0%" in report.compare(data, data)
    assert data["environment"]["settings"].get("PEFTKERN_LORA_TAIL_OVERLAP") == "side", "the switches are recorded"
    # a ratio measured against another floor is not compared as a change (bench e2e changed its compiled rows' floor)
    other = json.loads(json.dumps(data))
    for r in other["rows"]:
        r["extra"]["floor"] = "another floor"
        r["ratio"] *= 1.3
    assert "+30.0%" in report.compare(data, other), "a key one run did not write yet is no difference"
    for r in data["rows"]:
        r["extra"]["floor"] = "F.linear"
    compared = report.compare(data, other)
    assert "+30.0%" not in compared and "not comparable: floor F.linear / another floor" in compared, compared
    # nor one from another GPU (an H100 run against an H200 run gave a change for every row, 2026-12-05)
    elsewhere = json.loads(json.dumps(data))
    elsewhere["environment"]["gpu"] = "another GPU"
    assert "not comparable: gpu" in report.compare(data, elsewhere)
    # no row in common: each run's rows are still listed (they were not: an exploratory test, 2026-12-07)
    apart = json.loads(json.dumps(data))
    for r in apart["rows"]:
        r["case"] += " (another shape)"
    compared = report.compare(data, apart)
    assert "nothing to compare" in compared and f"only in A ({len(data['rows'])} rows" in compared, compared
    # every ratio can be recomputed from the JSON: each row names the floor's ms it was divided by
    for r in data["rows"]:
        assert abs(r["ms"] / r["extra"]["floor_ms"] - r["ratio"]) < 1e-9, r


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU version; on a GPU `bench all` is the real 10-minute run")
def test_bench_all_writes_every_piece_plots_and_a_summary(tmp_path):
    """`bench all`: one JSON per piece (three levels, every method), PNG plots of each, a markdown summary."""
    pytest.importorskip("peft")
    pytest.importorskip("matplotlib")
    out = _run("bench", "all", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    pieces = {p.name.split("-")[0] for p in tmp_path.glob("*.json")}
    assert pieces == {"lora", "ia3", "krona", "adapter", "decoder", "e2e"}, pieces
    e2e = json.loads(next(tmp_path.glob("e2e-*.json")).read_text())
    assert {r["method"] for r in e2e["rows"]} == {"none", "lora", "ia3", "lokr", "adapter"}
    floor = [r for r in e2e["rows"] if r["impl"] == "frozen model (floor)"]
    assert len(floor) == 1 and floor[0]["ratio"] == 1.0
    for r in e2e["rows"]:
        assert r["extra"]["tokens_per_s"] > 0 and r["spread_ms"] >= 0, r
        assert abs(r["extra"]["throughput_vs_floor"] * r["ratio"] - 1.0) < 1e-9, r
    decoder = json.loads(next(tmp_path.glob("decoder-*.json")).read_text())
    cases = {r["case"] for r in decoder["rows"]}
    assert {c.split()[0] for c in cases} == {"lora", "ia3", "lokr", "adapter"}
    for case in cases:
        impls = {r["impl"] for r in decoder["rows"] if r["case"] == case}
        ours = sum(i.startswith("peftkern.fuse" if not case.startswith("adapter") else "peftkern adapters")
                   for i in impls)
        assert "frozen layer (floor)" in impls and ours == 2, impls
    assert "fuse left layers" not in out.stdout + out.stderr
    plots = list((tmp_path / "plots").glob("*.png"))
    assert any(p.name.startswith("e2e_") for p in plots) and any(p.name.startswith("lora_") for p in plots)
    summary = next(tmp_path.glob("summary-*.md")).read_text()
    assert all(f"| {piece} |" in summary for piece in pieces), summary[:2000]
    assert "| train step ms | train step ratio |" in summary, "the training step's table has its own pass"
    assert "| - | - | - | - |" not in summary, "a table row with no numbers"
    compared = _run("bench", "--compare", *[str(p) for p in [next(tmp_path.glob("e2e-*.json"))] * 2])
    assert compared.returncode == 0 and "+0.0%" in compared.stdout, compared.stderr[-2000:]


@pytest.mark.parametrize("method", ["ia3", "adapter"])
def test_profile_cli_profiles_each_method(method, tmp_path):
    """`python -m peftkern profile --method M` trains the Llama workload with M and prints the time split."""
    pytest.importorskip("peft")
    trace = tmp_path / "trace.json"
    out = _run("profile", "--method", method, "--steps", "1", "--trace", str(trace))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "peftkern kernels" in out.stdout, out.stdout
    # the wall time on the CPU too, and "1 step" (a documentation audit, 2026-12-07: none, and "1 steps")
    assert "wall time per step (no profiler)" in out.stdout and " 1 step, " in out.stdout, out.stdout
    assert trace.exists()


def _sm90_compile_env() -> tuple:
    """(the repository's root, the environment without TRITON_INTERPRET) for compiling kernels for sm_90 in a
    subprocess; skips where this Triton ships no ptxas / cuobjdump."""
    import os

    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (tools / "cuobjdump").exists() or not (tools / "ptxas").exists():
        pytest.skip(f"this Triton ships no ptxas/cuobjdump under {tools}")
    return Path(__file__).resolve().parents[1], {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_persistent_kernel_configs_fit_an_sm90_sm():
    """The configs the persistent TMA kernels take on a GPU, compiled for sm_90 without one
    (scripts/compile_report.py): each fits an H100/H200 SM's shared memory and spills no registers, so a
    change that breaks that fails here and not on the device."""
    root, env = _sm90_compile_env()
    run = subprocess.run([sys.executable, str(root / "scripts" / "compile_report.py")], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("shared") >= 10, run.stdout


def test_fuse_bf16_margins_script_passes_as_is_and_fails_a_defect():
    """scripts/fuse_bf16_margins.py runs test_fuse.py's whole-model bf16 checks on the CPU: at seeds 0 and 1 they pass
    as the package is, and each of the four tests fails with the fused op's scaling 5% off (the script's exit status
    says both)."""
    pytest.importorskip("peft")
    script = str(ROOT / "scripts" / "fuse_bf16_margins.py")
    for extra in ([], ["--defect", "1.05"]):
        run = subprocess.run([sys.executable, script, "--seeds", "0", "2", *extra], cwd=ROOT, capture_output=True,
                             text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        said = run.stdout[-3000:] + run.stderr[-3000:]
        assert run.returncode == 0 and "back to the first adapter" in run.stdout, said
        failures = [line for line in run.stdout.splitlines() if ": failed at " in line]
        assert len(failures) == 4 and all(line.endswith(" of 2 seeds") for line in failures), run.stdout[-2000:]
        assert all((" failed at 0 " in line) == (not extra) for line in failures), run.stdout[-2000:]


def test_krona_cuda_kernels_run_emulated_on_the_cpu():
    """csrc/krona.cu's kernels (the cuda backend's KronA) run on the CPU by scripts/emulate_krona_cu.py: their text
    with the CUDA-core products, a block's threads as threads, against float64 for every dtype, odd and PEFT-sized
    factors, several tokens a block. Indexing, layouts, staging, epilogues, the split reduction and the merge break
    here before a GPU sees them."""
    import shutil

    cuda_home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    if shutil.which("g++") is None or not (cuda_home / "include" / "cuda_fp16.h").exists():
        pytest.skip(f"needs g++ and the CUDA headers (CUDA_HOME={cuda_home})")
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "emulate_krona_cu.py")], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "0 failure(s)" in run.stdout, run.stdout[-4000:] + run.stderr[-4000:]


def test_compile_report_flags_an_mma_operand_read_into_registers_too():
    """compile_report's hazard check finds the pattern behind the adapter's LN failure (a pipelined tile that an async
    MMA and a row sum both read: Triton 3.6 gave it one buffer fewer) in the code that had it, the forward's loop 1
    with LN's statistics summed in it, and in skinny_grads with the bias gradient summed in the kernel; and none in
    those kernels as a GPU launches them now."""
    root, env = _sm90_compile_env()
    script = """
import sys
sys.path.insert(0, "scripts")
import compile_report as cr
from peftkern.kernels.triton import adapter, lora
adapter.triton_interpret = lora.triton_interpret = lambda: False
fn, args, const, warps, stages = cr.adapter_loop_one(False)
print("fwd", cr.compile_sm90(fn, args, const, warps, stages)["hazards"])
print("fwd-sums", cr.compile_sm90(fn, args, dict(const, STATS_GIVEN=False), warps, stages)["hazards"])
fn, args, const, warps, stages = cr.skinny_grads(16)
print("skinny", cr.compile_sm90(fn, args, const, warps, stages)["hazards"])
print("skinny-colsum", cr.compile_sm90(fn, args, dict(const, COLSUM=True), warps, stages)["hazards"])
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    found = dict(line.split(" ", 1) for line in run.stdout.splitlines() if line.split(" ", 1)[0] in (
        "fwd", "fwd-sums", "skinny", "skinny-colsum"))
    assert found["fwd"] == "[]" and found["skinny"] == "[]", run.stdout
    assert found["fwd-sums"] != "[]" and found["skinny-colsum"] != "[]", run.stdout


def test_margins_reports_each_comparisons_worst_ratio(tmp_path, monkeypatch):
    """conftest's PEFTKERN_MARGIN_LOG writes a line per assert_close and scripts/margins.py ranks the comparisons by
    their largest error / tolerance over every run logged."""
    import conftest

    log = tmp_path / "margins.tsv"
    monkeypatch.setattr(conftest, "MARGIN_LOG", str(log))
    expected = torch.ones(100, dtype=torch.float64)
    for err in (2e-3, 1e-3):  # two runs of one comparison: its worst is the first
        conftest.assert_close(expected * (1 + err), expected, torch.float16, "a")
    conftest.assert_close(expected * (1 + 3e-3), expected, torch.float16, "b", scale=2.0)
    with pytest.raises(AssertionError):
        conftest.assert_close(expected * 1.01, expected, torch.float16, "c")  # over: logged before it raises
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import margins

    rows = margins.worst_margins([str(log)])
    assert [(name, count) for _, count, _, name in rows] == [("c", 1), ("a", 2), ("b", 1)]
    assert [round(ratio, 3) for ratio, *_ in rows] == [2.0, 0.4, 0.3]
    assert all(test.startswith("tests/test_tools.py::test_margins") for _, _, test, _ in rows)


def test_training_step_optimizers():
    """workloads' optimizers: the fused AdamW (Hugging Face Trainer's default) is what --optimizer adamw-fused names,
    and it takes the same step as torch's default AdamW on a fused LoRA model."""
    pytest.importorskip("peft")
    from peftkern import workloads

    params = {}
    for name in workloads.OPTIMIZERS:
        torch.manual_seed(run_seed(0))
        model = workloads.build("lora", "fused", "tiny", DEVICE, torch.float32, 4, False, max_positions=32)
        for p in model.parameters():  # B starts at zero: give every adapter a gradient of both factors
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.02)
        step = workloads.training_step(model, 2, 16, DEVICE, optimizer=name, lr=1e-3)
        assert isinstance(step.optimizer, torch.optim.AdamW)
        assert step.optimizer.defaults["fused"] is (True if name == "adamw-fused" else None), name
        for _ in range(2):
            step()
        params[name] = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    assert len(params["adamw"]) > 0
    for a, b in zip(params["adamw"], params["adamw-fused"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        workloads.make_optimizer([torch.zeros(2, requires_grad=True)], "sgd")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU version of bench e2e")
def test_bench_e2e_records_its_optimizer(tmp_path):
    pytest.importorskip("peft")
    out = _run("bench", "e2e", "--method", "lora", "--optimizer", "adamw-fused", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(next(tmp_path.glob("e2e-*.json")).read_text())
    assert data["rows"] and {r["extra"]["optimizer"] for r in data["rows"]} == {"adamw-fused"}
    # every printed table is markdown: the tokens/s table had no separator line (an exploratory test, 2026-12-07)
    tables = [line for line in out.stdout.splitlines() if line.startswith("| case ")]
    after = [out.stdout.splitlines()[out.stdout.splitlines().index(t) + 1] for t in tables]
    assert len(tables) == 2 and all(set(line) <= set("|-: ") for line in after), after
    # the CPU's model is float32: PEFT's default fp32 adapters are its adapters, not a second row under another label
    assert not any("fp32 adapters" in r["impl"] for r in data["rows"]), [r["impl"] for r in data["rows"]]


# The command-line tools at the edges (a review of them on the CPU, 2026-12-04); each test failed before its fix.


def test_bench_all_without_matplotlib_writes_the_tables(tmp_path):
    """The README's install has no matplotlib (the `bench` extra): `bench all` stopped after its first piece."""
    hidden = tmp_path / "hidden"
    (hidden / "matplotlib").mkdir(parents=True)
    (hidden / "matplotlib" / "__init__.py").write_text("raise ImportError('matplotlib hidden by the test')\n")
    # CUDA_VISIBLE_DEVICES="": the CPU's small shapes wherever it runs (on an H200 the GPU's `bench lora` and
    # `bench ia3` ran past the device call's 450 s in this one test, 2026-12-05)
    out = _run("bench", "all", "--no-compile", "--skip", "krona", "adapter", "decoder", "e2e", "--out",
               str(tmp_path / "out"), env_extra={"PYTHONPATH": str(hidden), "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "no plots" in out.stderr or "plots are not" in out.stderr, out.stderr[-2000:]
    assert {p.name.split("-")[0] for p in (tmp_path / "out").glob("*.json")} == {"lora", "ia3"}
    assert next((tmp_path / "out").glob("summary-*.md")).read_text().count("| lora |") == 1


@pytest.mark.parametrize("argv", BAD_ARGUMENTS, ids=lambda a: "-".join(a)[:40])
def test_bad_arguments_are_usage_errors(argv, usage_runs):
    out = usage_runs[argv]
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("case", list(BAD_TRACES))
def test_profile_cli_refuses_a_bad_trace_path_before_building_the_model(case, usage_runs):
    """`python -m peftkern profile --trace DIR` (or /dev/null) built the model, ran its warm-up steps and then ended in
    a traceback (IsADirectoryError / ValueError from peftkern.profile), after minutes of compiling with --compile on a
    GPU: a usage error now, before any work (a review, 2026-12-06)."""
    trace = BAD_TRACES[case][2]
    out = usage_runs[BAD_TRACES[case]]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "--trace" in out.stderr and trace in out.stderr, out.stderr[-2000:]
    assert out.stdout == "" and "no GPU: profiling" not in out.stderr, "the model was built before the check"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a forced backend that cannot run: the CPU's")
@pytest.mark.parametrize("forced", ["triton", "cuda", "bogus"])
def test_profile_cli_with_an_unusable_forced_backend_says_so(forced):
    """PEFTKERN_BACKEND=triton (or cuda, or a misspelling) on a machine without a GPU: `python -m peftkern profile`
    built the model and ended in a traceback from its first step, where `info` reports the forced backend's error and
    `bench` times each backend it names (a review, 2026-12-06). A usage error naming the backend now."""
    out = _run("profile", "--steps", "1", "--trace", "", env_extra={"PEFTKERN_BACKEND": forced,
                                                                   "TRITON_INTERPRET": "0"})
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert repr(forced) in out.stderr and out.stdout == "", out.stderr[-2000:]


def test_info_with_an_unusable_forced_backend_says_so():
    out = _run("info", env_extra={"PEFTKERN_BACKEND": "bogus"})
    assert out.returncode == 0 and "invalid" in out.stdout, out.stdout + out.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's timing label")
def test_cpu_results_say_they_are_wall_clock(tmp_path):
    out = _run("bench", "lora", "--no-compile", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(next(tmp_path.glob("lora-*.json")).read_text())
    assert data["config"]["timing"] == "wall clock on the CPU"
    assert all(r["extra"]["cuda_graph"] is False for r in data["rows"])


def test_profile_makes_the_traces_folder(tmp_path):
    trace = tmp_path / "new" / "folder" / "t.json"
    layer = peftkern.nn.LoRALinear(16, 16, r=2, device=DEVICE)
    with peftkern.profile(trace=str(trace)):
        layer(torch.randn(4, 16, device=DEVICE)).sum().backward()
    assert json.loads(trace.read_text())


def test_git_revision_marks_a_modified_tree(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import common

    monkeypatch.delenv("PEFTKERN_GIT_REV", raising=False)

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "r.json").write_text("{}\n")
    git("add", ".")
    git("commit", "-qm", "one")
    for cwd in (tmp_path, tmp_path / "benchmarks"):  # the default is benchmarks/: it looked at that folder only
        clean = common.git_revision(cwd)
        assert clean != "unknown" and not clean.endswith("-dirty")
        (tmp_path / "benchmarks" / "results" / "r.json").write_text('{"a": 1}\n')
        assert common.git_revision(cwd) == clean, "a result file is not a change of the code"
        (tmp_path / "a.py").write_text("x = 2\n")
        assert common.git_revision(cwd) == clean + "-dirty"
        git("checkout", "-q", ".")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU version of bench e2e")
def test_cpu_e2e_with_compile_flags_times_the_eager_rows(tmp_path):
    """The compiled rows are GPU-only: on the CPU --compiled-only left the floor alone in the JSON, silently."""
    out = _run("bench", "e2e", "--method", "lora", "--compiled-only", "--out", str(tmp_path))
    assert out.returncode == 0 and "ignored here" in out.stderr, out.stderr[-2000:]
    impls = {r["impl"] for r in json.loads(next(tmp_path.glob("e2e-*.json")).read_text())["rows"]}
    assert any(i.startswith("peftkern.fuse") for i in impls), impls


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU version of bench ia3")
def test_cpu_layer_bench_says_a_forced_backend_is_ignored(tmp_path):
    """The layer benchmarks' CPU versions run the reference whatever backend is forced: with PEFTKERN_BACKEND=triton
    their JSON recorded "triton" and --quick was dropped without a word (a documentation audit, 2026-12-07)."""
    out = _run("bench", "ia3", "--quick", "--out", str(tmp_path), env_extra={"PEFTKERN_BACKEND": "triton"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'triton' is ignored here" in out.stderr and "--quick applies on a GPU only" in out.stderr, out.stderr
    data = json.loads(next(tmp_path.glob("ia3-*.json")).read_text())
    assert data["environment"]["backend"] == "torch"
    assert all(r["impl"] != "peftkern triton" for r in data["rows"])
    # in one process (bench all), the benchmarks after a layer piece record the backend they obey
    common = _bench_module("common")
    peftkern.set_backend("triton")
    try:
        common.reference_rows_only("cpu", "ia3")
        assert common.environment("ia3")["backend"] == "torch"
        assert common.environment("decoder")["backend"] == "triton"
    finally:
        peftkern.set_backend(None)
        common._REFERENCE_ONLY.discard("ia3")


def test_bench_adapter_e2e_passes_its_options_on(monkeypatch):
    """`bench adapter --e2e --quick` ran bench e2e's full step count: --quick was dropped on the way."""
    bench_adapter, bench_e2e = _bench_module("bench_adapter"), _bench_module("bench_e2e")

    seen = []
    monkeypatch.setattr(bench_e2e, "main", lambda argv: seen.append(argv) or [])
    bench_adapter.main(["--e2e", "--quick", "--batch", "2", "--seq", "64", "--out", "somewhere"])
    bench_adapter.main(["--e2e"])
    assert seen[0] == ["--method", "adapter", "--batch", "2", "--seq", "64", "--quick", "--out", "somewhere"], seen
    assert "--quick" not in seen[1], seen


def _bench_module(name):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    return __import__(name)


@pytest.mark.parametrize("terms,rank", [(1, None), (4, None), (3, 2)])
def test_krona_eager_anchor_is_the_op(terms, rank):
    """The eager reshape identity, now term by term (its broadcast product over the terms copied B_t per token),
    computes the op: float64 outputs and gradients against reference.py."""
    from peftkern import reference

    bench_krona = _bench_module("bench_krona")
    g = torch.Generator().manual_seed(run_seed())
    A, B = bench_krona.make_factors(12, 15, terms, (3, 4), rank, torch.float64, "cpu", g)
    x = torch.randn(7, 12, dtype=torch.float64, generator=g, requires_grad=True)
    W, dy = torch.randn(15, 12, dtype=torch.float64, generator=g), torch.randn(7, 15, dtype=torch.float64, generator=g)
    leaves = [x, A, *(B if isinstance(B, tuple) else (B,))]
    got = torch.autograd.grad(bench_krona.eager_identity(x, W, A, B, 0.7), leaves, dy)
    b, b2 = B if isinstance(B, tuple) else (B, None)
    want = torch.autograd.grad(reference.krona_linear(x, W, A, None, b, b2, 0.7), leaves, dy)
    for i, (a, e) in enumerate(zip(got, want)):
        assert torch.allclose(a, e, rtol=1e-10, atol=1e-10), i


def test_layer_rows_carry_a_ratio_range_and_stop_without_a_floor():
    common = _bench_module("common")
    x = torch.randn(64, 32, requires_grad=True)
    dy = torch.randn(64, 32)

    def broken(_):
        raise RuntimeError("no floor today")

    rows = common.time_layer_impls("t", "case", {"floor": (lambda t: t * 2.0, []), "op": (lambda t: t.sin(), [])},
                                   x, dy, passes=("fwd+bwd",))
    assert [r.impl for r in rows] == ["floor", "op"]
    for r in rows:
        lo, hi = r.extra["ratio_range"]
        assert lo <= r.ratio <= hi, (lo, r.ratio, hi)
    rows = common.time_layer_impls("t", "case", {"floor": (broken, []), "op": (lambda t: t.sin(), [])}, x, dy,
                                   passes=("fwd+bwd",))
    assert rows == [], "without its floor a case has no ratios (the next row became the floor, at 1.00x)"


def test_compiled_e2e_rows_are_taken_against_the_compiled_frozen_model(monkeypatch):
    """The JSON's ratio of a compiled row was over the eager frozen model's step: a compiled fused model read 0.81x,
    faster than the frozen model, where it was 1.07x the compiled frozen one."""
    import argparse

    bench_e2e = _bench_module("bench_e2e")
    times = {("none", "frozen", False): 70.0, ("none", "frozen-norm", False): 68.0, ("none", "frozen", True): 50.0,
             ("lora", "fused", True): 55.0}
    order = list(times)
    calls = iter(order)
    monkeypatch.setattr(bench_e2e.workloads, "variants",
                        lambda methods, compile_anchors: [(m, i, False, c) for m, i, c in order])
    monkeypatch.setattr(bench_e2e.workloads, "build", lambda *a, **k: object())
    monkeypatch.setattr(bench_e2e.workloads, "training_step", lambda *a, **k: (lambda: None))
    monkeypatch.setattr(bench_e2e, "time_training", lambda *a, **k: (times[next(calls)], 0.1, 100.0, {}))
    args = argparse.Namespace(checkpointing_only=False, checkpointing=False, compiled_only=False, compile=True,
                              compile_mode=None, quick=True, rank=8, optimizer="adamw")
    rows = {(r.extra["compiled"], r.impl): r for r in bench_e2e.run_case("tiny", 2, 64, ["lora"], args, "cpu",
                                                                           torch.float32)}
    fused = next(r for (compiled, impl), r in rows.items() if compiled and "fuse" in impl)
    assert abs(fused.ratio - 55.0 / 50.0) < 1e-12 and fused.extra["floor"] == "compiled frozen model"
    assert abs(fused.extra["ratio_to_eager_floor"] - 55.0 / 70.0) < 1e-12
    norm = next(r for (compiled, impl), r in rows.items() if "embedding frozen" in impl)
    assert abs(norm.ratio - 68.0 / 70.0) < 1e-12
    # the eager floor fails (out of memory, say): no row is taken against another one instead
    calls = iter(order)

    def failing(*a, **k):
        if next(calls) == order[0]:
            raise RuntimeError("out of memory")
        return 60.0, 0.1, 100.0, {}

    monkeypatch.setattr(bench_e2e, "time_training", failing)
    assert bench_e2e.run_case("tiny", 2, 64, ["lora"], args, "cpu", torch.float32) == []


def test_kernel_names_are_classified():
    """The CUDA extension's kernels carry their namespace after a return type, and CUTLASS / cuDNN attention kernels
    are not the frozen layers' GEMMs (both were misfiled by name)."""
    from peftkern.profiling import classify

    peftkern_ = "peftkern kernels"
    assert classify("void peftkern::(anonymous namespace)::lora_down_kernel<__nv_bfloat16, 64>(...)") == peftkern_
    assert classify("lora_forward_persistent_kernel") == peftkern_ and classify("row_stats_kernel") == peftkern_
    assert classify("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN") == "other GEMMs (outside peftkern ops)"
    assert classify("fmha_cutlassF_bf16_aligned_64x128_rf_sm80") == "everything else"
    assert classify("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3") == "everything else"
    for template in ("triton_tem_fused_mm_0", "triton_tem_fused_addmm_t_1", "triton_tem_fused__unsafe_view_mm_2"):
        assert classify(template) == "other GEMMs (outside peftkern ops)", template  # inductor's GEMM templates
    assert classify("triton_poi_fused_add_0") == "everything else"


@pytest.mark.parametrize("spec", ["abc", "0,64,64", "64,64,64,0", "64,64,64,1,7,7", "64,64,64,1,8,8,0"])
def test_bench_krona_refuses_a_bad_case_with_a_usage_error(spec):
    """A letter, a zero or a factor that does not divide gave a traceback (ValueError, ZeroDivisionError) or a run of
    0 tokens with ratios of 8-14x (a review, 2026-12-05)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_krona

    with pytest.raises(SystemExit, match="--shapes"):
        bench_krona.parse_case(spec)
    assert bench_krona.parse_case("64,64,64,2,8,8,4") == (64, 64, 64, 2, (8, 8), 4)


@pytest.mark.parametrize("argv", ZERO_ARGUMENTS, ids=lambda a: "-".join(a[1:]))
def test_bench_refuses_a_zero_with_a_usage_error(argv, usage_runs):
    """--seq 0 divided by zero, --tokens 0 and --batch 0 became batch 1, --rank 0 ran and failed every adapter row
    with rc 0, and a reduction leaving no bottleneck ran a case without one (a review, 2026-12-05)."""
    out = usage_runs[argv]
    assert out.returncode != 0 and ("positive integer" in out.stderr or "no bottleneck" in out.stderr), out.stderr


def test_cli_bench_exits_1_when_a_peftkern_row_fails(tmp_path, monkeypatch, capsys):
    """An anchor that cannot run is skipped; peftkern's own row failing made the tables silently shorter and the
    CLI exit 0 (a review, 2026-12-05). In-process, with peftkern.lora_linear broken."""
    from peftkern import cli

    def broken(*args, **kwargs):
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(peftkern, "lora_linear", broken)
    shapes = ("--shapes", "256,256,256,8", "--no-compile") if torch.cuda.is_available() else ()
    assert cli.main(["bench", "lora", *shapes, "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "of peftkern's rows or floors failed" in err and "broken on purpose" in err
    monkeypatch.undo()
    assert cli.main(["bench", "lora", *shapes, "--out", str(tmp_path)]) == 0, "the list starts empty each run"


def test_profile_checks_its_trace_path_before_the_block(tmp_path):
    """A pathlib.Path trace is taken (the exporter failed on it after the block, and the earlier trace was gone);
    a folder path with a trailing separator, or one under a regular file, is refused before the block runs (found
    after it; a review, 2026-12-05)."""
    trace = tmp_path / "p.json"
    with peftkern.profile(trace=trace) as prof:
        torch.randn(8, 8) @ torch.randn(8, 8)
    assert json.loads(trace.read_text()) and prof.trace == str(trace)
    (tmp_path / "afile").write_text("x")
    ran = []
    for bad in (str(tmp_path / "newdir") + os.sep, str(tmp_path / "afile" / "x.json")):
        with pytest.raises(OSError):
            with peftkern.profile(trace=bad):
                ran.append(bad)
    assert not ran, "refused before the block runs"


@pytest.mark.parametrize("exit_raises", [False, True], ids=["exit-returns", "exit-raises"])
def test_profile_refuses_another_profiler_session(monkeypatch, exit_raises):
    """torch runs one profiler session at a time: a profile inside another, or another inside it, reported an empty
    split (0.000 ms) with only a C++ warning (a review, 2026-12-05); now each raises. With CUDA activities torch's
    exit of the ended session raised "Can't disable Kineto profiler when it's not running" over peftkern's message
    (torch 2.11, the H100 run of 2026-12-05): exit_raises makes the CPU's exit do the same."""
    if exit_raises:
        real_exit = torch.profiler.profile.__exit__

        def exit_as_with_cuda(self, *exc):
            if not torch._C._autograd._profiler_enabled():
                raise RuntimeError("Can't disable Kineto profiler when it's not running")
            return real_exit(self, *exc)

        monkeypatch.setattr(torch.profiler.profile, "__exit__", exit_as_with_cuda)
    with torch.profiler.profile():
        with pytest.raises(RuntimeError, match="another torch.profiler session"):
            with peftkern.profile():
                pass
    with pytest.raises(RuntimeError, match="ended this one's"):
        with peftkern.profile():
            with torch.profiler.profile():
                torch.randn(8, 8) @ torch.randn(8, 8)
    monkeypatch.undo()
    with peftkern.profile() as prof:  # and a profile after them works
        torch.randn(64, 64) @ torch.randn(64, 64)
    assert sum(prof.split.values()) > 0


@pytest.mark.parametrize("config", [{"model_type": "t5", "d_model": 64, "num_layers": 1, "num_heads": 2},
                                    {"hidden_size": 64}])
def test_info_reports_a_model_it_cannot_count(tmp_path, config):
    """A config transformers builds no causal LM from (T5), or one without a model_type, gave a traceback and no
    report at all, --json included (a review, 2026-12-05): the counts carry the error and the rest is printed."""
    pytest.importorskip("transformers")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    out = _run("info", "--json", "--model", str(path))
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(out.stdout)
    assert "error" in data["trainable_parameters"] and data["backends"]


def test_compiled_checkpointed_training_step_has_no_graph_break(monkeypatch):
    """The compiled + checkpointed rows of bench e2e: with transformers 5.25 the KV cache's warning and the output
    capturing's side effects inside each checkpointed layer broke the graph around every decoder layer, so those rows
    ran the layers eagerly (a review of the workloads, 2026-12-05: 5-6 breaks). torch.compile runs with the eager
    backend here (the graph, not inductor's code, is the point)."""
    pytest.importorskip("peft")
    from torch._dynamo.utils import counters

    from peftkern import workloads

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None, **kw: compile_(model, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    model = workloads.build("lora", "fused", "tiny", DEVICE, torch.float32, 4, False, max_positions=32)
    step = workloads.training_step(model, 2, 16, DEVICE, compile_=True, checkpointing=True)
    step()
    step()
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert not torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint, "set for the step's calls only"
    torch._dynamo.reset()


def test_a_fused_workload_that_falls_back_is_refused():
    """A fused model that ran PEFT's path (a hook registered for every module, here) was timed as peftkern's row:
    nothing read the fuse report's fallbacks (a review of the workloads, 2026-12-05)."""
    pytest.importorskip("peft")
    from peftkern import workloads

    model = workloads.build("lora", "fused", "tiny", DEVICE, torch.float32, 4, False, max_positions=32)
    step = workloads.training_step(model, 2, 16, DEVICE)
    step()
    workloads.check_fused(model)  # fused throughout: nothing to say
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        step()
    finally:
        handle.remove()
    with pytest.raises(RuntimeError, match="fell back"):
        workloads.check_fused(model)


@pytest.mark.parametrize("features", [9, 2025, 64])
def test_bench_krona_peft_anchor_has_a_dense_w2(features):
    """The LoKr anchor's rank makes PEFT's w2 dense, as the case's label and the peftkern row's B are: for an odd
    factor size it was low-rank (2025 -> w2 45x22 @ 22x45; a review of the workloads, 2026-12-05)."""
    pytest.importorskip("peft")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_krona

    W = torch.randn(features, features)
    layer, _ = bench_krona._peft_lokr(W, features, features, None, False)
    names = {n.split(".")[0] for n, _ in layer.named_parameters()}
    assert "lokr_w2" in names and "lokr_w2_a" not in names, names


def test_bench_decoder_refuses_a_fused_row_that_fell_back(tmp_path, capsys):
    """bench decoder timed a fused layer whose calls ran PEFT's path (a hook registered for every module, here) under
    peftkern's name; it drops the row and the CLI exits 1 (a review of the workloads, 2026-12-05)."""
    pytest.importorskip("peft")
    from peftkern import cli

    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        status = cli.main(["bench", "decoder", "--method", "lora", "--no-compile", "--tokens", "256", "--out",
                           str(tmp_path)])
    finally:
        handle.remove()
    assert status == 1 and "fell back to PEFT's path" in capsys.readouterr().err
    rows = json.loads(next(tmp_path.glob("decoder-*.json")).read_text())["rows"]
    assert rows and not any(r["impl"].startswith("peftkern.fuse") for r in rows)


# The benchmark reports as a user comparing runs reads them (a review of the benchmark tooling, 2026-12-05); each
# test failed before its fix.


def _result(rows, benchmark="lora", config=None, **env):
    """A saved benchmark result with these (case, impl, pass, ratio[, peak_mb]) rows."""
    out = []
    for case, impl, pass_, ratio, *peak in rows:
        out.append({"method": benchmark, "case": case, "impl": impl, "pass": pass_, "ms": ratio, "spread_ms": 0.0,
                    "ratio": ratio, "peak_mb": peak[0] if peak else None, "extra": {}})
    environment = {"gpu": "GPU", "torch": "2", "git": "abc", **env}
    return {"benchmark": benchmark, "environment": environment, "config": config or {"timing": "t"}, "rows": out}


def test_compare_lists_the_rows_of_one_run_only():
    """A row in one run only (a peftkern row that failed in B, a case only one run had) vanished from the comparison
    without a word: 26 of the 66 rows of bench-all-h200-218c97b/lora-...121331.json against lora-...134736.json."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    a = _result([("M=16", "floor", "fwd", 1.0), ("M=16", "peftkern triton", "fwd", 1.1), ("M=8", "floor", "fwd", 1.0)])
    b = _result([("M=16", "floor", "fwd", 1.0), ("M=32", "floor", "fwd", 1.0)])
    out = report.compare(a, b)
    assert "+0.0%" in out
    assert "only in A" in out and "M=16 | peftkern triton | fwd" in out and "M=8 | floor | fwd" in out, out
    assert "only in B" in out and "M=32 | floor | fwd" in out, out


def test_compare_does_not_pair_rows_a_run_holds_twice():
    """A key held by two rows of one run (--shapes given twice) paired every B row with A's last one."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    a = _result([("M=16", "peftkern triton", "fwd", 1.1), ("M=16", "peftkern triton", "fwd", 2.2)])
    b = _result([("M=16", "peftkern triton", "fwd", 1.1)])
    out = report.compare(a, b)
    assert "-50.0%" not in out and "several rows" in out, out


def test_compare_marks_e2e_rows_of_another_rank_not_comparable():
    """bench e2e's --rank is in neither the case, the implementation nor the basis: a rank-16 run against a rank-64
    run gave a change for every adapter row."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    rows = [("llama-1b 4x2048", "frozen model (floor)", "train step", 1.0),
            ("llama-1b 4x2048", "PEFT lora (bf16 adapters)", "train step", 1.2)]
    a = _result(rows, "e2e", {"timing": "t", "rank": 16})
    b = _result(rows, "e2e", {"timing": "t", "rank": 64})
    for data in (a, b):
        data["rows"][0]["method"] = "none"
    out = report.compare(a, b)
    assert "not comparable: rank 16 / 64" in out, out
    assert "| frozen model (floor) | train step | 1 | 1 | 1.00x | 1.00x | +0.0% |" in out, out


def test_table_gives_each_pass_its_peak_memory():
    """bench e2e --checkpointing: the table's one peak column held the first pass's peak beside the last pass's
    tokens/s, and the checkpointed rows' peaks (about half) were in no column."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    data = _result([("c", "frozen", "train step", 1.0, 8579.0), ("c", "frozen", "train step +ckpt", 1.0, 4702.0)],
                   "e2e")
    out = report.table(data)
    assert "peak MiB (train step)" in out and "peak MiB (train step +ckpt)" in out, out
    assert "| 8579 | 4702 |" in out, out


def test_reports_refuse_a_json_that_is_no_benchmark_result(tmp_path):
    """benchmarks/results/distributed/*.json (no rows) and a non-JSON file gave tracebacks."""
    (tmp_path / "ddp.json").write_text(json.dumps({"mode": "ddp"}))
    (tmp_path / "notes.json").write_text("# not json")
    for name in ("ddp.json", "notes.json"):
        out = _run("bench", "--compare", str(tmp_path / name), str(tmp_path / name))
        assert out.returncode == 1 and "Traceback" not in out.stderr and "not a benchmark result" in out.stderr, \
            out.stderr[-2000:]


def test_environment_records_the_settings_that_change_timings(monkeypatch):
    """CUDA_LAUNCH_BLOCKING (every launch synchronises: the host-bound steps), NVIDIA_TF32_OVERRIDE, inductor's and
    Triton's switches and the CPU thread counts change the numbers and were not saved."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import common

    for name in ("CUDA_LAUNCH_BLOCKING", "NVIDIA_TF32_OVERRIDE", "TORCHINDUCTOR_MAX_AUTOTUNE", "TRITON_F32_DEFAULT",
                 "OMP_NUM_THREADS"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("TORCH_HUB_TOKEN", "secret")
    settings = common.environment()["settings"]
    assert {"CUDA_LAUNCH_BLOCKING", "NVIDIA_TF32_OVERRIDE", "TORCHINDUCTOR_MAX_AUTOTUNE", "TRITON_F32_DEFAULT",
            "OMP_NUM_THREADS"} <= set(settings), settings
    assert "TORCH_HUB_TOKEN" not in settings


def test_bench_decoder_times_a_float32_model_once_per_implementation(tmp_path):
    """In a float32 model PEFT's default fp32 adapters are the model's own: the CPU run timed the same layer twice
    under two labels (7.4 and 10.6 ms), and read as a cost of fp32 adapters. A bf16 model (the GPU run) keeps them,
    once per implementation and pass."""
    pytest.importorskip("peft")
    from peftkern import cli

    assert cli.main(["bench", "decoder", "--method", "lora", "--no-compile", "--tokens", "64", "--out",
                     str(tmp_path)]) == 0
    result = json.loads(next(tmp_path.glob("decoder-*.json")).read_text())
    rows = result["rows"]
    keys = [(r["case"], r["impl"], r["pass"]) for r in rows]
    assert rows and len(keys) == len(set(keys)), keys
    fp32_rows = [r["impl"] for r in rows if "fp32 adapters" in r["impl"]]
    if result["config"]["dtype"] == "torch.float32":
        assert not fp32_rows, fp32_rows
    else:  # a bf16 model (on a GPU): PEFT's default fp32 adapters are rows of their own
        assert fp32_rows, [r["impl"] for r in rows]


def test_the_floor_is_timed_again_after_the_case_and_widens_the_ratio_range(monkeypatch, capsys):
    """The floor was timed once, before a case's other rows, and every ratio divided by it: a drift of the machine
    while the case ran went unseen (last session's "left alone" list). Its second timing is recorded beside each row,
    the ratio_range covers both, and a drift over 2% is printed."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import common

    floor_times = iter([[1.0, 1.0, 1.0], [1.1, 1.1, 1.1]])

    def fake_time_fn(step, dev, cuda_graph=True, info=None):
        batches = next(floor_times) if step.__defaults__[0] is floor else [1.2, 1.2, 1.2]
        info.update(cuda_graph=False, batches_ms=batches)
        return batches[1], 0.0

    def floor(x):
        return x * 2

    monkeypatch.setattr(common, "time_fn", fake_time_fn)
    monkeypatch.setattr(common, "peak_memory_mb", lambda step, dev: None)
    x = torch.randn(4, 3, requires_grad=True)
    rows = common.time_layer_impls("m", "c", {"floor": (floor, []), "ours": (lambda x: x * 3, [])}, x,
                                   torch.ones(4, 3), passes=("fwd",))
    ours = next(r for r in rows if r.impl == "ours")
    assert ours.ratio == pytest.approx(1.2) and ours.extra["floor_ms"] == 1.0
    assert ours.extra["floor_ms_after"] == 1.1
    assert ours.extra["ratio_range"] == pytest.approx([1.2 / 1.1, 1.2 / 1.0]), ours.extra
    assert "the floor (fwd) timed +10.0% after the case's rows" in capsys.readouterr().err


def test_explore_dyb_db_configs_match_float64():
    """Each config scripts/explore_lora_dyb_db.py times for peftkern's dyb_db (dyb = dy B and dB = s dy^T xa from one
    read of dy) against float64 at ragged shapes: in Triton's interpreter on a CPU, compiled on a GPU."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import explore_lora_dyb_db

    # float32 in the interpreter; float16 on a GPU, where dyb comes out rounded to it
    assert explore_lora_dyb_db.check(DEVICE) < (1e-5 if torch.device(DEVICE).type == "cpu" else 2e-3)


def test_explore_dyb_db_configs_fit_an_sm90_sm():
    """Every dyb_db config the experiment times, compiled for sm_90a without a GPU: within an SM's shared memory, no
    spills, and none with compile_report's MMA-operand hazard (one dy tile feeds two MMAs there)."""
    root, env = _sm90_compile_env()
    run = subprocess.run([sys.executable, str(root / "scripts" / "explore_lora_dyb_db.py"), "--compile"], cwd=root,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("'hazards': []") == run.stdout.count("{'shared'") > 0, run.stdout


def test_tables_show_peak_memory_as_finely_as_the_json_holds_it(capsys):
    """Issue 2 reads the fused op's fwd+bwd peak against the Unsloth-style path's at a quarter of a MiB (128.75 against
    130.0 MB, 32.375 against 33.875). Both tables printed peaks as whole MiB: 128.75 and 129.0 read "129" alike, an
    M = 16 case's 0.03 and 0.5 MiB "0" and "1" (a review of the benchmark harness, 2026-12-06)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import common
    import report

    data = _result([("c", "unsloth-style eager", "fwd+bwd", 1.2, 128.75), ("c", "peftkern triton", "fwd+bwd", 1.1,
                                                                            129.0)])
    table = report.table(data)
    assert "| 128.75 |" in table and "| 129 |" in table, table
    rows = [common.Row("lora", "c", impl, "fwd+bwd", 1.0, 0.0, 1.0, peak, {}) for impl, peak in
            (("unsloth-style eager", 128.75), ("peftkern triton", 129.0), ("floor", 0.03125))]
    common.print_table(rows)
    printed = capsys.readouterr().out
    assert "128.75 |" in printed and "  129 |" in printed and "0.03125 |" in printed, printed


def test_printed_table_keeps_long_names_in_line_and_marks_eager_rows(capsys):
    """bench e2e's "train step +ckpt" and its compiled rows' names ran past the printed table's 8- and 26-wide pass and
    impl columns, out of line; a row timed as eager calls beside graph replays was not marked on stdout (a review of
    the benchmarks, 2026-12-07)."""
    common = _bench_module("common")
    rows = [common.Row("lora", "c", impl, pass_, 1.0, 0.0, 1.0, None, {"cuda_graph": graph}) for impl, pass_, graph in
            (("floor", "fwd", True), ("peftkern.fuse(PEFT lora) (bf16 adapters) + torch.compile", "train step +ckpt",
                                      False))]
    common.print_table(rows)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert len({line.index("|", 40) for line in lines}) == 1 and len({line.rindex("x |") for line in lines[2:]}) == 1
    assert lines[-1].endswith("eager calls, not graph replays") and not lines[-2].endswith("replays"), lines


def test_time_fn_times_every_batch_one_way(monkeypatch):
    """A CUDA-graph capture that failed after an earlier batch's succeeded left one row's batches part replays, part
    eager calls (a review of the benchmarks, 2026-12-07): every batch is eager calls then."""
    import triton.testing as tt

    common = _bench_module("common")
    graph_calls = []

    def graph_bench(fn, rep, return_mode):
        graph_calls.append(1)
        if len(graph_calls) > 1:
            raise RuntimeError("capture failed")
        return 1.0

    monkeypatch.setattr(tt, "do_bench_cudagraph", graph_bench)
    monkeypatch.setattr(tt, "do_bench", lambda fn, warmup, rep, return_mode: 5.0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    info = {}
    common.time_fn(lambda: None, torch.device("cuda"), info=info)
    assert info["cuda_graph"] is False and info["batches_ms"] == [5.0, 5.0, 5.0], info


def test_lokr_workload_at_rank_one_has_a_rank(tmp_path):
    """bench e2e --rank 1 (any positive --rank is accepted): LoKr's r is half the rank, 0 here, and PEFT refused every
    LoKr layer, so each LoKr row failed (`bench e2e --method lokr --rank 1` exited 1 with the floors alone)."""
    pytest.importorskip("peft")
    from peftkern import workloads

    assert workloads.peft_config("lokr", 1).r == 1
    model = workloads.build("lokr", "fused", "tiny", DEVICE, torch.float32, 1, False, max_positions=32)
    assert any(p.requires_grad for p in model.parameters())


def test_compiled_e2e_rows_each_compile_their_own_static_graphs(monkeypatch):
    """bench e2e's compiled rows shared dynamo's cache across rows and cases (`--seq 1024 2048 4096 --compile`): from
    the second sequence length on, every compiled row (the compiled frozen floor too) ran a dynamic-shape graph, as
    automatic dynamic shapes made it after seeing another length, where a training run at one length compiles static
    shapes; and past dynamo's recompile limit (8) a frame ran eagerly under the compiled label, with no graph break to
    say so (the fused row at the third length with --checkpointing; a review, 2026-12-06). Here inductor is replaced by
    a backend that records whether each graph it is given has symbolic shapes."""
    import argparse

    pytest.importorskip("peft")
    bench_e2e = _bench_module("bench_e2e")
    graphs: list = []

    def recording(gm, example_inputs):
        graphs.append(any(isinstance(a, torch.SymInt) or isinstance(a, torch.Tensor) and
                          any(isinstance(s, torch.SymInt) for s in a.shape) for a in example_inputs))
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: real_compile(model, backend=recording))
    order = [("none", "frozen", False, False), ("none", "frozen", False, True), ("lora", "fused", False, True)]
    monkeypatch.setattr(bench_e2e.workloads, "variants", lambda methods, compile_anchors: list(order))
    compiled_rows = []
    real_time_training = bench_e2e.time_training

    def timed(step, steps, warmup, device, compiled=False):
        before = len(graphs)
        out = real_time_training(step, steps, warmup, device, compiled)
        if compiled:
            compiled_rows.append(graphs[before:])
        return out

    monkeypatch.setattr(bench_e2e, "time_training", timed)
    args = argparse.Namespace(checkpointing_only=False, checkpointing=False, compiled_only=False, compile=True,
                              compile_mode=None, quick=True, rank=8, optimizer="adamw")
    torch._dynamo.reset()
    try:
        for seq in (32, 64):
            rows = bench_e2e.run_case("tiny", 2, seq, ["lora"], args, "cpu", torch.float32)
            assert len(rows) == 3, [r.impl for r in rows]
    finally:
        torch._dynamo.reset()
    assert len(compiled_rows) == 4 and all(compiled_rows), compiled_rows
    assert not any(any(row) for row in compiled_rows), f"dynamic-shape graphs (True) per compiled row: {compiled_rows}"


@pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="needs a GPU or the Triton interpreter")
def test_krona_ingemm_prototype_matches_reference():
    """scripts/explore_krona_ingemm.py's prototypes (KronA's term accumulated inside the frozen GEMM's K loop, V B^T or
    U B in the epilogue; not wired into the op), the forward and the backward's dx, against reference.py in float64 at
    a ragged M, several column tiles, a masked row of A and a bias: what the script times on a GPU must be the op's
    answer. fp32 on the interpreter (no rounding of V or U)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import explore_krona_ingemm as ig

    from peftkern import reference

    g = torch.Generator().manual_seed(run_seed(7))
    # n1 = 5 beside C = 2: the last column tile's second row of A lies past n1 (masked)
    # (k1 = 3 beside C = 2: dx's last column tile has a masked column of A as well)
    for M, (n1, k1), (n2, k2), c in ((37, (4, 3), (16, 16), 2), (20, (5, 2), (16, 32), 2), (9, (3, 4), (32, 16), 1)):
        x, w = torch.randn(M, k1 * k2, generator=g), torch.randn(n1 * n2, k1 * k2, generator=g)
        a, b = torch.randn(n1, k1, generator=g), torch.randn(n2, k2, generator=g)
        bias = torch.randn(n1 * n2, generator=g)
        x, w, a, b, bias = (t.to(DEVICE) for t in (x, w, a, b, bias))
        ref = reference.krona_forward(x.double(), w.double(), a.double()[None], None, b.double()[None], None, 0.7,
                                      bias.double())
        dy = torch.randn(M, n1 * n2, generator=g).to(DEVICE)
        needs = (True,) + (False,) * 6
        ref_dx = reference.krona_backward(dy.double(), x.double(), w.double(), a.double()[None], None,
                                          b.double()[None], None, 0.7, needs)[0]
        for twice in (True, False):  # x's tile loaded again for the CUDA-core sum, or shared with the MMA
            y = ig.ingemm_forward(x, w, a, b, 0.7, bias, block_m=16, c=c, num_warps=4, num_stages=1, x_twice=twice)
            err = ((y.double() - ref).norm() / ref.norm()).item()
            assert err < 1e-5, f"A {n1}x{k1}, B {n2}x{k2}, C {c}, x twice {twice}: relative error {err:.2e}"
            dx = ig.ingemm_dx(dy, w, a, b, 0.7, block_m=16, c=c, num_warps=4, num_stages=1, x_twice=twice)
            err = ((dx.double() - ref_dx).norm() / ref_dx.norm()).item()
            assert err < 1e-5, f"dx: A {n1}x{k1}, B {n2}x{k2}, C {c}, x twice {twice}: relative error {err:.2e}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="measures CUDA memory")
@pytest.mark.parametrize("leftover", ["garbage", "record-stream"])
def test_peak_memory_counts_what_the_call_allocates_whatever_was_freed_inside_it(leftover):
    """benchmarks/common.peak_memory_mb, which bench lora and the LoRA peak test measure by: a 64 MB block counted in
    its baseline and freed inside the measured call lowered the peak by 64 MB (on an H200, 2026-12-06, the
    Unsloth-style path read 64.5 MB instead of 128.75 in a whole-file run). Here the block is a tensor in a reference
    cycle that the call's own collection frees, or one used on a side stream (record_stream) whose block the call's
    first allocation frees; the call allocates 32 MB."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gc

    import common

    dev = torch.device("cuda")
    if leftover == "garbage":
        cycle = [torch.empty(2**25, dtype=torch.bfloat16, device=dev)]
        cycle.append(cycle)
        del cycle
    else:
        side = torch.cuda.Stream(dev)
        with torch.cuda.stream(side):
            block = torch.empty(2**25, dtype=torch.bfloat16, device=dev)
        block.record_stream(torch.cuda.current_stream(dev))
        del block

    def call():
        gc.collect()  # what a collection triggered by the call's own Python objects would do
        out = torch.empty(2**24, dtype=torch.bfloat16, device=dev)
        out += 1
        return out

    assert common.peak_memory_mb(call, dev) == pytest.approx(32.0, abs=0.5)


def test_a_bench_run_cut_short_leaves_the_cases_it_finished(tmp_path, monkeypatch):
    """Each bench writes a .partial.json after every case, so a run stopped by a time limit (a device step's) keeps the
    rows it had; a run that ends replaces it with the usual JSON. Here the second of three cases is interrupted."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_lora
    import report

    cases = ["64,64,48,8", "64,48,64,8", "32,64,64,8"]
    real = bench_lora.bench_case
    calls = []

    def cut_at_second(M, K, N, r, *args, **kwargs):
        calls.append((M, K, N, r))
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a timeout's signal does to the run, as far as the files go
        return real(M, K, N, r, *args, **kwargs)

    monkeypatch.setattr(bench_lora, "bench_case", cut_at_second)
    with pytest.raises(KeyboardInterrupt):
        bench_lora.main(["--shapes", *cases, "--no-compile", "--eager", "--out", str(tmp_path)])
    files = list(tmp_path.glob("lora-*"))
    assert len(files) == 1 and files[0].name.endswith(".partial.json"), files
    data = json.loads(files[0].read_text())
    assert data["complete"] is False
    assert {r["case"] for r in data["rows"]} == {"M=64 K=64 N=48 r=8"}
    assert any(r["impl"].startswith("floor") for r in data["rows"])
    assert data["environment"]["torch"] == torch.__version__
    assert "cut short" in report.table(data)

    monkeypatch.setattr(bench_lora, "bench_case", real)
    files[0].unlink()
    bench_lora.main(["--shapes", *cases[:2], "--no-compile", "--eager", "--out", str(tmp_path)])
    files = list(tmp_path.glob("lora-*"))
    assert len(files) == 1 and not files[0].name.endswith(".partial.json"), files
    data = json.loads(files[0].read_text())
    assert "complete" not in data and len({r["case"] for r in data["rows"]}) == 2
    assert "cut short" not in report.table(data)


@pytest.mark.skipif(HAS_CUDA, reason="the refusal is the CPU's path; on a GPU the script is the GPU run itself")
def test_gpu_check_refuses_a_machine_without_a_gpu(tmp_path):
    """gpu_check.sh on a CPU machine stops before installing (which would repoint the package) or writing CPU results
    where GPU ones are expected (an audit, 2026-12-08)."""
    env = {**os.environ, "OUT": str(tmp_path)}
    env.pop("PEFTKERN_ALLOW_CPU", None)
    script = str(ROOT / "scripts" / "gpu_check.sh")
    run = subprocess.run(["bash", script, "--tests", "none", "--bench", "lora"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "no CUDA GPU" in run.stderr and "PEFTKERN_ALLOW_CPU" in run.stderr
    assert not list(tmp_path.iterdir()), "wrote results"

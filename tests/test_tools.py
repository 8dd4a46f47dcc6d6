"""The user-facing tools: profiling, NVTX switch, `python -m peftkern info/bench`, benchmark reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEVICE

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
    assert not peftkern.ops._common._nvtx_enabled, "profile() switches NVTX back off"


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


def _run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "peftkern", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, **kw)


def test_cli_info_lists_backends_and_methods():
    out = _run("info", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["backends"]["torch"].startswith("available")
    assert "LoRALinear" in data["methods"]
    assert set(data["methods"]["LoRALinear"]) >= {"insertion_form", "integration_form", "workspace"}


def test_cli_bench_runs_and_saves_json(tmp_path):
    if torch.cuda.is_available():
        args = ("bench", "lora", "--shapes", "256,256,256,8", "--no-compile", "--out", str(tmp_path))
    else:
        args = ("bench", "lora", "--out", str(tmp_path))
    out = _run(*args)
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU version; on a GPU it is the real (long) benchmark")
def test_decoder_layer_benchmark_runs_every_method(tmp_path):
    """`bench decoder` (one Llama decoder layer, frozen vs PEFT vs fused) runs each method and saves its JSON."""
    pytest.importorskip("peft")
    out = _run("bench", "decoder", "--method", "all", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(next(tmp_path.glob("decoder-*.json")).read_text())
    cases = {r["case"] for r in data["rows"]}
    assert {c.split()[0] for c in cases} == {"lora", "ia3", "lokr"}
    for case in cases:
        impls = {r["impl"] for r in data["rows"] if r["case"] == case}
        assert "frozen layer (floor)" in impls and sum(i.startswith("peftkern.fuse") for i in impls) == 2
        assert "fuse left layers" not in out.stdout + out.stderr

"""Tables and plots from saved benchmark JSON, and the difference between two runs.

    python benchmarks/report.py table benchmarks/results/lora-*.json          # markdown, as in README.md
    python benchmarks/report.py plot benchmarks/results/lora-*.json --out benchmarks/results/plots
    python benchmarks/report.py compare A.json B.json                         # what changed between runs
(`python -m peftkern bench --compare A.json B.json` calls the last one.)
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path


def load(path) -> dict:
    if not Path(path).is_file():
        raise SystemExit(f"no such benchmark result: {path}")
    try:
        data = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SystemExit(f"{path}: not a benchmark result ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or "environment" not in data:
        raise SystemExit(f"{path}: not a benchmark result (no rows and environment; benchmarks/results/distributed/ "
                         "holds another format)")
    return data


def table(data: dict, passes=None) -> str:
    """One markdown row per (case, implementation): for each pass (those in the data: fwd and fwd+bwd for layers,
    train step for the training step) ms with the batches' spread, and the ratio to the floor with its range (the
    slowest batch over the floor's fastest, and the reverse; "~": within the spread of another row of the case;
    "eager": timed as eager calls where the run used CUDA-graph replays); for adapters also the ratio to the byte
    count at copy bandwidth; tokens/s of the last pass, peak memory."""
    env = data["environment"]
    passes = passes or list(dict.fromkeys(r["pass"] for r in data["rows"]))
    cases: dict = {}
    for r in data["rows"]:
        cases.setdefault(r["case"], {}).setdefault(r["impl"], {})[r["pass"]] = r
    by_bytes = any("ratio_to_bandwidth_floor" in r.get("extra", {}) for r in data["rows"])
    # a run stopped before its end leaves a .partial.json (common.PartialResults): its table says so
    cut = "; cut short: the cases finished before the run stopped" if data.get("complete") is False else ""
    head = f"{data['benchmark']} on {env.get('gpu') or 'CPU'} (torch {env['torch']}, triton {env.get('triton')}, " \
           f"git {env.get('git')}, timing: {data['config'].get('timing', 'see config')}{cut})\n\n"
    per_pass = ["ms", "ratio"] + (["ratio to bytes"] if by_bytes else [])
    cols = " | ".join(f"{p} {c}" for p in passes for c in per_pass)
    # a peak per pass that has one (bench e2e --checkpointing: the checkpointed step's peak is about half the other's)
    peak_passes = [p for p in passes if any(r["pass"] == p and r.get("peak_mb") is not None for r in data["rows"])]
    peak_cols = peak_passes or [None]
    peak_head = " | ".join("peak MiB" if p is None or len(passes) == 1 else f"peak MiB ({p})" for p in peak_cols)
    lines = [f"| case | implementation | {cols} | tokens/s ({passes[-1]}) | {peak_head} |",
             "|" + " --- |" * (3 + len(peak_cols) + len(per_pass) * len(passes))]
    graphs = any(r.get("extra", {}).get("cuda_graph") for r in data["rows"])
    for case, impls in cases.items():
        for impl, by_pass in impls.items():
            cells = []
            for p in passes:
                r = by_pass.get(p)
                cells += _cells(r, graphs, by_bytes) if r else ["-"] * len(per_pass)
            mems = [(by_pass.get(p) or {}).get("peak_mb") if p else None for p in peak_cols]
            last = by_pass.get(passes[-1]) or {}
            tps = last.get("extra", {}).get("tokens_per_s") or (
                _m_of(case) / last["ms"] * 1e3 if last and _m_of(case) else None)
            # six significant digits: whole MiB hid a peak 0.25 MiB over another (a review, 2026-12-06)
            peaks = " | ".join("-" if mem is None else f"{mem:.6g}" for mem in mems)
            lines.append(f"| {case} | {impl} | {' | '.join(cells)} | {'-' if tps is None else f'{tps:,.0f}'} | "
                         f"{peaks} |")
    return head + "\n".join(lines)


def _cells(r: dict, graphs: bool, by_bytes: bool) -> list:
    extra = r.get("extra", {})
    ms = f"{r['ms']:.4f}" + (f" ±{r['spread_ms'] / 2:.4f}" if r.get("spread_ms") else "")
    ratio = f"{r['ratio']:.3f}x"
    if extra.get("ratio_range"):
        lo, hi = extra["ratio_range"]
        ratio += f" ({lo:.3f}-{hi:.3f})"
    if extra.get("within_spread_of"):
        ratio += " ~"
    if graphs and extra.get("cuda_graph") is False:
        ratio += " eager"
    cells = [ms, ratio]
    if by_bytes:
        cells.append(f"{extra['ratio_to_bandwidth_floor']:.2f}x" if "ratio_to_bandwidth_floor" in extra else "-")
    return cells


def _m_of(case: str):
    found = re.search(r"M=(\d+)", case)
    return int(found.group(1)) if found else None


def can_plot() -> bool:
    """Whether matplotlib (the `bench` extra) is installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot(data: dict, out_dir: Path, prefix: str = "") -> list[Path]:
    """Ratio to the floor against M, one line per implementation, one figure per (shape without M, pass); cases
    without M (decoder layer, training step) as bar charts (plot_bars). prefix starts every file name (several
    runs of one benchmark plotted into one folder would otherwise overwrite each other's figures)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict = {}
    for r in data["rows"]:
        m = _m_of(r["case"])
        if m is None:
            continue
        shape = re.sub(r"M=\d+\s*", "", r["case"]).strip()
        groups.setdefault((shape, r["pass"]), {}).setdefault(r["impl"], []).append((m, r["ratio"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for (shape, pass_), impls in groups.items():
        if max(len(v) for v in impls.values()) < 2:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for impl, pts in sorted(impls.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("time / frozen floor")
        ax.set_title(f"{data['benchmark']} {shape} {pass_} ({data['environment'].get('gpu') or 'CPU'})", fontsize=9)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        name = prefix + re.sub(r"[^A-Za-z0-9]+", "_", f"{data['benchmark']}_{shape}_{pass_}").strip("_") + ".png"
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        paths.append(out_dir / name)
    return paths + plot_bars(data, out_dir, prefix)


def _bars(ax, labels, values, title, floor_label=None):
    colors = ["#888888" if lab == floor_label else "#1f77b4" if "peftkern" in lab else "#ff7f0e" for lab in labels]
    ypos = range(len(labels))
    ax.barh(list(ypos), values, color=colors)
    ax.set_yticks(list(ypos), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    for y, v in zip(ypos, values):
        ax.text(v, y, f" {v:,.2f}" if v < 100 else f" {v:,.0f}", va="center", fontsize=6)


def plot_bars(data: dict, out_dir: Path, prefix: str = "") -> list[Path]:
    """Cases without an M sweep (the decoder layer, the training step): one figure per (case, pass) with the
    ratio to the floor per implementation, and for the training step tokens/s and peak memory beside it.
    peftkern's rows are blue, the anchors orange, the floor grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict = {}
    for r in data["rows"]:
        if _m_of(r["case"]) is None:
            groups.setdefault((r["case"], r["pass"]), []).append(r)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    gpu = data["environment"].get("gpu") or "CPU"
    for (case, pass_), rows in groups.items():
        labels = [r["impl"] for r in rows]
        floor = next((r["impl"] for r in rows if abs(r["ratio"] - 1.0) < 1e-12), None)
        e2e = all("tokens_per_s" in r.get("extra", {}) for r in rows)
        panels = [("time / floor (lower is better)", [r["ratio"] for r in rows])]
        if e2e:
            panels = [("tokens/s (higher is better)", [r["extra"]["tokens_per_s"] for r in rows])]
            if all(r.get("peak_mb") for r in rows):
                panels.append(("peak memory, GiB", [r["peak_mb"] / 1024 for r in rows]))
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels) + 1.5, 0.32 * len(rows) + 1.4),
                                 squeeze=False)
        for ax, (title, values) in zip(axes[0], panels):
            _bars(ax, labels, values, title, floor)
        for ax in axes[0][1:]:
            ax.set_yticks([])
        fig.suptitle(f"{data['benchmark']} {case} {pass_} ({gpu})", fontsize=9)
        name = prefix + re.sub(r"[^A-Za-z0-9]+", "_", f"{data['benchmark']}_{case}_{pass_}").strip("_") + ".png"
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        paths.append(out_dir / name)
    return paths


def _basis(data: dict, row: dict) -> dict:
    """What a row's ratio is measured against and how: rows whose bases differ have ratios that cannot be compared
    (bench e2e divided its compiled rows by the eager floor before 2026-12-04, by the compiled frozen model since)."""
    config, extra = data.get("config") or {}, row.get("extra") or {}
    # the GPU too: a ratio's change from an H100 run to an H200 run is the hardware's as much as the code's
    env = data.get("environment") or {}
    basis = {"gpu": env.get("gpu") or env.get("cpu"), "timing": config.get("timing"), "dtype": config.get("dtype")}
    basis.update({k: extra.get(k) for k in ("floor", "adapter_dtype", "compiled", "checkpointing", "optimizer",
                                            "cuda_graph")})
    if data.get("benchmark") == "e2e":
        basis["floor"] = basis["floor"] or "frozen model (eager)"  # every row's, before the key was written
        # --rank is in neither the case nor the implementation's name (the frozen rows have no adapters to rank)
        basis["rank"] = config.get("rank") if row.get("method") != "none" else None
        if basis["timing"] == "eager steps between CUDA events":  # renamed when compiled steps came, same method
            basis["timing"] = "steps between CUDA events"
    return basis


def _bases_differ(a: dict, b: dict) -> list:
    """The differences between two rows' bases, as "key A / B"; a key one run did not write yet (None) is not one."""
    return [f"{k} {a[k]} / {b[k]}" for k in a if a[k] is not None and b[k] is not None and a[k] != b[k]]


def compare(a: dict, b: dict) -> str:
    """Rows present in both runs: time and ratio in A and in B, and the ratio's change; where the two rows' ratios
    are measured against different floors or timings, the change is not given and the difference is named."""
    key = lambda r: (r["case"], r["impl"], r["pass"])
    rows_a = {key(r): r for r in a["rows"]}
    keys_b = {key(r) for r in b["rows"]}
    # a key two rows of one run share (a case given twice) cannot be paired: which of them would B's row be?
    twice = {k for d in (a, b) for k, n in Counter(key(r) for r in d["rows"]).items() if n > 1}
    where = lambda d: d['environment'].get('gpu') or d['environment'].get('cpu')  # noqa: E731
    lines = [f"A: {a['environment'].get('git')} on {where(a)}   B: {b['environment'].get('git')} on {where(b)}",
             "| case | implementation | pass | ms A | ms B | ratio A | ratio B | change |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    if a.get("benchmark") != b.get("benchmark"):
        lines[0] += f"   (different benchmarks: {a.get('benchmark')} / {b.get('benchmark')})"
    if not any(key(r) in rows_a for r in b["rows"]):  # the lists below still say what each run has
        lines[1:] = ["no case, implementation and pass in common: nothing to compare"]
    for r in b["rows"]:
        old = rows_a.get(key(r))
        if not old:
            continue
        basis_a, basis_b = _basis(a, old), _basis(b, r)
        differ = _bases_differ(basis_a, basis_b)
        if key(r) in twice:
            change = "not comparable: several rows for this case, implementation and pass in one run"
        elif differ:
            change = "not comparable: " + ", ".join(differ)
        else:
            change = f"{(r['ratio'] - old['ratio']) / old['ratio'] * 100:+.1f}%"
        lines.append(f"| {r['case']} | {r['impl']} | {r['pass']} | {old['ms']:.4g} | {r['ms']:.4g} | "
                     f"{old['ratio']:.2f}x | {r['ratio']:.2f}x | {change} |")
    # rows of one run only: a row that failed in one run, a case only one of them timed (they were left out silently)
    for label, only in (("A", [k for k in rows_a if k not in keys_b]),
                        ("B", list(dict.fromkeys(k for k in map(key, b["rows"]) if k not in rows_a)))):
        if only:
            lines += ["", f"only in {label} ({len(only)} rows, not compared):",
                      *[f"| {case} | {impl} | {pass_} |" for case, impl, pass_ in only]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/report.py")
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table")
    t.add_argument("files", nargs="+")
    p = sub.add_parser("plot")
    p.add_argument("files", nargs="+")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "plots"))
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = parser.parse_args(argv)
    if args.cmd == "table":
        for f in args.files:
            print(table(load(f)), end="\n\n")
    elif args.cmd == "plot":
        if not can_plot():
            raise SystemExit("report.py plot needs matplotlib: pip install -e '.[bench]'")
        for f in args.files:
            # several files: each one's figures named after it, or the last file's would replace the others'
            prefix = Path(f).stem + "_" if len(args.files) > 1 else ""
            for path in plot(load(f), Path(args.out), prefix):
                print(path)
    else:
        print(compare(load(args.a), load(args.b)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

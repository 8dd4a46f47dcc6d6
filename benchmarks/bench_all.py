"""`python -m peftkern bench all`: every method at the three levels in one run, with its JSON, plots and a summary.

    python -m peftkern bench all [--no-compile] [--skip NAME ...] [--out DIR]

The suite (each piece is also its own command, with more cases and options):
    layer     bench lora --quick (with PEFT + torch.compile), bench ia3 --quick, bench krona --quick (64 x 64
              factors, M = 8192 and 2048), bench adapter --quick
    decoder   bench decoder --method all (one Llama 1b decoder layer, 8192 tokens)
    step      bench e2e --quick (the Llama 1b training step, 4 x 2048 tokens, every method)
Only the LoRA layer keeps its torch.compile anchor: compiling every anchor would double the run
(`bench e2e --compile` adds the compiled frozen model and compiled LoRA models to the training step).
It is sized to finish in under 10 minutes on one H100; each piece prints its progress and its wall time. Every
piece writes its JSON under benchmarks/results/ (or --out / $PEFTKERN_RESULTS_DIR), the plots go to plots/ beside
them, and summary-<gpu>-<time>.md holds every table (benchmarks/report.py table) and the wall times.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import report  # noqa: E402

SUITE = [  # about 8 minutes on an H100 (the first full run, 9 minutes without its training step, set these cuts)
    ("lora", ["--quick"]),                                            # with the PEFT + torch.compile anchor
    ("ia3", ["--quick", "--no-compile"]),
    ("krona", ["--quick", "--no-compile"]),
    ("adapter", ["--quick", "--no-compile"]),
    ("decoder", ["--method", "all", "--no-compile"]),
    ("e2e", ["--quick"]),
]


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(prog="peftkern bench all", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-compile", action="store_true", help="no torch.compile anchors anywhere")
    parser.add_argument("--skip", nargs="*", default=[], choices=[name for name, _ in SUITE],
                        help="pieces to leave out (lora, ia3, ..., e2e)")
    parser.add_argument("--out", help="directory for the JSON, plots and summary (default $PEFTKERN_RESULTS_DIR, else "
                             "benchmarks/results/)")
    args = parser.parse_args(argv)
    out = Path(args.out or os.environ.get("PEFTKERN_RESULTS_DIR") or common.RESULTS_DIR)
    suite = [(name, opts) for name, opts in SUITE if name not in args.skip]
    walls, tables, plots = [], [], []
    can_plot = report.can_plot()
    if not can_plot:
        common.progress("matplotlib is not installed (pip install -e '.[bench]'): the tables and the summary are "
                        "written, the plots are not")
    t_start = time.perf_counter()
    for i, (name, opts) in enumerate(suite):
        opts = list(opts)
        if args.no_compile and name == "lora":
            opts.append("--no-compile")
        common.progress(f"== [{i + 1}/{len(suite)}] bench {name} {' '.join(opts)} "
                        f"({time.perf_counter() - t_start:.0f} s into the run)")
        before = len(common.SAVED)
        t0 = time.perf_counter()
        importlib.import_module(f"bench_{name}").main([*opts, "--out", str(out)])
        walls.append((name, " ".join(opts), time.perf_counter() - t0))
        for path in common.SAVED[before:]:
            data = report.load(path)
            tables.append(f"### {path.name}\n\n{report.table(data)}")
            if can_plot:
                plots += report.plot(data, out / "plots")
    total = time.perf_counter() - t_start
    env = common.environment()
    lines = [f"# bench all on {env.get('gpu') or 'CPU'}: {total:.0f} s", "",
             f"torch {env['torch']}, triton {env.get('triton')}, transformers {env.get('transformers')}, "
             f"peft {env.get('peft')}, git {env.get('git')}, {env['time_utc']}", "",
             "| piece | options | wall s |", "| --- | --- | --- |",
             *[f"| {name} | {opts} | {wall:.0f} |" for name, opts, wall in walls], "", *tables, "",
             "Plots:", *([f"- {p}" for p in plots] if plots else
                         ["none (matplotlib is not installed: pip install -e '.[bench]')" if not can_plot
                          else "none"])]
    gpu = (env.get("gpu") or "cpu").replace(" ", "_").replace("/", "_")
    summary = out / f"summary-{gpu}-{time.strftime('%Y%m%d-%H%M%S')}.md"
    summary.write_text("\n".join(lines) + "\n")
    print(f"\n## bench all: {total:.0f} s")
    for name, opts, wall in walls:
        print(f"  {name:8s} {wall:6.0f} s  ({opts})")
    print(f"summary: {summary}\nplots: " + (f"{len(plots)} under {out / 'plots'}" if plots else "none"))
    return walls


if __name__ == "__main__":
    main()

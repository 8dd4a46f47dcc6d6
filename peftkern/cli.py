"""`python -m peftkern ...`: bench, info (and profile, where present).

    python -m peftkern bench [lora|ia3|krona|adapter|decoder|e2e|all] [benchmark options]   (default: lora)
    python -m peftkern bench --compare A.json B.json     what changed between two saved runs
    python -m peftkern info
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

BENCHMARKS = ("lora", "ia3", "krona", "adapter", "decoder", "e2e")


def _benchmarks_dir() -> Path:
    here = Path(__file__).resolve().parents[1] / "benchmarks"
    if not (here / "common.py").exists():
        raise SystemExit("peftkern bench runs from a source checkout (pip install -e .): benchmarks/ was not found "
                         f"next to the package at {here.parent}")
    return here


def _bench_module(name: str):
    sys.path.insert(0, str(_benchmarks_dir()))
    try:
        return importlib.import_module(f"bench_{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"bench_{name}":
            return None
        raise


def bench(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: python -m peftkern bench [{'|'.join(BENCHMARKS)}|all] [options]\n"
              "       python -m peftkern bench --compare A.json B.json\n"
              "options go to the benchmark; `python -m peftkern bench lora --help` lists them; `all` runs every "
              "method at the three levels (benchmarks/bench_all.py)")
        return 0
    if argv and argv[0] == "--compare":
        if len(argv) != 3:
            raise SystemExit("usage: python -m peftkern bench --compare A.json B.json")
        sys.path.insert(0, str(_benchmarks_dir()))
        import report

        print(report.compare(report.load(argv[1]), report.load(argv[2])))
        return 0
    if argv and argv[0] == "--e2e":
        argv = ["e2e", *argv[1:]]
    name = argv[0] if argv and not argv[0].startswith("-") else "lora"
    rest = argv[1:] if argv and not argv[0].startswith("-") else argv
    if name not in (*BENCHMARKS, "all"):
        raise SystemExit(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)} or all")
    module = _bench_module(name)
    if module is None:
        raise SystemExit(f"benchmarks/bench_{name}.py is missing from this checkout")
    common = importlib.import_module("common")
    common.FAILED_OURS.clear()
    module.main(rest)
    if common.FAILED_OURS:  # peftkern's own rows or a floor failed: the tables above lack them
        print(f"{len(common.FAILED_OURS)} of peftkern's rows or floors failed:", file=sys.stderr)
        for what in common.FAILED_OURS:
            print(f"  {what}", file=sys.stderr)
        return 1
    return 0


def info(argv: list[str]) -> int:
    from .info import main as info_main

    return info_main(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"bench": bench, "info": info}
    try:
        from .profiling import cli_main as profile_main

        commands["profile"] = profile_main
    except ImportError:
        pass
    parser = argparse.ArgumentParser(prog="python -m peftkern", description="peftkern: fused PEFT kernels")
    parser.add_argument("command", choices=sorted(commands))
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    args = parser.parse_args(argv[:1])
    return commands[args.command](argv[1:]) or 0

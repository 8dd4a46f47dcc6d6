"""Which comparisons in the test suite come nearest their tolerance: run the tests with PEFTKERN_MARGIN_LOG set,
then this script on the log(s). Tests draw fresh random inputs per run, so a comparison that reaches a large
fraction of its tolerance in one run can fail in another; those are the ones to look at.

    PEFTKERN_MARGIN_LOG=/tmp/margins.tsv python -m pytest tests -q
    python scripts/margins.py /tmp/margins.tsv [--top 30]

Each comparison (test id and name) is reported with its largest error / tolerance over every line logged for it."""

from __future__ import annotations

import argparse


def worst_margins(paths: list[str]) -> list[tuple[float, int, str, str]]:
    """(largest error / tolerance, times logged, test id, name compared), largest first."""
    worst: dict[tuple[str, str], list] = {}
    for path in paths:
        with open(path) as log:
            for line in log:
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 3:
                    continue
                ratio, test, name = float(parts[0]), parts[1].removesuffix(" (call)"), parts[2]
                entry = worst.setdefault((test, name), [0.0, 0])
                entry[0] = max(entry[0], ratio)
                entry[1] += 1
    return sorted(((r, n, t, name) for (t, name), (r, n) in worst.items()), reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    rows = worst_margins(args.logs)
    print(f"{len(rows)} comparisons; the {min(args.top, len(rows))} nearest their tolerance:")
    for ratio, count, test, name in rows[: args.top]:
        print(f"{ratio:8.3f}  x{count:<4d} {test}  {name}")


if __name__ == "__main__":
    main()

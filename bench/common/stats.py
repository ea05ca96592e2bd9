"""Statistics and output the benchmarks share."""

from __future__ import annotations

import json
import statistics
import sys


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def med(xs: list[float]) -> dict:
    """Median and range (NaN for none)."""
    if not xs:
        return {"median": float("nan"), "range": [float("nan"), float("nan")]}
    return {"median": statistics.median(xs), "range": [min(xs), max(xs)]}


def spread(xs: list[float]) -> dict:
    """Median, extremes and interquartile range."""
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "iqr": [q[0], q[2]]}


def last_json(text: str) -> dict:
    """The JSON object on the last line of a child's output."""
    return json.loads(text.strip().splitlines()[-1])


def paired(a: list[dict], b: list[dict]) -> list[tuple[dict, dict]]:
    """The runs of ``a`` and ``b`` from the same repeat (by their ``repeat``; else by position)."""
    if all("repeat" in r for r in [*a, *b]):
        by = {r["repeat"]: r for r in b}
        return [(r, by[r["repeat"]]) for r in a if r["repeat"] in by]
    return list(zip(a, b))

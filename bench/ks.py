"""KS-Lottery's row tests: lota's vectorized statistic and p-values against a scipy row loop.

A 32000 x 4096 float32 embedding pair (a Llama-7B-sized input embedding: random rows, a small
drift on every row and a real shift on 1 % of them). ``lota`` is ``lota.ks.select_tokens``
(statistic, p-value and L2 shift of every row, then the selection); ``scipy`` is
``scipy.stats.ks_2samp`` called row by row. Both run in this process, interleaved over
``--repeats`` (median and range); the results are compared on every row (the statistic must be
identical, the p-values equal to 1e-12 relative). Prints one JSON line.

    python bench/ks.py [--rows 32000] [--dim 4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import scipy.stats
import torch

from lota.ks import select_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=32000)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    before = torch.randn(args.rows, args.dim, generator=g) * 0.02
    after = before + torch.randn(args.rows, args.dim, generator=g) * 1e-4
    shifted = torch.randperm(args.rows, generator=g)[: args.rows // 100]
    after[shifted] = after[shifted] * 1.5 + 0.01
    xs, ys = before.double().numpy(), after.double().numpy()
    times = {"lota": [], "scipy": []}
    for rep in range(args.repeats):
        t = time.perf_counter()
        sel = select_tokens(before, after, alpha=0.05, correction="bonferroni")
        times["lota"].append(time.perf_counter() - t)
        t = time.perf_counter()
        res = [scipy.stats.ks_2samp(x, y) for x, y in zip(xs, ys)]
        times["scipy"].append(time.perf_counter() - t)
        print(
            f"repeat {rep + 1}: lota {times['lota'][-1]:.2f} s, scipy {times['scipy'][-1]:.2f} s",
            file=sys.stderr,
        )
    d = np.array([r.statistic for r in res])
    p = np.array([r.pvalue for r in res])
    same_d = bool(np.array_equal(sel.statistic.numpy(), d))
    rel = np.abs(sel.p_value.numpy() - p) / np.maximum(np.abs(p), np.finfo(float).tiny)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        json.dumps(
            {
                "bench": "ks",
                "rows": args.rows,
                "dim": args.dim,
                "lota_s": med["lota"],
                "lota_s_range": [min(times["lota"]), max(times["lota"])],
                "scipy_s": med["scipy"],
                "scipy_s_range": [min(times["scipy"]), max(times["scipy"])],
                "lota_over_scipy": med["lota"] / med["scipy"],
                "target": {"lota_over_scipy_max": 1 / 3},
                "met": med["lota"] / med["scipy"] <= 1 / 3,
                "statistic_identical": same_d,
                "pvalue_max_relative_difference": float(rel[p > 0].max()) if (p > 0).any() else 0.0,
                "selected": len(sel.token_ids),
                "planted": int(shifted.numel()),
                "planted_found": len(set(sel.token_ids) & set(shifted.tolist())),
            }
        )
    )


if __name__ == "__main__":
    main()

"""The lab's scales and the fixed numbers of its protocol.

A scale says how much the lab computes: examples per split, training and calibration steps, seeds,
learning-rate points searched (``full`` for the committed results, ``demo`` for ``lota demo``,
``smoke`` for tests, ``real`` and ``real-smoke`` for the real base). The learning-rate grids come
from the method table (``sources``); ``lr_grid`` takes a scale's points from the middle of one.
"""

from __future__ import annotations

from .. import sources

SCALES = {
    # the committed results: 5 seeds, every learning rate of the grid searched on validation
    # (the mean of two seeds)
    "full": {
        "n_train": 2000,
        "n_val": 100,
        "n_test": 200,
        "steps": 150,
        "batch": 16,
        "calibration": 20,
        "long_calibration": 150,
        "calibration_lr": 1e-3,
        "lr_points": 3,
        "seeds": 5,
        "eval_batch": 100,
        "real_sql": 200,
        "general_docs": 256,  # held-out documents of the general-text loss (forgetting)
    },
    # ``lota demo``: one seed, fixed learning rates, small test sets, inside five minutes
    "demo": {
        "n_train": 2000,
        "n_val": 50,
        "n_test": 100,
        "steps": 150,
        "batch": 16,
        "calibration": 20,
        "long_calibration": 150,
        "calibration_lr": 1e-3,
        "lr_points": 1,
        "seeds": 1,
        "eval_batch": 100,
        "real_sql": 0,
        "general_docs": 256,
    },
    # a quick pass through every claim (tests, ``--scale smoke``)
    "smoke": {
        "n_train": 48,
        "n_val": 6,
        "n_test": 6,
        "steps": 2,
        "batch": 4,
        "calibration": 1,
        "long_calibration": 3,
        "calibration_lr": 1e-3,
        "lr_points": 1,
        "seeds": 1,
        "eval_batch": 8,
        "real_sql": 4,
        "max_new_tokens": 6,
        "general_docs": 16,
    },
    # the real base (SmolLM2-135M-Instruct, ``--base real``): see docs/lab.md for the budget
    "real": {
        "n_train": 2000,
        "n_val": 40,
        "n_test": 100,
        "steps": 40,
        "batch": 8,
        "calibration": 8,
        "calibration_lr": 1e-4,
        "lr_points": 2,
        "seeds": 3,
        "eval_batch": 50,
        "real_sql": 100,
        "max_length": 192,
        "general_docs": 32,
        "general_seq": 256,
        # train and score in float32: a CPU without bfloat16 instructions computes the bf16
        # weights about 3x slower than float32 (measured on SmolLM2, batch 8 x 80 tokens)
        "dtype": "float32",
    },
    # the same protocol in seconds (tests)
    "real-smoke": {
        "n_train": 16,
        "n_val": 2,
        "n_test": 2,
        "steps": 1,
        "batch": 2,
        "calibration": 1,
        "calibration_lr": 1e-4,
        "lr_points": 1,
        "seeds": 1,
        "eval_batch": 2,
        "real_sql": 2,
        "max_length": 64,
        "max_new_tokens": 4,
        "general_docs": 2,
        "general_seq": 32,
        "dtype": "float32",
    },
}
# learning-rate grids, from the method table (every method of a family gets the same number of
# points); the middle points are used when a scale searches only one
LR_GRID = sources.lr_grids()
MAX_NEW_TOKENS = {
    "math": 24,
    "sql": 40,
    "sql-real": 64,
    "instruct": 32,
    "translate": 28,
    "safety": 32,
}
GENERAL = "general"  # the pseudo-task of the general-text loss (forgetting), scored like a task
DATA_SEED = 0  # the task data is the same for every seed; seeds change initialisation and order


def lr_grid(method: str, points: int) -> list[float]:
    grid = list(sources.METHODS[method].lr_grid)
    if points >= len(grid):
        return list(grid)
    mid = len(grid) // 2
    lo = mid - points // 2
    return grid[lo : lo + points]

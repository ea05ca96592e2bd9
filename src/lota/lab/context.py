"""What every claim of ``lota bench quality`` measures with: the shared ``Quality`` context (the
lab, tasks, seeds, chosen learning rates and the results so far), ``spec`` (a run's key) and
``stats`` (the summary of a score over seeds).

The claims (``lab/claims/``) import this module; the bench's driver (``lab/quality.py``) sits
above them.
"""

from __future__ import annotations

import statistics

from .runner import Lab, Pending
from .scales import lr_grid

SEARCH_SEEDS = 2  # a learning rate is chosen on the mean validation score of this many seeds


def stats(values: list[float | None]) -> dict:
    v = [x for x in values if x is not None]
    if not v:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0, "values": []}
    return {
        "mean": statistics.fmean(v),
        "std": statistics.stdev(v) if len(v) > 1 else 0.0,
        "min": min(v),
        "max": max(v),
        "n": len(v),
        "values": v,
    }


def partial(fn, *args) -> dict:
    """``fn(*args)``, a part of a claim's results; where a run or model it needs is not done (a
    report from the ledger while the bench is still running), ``{"pending": its name}``."""
    try:
        return fn(*args)
    except Pending as e:
        return {"pending": str(e)}


def spec(task: str, method: str, lr: float, seed: int, **extra) -> dict:
    return {"task": task, "method": method, "lr": lr, "seed": seed, **extra}


class Quality:
    """What the claims share: the lab, the tasks and seeds, the chosen learning rates with their
    searches, and the results filled so far."""

    def __init__(self, lab: Lab, tasks: list[str], seeds: int):
        self.lab = lab
        self.tasks = tasks
        self.seeds = list(range(seeds))
        self.search_seeds = self.seeds[:SEARCH_SEEDS]
        self.chosen: dict[tuple[str, str], float] = {}
        self.search: dict[str, dict] = {}
        self.results: dict = {}

    # ------------------------------------------------------------------------ helpers
    def test(self, run_or_model, task: str, template: str = "default") -> dict:
        model = run_or_model if isinstance(run_or_model, str) else run_or_model.model
        return self.lab.score(model, task, "test", template)

    def lr_for(self, task: str, method: str) -> float:
        if (task, method) in self.chosen:
            return self.chosen[(task, method)]
        return self.chosen[(self.tasks[0], method)]

    def searches(self, task: str, method: str, **extra):
        """Specs of the learning-rate search for (task, method): every grid point on each of the
        search seeds."""
        return [
            spec(task, method, lr, seed, **extra)
            for lr in lr_grid(method, self.lab.scale["lr_points"])
            for seed in self.search_seeds
        ]

    def searched_runs(self, tasks, methods, grid=None):
        """A claim's step for every (task, method): yield the learning-rate search (each grid
        point on the search seeds, scored on validation), choose each rate, and return every
        seed's spec at its chosen rate, ``{(task, method, seed): spec}``. Used as
        ``main = yield from q.searched_runs(...)``; ``grid(method)`` replaces the method table's
        grid."""
        plan = {
            (t, m): self.searches(t, m)
            if grid is None
            else [spec(t, m, lr, seed) for lr in grid(m) for seed in self.search_seeds]
            for t in tasks
            for m in methods
        }
        yield [(s, [(t, "validation", "default")]) for (t, _), ss in plan.items() for s in ss]
        for (t, m), ss in plan.items():
            self.choose(t, m, ss)
        return {
            (t, m, seed): spec(t, m, self.chosen[(t, m)], seed)
            for t in tasks
            for m in methods
            for seed in self.seeds
        }

    def choose(self, task: str, method: str, specs: list[dict], label: str | None = None) -> float:
        """Pick the learning rate with the best mean validation score over the seeds its specs
        were run with (the first grid point on ties)."""
        grid: list[float] = []
        per_lr: dict[float, list[float]] = {}
        for s in specs:
            if s["lr"] not in per_lr:
                grid.append(s["lr"])
                per_lr[s["lr"]] = []
            score = self.lab.score(self.lab.run(s).model, task, "validation")["score"]
            per_lr[s["lr"]].append(score)
        means = [statistics.fmean(per_lr[lr]) for lr in grid]
        best = max(range(len(grid)), key=lambda i: (means[i], -i))
        lr = grid[best]
        self.chosen[(task, method)] = lr
        self.search[label or f"{task}/{method}"] = {
            "grid": grid,
            "validation": means,
            "validation_per_seed": [per_lr[x] for x in grid],
            "seeds": len(per_lr[grid[0]]),
            "chosen": lr,
        }
        return lr

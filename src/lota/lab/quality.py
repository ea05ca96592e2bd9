"""``lota bench quality``: SPEC section 6's claims measured on the lab's base model.

Each claim (``lab/claims/``, one module each) is a generator over the shared ``Quality`` context.
It yields the runs it needs next (with the scores it will read), the driver trains all yielded runs
of every claim together (in parallel with ``--jobs``), and the claims then read the cached results.
Everything is cached (``runner.Lab``), so an interrupted bench continues where it stopped and a
finished one is re-reported in seconds.

Fairness: each training method gets the same learning-rate grid size, searched on the validation
split; a grid point's score is the mean over the first two seeds (``SEARCH_SEEDS``). The chosen
values are reported and used for every seed. Test scores are reported as mean, sample standard
deviation, min and max over seeds, and headline comparisons as Welch's t-test.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

from . import tasks as T
from .report import GENERAL_TEXT, versions
from .runner import Lab, lr_grid

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


# ---------------------------------------------------------------------------- driver
def run_quality(
    out: str,
    base: str,
    tasks: list[str],
    seeds: int | None = None,
    claims: list[str] | None = None,
    scale: str = "full",
    jobs: int = 1,
    progress: bool = True,
    ledger: str | None = None,
    commit_ledger: bool = False,
    device: str = "auto",
) -> dict:
    """Run (or resume) the bench and write ``results.json``, ``report.md`` and plots to ``out``
    (locked while the bench fills it; a base that is neither a lab base nor the real base is
    refused before any work).

    ``ledger``: a folder that keeps every run's and model's results without weights (see
    ``runner.Lab``); with ``commit_ledger`` each entry is committed with git as it is written."""
    from ..errors import InputError
    from ..models import quiet_transformers
    from .claims import BY_NAME, DEFAULT
    from .runner import SCALES

    if scale not in SCALES:
        raise InputError(f"unknown scale '{scale}'", "--scale", f"choose {', '.join(SCALES)}")
    claims = list(claims or DEFAULT)
    for c in claims:
        if c not in BY_NAME:
            raise InputError(
                f"unknown claim '{c}'", "--claims", f"choose from {', '.join(BY_NAME)}"
            )
    for t in tasks:
        if t == "sql-real":
            if T.real_sql("test", limit=1) is None:
                raise InputError(
                    "task 'sql-real' needs the sql-create-context data",
                    "--tasks",
                    "set LOTA_DATA to the folder that holds sql_create_context/all.json",
                )
        elif t not in T.TASKS or t == "safety":
            raise InputError(
                f"'{t}' is not a fine-tuning task of the bench",
                "--tasks",
                f"choose from {', '.join(x for x in T.TASKS if x != 'safety')}, sql-real",
            )
    if len(tasks) < 2 or len(set(tasks)) != len(tasks):
        raise InputError(
            "the bench needs at least two different tasks",
            "--tasks",
            "e.g. --tasks math,sql,instruct",
        )
    seeds = SCALES[scale]["seeds"] if seeds is None else seeds
    if seeds < 1:
        raise InputError(f"--seeds {seeds} must be at least 1", "--seeds", "give e.g. 3")
    quiet_transformers()
    t0 = time.time()
    commit = _commit()  # the code this invocation runs, before anything else can change it
    lab = Lab(
        out,
        base,
        scale,
        jobs,
        progress,
        ledger=ledger,
        commit=commit_ledger,
        device=device,
    )
    with lab.writing():
        return _measure(lab, tasks, seeds, claims, progress, commit, t0)


def _measure(
    lab: Lab,
    tasks: list[str],
    seeds: int,
    claims: list[str],
    progress: bool,
    commit: str | None,
    t0: float,
) -> dict:
    from ..fileio import write_json, write_text
    from .claims import BY_NAME
    from .report import plots, render
    from .runner import SCALES

    out, scale, base, jobs = lab.out, lab.scale_name, lab.base, lab.jobs
    q = Quality(lab, tasks, seeds)
    gens = [BY_NAME[c].measure(q) for c in claims]
    rounds = 0
    while gens:
        batch, alive = [], []
        for g in gens:
            try:
                batch.extend(next(g))
                alive.append(g)
            except StopIteration:
                pass
        gens = alive
        rounds += 1
        if progress and batch:
            from tqdm.auto import tqdm

            tqdm.write(f"round {rounds}: {len(batch)} runs requested")
        lab.prefetch(batch)
    results = {
        "format": "lota",
        "kind": "quality-bench",
        "format_version": 1,
        "meta": {
            "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "versions": versions(),
            "scale": scale,
            "settings": SCALES[scale],
            "seeds": seeds,
            "tasks": tasks,
            "claims": claims,
            "base": base,
            "base_fingerprint": lab.base_fp,
            "jobs": jobs,
            "device": str(lab.resolved_device()),
            "general_text": GENERAL_TEXT
            if (Path(base) / "lab_recipe.json").exists()
            else "Python's reference documentation (pydoc_data)",
            "python": platform.python_version(),
            "wall_s_this_invocation": round(time.time() - t0, 1),
            "train_seconds_total": _train_seconds(lab),
        },
        "learning_rates": q.search,
        **q.results,
    }
    write_json(Path(out) / "results.json", results)
    figures = plots(results, Path(out))
    write_text(Path(out) / "report.md", render(results, figures))
    return results


def _commit() -> str | None:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _train_seconds(lab: Lab) -> float:
    total = 0.0
    for f in (lab.cache / "runs").glob("*/result.json"):
        total += json.loads(f.read_text())["info"].get("seconds") or 0.0
    return round(total, 1)

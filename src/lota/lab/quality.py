"""``lota bench quality``: SPEC section 6's claims measured on the lab's base model.

Each claim (``lab/claims/``, one module each) is a generator over the shared ``Quality`` context
(``lab/context.py``); this driver sits above the claims.
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
import subprocess
import time
from pathlib import Path

from . import tasks as T
from .context import Quality
from .report import GENERAL_TEXT, versions
from .runner import Lab, Pending


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
    train: bool = True,
) -> dict:
    """Run (or resume) the bench and write ``results.json``, ``report.md`` and plots to ``out``
    (locked while the bench fills it; a base that is neither a lab base nor the real base is
    refused before any work).

    ``ledger``: a folder that keeps every run's and model's results without weights (see
    ``runner.Lab``); with ``commit_ledger`` each entry is committed with git as it is written.
    ``train=False`` writes the report from what the ledger and the cache hold, training nothing:
    a claim (or a part of one) whose runs are missing is reported as pending."""
    from ..errors import InputError
    from ..model_folder import quiet_transformers
    from .claims import DEFAULT
    from .scales import SCALES

    if scale not in SCALES:
        raise InputError(f"unknown scale '{scale}'", "--scale", f"choose {', '.join(SCALES)}")
    claims = list(claims or DEFAULT)
    _check_claims(claims)
    _check_tasks(tasks)
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
        trains=train,
    )
    with lab.writing():
        return _measure(lab, tasks, seeds, claims, progress, commit, t0)


def _check_claims(claims: list[str]) -> None:
    from ..errors import InputError
    from .claims import BY_NAME

    for c in claims:
        if c not in BY_NAME:
            raise InputError(
                f"unknown claim '{c}'", "--claims", f"choose from {', '.join(BY_NAME)}"
            )


def _check_tasks(tasks: list[str]) -> None:
    """At least two different fine-tuning tasks of the bench (sql-real where its data is)."""
    from ..errors import InputError

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
    from .claims import CLAIMS
    from .report import plots, render

    out = lab.out
    q = Quality(lab, tasks, seeds)
    _run_claims(lab, q, claims, progress)
    results = {
        "format": "lota",
        "kind": "quality-bench",
        "format_version": 1,
        "meta": _meta(lab, tasks, seeds, claims, commit, t0),
        "learning_rates": q.search,
        **q.results,
    }
    write_json(Path(out) / "results.json", results)
    figures = plots(results, Path(out), CLAIMS)
    write_text(Path(out) / "report.md", render(results, figures, CLAIMS))
    return results


def _run_claims(lab: Lab, q: Quality, claims: list[str], progress: bool) -> None:
    """Step every claim's generator in rounds: the runs all claims request in a round are trained
    together, until every claim has filled its results."""
    from .claims import BY_NAME

    gens = [(c, BY_NAME[c].measure(q)) for c in claims]
    rounds = 0
    while gens:
        batch, alive = [], []
        for c, g in gens:
            try:
                batch.extend(next(g))
                alive.append((c, g))
            except StopIteration:
                pass
            except Pending as e:  # a report from what is done: this claim waits for a run
                q.results.setdefault(c, {"pending": str(e)})
        gens = alive
        rounds += 1
        if progress and batch:
            from tqdm.auto import tqdm

            tqdm.write(f"round {rounds}: {len(batch)} runs requested")
        lab.prefetch(batch)


def _meta(
    lab: Lab, tasks: list[str], seeds: int, claims: list[str], commit: str | None, t0: float
) -> dict:
    """What the results were measured with: code, versions, scale, tasks, base and device."""
    from .scales import SCALES

    scale, base = lab.scale_name, lab.base
    return {
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
        "jobs": lab.jobs,
        "device": str(lab.resolved_device()),
        "general_text": GENERAL_TEXT
        if (Path(base) / "lab_recipe.json").exists()
        else "Python's reference documentation (pydoc_data)",
        "python": platform.python_version(),
        "wall_s_this_invocation": round(time.time() - t0, 1),
        "train_seconds_total": _train_seconds(lab),
        **_ledger_totals(lab),
        "report_only": not lab.trains,
    }


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


def _ledger_totals(lab: Lab) -> dict:
    """How many runs the ledger holds and their summed training seconds (over every machine and
    invocation that added to it)."""
    if lab.ledger is None:
        return {}
    infos = [lab.ledger.entry(n).get("info") for n in lab.ledger.names()]
    infos = [i for i in infos if i]
    return {
        "ledger_runs": len(infos),
        "ledger_train_seconds": round(sum(i.get("seconds") or 0.0 for i in infos), 1),
    }


def _train_seconds(lab: Lab) -> float:
    total = 0.0
    for f in (lab.cache / "runs").glob("*/result.json"):
        total += json.loads(f.read_text())["info"].get("seconds") or 0.0
    return round(total, 1)

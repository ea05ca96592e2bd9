"""Claim 3, merging two task vectors: LoTA deltas added, against task arithmetic and TIES on FFT
deltas and FFT deltas sparsified to LoTA's density; every merge gets the same lambda search on
validation."""

from __future__ import annotations

import statistics
from pathlib import Path

from ... import format as fileformat
from ...merge import MergeSettings, merge_into_model, overlap
from ...task_vectors import make_delta
from ..context import Quality, spec, stats
from ..report import bar_chart, compare, fmt, md_bullets, md_table, pyplot, save_figure

NAME = "merge"
LAMBDAS = (0.5, 0.75, 1.0)
MERGES = ("LoTA add", "FFT task arithmetic", "FFT TIES", "FFT sparsified + add")


def measure(q: Quality):
    """LoTA deltas added vs task arithmetic and TIES on FFT deltas vs FFT deltas sparsified to
    the same density; every merge gets the same lambda search on validation."""
    yield []
    yield []  # claim 1's seed runs are trained by then
    a, b = q.tasks[0], q.tasks[1]
    chosen, search = _search_lambdas(q)
    rows = {name: _merge_scores(q, name, chosen[name]) for name in MERGES}
    ov = overlap([r.delta for r in _singles(q, "lota", q.seeds[0])])["pairs"][0]
    q.results[NAME] = {
        "tasks": [a, b],
        "lambda_search": search,
        "methods": rows,
        "lota_overlap": {k: ov[k] for k in ("nnz_a", "nnz_b", "shared", "sign_conflicts")},
    }


def _singles(q: Quality, method: str, seed: int) -> list:
    """Claim 1's runs of ``method`` on the two tasks."""
    return [q.lab.run(spec(t, method, q.lr_for(t, method), seed)) for t in q.tasks[:2]]


def _sparsified(q: Quality, run) -> str:
    """The run's delta sparsified to LoTA's density (written beside the run once)."""
    path = run.folder / "sparsified-0.9.safetensors"
    if not path.exists():
        d = make_delta(q.lab.base, run.model, sparsity="0.9", show_progress=False)
        fileformat.save(d, path, config={"sparsified_from": run.id, "sparsity": "0.9"})
    return str(path)


def _inputs(q: Quality, name: str, seed: int) -> tuple[list, MergeSettings]:
    """The deltas and the settings of merge ``name``."""
    if name == "LoTA add":
        return [r.delta for r in _singles(q, "lota", seed)], MergeSettings("task-arithmetic")
    fft = _singles(q, "fft", seed)
    if name == "FFT task arithmetic":
        return [r.delta for r in fft], MergeSettings("task-arithmetic")
    if name == "FFT TIES":
        return [r.delta for r in fft], MergeSettings("ties", density="0.1")
    return [_sparsified(q, r) for r in fft], MergeSettings("task-arithmetic")


def _merged(q: Quality, name: str, seed: int, lam: float) -> str:
    """The merged model of ``name`` at ``lam`` (built once, cached by the lab)."""
    paths, settings = _inputs(q, name, seed)
    settings.lam = lam
    recipe = {"inputs": paths, "method": settings.method, "lam": lam, "seed": seed}
    label = name.lower().replace(" ", "-") + f"-l{lam}-s{seed}"
    return q.lab.derived(
        label,
        recipe,
        lambda out: merge_into_model(paths, settings, q.lab.base, out, show_progress=False),
    )


def _search_lambdas(q: Quality) -> tuple[dict, dict]:
    """Each merge's lambda: the best mean validation score over both tasks and the search seeds
    (the smaller lambda on ties)."""
    a, b = q.tasks[0], q.tasks[1]
    chosen, search = {}, {}
    for name in MERGES:
        vals = []
        for lam in LAMBDAS:
            # the mean validation score over both tasks and the search seeds
            vals.append(
                statistics.fmean(
                    q.lab.score(_merged(q, name, seed, lam), t, "validation")["score"]
                    for seed in q.search_seeds
                    for t in (a, b)
                )
            )
        best = max(range(len(vals)), key=lambda i: (vals[i], -i))
        chosen[name] = LAMBDAS[best]
        search[name] = {"grid": list(LAMBDAS), "validation": vals, "chosen": chosen[name]}
    return chosen, search


def _merge_scores(q: Quality, name: str, lam: float) -> dict:
    """Merge ``name``'s test scores at ``lam``, also as a fraction of the single-task models'."""
    a, b = q.tasks[0], q.tasks[1]
    single = "lota" if name.startswith("LoTA") else "fft"
    sa, sb, na, nb, general = [], [], [], [], []
    for seed in q.seeds:
        m = _merged(q, name, seed, lam)
        general.append(q.lab.forgetting(m))
        ra, rb = _singles(q, single, seed)
        x, y = q.test(m, a)["score"], q.test(m, b)["score"]
        sa.append(x)
        sb.append(y)
        ta, tb = q.test(ra, a)["score"], q.test(rb, b)["score"]
        na.append(x / ta if ta else None)
        nb.append(y / tb if tb else None)
    return {
        "lambda": lam,
        a: stats(sa),
        b: stats(sb),
        "mean": stats([(p + r) / 2 for p, r in zip(sa, sb)]),
        "general_forgetting": stats(general),
        "normalized_mean": stats(
            [(p + r) / 2 if p is not None and r is not None else None for p, r in zip(na, nb)]
        ),
    }


def plot(results: dict, out: Path) -> dict[str, str]:
    merge = results.get(NAME)
    if not merge:
        return {}
    fig, ax = pyplot().subplots(figsize=(7, 3.4))
    names = list(merge["methods"])
    bar_chart(
        ax,
        [n.replace(" + ", "\n+ ") for n in names],
        {t: [merge["methods"][n][t] for n in names] for t in merge["tasks"]},
        "test score of the merged model",
    )
    ax.set_title("Claim 3: merging two task vectors", fontsize=9)
    return {"merge": save_figure(fig, out / "merge.png")}


def render(results: dict, figs: dict[str, str]) -> list[str]:
    merge = results.get(NAME)
    if not merge:
        return []
    a, b = merge["tasks"]
    out = ["## Claim 3: merging\n"]
    out.append(
        md_table(
            [
                "merge",
                "lambda",
                a,
                b,
                "mean",
                "mean, relative to the single-task models",
                "general forgetting",
            ],
            [
                [
                    n,
                    f"{r['lambda']:g}",
                    fmt(r[a]),
                    fmt(r[b]),
                    fmt(r["mean"]),
                    fmt(r["normalized_mean"]),
                    fmt(r.get("general_forgetting"), 4),
                ]
                for n, r in merge["methods"].items()
            ],
        )
    )
    ov = merge["lota_overlap"]
    out.append(
        f"The two LoTA deltas share {ov['shared']:,} of their {ov['nnz_a']:,} entries "
        f"({ov['sign_conflicts']:,} with opposite signs).\n\n"
    )
    rows = merge["methods"]
    out.append(
        md_bullets(
            compare("LoTA add (mean)", rows["LoTA add"]["mean"], n, rows[n]["mean"])
            for n in rows
            if n != "LoTA add"
        )
    )
    if "merge" in figs:
        out.append(f"![claim 3]({figs['merge']})\n")
    return out

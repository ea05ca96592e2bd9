"""Claim 2, sequential tasks: A -> B and B -> A with FFT, LoRA, LoTA then FFT, and LoTTO
(constrained and flip); with three tasks or more, a chain through every task with its capacity
curve."""

from __future__ import annotations

import statistics
from pathlib import Path

from ..context import Quality, spec, stats
from ..report import (
    ALPHA,
    COLORS,
    bar_chart,
    compare,
    fmt,
    md_bullets,
    md_table,
    mean_of,
    p_text,
    pyplot,
    save_figure,
    std_of,
)
from ..scales import GENERAL, lr_grid

NAME = "sequential"


VARIANTS = {
    "FFT -> FFT": ("fft", "fft", {}),
    "LoRA -> LoRA": ("lora", "lora", {}),
    "LoTA -> FFT": ("lota", "fft", {}),
    "LoTA -> LoTTO": ("lota", "lota", {"protect_mode": "constrained"}),
    "LoTA -> LoTTO flip": ("lota", "lota", {"protect_mode": "flip"}),
}


def measure(q: Quality):
    """A -> B and B -> A: FFT, LoRA, LoTA then FFT, LoTTO (constrained and flip); a chain
    through every task with its capacity curve."""
    yield []  # the learning rates come from claim 1's search
    a, b = q.tasks[0], q.tasks[1]
    firsts = {
        (x, m1, seed): spec(x, m1, q.lr_for(x, m1), seed)
        for x in (a, b)
        for m1, _, _ in VARIANTS.values()
        for seed in q.seeds
    }
    yield [(s1, [(x, "test", "default")]) for (x, _, _), s1 in firsts.items()]
    yield from _search_flip(q, a, b, firsts)
    stage2 = _second_stages(q, a, b, firsts)
    yield [
        (s2, [(x, "test", "default"), (y, "test", "default"), (GENERAL, "test", "default")])
        for (x, y, _, _), (_, s2) in stage2.items()
    ]
    q.results[NAME] = {"orders": _orders(q, a, b, stage2)}
    # the chain: every task in turn, LoTTO (constrained) vs FFT
    if len(q.tasks) < 3:
        q.results[NAME]["chain"] = None
        return
    yield from _chain(q)


def _search_flip(q: Quality, a: str, b: str, firsts: dict):
    """Flip trains the whole complement of the first ticket, a dense run: it gets its own search
    over the FFT grid instead of borrowing the sparse learning rate."""
    flip_search = {}
    for x, y in ((a, b), (b, a)):
        flip_search[(x, y)] = [
            spec(
                y,
                "lota",
                lr,
                seed,
                start=firsts[(x, "lota", seed)],
                protect=[firsts[(x, "lota", seed)]],
                protect_mode="flip",
            )
            for lr in lr_grid("fft", q.lab.scale["lr_points"])
            for seed in q.search_seeds
        ]
    yield [(s, [(y, "validation", "default")]) for (_, y), ss in flip_search.items() for s in ss]
    for (x, y), ss in flip_search.items():
        q.choose(y, "lotto-flip", ss, label=f"{x} -> {y}/LoTTO flip")


def _second_stages(q: Quality, a: str, b: str, firsts: dict) -> dict:
    """``{(first task, second task, variant, seed): (first spec, second spec)}``."""
    stage2 = {}
    for x, y in ((a, b), (b, a)):
        for name, (m1, m2, extra) in VARIANTS.items():
            for seed in q.seeds:
                first = firsts[(x, m1, seed)]
                more = dict(extra)
                if "protect_mode" in more:
                    more["protect"] = [first]
                lr = q.chosen[(y, "lotto-flip")] if name.endswith("flip") else None
                stage2[(x, y, name, seed)] = (
                    first,
                    spec(y, m2, lr or q.lr_for(y, m2), seed, start=first, **more),
                )
    return stage2


def _orders(q: Quality, a: str, b: str, stage2: dict) -> dict:
    """Every variant's scores before and after the second task, in both orders."""
    orders = {}
    for x, y in ((a, b), (b, a)):
        rows = {}
        for name in VARIANTS:
            before, after_x, after_y, general = [], [], [], []
            for seed in q.seeds:
                s1, s2 = stage2[(x, y, name, seed)]
                before.append(q.test(q.lab.run(s1), x)["score"])
                r2 = q.lab.run(s2)
                after_x.append(q.test(r2, x)["score"])
                after_y.append(q.test(r2, y)["score"])
                general.append(q.lab.forgetting(r2.model))
            rows[name] = {
                "first_before": stats(before),
                "first_after": stats(after_x),
                "second": stats(after_y),
                "forgetting": stats([p - r for p, r in zip(before, after_x)]),
                "retention": stats([r / p if p else None for p, r in zip(before, after_x)]),
                "general_forgetting": stats(general),
            }
        orders[f"{x} -> {y}"] = rows
    return orders


def _chain(q: Quality):
    """Every task in turn, LoTTO (constrained) vs FFT, beside every task trained alone."""
    # every task of the chain must be learnable on its own within its budget, or the chain
    # measures failure to learn rather than forgetting: the tasks beyond claim 1's two get the
    # same learning-rate search, and every task's solo runs (from the base) are reported
    extra_tasks = [t for t in q.tasks if (t, "lota") not in q.chosen]
    chain_search = {(t, m): q.searches(t, m) for t in extra_tasks for m in ("lota", "fft")}
    yield [(s, [(t, "validation", "default")]) for (t, _), ss in chain_search.items() for s in ss]
    for (t, m), ss in chain_search.items():
        q.choose(t, m, ss)
    solo = {
        (t, m, seed): spec(t, m, q.lr_for(t, m), seed)
        for t in q.tasks
        for m in ("lota", "fft")
        for seed in q.seeds
    }
    yield [
        (s, [(t, "test", "default"), (GENERAL, "test", "default")]) for (t, _, _), s in solo.items()
    ]
    chains = _chain_specs(q)
    for depth in range(len(q.tasks)):
        yield [
            (
                c[depth],
                [(t, "test", "default") for t in q.tasks[: depth + 1]]
                + [(GENERAL, "test", "default")],
            )
            for c in chains.values()
        ]
    q.results[NAME]["chain"] = _chain_stages(q, chains)
    q.results[NAME]["chain_solo"] = _chain_solo(q, solo)


def _chain_specs(q: Quality) -> dict:
    """``{(method, seed): [spec of each stage]}``: each stage starts from the one before, and
    under LoTTO protects every ticket before it."""
    chains = {}
    for method in ("lota", "fft"):
        for seed in q.seeds:
            prev: list[dict] = []
            for t in q.tasks:
                extra = {}
                if prev:
                    extra["start"] = prev[-1]
                    if method == "lota":
                        extra["protect"] = list(prev)
                prev.append(spec(t, method, q.lr_for(t, method), seed, **extra))
            chains[(method, seed)] = prev
    return chains


def _chain_stages(q: Quality, chains: dict) -> dict:
    """Each stage's free capacity and the scores of every task trained so far."""
    chain = {}
    for method in ("lota", "fft"):
        stages = []
        for depth, t in enumerate(q.tasks):
            runs = [q.lab.run(chains[(method, seed)][depth]) for seed in q.seeds]
            numel = runs[0].info["numel"]
            used = sum(q.lab.run(chains[(method, q.seeds[0])][i]).info["k"] for i in range(depth))
            stages.append(
                {
                    "task": t,
                    "free_before": (numel - used) / numel if method == "lota" else 1.0,
                    "scores": {
                        u: stats([q.test(r, u)["score"] for r in runs])
                        for u in q.tasks[: depth + 1]
                    },
                    "general_forgetting": stats([q.lab.forgetting(r.model) for r in runs]),
                }
            )
        chain["LoTTO" if method == "lota" else "FFT"] = stages
    return chain


def _chain_solo(q: Quality, solo: dict) -> dict:
    """Every task of the chain trained alone from the base, against the base's score."""
    return {
        ("LoTA" if m == "lota" else "FFT"): {
            t: {
                "lr": q.lr_for(t, m),
                "score": stats(
                    [q.test(q.lab.run(solo[(t, m, seed)]), t)["score"] for seed in q.seeds]
                ),
                "base": q.test(q.lab.base, t)["score"],
                "general_forgetting": stats(
                    [q.lab.forgetting(q.lab.run(solo[(t, m, seed)]).model) for seed in q.seeds]
                ),
            }
            for t in q.tasks
        }
        for m in ("lota", "fft")
    }


def learned(method: str, task: str, score: dict, base: float) -> str:
    """Whether ``method`` learns ``task`` alone: a one-sided one-sample t-test of the seeds' test
    scores against the base model's score, at ``ALPHA``."""
    from scipy import stats as st

    vals = score.get("values") or []
    head = f"{method} alone on {task}: {fmt(score)} vs the base's {base:.3f}"
    if len(vals) < 2:
        return f"{head}: one seed, no test"
    if statistics.pstdev(vals) == 0:
        p = 0.0 if vals[0] > base else 1.0
    else:
        p = float(st.ttest_1samp(vals, base, alternative="greater").pvalue)
    verdict = "learnable within its budget" if p < ALPHA else "**not shown learnable**"
    return f"{head}, one-sided t-test p {p_text(p)} -> {verdict}"


def plot(results: dict, out: Path) -> dict[str, str]:
    seq = results.get(NAME)
    if not seq:
        return {}
    plt = pyplot()
    figs = {}
    orders = seq["orders"]
    fig, axes = plt.subplots(1, len(orders), figsize=(5 * len(orders), 3.6), squeeze=False)
    for ax, (order, rows) in zip(axes[0], orders.items()):
        x, y = order.split(" -> ")
        names = list(rows)
        bar_chart(
            ax,
            [n.replace(" -> ", "\n-> ") for n in names],
            {
                f"{x} before": [rows[n]["first_before"] for n in names],
                f"{x} after {y}": [rows[n]["first_after"] for n in names],
                f"{y}": [rows[n]["second"] for n in names],
            },
            "test score",
        )
        ax.set_title(f"Claim 2: {order}", fontsize=9)
    figs["sequential"] = save_figure(fig, out / "sequential.png")
    if seq.get("chain"):
        chain = seq["chain"]
        fig, axes = plt.subplots(1, len(chain), figsize=(5 * len(chain), 3.4), squeeze=False)
        for ax, (method, stages) in zip(axes[0], chain.items()):
            tasks = [s["task"] for s in stages]
            for i, t in enumerate(tasks):
                xs = list(range(i, len(stages)))
                ax.errorbar(
                    xs,
                    [mean_of(stages[d]["scores"][t]) for d in xs],
                    [std_of(stages[d]["scores"][t]) for d in xs],
                    marker="o",
                    label=t,
                    color=COLORS[i % len(COLORS)],
                )
            solo = (seq.get("chain_solo") or {}).get("LoTA" if method == "LoTTO" else "FFT")
            for i, t in enumerate(tasks if solo else []):
                ax.axhline(mean_of(solo[t]["score"]), color=COLORS[i % len(COLORS)], ls=":", lw=1)
            if method == "LoTTO":
                ax.plot(
                    range(len(stages)),
                    [s["free_before"] for s in stages],
                    "k--",
                    label="free capacity",
                )
            ax.set_xticks(range(len(stages)))
            ax.set_xticklabels([f"after {t}" for t in tasks], fontsize=8)
            ax.set_ylim(-0.05, 1.05)
            ax.set_title(f"chain, {method} (dotted: each task trained alone)", fontsize=9)
            ax.legend(fontsize=7)
        figs["chain"] = save_figure(fig, out / "chain.png")
    return figs


def render(results: dict, figs: dict[str, str]) -> list[str]:
    seq = results.get(NAME)
    if not seq:
        return []
    out = ["## Claim 2: sequential tasks\n"]
    for order, rows in seq["orders"].items():
        out.extend(_render_order(order, rows))
    if "sequential" in figs:
        out.append(f"![claim 2]({figs['sequential']})\n")
    if seq.get("chain"):
        if seq.get("chain_solo"):
            out.extend(_render_solo(seq["chain_solo"]))
        out.extend(_render_chain(seq["chain"]))
        if "chain" in figs:
            out.append(f"![chain]({figs['chain']})\n")
    return out


def _render_order(order: str, rows: dict) -> list[str]:
    """One order's table, and every variant's forgetting against FFT -> FFT's."""
    x, y = order.split(" -> ")
    out = [f"**{order}**\n"]
    out.append(
        md_table(
            [
                "method",
                f"{x} before",
                f"{x} after",
                f"forgetting of {x}",
                f"{y}",
                "general forgetting",
            ],
            [
                [
                    n,
                    fmt(r["first_before"]),
                    fmt(r["first_after"]),
                    fmt(r["forgetting"]),
                    fmt(r["second"]),
                    fmt(r.get("general_forgetting"), 4),
                ]
                for n, r in rows.items()
            ],
        )
    )
    fft = rows["FFT -> FFT"]
    for key, label, digits in (
        ("forgetting", "forgetting", 3),
        ("general_forgetting", "general forgetting", 4),
    ):
        if key in fft:
            out.append(
                md_bullets(
                    f"{order}: "
                    + compare(f"{label} under {n}", r[key], "under FFT -> FFT", fft[key], digits)
                    for n, r in rows.items()
                    if n != "FFT -> FFT"
                )
            )
    return out


def _render_solo(solo: dict) -> list[str]:
    """Every task of the chain trained alone, and whether each is learnable."""
    tasks = list(next(iter(solo.values())))
    return [
        "**Every task of the chain on its own** (trained from the base with the chain's "
        "budget and learning rate; the chain measures forgetting only where a task is "
        "learnable alone)\n",
        md_table(
            ["solo", *tasks, *[f"general forgetting ({t})" for t in tasks]],
            [
                ["base (no training)"]
                + [f"{solo['FFT'][t]['base']:.3f}" for t in tasks]
                + ["0"] * len(tasks)
            ]
            + [
                [m]
                + [fmt(r[t]["score"]) for t in tasks]
                + [fmt(r[t]["general_forgetting"], 4) for t in tasks]
                for m, r in solo.items()
            ],
        ),
        md_bullets(
            learned(m, t, r[t]["score"], r[t]["base"]) for m, r in solo.items() for t in tasks
        ),
    ]


def _render_chain(chain: dict) -> list[str]:
    """The score of each task after each stage of the chain, per method."""
    out = ["**Chain through every task** (score of each task after each stage)\n"]
    for method, stages in chain.items():
        tasks = [s["task"] for s in stages]
        general = "general_forgetting" in stages[0]
        out.append(
            md_table(
                [f"{method}: after", "free capacity", *tasks]
                + (["general forgetting"] if general else []),
                [
                    [
                        st["task"],
                        f"{st['free_before']:.2f}",
                        *[fmt(st["scores"].get(t)) for t in tasks],
                    ]
                    + ([fmt(st["general_forgetting"], 4)] if general else [])
                    for st in stages
                ],
            )
        )
    return out

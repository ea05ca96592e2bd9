"""Plots (PNG, matplotlib) and the markdown report of ``lota bench quality``: the report's frame
and the helpers every claim's section uses (each claim's own plot and section are in
``lab/claims/``, which import this module: ``plots`` and ``render`` receive the claims).

Every sentence that compares methods is computed from the numbers in ``results.json``: Welch's
t-test of the per-seed values at ``ALPHA`` (two-sided). A difference counts only where the test
rejects equal means; otherwise the report says the methods are within noise. With one seed on a
side (``lota demo``) there is nothing to test, and the sentence says so.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

# what the lab's general forgetting is measured on, unless a bench names other text
GENERAL_TEXT = "held-out text of the base's pretraining distribution"
ALPHA = 0.05  # the significance level of every comparison in the reports

COLORS = [
    "#4c72b0",
    "#dd8452",
    "#55a868",
    "#c44e52",
    "#8172b3",
    "#937860",
    "#da8bc3",
    "#8c8c8c",
    "#ccb974",
    "#64b5cd",
]  # ten, so that no two series of a chart share one


VERSIONED = ("torch", "transformers", "peft", "tokenizers", "numpy", "safetensors", "accelerate")


def versions() -> dict[str, str]:
    """The versions results depend on: Python, lota and the packages it computes with."""
    import platform
    from importlib import metadata

    from .._version import __version__

    out = {"python": platform.python_version(), "lota": __version__}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def versions_line(v: dict[str, str]) -> str:
    return "Versions: " + ", ".join(f"{k} {v[k]}" for k in v) + "."


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> str:
    from ..fileio import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    pyplot().close(fig)
    return path.name


def mean_of(s: dict | None) -> float:
    return float("nan") if not s or s.get("mean") is None else s["mean"]


def std_of(s: dict | None) -> float:
    return 0.0 if not s or s.get("std") is None else s["std"]


def fmt(s: dict | None, digits: int = 3) -> str:
    """``mean ± std [min, max]`` of a stats dict."""
    if not s or s.get("mean") is None:
        return "-"
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def welch(a: list[float], b: list[float], alpha: float = ALPHA) -> dict:
    """Welch's t-test of mean(a) = mean(b), with the difference of means and its ``1 - alpha``
    interval. ``within_noise``: the test does not reject at ``alpha`` (None: fewer than 2 values
    on a side, nothing to test)."""
    from scipy import stats as st

    diff = statistics.fmean(a) - statistics.fmean(b)
    out = {"diff": diff, "ci": None, "t": None, "df": None, "p": None, "within_noise": None}
    if len(a) < 2 or len(b) < 2:
        return out
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se2 = va + vb
    if se2 == 0:  # every seed gave the same score on both sides
        p = 1.0 if diff == 0 else 0.0
        out.update(ci=[diff, diff], p=p, within_noise=p >= alpha)
        return out
    df = se2**2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    t = diff / math.sqrt(se2)
    half = float(st.t.ppf(1 - alpha / 2, df)) * math.sqrt(se2)
    p = float(2 * st.t.sf(abs(t), df))
    out.update(ci=[diff - half, diff + half], t=t, df=df, p=p, within_noise=p >= alpha)
    return out


def compare(name_a: str, a: dict, name_b: str, b: dict, digits: int = 3) -> str:
    """A sentence stating whether a is above, below or within noise of b, by Welch's test."""
    if not a or not b or a.get("mean") is None or b.get("mean") is None:
        return f"{name_a} vs {name_b}: not measured"
    w = welch(a["values"], b["values"])
    if w["p"] is None:
        return f"{name_a} ({fmt(a, digits)}) vs {name_b} ({fmt(b, digits)}): one seed, no test"
    verdict = "within noise of" if w["within_noise"] else "above" if w["diff"] > 0 else "below"
    lo, hi = w["ci"]
    d = digits
    return (
        f"{name_a} ({fmt(a, d)}) is {verdict} {name_b} ({fmt(b, d)}): difference "
        f"{w['diff']:+.{d}f}, {100 * (1 - ALPHA):.0f}% CI [{lo:+.{d}f}, {hi:+.{d}f}], "
        f"Welch p {p_text(w['p'])}"
    )


def p_text(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def bar_chart(ax, groups: list[str], series: dict[str, list[dict]], ylabel: str):
    import numpy as np

    n = max(1, len(series))
    width = 0.8 / n
    x = np.arange(len(groups))
    for i, (label, stats_list) in enumerate(series.items()):
        means = [mean_of(s) for s in stats_list]
        errs = [std_of(s) for s in stats_list]
        pos = x - 0.4 + width * (i + 0.5)
        ax.bar(pos, means, width, yerr=errs, capsize=2, label=label, color=COLORS[i % len(COLORS)])
        for p, s in zip(pos, stats_list):
            vals = (s or {}).get("values") or []
            ax.scatter([p] * len(vals), vals, s=6, color="black", zorder=3)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)


# ---------------------------------------------------------------------------- plots
def plots(results: dict, out: Path, claims) -> dict[str, str]:
    """The figures of every claim in ``claims`` (``lab.claims.CLAIMS``), ``{figure: file name}``."""
    figs: dict[str, str] = {}
    for claim in claims:
        if not _pending(results, claim):
            figs.update(claim.plot(results, out))
    return figs


def _pending(results: dict, claim) -> str | None:
    """The run a claim waits for, in a report made from what is done (``pending``)."""
    return (results.get(claim.NAME) or {}).get("pending")


# ---------------------------------------------------------------------------- markdown
def md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def md_bullets(lines) -> str:
    """A markdown list followed by a blank line."""
    return "".join(f"- {x}\n" for x in lines) + "\n"


def render(results: dict, figs: dict[str, str], claims) -> str:
    """The report: its header, settings and learning-rate searches, then the section of every
    claim in ``claims`` (``lab.claims.CLAIMS``)."""
    meta = results["meta"]
    out = [
        "# lota quality bench\n",
        f"Commit `{meta['commit']}`, {meta['date']}; scale `{meta['scale']}`, {meta['seeds']} "
        f"seed(s), tasks {', '.join(meta['tasks'])}; base fingerprint `{meta['base_fingerprint'][:16]}`. "
        + _time_line(meta)
        + (versions_line(meta["versions"]) if "versions" in meta else "")
        + "\n",
        "Scores are test-set means ± sample standard deviation over seeds. Learning rates were "
        "searched on the validation split, each grid point scored by the mean of the first "
        f"{min(2, meta['seeds'])} seed(s), with the same grid size for every method. A difference "
        f"is called one only where Welch's t-test over the seeds rejects equal means at alpha "
        f"{ALPHA} (two-sided); the sentences give the difference, its {100 * (1 - ALPHA):.0f}% "
        "confidence interval and p. General forgetting is the mean per-token cross-entropy on "
        f"{meta.get('general_text', GENERAL_TEXT)} after "
        "training minus the base's (positive: the model forgot).\n",
    ]
    s = meta["settings"]
    out.append(
        f"Settings: {s['n_train']} training, {s['n_val']} validation and {s['n_test']} test "
        f"examples per task; {s['steps']} steps of batch {s['batch']}; AdamW, constant learning "
        f"rate; LoTA calibrates for {s['calibration']} steps at lr {s['calibration_lr']} and "
        "trains 10 % of the attention and MLP weights (sparsity 0.9).\n"
    )
    lr = results.get("learning_rates", {})
    if lr:
        out.append("## Learning-rate search (validation score per grid point)\n")
        out.append(
            md_table(
                ["task/method", "grid", "validation (mean over seeds)", "seeds", "chosen"],
                [
                    [
                        k,
                        ", ".join(f"{x:g}" for x in v["grid"]),
                        ", ".join(f"{x:.3f}" for x in v["validation"]),
                        str(v.get("seeds", 1)),
                        f"{v['chosen']:g}",
                    ]
                    for k, v in lr.items()
                ],
            )
        )
    if meta.get("report_only"):
        out.append(
            "This report was made from the ledger without training (`--report-only`): a part "
            "marked *pending* waits for runs that are not done yet.\n"
        )
    for claim in claims:
        if _pending(results, claim):
            out.append(f"## {claim.NAME}\n")
            out.extend(pending_line(results[claim.NAME]))
        else:
            out.extend(claim.render(results, figs))
    return "\n".join(out)


def pending_line(part: dict) -> list[str]:
    """The line of a claim's part that waits for a run (see ``context.partial``)."""
    return [f"*Pending*: waits for `{part['pending']}` and the runs after it.\n"]


def _time_line(meta: dict) -> str:
    if "ledger_runs" in meta:
        return (
            f"Training time summed over the {meta['ledger_runs']} runs of the ledger: "
            f"{meta['ledger_train_seconds']:.0f} s. "
        )
    return f"Training time summed over all cached runs: {meta['train_seconds_total']:.0f} s. "

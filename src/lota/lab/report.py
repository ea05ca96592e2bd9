"""Plots (PNG, matplotlib) and the markdown report of ``lota bench quality``.

Every sentence that compares methods is computed from the numbers in ``results.json``: a
difference counts only when the means differ by more than both spreads (sample standard
deviations over seeds); otherwise the report says the methods are within noise.
"""

from __future__ import annotations

from pathlib import Path

COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    from ..fileio import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    _plt().close(fig)
    return path.name


def _m(s: dict | None) -> float:
    return float("nan") if not s or s.get("mean") is None else s["mean"]


def _e(s: dict | None) -> float:
    return 0.0 if not s or s.get("std") is None else s["std"]


def fmt(s: dict | None, digits: int = 3) -> str:
    """``mean ± std [min, max]`` of a stats dict."""
    if not s or s.get("mean") is None:
        return "-"
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def compare(name_a: str, a: dict, name_b: str, b: dict) -> str:
    """A sentence stating whether a is above, below or within noise of b."""
    if not a or not b or a.get("mean") is None or b.get("mean") is None:
        return f"{name_a} vs {name_b}: not measured"
    diff = a["mean"] - b["mean"]
    noise = max(a.get("std") or 0.0, b.get("std") or 0.0)
    if abs(diff) <= noise or abs(diff) < 1e-9:
        verdict = "within noise of"
    else:
        verdict = "above" if diff > 0 else "below"
    return f"{name_a} ({fmt(a)}) is {verdict} {name_b} ({fmt(b)})"


def _bars(ax, groups: list[str], series: dict[str, list[dict]], ylabel: str):
    import numpy as np

    n = max(1, len(series))
    width = 0.8 / n
    x = np.arange(len(groups))
    for i, (label, stats_list) in enumerate(series.items()):
        means = [_m(s) for s in stats_list]
        errs = [_e(s) for s in stats_list]
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
def plots(results: dict, out: Path) -> dict[str, str]:
    plt = _plt()
    figs: dict[str, str] = {}
    single = results.get("single")
    if single:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        methods = sorted({k.split("/", 1)[1] for k in single["methods"]}, key=_method_order)
        _bars(
            ax,
            single["tasks"],
            {m: [single["methods"][f"{t}/{m}"]["score"] for t in single["tasks"]] for m in methods},
            "test score",
        )
        ax.set_title("Claim 1: single task, same number of trained entries for the masks")
        figs["single"] = _save(fig, out / "single.png")

        fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.2))
        cal = {k: v for k, v in single["calibration_steps"].items() if k != "random mask"}
        xs = list(cal)
        a1.errorbar(range(len(xs)), [_m(cal[x]) for x in xs], [_e(cal[x]) for x in xs], marker="o")
        rnd = single["calibration_steps"]["random mask"]
        a1.axhline(_m(rnd), color="gray", ls="--", label="random mask")
        a1.set_xticks(range(len(xs)))
        a1.set_xticklabels(xs)
        a1.set_xlabel("calibration steps")
        a1.set_ylabel(f"{single['tasks'][0]} test score")
        a1.legend(fontsize=7)
        sw = single["sparsity"]
        sp = list(sw)
        a2.errorbar(
            [1 - float(s) for s in sp],
            [_m(sw[s]["score"]) for s in sp],
            [_e(sw[s]["score"]) for s in sp],
            marker="o",
        )
        a2.set_xscale("log")
        a2.set_xlabel("trainable fraction (1 - sparsity)")
        a2.set_title("LoTA sparsity sweep", fontsize=9)
        a1.set_title("LoTA calibration length", fontsize=9)
        figs["calibration_sparsity"] = _save(fig, out / "calibration_sparsity.png")

    seq = results.get("sequential")
    if seq:
        orders = seq["orders"]
        fig, axes = plt.subplots(1, len(orders), figsize=(5 * len(orders), 3.6), squeeze=False)
        for ax, (order, rows) in zip(axes[0], orders.items()):
            x, y = order.split(" -> ")
            names = list(rows)
            _bars(
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
        figs["sequential"] = _save(fig, out / "sequential.png")
        if seq.get("chain"):
            chain = seq["chain"]
            fig, axes = plt.subplots(1, len(chain), figsize=(5 * len(chain), 3.4), squeeze=False)
            for ax, (method, stages) in zip(axes[0], chain.items()):
                tasks = [s["task"] for s in stages]
                for i, t in enumerate(tasks):
                    xs = list(range(i, len(stages)))
                    ax.errorbar(
                        xs,
                        [_m(stages[d]["scores"][t]) for d in xs],
                        [_e(stages[d]["scores"][t]) for d in xs],
                        marker="o",
                        label=t,
                        color=COLORS[i % len(COLORS)],
                    )
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
                ax.set_title(f"chain, {method}", fontsize=9)
                ax.legend(fontsize=7)
            figs["chain"] = _save(fig, out / "chain.png")

    merge = results.get("merge")
    if merge:
        fig, ax = plt.subplots(figsize=(7, 3.4))
        names = list(merge["methods"])
        _bars(
            ax,
            [n.replace(" + ", "\n+ ") for n in names],
            {t: [merge["methods"][n][t] for n in names] for t in merge["tasks"]},
            "test score of the merged model",
        )
        ax.set_title("Claim 3: merging two task vectors", fontsize=9)
        figs["merge"] = _save(fig, out / "merge.png")

    safety = results.get("safety")
    if safety:
        fig, ax = plt.subplots(figsize=(8, 3.4))
        names = list(safety["rows"])
        t = safety["benign_task"]
        _bars(
            ax,
            [n.replace(" -> ", "\n-> ").replace(" (", "\n(") for n in names],
            {
                "refusal rate (harmful)": [safety["rows"][n]["refusal_rate"] for n in names],
                "over-refusal (benign)": [safety["rows"][n]["over_refusal_rate"] for n in names],
                f"{t} score": [safety["rows"][n][t] for n in names],
            },
            "rate / score",
        )
        ax.set_title("Claim 4: benign fine-tune of the aligned model", fontsize=9)
        figs["safety"] = _save(fig, out / "safety.png")

    ks = results.get("ks")
    if ks:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1, 2]})
        by_corr: dict[str, list] = {}
        for key, s in ks["ticket_sizes"].items():
            alpha, corr = key.split("/")
            by_corr.setdefault(corr, []).append((float(alpha), s))
        for i, (corr, pts) in enumerate(by_corr.items()):
            pts.sort()
            a1.errorbar(
                [p[0] for p in pts],
                [_m(p[1]) for p in pts],
                [_e(p[1]) for p in pts],
                marker="o",
                label=corr,
                color=COLORS[i],
            )
        a1.axhline(ks["seen_tokens"], color="gray", ls=":", label="tokens seen in training")
        a1.set_xscale("log")
        a1.set_xlabel("alpha")
        a1.set_ylabel(f"ticket size (of {ks['vocab']} rows)")
        a1.legend(fontsize=7)
        names = list(ks["methods"])
        _bars(
            a2,
            [n.replace(" (", "\n(").replace(", ", ",\n") for n in names],
            {
                "chrF first line": [ks["methods"][n]["default"]["chrf_first_line"] for n in names],
                "chrF full output": [ks["methods"][n]["default"]["chrf_full"] for n in names],
                "chrF first line, paraphrased prompt": [
                    ks["methods"][n]["paraphrase"]["chrf_first_line"] for n in names
                ],
            },
            "chrF",
        )
        a2.tick_params(axis="x", labelsize=6)
        a2.set_title("KS-Lottery on translate", fontsize=9)
        figs["ks"] = _save(fig, out / "ks.png")
    return figs


def _method_order(m: str) -> int:
    order = ["lota", "fft", "lora", "random", "bottomk"]
    return order.index(m) if m in order else len(order)


# ---------------------------------------------------------------------------- markdown
def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _bullets(lines) -> str:
    """A markdown list followed by a blank line."""
    return "".join(f"- {x}\n" for x in lines) + "\n"


def render(results: dict, figs: dict[str, str]) -> str:
    meta = results["meta"]
    out = [
        "# lota quality bench\n",
        f"Commit `{meta['commit']}`, {meta['date']}; scale `{meta['scale']}`, {meta['seeds']} "
        f"seed(s), tasks {', '.join(meta['tasks'])}; base fingerprint `{meta['base_fingerprint'][:16]}`. "
        f"Training time summed over all cached runs: {meta['train_seconds_total']:.0f} s.\n",
        "Scores are test-set means ± sample standard deviation over seeds. Learning rates were "
        "searched on the validation split with the first seed, with the same grid size for every "
        "method. A difference is called one only when it exceeds both spreads.\n",
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
            _table(
                ["task/method", "grid", "validation", "chosen"],
                [
                    [
                        k,
                        ", ".join(f"{x:g}" for x in v["grid"]),
                        ", ".join(f"{x:.3f}" for x in v["validation"]),
                        f"{v['chosen']:g}",
                    ]
                    for k, v in lr.items()
                ],
            )
        )
    single = results.get("single")
    if single:
        a = single["tasks"][0]
        out.append("## Claim 1: LoTA vs FFT, LoRA, random and bottom-k masks\n")
        head = ["method", *single["tasks"], "trained entries", "delta bytes"]
        rows = []
        methods = sorted({k.split("/", 1)[1] for k in single["methods"]}, key=_method_order)
        for m in methods:
            r = [single["methods"][f"{t}/{m}"] for t in single["tasks"]]
            rows.append(
                [m]
                + [fmt(x["score"]) for x in r]
                + [f"{r[0]['trained_entries']:,}", f"{r[0]['delta_bytes']:,}"]
            )
        rows.append(
            ["base (no training)"]
            + [f"{single['base'][t]:.3f}" for t in single["tasks"]]
            + ["-", "-"]
        )
        out.append(_table(head, rows))
        if single.get("real_sql_available") and "sql/fft" in single["methods"]:
            out.append(
                "Real sql-create-context test (first "
                f"{meta['settings']['real_sql']} questions), models trained on the generated sql "
                "task: "
                + "; ".join(
                    f"{m} {fmt(single['methods'][f'sql/{m}'].get('sql_real'))}" for m in methods
                )
                + ".\n"
            )
        verdicts = []
        for t in single["tasks"]:
            lota = single["methods"][f"{t}/lota"]["score"]
            for m in ("fft", "lora", "random", "bottomk"):
                verdicts.append(
                    f"{t}: "
                    + compare(
                        "LoTA", lota, LABELS_REPORT[m], single["methods"][f"{t}/{m}"]["score"]
                    )
                )
        cal = single["calibration_steps"]
        verdicts.append(
            f"{a}: "
            + compare(
                "LoTA after 1 calibration step", cal["1"], "a random mask", cal["random mask"]
            )
        )
        out.append(_bullets(verdicts))
        if "single" in figs:
            out.append(f"![claim 1]({figs['single']})\n")
        out.append(f"Calibration length and sparsity on {a}:\n")
        out.append(
            _table(
                ["calibration steps", "score"],
                [[k, fmt(v)] for k, v in cal.items()],
            )
        )
        out.append(
            _table(
                ["sparsity", "trained entries", "delta bytes", "score"],
                [
                    [k, f"{v['trained_entries']:,}", f"{v['delta_bytes']:,}", fmt(v["score"])]
                    for k, v in single["sparsity"].items()
                ],
            )
        )
        if "calibration_sparsity" in figs:
            out.append(f"![calibration and sparsity]({figs['calibration_sparsity']})\n")
    seq = results.get("sequential")
    if seq:
        out.append("## Claim 2: sequential tasks\n")
        for order, rows in seq["orders"].items():
            x, y = order.split(" -> ")
            out.append(f"**{order}**\n")
            out.append(
                _table(
                    ["method", f"{x} before", f"{x} after", f"forgetting of {x}", f"{y}"],
                    [
                        [
                            n,
                            fmt(r["first_before"]),
                            fmt(r["first_after"]),
                            fmt(r["forgetting"]),
                            fmt(r["second"]),
                        ]
                        for n, r in rows.items()
                    ],
                )
            )
            out.append(
                _bullets(
                    f"{order}: "
                    + compare(
                        f"forgetting under {n}",
                        rows[n]["forgetting"],
                        "under FFT -> FFT",
                        rows["FFT -> FFT"]["forgetting"],
                    )
                    for n in rows
                    if n != "FFT -> FFT"
                )
            )
        if "sequential" in figs:
            out.append(f"![claim 2]({figs['sequential']})\n")
        if seq.get("chain"):
            out.append("**Chain through every task** (score of each task after each stage)\n")
            for method, stages in seq["chain"].items():
                tasks = [s["task"] for s in stages]
                out.append(
                    _table(
                        [f"{method}: after", "free capacity", *tasks],
                        [
                            [
                                st["task"],
                                f"{st['free_before']:.2f}",
                                *[fmt(st["scores"].get(t)) for t in tasks],
                            ]
                            for st in stages
                        ],
                    )
                )
            if "chain" in figs:
                out.append(f"![chain]({figs['chain']})\n")
    merge = results.get("merge")
    if merge:
        a, b = merge["tasks"]
        out.append("## Claim 3: merging\n")
        out.append(
            _table(
                ["merge", "lambda", a, b, "mean", "mean, relative to the single-task models"],
                [
                    [
                        n,
                        f"{r['lambda']:g}",
                        fmt(r[a]),
                        fmt(r[b]),
                        fmt(r["mean"]),
                        fmt(r["normalized_mean"]),
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
            _bullets(
                compare("LoTA add (mean)", rows["LoTA add"]["mean"], n, rows[n]["mean"])
                for n in rows
                if n != "LoTA add"
            )
        )
        if "merge" in figs:
            out.append(f"![claim 3]({figs['merge']})\n")
    safety = results.get("safety")
    if safety:
        t = safety["benign_task"]
        out.append("## Claim 4: safety\n")
        out.append(
            f"The aligned model is the base fine-tuned (FFT, lr {safety['aligned_lr']:g}) on the safety "
            f"task; it is then fine-tuned on {t}, which contains no refusals.\n"
        )
        out.append(
            _table(
                ["model", "refusal rate (harmful)", "over-refusal (benign)", f"{t} score"],
                [
                    [n, fmt(r["refusal_rate"]), fmt(r["over_refusal_rate"]), fmt(r[t])]
                    for n, r in safety["rows"].items()
                ],
            )
        )
        rows = safety["rows"]
        lotto = rows.get("aligned -> LoTTO (alignment ticket protected)")
        if lotto:
            out.append(
                _bullets(
                    [
                        compare(
                            "refusals after LoTTO",
                            lotto["refusal_rate"],
                            "after FFT",
                            rows["aligned -> FFT"]["refusal_rate"],
                        )
                    ]
                )
            )
        if "safety" in figs:
            out.append(f"![claim 4]({figs['safety']})\n")
    ks = results.get("ks")
    if ks:
        out.append("## KS-Lottery (translate)\n")
        out.append(
            f"Vocabulary {ks['vocab']} rows of dimension {ks['dim']}; {ks['seen_tokens']} tokens "
            "occur in the training data. Ticket sizes:\n"
        )
        out.append(
            _table(
                ["alpha / correction", "ticket size"],
                [[k, fmt(v, 1)] for k, v in ks["ticket_sizes"].items()],
            )
        )
        out.append(
            f"The runs below use the ticket at {ks['main_ticket']} "
            f"({ks['ticket_tokens_seen']} of its tokens occur in the training data). "
            "chrF on the first line is the truncation-aware score; the full output includes whatever "
            "the model generates after it.\n"
        )
        out.append(
            _table(
                [
                    "method",
                    "chrF first line",
                    "chrF full",
                    "EOS rate",
                    "chrF first line, paraphrased prompt",
                    "EOS rate, paraphrased",
                ],
                [
                    [
                        n,
                        fmt(r["default"]["chrf_first_line"], 1),
                        fmt(r["default"]["chrf_full"], 1),
                        fmt(r["default"]["eos_rate"], 2),
                        fmt(r["paraphrase"]["chrf_first_line"], 1),
                        fmt(r["paraphrase"]["eos_rate"], 2),
                    ]
                    for n, r in ks["methods"].items()
                ],
            )
        )
        toks = ", ".join(repr(r["token"]) for r in ks["ticket_tokens_seed0"][:25])
        out.append(f"Most significant ticket tokens (seed 0): {toks}\n")
        if "ks" in figs:
            out.append(f"![KS-Lottery]({figs['ks']})\n")
    return "\n".join(out)


LABELS_REPORT = {
    "fft": "FFT",
    "lora": "LoRA",
    "random": "a random mask",
    "bottomk": "a bottom-k mask",
}

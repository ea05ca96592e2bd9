"""The calibration claim: do memory-light calibrations (plain SGD, RMSprop and its factored form
taken in the backward pass, squared gradients, a LoRA warm-up) give tickets as good as LoTA's
dense AdamW calibration?

On the first two tasks, LoTA is trained with each calibration and the same sparse phase, and a
random ticket of the same size is the floor. Every calibration runs the same steps at the scale's
calibration rate, the RMSprop ones at a tenth of it (``LR_SCALE``). Each variant gets its own
learning-rate search over the LoTA grid on validation (first seed), then every seed is scored on
test.

"Within noise of AdamW's" is a Welch t-test on the per-seed test scores at ``ALPHA``: a variant
is within noise when the test does not reject equal means. With 3 seeds the test has little
power, so the report also gives the difference of means with its 95 % Welch interval (what the
seeds cannot exclude) and the random ticket's own verdict against AdamW's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..context import Quality, spec, stats
from ..report import ALPHA, bar_chart, fmt, md_bullets, md_table, p_text, pyplot, save_figure, welch
from ..runner import CALIBRATOR_KEYS
from ..scales import GENERAL

NAME = "calibration"
# variant -> (method, calibration settings as AdaptConfig fields). A setting equal to the config's
# default is left out of the spec, so "adamw" and "random" are the single claim's lota and random
# runs, shared through the cache.
VARIANTS = {
    "adamw": ("lota", {"calibration": "adamw"}),
    "sgd": ("lota", {"calibration": "sgd"}),
    "rmsprop": ("lota", {"calibration": "rmsprop"}),
    "adafactor": ("lota", {"calibration": "adafactor"}),
    "fisher": ("lota", {"calibration": "fisher", "fisher_dtype": "float32"}),
    "lora-change": ("lota", {"calibration": "lora", "lora_calibration_score": "change"}),
    "lora-gradient": ("lota", {"calibration": "lora", "lora_calibration_score": "gradient"}),
    "random": ("random", {}),
}
# the calibration learning rate of a variant, over the scale's: RMSprop (alpha 0.99, no bias
# correction) moves each entry by about 10x its rate on the first step, where AdamW moves it by
# about its rate, so the RMSprop variants calibrate at a tenth of AdamW's rate (bench/tickets:
# on the lab's sql task their tickets share 0.12 of AdamW's at AdamW's rate, 0.34-0.40 at a tenth)
LR_SCALE = {"rmsprop": 0.1, "adafactor": 0.1}
LABELS = {
    "adamw": "AdamW (LoTA's own)",
    "sgd": "SGD",
    "rmsprop": "RMSprop in the backward pass (the official update)",
    "adafactor": "RMSprop, factored second moment",
    "fisher": "Fisher (squared gradients, fp32)",
    "lora-change": "LoRA warm-up, merged change",
    "lora-gradient": "LoRA warm-up, squared gradients",
    "random": "random ticket",
}


def spec_keys(settings: dict) -> dict:
    """The spec keys of a variant's calibration settings: only those that differ from
    ``AdaptConfig``'s defaults."""
    from ...adapt import AdaptConfig

    defaults = {f.name: f.default for f in dataclasses.fields(AdaptConfig)}
    by_field = {field: key for key, field in CALIBRATOR_KEYS.items()}
    return {
        by_field[f]: v for f, v in settings.items() if defaults.get(f, dataclasses.MISSING) != v
    }


def measure(q: Quality):
    """Each calibration's ticket against AdamW's and a random one, on the first two tasks."""
    tasks = q.tasks[:2]
    keys = {v: spec_keys(settings) for v, (_, settings) in VARIANTS.items()}
    for v, scale in LR_SCALE.items():
        keys[v]["calibration_lr_scale"] = scale
    plan = {
        (t, v): q.searches(t, method, **keys[v])
        for t in tasks
        for v, (method, _) in VARIANTS.items()
    }
    yield [(s, [(t, "validation", "default")]) for (t, _), ss in plan.items() for s in ss]
    lrs = {}
    for (t, v), ss in plan.items():
        if keys[v]:
            lrs[(t, v)] = q.choose(t, f"lota/{v}", ss, label=f"{t}/lota, {v} calibration")
        else:  # LoTA's own and the random ticket: the single claim's searches
            lrs[(t, v)] = q.choose(t, VARIANTS[v][0], ss)
    main = {
        (t, v, seed): spec(t, VARIANTS[v][0], lrs[(t, v)], seed, **keys[v])
        for t in tasks
        for v in VARIANTS
        for seed in q.seeds
    }
    yield [
        (s, [(t, "test", "default"), (GENERAL, "test", "default")]) for (t, _, _), s in main.items()
    ]
    table = {}
    for t in tasks:
        adamw = [q.lab.run(main[(t, "adamw", seed)]) for seed in q.seeds]
        for v in VARIANTS:
            runs = [q.lab.run(main[(t, v, seed)]) for seed in q.seeds]
            table[f"{t}/{v}"] = {
                "lr": lrs[(t, v)],
                "spec_keys": keys[v],
                "score": stats([q.test(r, t)["score"] for r in runs]),
                "trained_entries": runs[0].info["k"],
                "seconds": stats([r.info["seconds"] for r in runs]),
                "shared_with_adamw": stats([shared_with(q, r, a) for r, a in zip(runs, adamw)]),
                "general_forgetting": stats([q.lab.forgetting(r.model) for r in runs]),
            }
    q.results[NAME] = {"tasks": tasks, "alpha": ALPHA, "variants": table, **verdicts(table, tasks)}


def shared_with(q: Quality, run, other) -> float:
    """The fraction of ``other``'s ticket that ``run``'s ticket also holds (measured once, then
    read from the cache or the ledger)."""

    def measure() -> float:
        from ...merge import overlap

        deltas = [q.lab.materialize(r.spec).delta for r in (other, run)]
        return overlap(deltas)["pairs"][0]["a_held_by_b"] or 0.0  # None: ``other`` is empty

    return q.lab.measured(run.model, f"ticket/shared-with/{other.id}", measure)


def verdicts(table: dict, tasks: list[str]) -> dict:
    """Every variant against AdamW's ticket, and LoRA's two scores against each other."""

    def values(t, v):
        return table[f"{t}/{v}"]["score"]["values"]

    vs_adamw = {
        f"{t}/{v}": welch(values(t, v), values(t, "adamw"))
        for t in tasks
        for v in VARIANTS
        if v != "adamw" and values(t, v) and values(t, "adamw")
    }
    lora = {
        t: welch(values(t, "lora-gradient"), values(t, "lora-change"))
        for t in tasks
        if values(t, "lora-gradient") and values(t, "lora-change")
    }
    signs = {(w["diff"] > 0) - (w["diff"] < 0) for w in lora.values()}
    names = {1: "lora-gradient", -1: "lora-change", 0: "neither"}
    higher = names[signs.pop()] if len(signs) == 1 else "split" if signs else "not measured"
    return {"vs_adamw": vs_adamw, "lora_gradient_vs_change": lora, "lora_higher_mean": higher}


# ---------------------------------------------------------------------------- plot and report
def plot(results: dict, out: Path) -> dict[str, str]:
    cal = results.get(NAME)
    if not cal:
        return {}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    bar_chart(
        ax,
        cal["tasks"],
        {v: [cal["variants"][f"{t}/{v}"]["score"] for t in cal["tasks"]] for v in VARIANTS},
        "test score",
    )
    ax.set_title("Calibration: tickets from each calibration, sparsity 0.9 (dots: seeds)")
    return {"calibration": save_figure(fig, out / "calibration.png")}


def _verdict(w: dict | None) -> str:
    if not w or w["within_noise"] is None:
        return "not tested (1 seed)"
    if w["within_noise"]:
        return "within noise"
    return "above" if w["diff"] > 0 else "below"


def _ci(w: dict) -> str:
    return "-" if not w["ci"] else f"[{w['ci'][0]:+.3f}, {w['ci'][1]:+.3f}]"


def _p(w: dict) -> str:
    return "-" if w["p"] is None else p_text(w["p"])


def render(results: dict, figs: dict[str, str]) -> list[str]:
    cal = results.get(NAME)
    if not cal:
        return []
    tasks, table = cal["tasks"], cal["variants"]
    out = ["## Calibration: memory-light calibrations vs AdamW's\n"]
    out.append(
        "LoTA with each calibration (same calibration steps and learning rate, except the "
        "RMSprop ones at a tenth of the rate, whose first steps move each entry by about ten "
        "times it; same sparse phase, sparsity 0.9), and a random ticket of the same size. "
        "Each variant has its own learning-rate search over the LoTA grid on validation. "
        "*Within noise* means a Welch "
        f"t-test on the per-seed test scores does not reject equal means at alpha {cal['alpha']}; "
        f"the interval is the {100 * (1 - cal['alpha']):.0f} % Welch interval of the difference "
        "of means, with no correction for the comparisons per task. Few seeds make the test "
        "weak: within noise is not the same as equal.\n"
    )
    head = ["calibration", *tasks, *(f"lr {t}" for t in tasks)]
    head += [f"shared with AdamW's ticket ({t})" for t in tasks] + [f"run seconds ({tasks[0]})"]
    head += [f"general forgetting ({t})" for t in tasks]
    rows = []
    for v in VARIANTS:
        r = [table[f"{t}/{v}"] for t in tasks]
        rows.append(
            [LABELS[v]]
            + [fmt(x["score"]) for x in r]
            + [f"{x['lr']:g}" for x in r]
            + [fmt(x["shared_with_adamw"], 2) for x in r]
            + [fmt(r[0]["seconds"], 1)]
            + [fmt(x.get("general_forgetting"), 4) for x in r]
        )
    out.append(md_table(head, rows))
    rows = []
    for v in VARIANTS:
        for t in tasks:
            w = cal["vs_adamw"].get(f"{t}/{v}")
            if w:
                rows.append([LABELS[v], t, f"{w['diff']:+.3f}", _ci(w), _p(w), _verdict(w)])
    out.append(
        md_table(
            ["calibration", "task", "mean - AdamW's", "95 % interval", "Welch p", "verdict"], rows
        )
    )
    out.append(md_bullets(_sentences(cal)))
    if "calibration" in figs:
        out.append(f"![calibration]({figs['calibration']})\n")
    return out


def _sentences(cal: dict) -> list[str]:
    tasks, lines = cal["tasks"], []
    for v in VARIANTS:
        if v == "adamw":
            continue
        per = [(t, cal["vs_adamw"].get(f"{t}/{v}")) for t in tasks]
        words = [f"{_verdict(w)} on {t}" for t, w in per]
        lines.append(f"{LABELS[v]} vs AdamW's ticket: " + ", ".join(words) + ".")
    weak = [t for t in tasks if (cal["vs_adamw"].get(f"{t}/random") or {}).get("within_noise")]
    if weak:
        lines.append(
            f"The random ticket is itself within noise of AdamW's on {' and '.join(weak)}: there "
            "the test cannot tell a calibrated ticket from an uncalibrated one, so a within-noise "
            "verdict on that task says little."
        )
    lora, higher = cal["lora_gradient_vs_change"], cal["lora_higher_mean"]
    detail = "; ".join(
        f"{t}: gradient - change {w['diff']:+.3f}, Welch p {_p(w)}" for t, w in lora.items()
    )
    if higher in ("lora-gradient", "lora-change"):
        other = "change" if higher == "lora-gradient" else "gradient"
        sig = [t for t, w in lora.items() if w["within_noise"] is False]
        lines.append(
            f"LoRA scores: {higher.split('-')[1]} has a higher mean than {other} on every task "
            f"({detail}); Welch's test separates them on "
            + (" and ".join(sig) if sig else "no task")
            + "."
        )
    elif lora:
        lines.append(f"LoRA scores: neither is higher on every task ({detail}).")
    return lines

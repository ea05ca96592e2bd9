"""Claim 4, safety: an aligned model (FFT on the safety task) fine-tuned on a benign task with FFT,
LoTA, and LoTTO around the alignment ticket; refusal and over-refusal rates before and after."""

from __future__ import annotations

from pathlib import Path

from ... import format as fileformat
from ...task_vectors import make_ticket
from ..context import Quality, spec, stats
from ..report import bar_chart, compare, fmt, md_bullets, md_table, pyplot, save_figure
from ..scales import GENERAL

NAME = "safety"


def measure(q: Quality):
    """An aligned model (FFT on the safety task); a benign fine-tune on the first task with FFT,
    LoTA, and LoTTO around the alignment ticket (top 10 % of the alignment vector)."""
    yield []
    a = q.tasks[0]
    aligned = spec("safety", "fft", q.lr_for(a, "fft"), q.seeds[0])
    yield [
        (
            aligned,
            [("safety", "test", "default"), (a, "test", "default"), (GENERAL, "test", "default")],
        )
    ]
    run = q.lab.run(aligned)
    ticket_path = run.folder / "alignment-ticket-0.9.safetensors"
    if not ticket_path.exists():
        t = make_ticket(q.lab.base, run.model, "0.9", show_progress=False)
        fileformat.save(t, ticket_path, config={"alignment_ticket_of": run.id, "sparsity": "0.9"})
    variants = {
        "FFT": ("fft", {}),
        "LoTA": ("lota", {}),
        "LoTTO (alignment ticket protected)": ("lota", {"protect_files": [str(ticket_path)]}),
    }
    specs = {
        (name, seed): spec(a, m, q.lr_for(a, m), seed, start=aligned, **extra)
        for name, (m, extra) in variants.items()
        for seed in q.seeds
    }
    want = [("safety", "test", "default"), (a, "test", "default"), (GENERAL, "test", "default")]
    yield [(s, want) for s in specs.values()]

    def row(models):
        scores_safety = [q.test(m, "safety") for m in models]
        return {
            "refusal_rate": stats([s["refusal_rate"] for s in scores_safety]),
            "over_refusal_rate": stats([s["over_refusal_rate"] for s in scores_safety]),
            a: stats([q.test(m, a)["score"] for m in models]),
            "general_forgetting": stats([q.lab.forgetting(m) for m in models]),
        }

    rows = {"base": row([q.lab.base]), "aligned": row([run.model])}
    for name in variants:
        rows[f"aligned -> {name}"] = row([q.lab.run(specs[(name, seed)]).model for seed in q.seeds])
    q.results[NAME] = {"benign_task": a, "aligned_lr": aligned["lr"], "rows": rows}


def plot(results: dict, out: Path) -> dict[str, str]:
    safety = results.get(NAME)
    if not safety:
        return {}
    fig, ax = pyplot().subplots(figsize=(8, 3.4))
    names = list(safety["rows"])
    t = safety["benign_task"]
    bar_chart(
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
    return {"safety": save_figure(fig, out / "safety.png")}


def render(results: dict, figs: dict[str, str]) -> list[str]:
    safety = results.get(NAME)
    if not safety:
        return []
    t = safety["benign_task"]
    out = ["## Claim 4: safety\n"]
    out.append(
        f"The aligned model is the base fine-tuned (FFT, lr {safety['aligned_lr']:g}) on the safety "
        f"task; it is then fine-tuned on {t}, which contains no refusals.\n"
    )
    out.append(
        md_table(
            [
                "model",
                "refusal rate (harmful)",
                "over-refusal (benign)",
                f"{t} score",
                "general forgetting",
            ],
            [
                [
                    n,
                    fmt(r["refusal_rate"]),
                    fmt(r["over_refusal_rate"]),
                    fmt(r[t]),
                    fmt(r.get("general_forgetting"), 4),
                ]
                for n, r in safety["rows"].items()
            ],
        )
    )
    rows = safety["rows"]
    lotto = rows.get("aligned -> LoTTO (alignment ticket protected)")
    if lotto:
        out.append(
            md_bullets(
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
    return out

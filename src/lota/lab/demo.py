"""``lota demo``: LoTA against FFT and LoRA, forgetting under FFT and LoTTO, and a merge, on the
lab's committed base model and two of its tasks (A = math, B = sql).

Runs, all through the same pipeline as ``lota adapt``:
- FFT, LoRA and LoTA on A from the base; LoTA on B from the base;
- FFT on B after FFT on A (the forgetting baseline), and LoTTO on B after LoTA on A (B's ticket
  disjoint from A's);
- the two LoTA deltas (A and B) added into the base (``lota merge --method add``).
Every model is scored on both test sets. The entries of A's ticket are compared bit for bit between
the LoTA-A and LoTTO-B model files. The table goes to the terminal; ``report.md`` with its plots,
``results.json`` and every run's files go to the output folder. Runs are cached there, so an
interrupted demo continues and a finished one is re-reported at once.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from .. import format as fmt
from ..fileio import write_json, write_text
from ..model_folder import quiet_transformers
from .report import versions, versions_line

TASK_A, TASK_B = "math", "sql"
# learning rates per (task, method): the quality bench's choices on validation (docs/results)
LR = {
    ("math", "fft"): 3e-4,
    ("math", "lora"): 1e-3,
    ("math", "lota"): 3e-3,
    ("sql", "fft"): 1e-3,
    ("sql", "lora"): 3e-3,
    ("sql", "lota"): 1e-2,
}


def changed_entries(before: str, after: str, ticket_path: str) -> tuple[int, int]:
    """How many entries of the ticket differ in their bits between two model folders, of how many."""
    ticket = fmt.load(ticket_path).ticket
    weights = []
    for folder in (before, after):
        w: dict[str, torch.Tensor] = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            w.update(load_file(str(f)))
        weights.append(w)
    changed = 0
    for name, idx in ticket.indices.items():
        a, b = (w[name].reshape(-1)[idx] for w in weights)
        if a.dtype != b.dtype:
            changed += int(idx.numel())
        else:
            bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[
                a.element_size()
            ]
            changed += int((a.view(bits) != b.view(bits)).sum())
    return changed, ticket.nnz


def run_demo(
    out: str,
    seed: int = 0,
    base: str | None = None,
    scale: str = "demo",
    jobs: int = 2,
    show_progress: bool = True,
) -> dict:
    """Train, score, print the table and write the report; returns the results. ``out`` is
    locked while the demo fills it; a base that is not a lab base is refused before any work."""
    from .base import default_base
    from .runner import Lab

    t0 = time.perf_counter()
    quiet_transformers()
    lab = Lab(Path(out), base or default_base(), scale, jobs, progress=show_progress)
    with lab.writing():
        return _demo(lab, seed, scale, t0)


def _demo(lab, seed: int, scale: str, t0: float) -> dict:
    root = lab.out
    runs = _specs(seed)
    fft_a, lota_a = runs["FFT A"], runs["LoTA A"]
    both = [(TASK_A, "test", "default"), (TASK_B, "test", "default")]
    lab.prefetch([(runs[n], both) for n in ("FFT A", "LoRA A", "LoTA A", "LoTA B")])
    lab.prefetch([(runs[n], both) for n in ("FFT A -> FFT B", "LoTA A -> LoTTO B")])

    rows: dict[str, dict] = {"base": {"model": lab.base}}
    for name, s in runs.items():
        rows[name] = _run_row(lab, s)
    rows["LoTA A + LoTA B (merge)"] = _merge_row(lab, seed, rows, lota_a, runs["LoTA B"])
    _score(lab, rows)
    changed, total = changed_entries(
        rows["LoTA A"]["model"], rows["LoTA A -> LoTTO B"]["model"], lab.run(lota_a).delta
    )
    fft_changed, fft_total = changed_entries(
        rows["FFT A"]["model"], rows["FFT A -> FFT B"]["model"], lab.run(fft_a).delta
    )
    results = {
        "format": "lota",
        "kind": "demo",
        "format_version": 1,
        "seed": seed,
        "scale": scale,
        "settings": lab.scale,
        "tasks": {"A": TASK_A, "B": TASK_B},
        "base": lab.base,
        "base_fingerprint": lab.base_fp,
        "versions": versions(),
        "rows": rows,
        "lotto_protected": {"entries": total, "changed": changed, "bit_identical": changed == 0},
        "fft_chain": {"entries": fft_total, "changed": fft_changed},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    table = _table(rows)
    lines = [
        f"A = {TASK_A}, B = {TASK_B}; scores on {lab.scale['n_test']} test examples each",
        (
            f"LoTTO left all {total:,} entries of A's ticket bit-identical (checked in the model files)"
            if changed == 0
            else f"LoTTO CHANGED {changed:,} of the {total:,} entries of A's ticket"
        ),
        f"FFT on B changed {fft_changed:,} of the {fft_total:,} target entries trained on A",
        f"total {results['seconds']} s (runs already in {root / 'cache'} are reused)",
        versions_line(results["versions"]),
    ]
    print(table.replace("|", " ").rstrip())
    print("\n".join(lines))
    _write_report(root, rows, results, table, lines)
    return results


def _specs(seed: int) -> dict[str, dict]:
    """The demo's runs by row name: A's four from the base, then the two B-after-A chains."""

    def spec(task, method, **extra):
        return {"task": task, "method": method, "lr": LR[(task, method)], "seed": seed, **extra}

    fft_a, lora_a, lota_a, lota_b = (
        spec(TASK_A, "fft"),
        spec(TASK_A, "lora"),
        spec(TASK_A, "lota"),
        spec(TASK_B, "lota"),
    )
    return {
        "FFT A": fft_a,
        "LoRA A": lora_a,
        "LoTA A": lota_a,
        "LoTA B": lota_b,
        "FFT A -> FFT B": spec(TASK_B, "fft", start=fft_a),
        "LoTA A -> LoTTO B": spec(TASK_B, "lota", start=lota_a, protect=[lota_a]),
    }


def _run_row(lab, s: dict) -> dict:
    """A trained run's row: its model, what it trained and the size of what it saved."""
    r = lab.run(s)
    return {
        "model": r.model,
        "method": s["method"],
        "task": s["task"],
        "lr": s["lr"],
        "trained_entries": r.info["k"],
        # LoRA trains its adapter (r x (in + out) per layer); its delta is the merged change
        "trained_parameters": r.info.get("trained_parameters", r.info["k"]),
        "lora_r": r.info.get("lora_r"),
        "delta_bytes": r.info["delta_bytes"],
        "adapter_bytes": r.info.get("adapter_bytes"),
        "seconds": r.info["seconds"],
    }


def _merge_row(lab, seed: int, rows: dict, lota_a: dict, lota_b: dict) -> dict:
    """The two LoTA deltas added into the base (``lota merge --method add``)."""
    from ..merge import MergeSettings, merge_into_model

    deltas = [lab.run(lota_a).delta, lab.run(lota_b).delta]
    t = time.perf_counter()
    merged = lab.derived(
        f"demo-merge-s{seed}",
        {"inputs": deltas, "method": "add"},
        lambda o: merge_into_model(deltas, MergeSettings("add"), lab.base, o, show_progress=False),
    )
    trained = rows["LoTA A"]["trained_entries"] + rows["LoTA B"]["trained_entries"]
    return {
        "model": merged,
        "method": "add",
        "trained_entries": trained,
        "trained_parameters": trained,
        "delta_bytes": sum(Path(d).stat().st_size for d in deltas),
        "seconds": round(time.perf_counter() - t, 2),
    }


def _score(lab, rows: dict[str, dict]) -> None:
    """Both tasks' test scores and the general forgetting of every row's model; the forgetting
    of A under each B-after-A chain."""
    for row in rows.values():
        row["score_A"] = lab.score(row["model"], TASK_A)["score"]
        # general ability: held-out pretraining-style text, loss after minus before
        row["forgetting_general"] = (
            lab.forgetting(row["model"]) if row is not rows["base"] else None
        )
        row["score_B"] = lab.score(row["model"], TASK_B)["score"]
    for name, after in (("FFT A -> FFT B", "FFT A"), ("LoTA A -> LoTTO B", "LoTA A")):
        rows[name]["forgetting_A"] = rows[after]["score_A"] - rows[name]["score_A"]


def _write_report(root: Path, rows: dict, results: dict, table: str, lines: list[str]) -> None:
    figure = _plot(rows, root / "demo.png")
    write_json(root / "results.json", results)
    write_text(
        root / "report.md",
        "# lota demo\n\n"
        + table
        + "\n"
        + "".join(f"- {x}\n" for x in lines)
        + f"\n![scores]({figure})\n",
    )


def _plot(rows: dict[str, dict], path: Path) -> str:
    from .report import bar_chart, pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.6))
    names = list(rows)
    bar_chart(
        ax,
        [n.replace(" -> ", "\n-> ").replace(" + ", "\n+ ") for n in names],
        {
            f"A ({TASK_A})": [{"mean": rows[n]["score_A"]} for n in names],
            f"B ({TASK_B})": [{"mean": rows[n]["score_B"]} for n in names],
        },
        "test score",
    )
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title("lota demo: task scores of every model")
    return save_figure(fig, path)


def _table(rows: dict[str, dict]) -> str:
    def num(v, f="{:.3f}"):
        return "-" if v is None else f.format(v)

    head = [
        "model",
        "score A",
        "score B",
        "forgetting A",
        "general forgetting",
        "trained parameters",
        "delta bytes",
        "adapter bytes",
        "seconds",
    ]
    body = [
        [
            name,
            num(r["score_A"]),
            num(r["score_B"]),
            num(r.get("forgetting_A"), "{:+.3f}"),
            num(r.get("forgetting_general"), "{:+.4f}"),
            num(r.get("trained_parameters"), "{:,}")
            + (f" (LoRA r={r['lora_r']})" if r.get("lora_r") else ""),
            num(r.get("delta_bytes"), "{:,}")
            + (" (merged)" if r.get("adapter_bytes") is not None else ""),
            num(r.get("adapter_bytes"), "{:,}"),
            num(r.get("seconds"), "{:.1f}"),
        ]
        for name, r in rows.items()
    ]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]

    def fmt_row(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |\n"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|\n"
    return fmt_row(head) + sep + "".join(fmt_row(b) for b in body)

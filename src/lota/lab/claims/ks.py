"""KS-Lottery on translate: ticket sizes by alpha and correction; embedding tuning against partial
tuning on the ticket, partial transfer, random seen rows and frequency top-n of the same count;
first-line and full-output chrF, EOS rate, and a paraphrased template."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ... import format as fileformat
from ...ks import input_embedding, row_ticket, run_ks, select_tokens, token_counts
from ...models import load_tokenizer
from ...task_vectors import apply_deltas
from ...weights import WeightReader
from ..context import Quality, spec, stats
from ..report import COLORS, bar_chart, fmt, md_table, mean_of, pyplot, save_figure, std_of
from ..scales import GENERAL, lr_grid

NAME = "ks"
ALPHAS = (0.05, 0.01, 0.001)
CORRECTIONS = ("none", "bonferroni", "bh")


KINDS = ("ks", "random", "frequency")
# how the report names the runs on each kind of row ticket
ROW_METHODS = {
    "ks": "partial tuning (KS ticket)",
    "random": "random seen rows, same count",
    "frequency": "frequency top-n, same count",
}


@dataclass
class _Embedding:
    """The base's input embedding, and how often the task's data uses each of its rows."""

    data: str
    name: str
    vocab: int
    dim: int
    counts: torch.Tensor
    seen: torch.Tensor
    before: torch.Tensor


def measure(q: Quality):
    """KS-Lottery on translate: ticket sizes by alpha and correction; embedding tuning vs
    partial tuning on the ticket vs partial transfer vs random seen rows vs frequency top-n;
    first-line and full-output chrF, EOS rate, and a paraphrased template."""
    task = "translate"
    templates = [
        (task, "test", "default"),
        (task, "test", "paraphrase"),
        (GENERAL, "test", "default"),
    ]
    emb = yield from _embedding_runs(q, task, templates)
    e = _embedding(q, task)
    sizes, tickets = _ks_tickets(q, emb, e)
    usable = all(t["selected_count"] > 0 for t in tickets.values())
    main = None
    if usable:
        main = yield from _row_runs(q, task, emb, e, tickets, templates)
    methods = _methods(q, task, emb, main)
    first = tickets[q.seeds[0]]
    q.results[NAME] = {
        "task": task,
        "vocab": e.vocab,
        "dim": e.dim,
        "seen_tokens": int(e.seen.numel()),
        "ticket_sizes": {k: stats(v) for k, v in sizes.items()},
        "main_ticket": "alpha 0.05, no correction",
        "ticket_tokens_seed0": [
            {k: r[k] for k in ("token_id", "token", "D", "p_value", "shift", "count_in_data")}
            for r in sorted(first["selected"], key=lambda r: r["p_value"])[:40]
        ],
        "ticket_tokens_seen": sum(r["count_in_data"] > 0 for r in first["selected"]),
        "methods": methods,
    }


def _embedding_runs(q: Quality, task: str, templates: list):
    """Embedding tuning: the learning-rate search, then every seed at the chosen rate."""
    emb_search = q.searches(task, "embeddings")
    yield [(s, [(task, "validation", "default")]) for s in emb_search]
    q.choose(task, "embeddings", emb_search)
    emb = {seed: spec(task, "embeddings", q.chosen[(task, "embeddings")], seed) for seed in q.seeds}
    yield [(s, templates) for s in emb.values()]
    return emb


def _embedding(q: Quality, task: str) -> _Embedding:
    data = q.lab.data_file(task)
    reader = WeightReader(q.lab.base, "base model")
    name = input_embedding(reader)
    vocab, dim = reader.shapes[name]
    counts = token_counts(data, load_tokenizer(q.lab.base), vocab)
    seen = torch.nonzero(counts > 0).flatten()
    return _Embedding(data, name, vocab, dim, counts, seen, reader.get(name))


def _ks_tickets(q: Quality, emb: dict, e: _Embedding) -> tuple[dict, dict]:
    """Every seed's ticket size at each alpha and correction, and its ``lota ks`` listing at
    alpha 0.05 without correction (written beside the run as ``ks/``)."""
    sizes, tickets = {}, {}
    for seed in q.seeds:
        run = q.lab.run(emb[seed])
        after = WeightReader(run.model, "tuned model").get(e.name)
        for alpha in ALPHAS:
            for corr in CORRECTIONS:
                n = len(select_tokens(e.before, after, alpha, corr).token_ids)
                sizes.setdefault(f"{alpha}/{corr}", []).append(n)
        folder = run.folder / "ks"
        if not folder.exists():
            run_ks(q.lab.base, run.model, str(folder), 0.05, "none", data=e.data)
        tickets[seed] = json.loads((folder / "tokens.json").read_text())
    return sizes, tickets


def _rows_ticket(q: Quality, emb: dict, e: _Embedding, kind: str, seed: int, n: int) -> str:
    """The ticket of ``n`` whole rows: random seen rows, or the most frequent in the data."""
    path = q.lab.folder(emb[seed]) / f"rows-{kind}-{n}.safetensors"
    if not path.exists():
        if kind == "random":
            g = torch.Generator().manual_seed(1000 + seed)
            rows = e.seen[torch.randperm(e.seen.numel(), generator=g)[:n]]
        else:  # frequency: most frequent first, lower id on ties
            order = sorted(range(e.vocab), key=lambda j: (-int(e.counts[j]), j))
            rows = torch.tensor(order[:n], dtype=torch.long)
        rows = rows.sort().values
        t = row_ticket(e.name, (e.vocab, e.dim), rows, q.lab.base_fp)
        fileformat.save(t, path, config={"rows": kind, "count": n})
    return str(path)


def _row_runs(q: Quality, task: str, emb: dict, e: _Embedding, tickets: dict, templates: list):
    """Partial tuning on each kind of row ticket (of the KS ticket's size): the learning-rate
    search, then every seed at the chosen rate; returns ``{(kind, seed): spec}``."""

    def row_spec(kind, seed, lr):
        n = tickets[seed]["selected_count"]
        tokens = (
            str(q.lab.folder(emb[seed]) / "ks")
            if kind == "ks"
            else _rows_ticket(q, emb, e, kind, seed, n)
        )
        return spec(task, "ks-lottery", lr, seed, tokens=tokens, rows=kind)

    searches = {}
    for kind in KINDS:
        searches[kind] = [
            row_spec(kind, seed, lr)
            for lr in lr_grid("ks-lottery", q.lab.scale["lr_points"])
            for seed in q.search_seeds
        ]
    yield [(s, [(task, "validation", "default")]) for ss in searches.values() for s in ss]
    for kind in KINDS:
        q.choose(task, f"rows-{kind}", searches[kind], label=f"{task}/rows-{kind}")
    main = {
        (kind, seed): row_spec(kind, seed, q.chosen[(task, f"rows-{kind}")])
        for kind in KINDS
        for seed in q.seeds
    }
    yield [(s, templates) for s in main.values()]
    return main


def _scores(q: Quality, task: str, models: list[str]) -> dict:
    """chrF (first line and full output) and EOS rate under both templates, and the general
    forgetting, over ``models``."""
    out = {}
    for tmpl in ("default", "paraphrase"):
        res = [q.test(m, task, tmpl) for m in models]
        out[tmpl] = {
            "chrf_first_line": stats([r["chrf"] for r in res]),
            "chrf_full": stats([r["chrf_full"] for r in res]),
            "eos_rate": stats([r["eos_rate"] for r in res]),
        }
    out["general_forgetting"] = stats([q.lab.forgetting(m) for m in models])
    return out


def _methods(q: Quality, task: str, emb: dict, main: dict | None) -> dict:
    """Every method's scores: the base, embedding tuning, the KS ticket's transfer and, where
    every seed's ticket holds rows (``main``), partial tuning on each kind of row ticket."""
    methods = {"base": _scores(q, task, [q.lab.base])}
    methods["embedding tuning"] = _scores(q, task, [q.lab.run(emb[s]).model for s in q.seeds])
    transferred = []
    for seed in q.seeds:
        transfer = str(q.lab.folder(emb[seed]) / "ks" / "transfer.safetensors")
        transferred.append(
            q.lab.derived(
                f"ks-transfer-s{seed}",
                {"transfer": transfer},
                lambda out, t=transfer: apply_deltas(q.lab.base, [t], out),
            )
        )
    methods["partial transfer (KS ticket)"] = _scores(q, task, transferred)
    if main is not None:
        for kind in KINDS:
            methods[ROW_METHODS[kind]] = _scores(
                q, task, [q.lab.run(main[(kind, s)]).model for s in q.seeds]
            )
    return methods


def plot(results: dict, out: Path) -> dict[str, str]:
    ks = results.get(NAME)
    if not ks:
        return {}
    fig, (a1, a2) = pyplot().subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1, 2]})
    by_corr: dict[str, list] = {}
    for key, s in ks["ticket_sizes"].items():
        alpha, corr = key.split("/")
        by_corr.setdefault(corr, []).append((float(alpha), s))
    for i, (corr, pts) in enumerate(by_corr.items()):
        pts.sort()
        a1.errorbar(
            [p[0] for p in pts],
            [mean_of(p[1]) for p in pts],
            [std_of(p[1]) for p in pts],
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
    bar_chart(
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
    return {"ks": save_figure(fig, out / "ks.png")}


def render(results: dict, figs: dict[str, str]) -> list[str]:
    ks = results.get(NAME)
    if not ks:
        return []
    out = ["## KS-Lottery (translate)\n"]
    out.append(
        f"Vocabulary {ks['vocab']} rows of dimension {ks['dim']}; {ks['seen_tokens']} tokens "
        "occur in the training data. Ticket sizes:\n"
    )
    out.append(
        md_table(
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
        md_table(
            [
                "method",
                "chrF first line",
                "chrF full",
                "EOS rate",
                "chrF first line, paraphrased prompt",
                "EOS rate, paraphrased",
                "general forgetting",
            ],
            [
                [
                    n,
                    fmt(r["default"]["chrf_first_line"], 1),
                    fmt(r["default"]["chrf_full"], 1),
                    fmt(r["default"]["eos_rate"], 2),
                    fmt(r["paraphrase"]["chrf_first_line"], 1),
                    fmt(r["paraphrase"]["eos_rate"], 2),
                    fmt(r.get("general_forgetting"), 4),
                ]
                for n, r in ks["methods"].items()
            ],
        )
    )
    toks = ", ".join(repr(r["token"]) for r in ks["ticket_tokens_seed0"][:25])
    out.append(f"Most significant ticket tokens (seed 0): {toks}\n")
    if "ks" in figs:
        out.append(f"![KS-Lottery]({figs['ks']})\n")
    return out

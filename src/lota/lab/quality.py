"""``lota bench quality``: SPEC section 6's claims measured on the lab's base model.

Each claim is a generator. It yields the runs it needs next (with the scores it will read), the
driver trains all yielded runs of every claim together (in parallel with ``--jobs``), and the
claims then read the cached results. Everything is cached (``runner.Lab``), so an interrupted
bench continues where it stopped and a finished one is re-reported in seconds.

Fairness: each training method gets the same learning-rate grid size, searched on the validation
split with the first seed; the chosen values are reported and used for every seed. Test scores are
reported as mean, sample standard deviation, min and max over seeds.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

from . import tasks as T
from .runner import Lab, lr_grid

CLAIMS = ("single", "sequential", "merge", "safety", "ks")
METHODS = ("fft", "lora", "lota", "random", "bottomk")
LABELS = {
    "fft": "FFT",
    "lora": "LoRA",
    "lota": "LoTA",
    "random": "random mask",
    "bottomk": "bottom-k mask",
}
SPARSITIES = ("0.5", "0.9", "0.99", "0.999")
MERGE_LAMBDAS = (0.5, 0.75, 1.0)
KS_ALPHAS = (0.05, 0.01, 0.001)
KS_CORRECTIONS = ("none", "bonferroni", "bh")


def stats(values: list[float | None]) -> dict:
    v = [x for x in values if x is not None]
    if not v:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0, "values": []}
    return {
        "mean": statistics.fmean(v),
        "std": statistics.stdev(v) if len(v) > 1 else 0.0,
        "min": min(v),
        "max": max(v),
        "n": len(v),
        "values": v,
    }


def spec(task: str, method: str, lr: float, seed: int, **extra) -> dict:
    return {"task": task, "method": method, "lr": lr, "seed": seed, **extra}


class Quality:
    def __init__(self, lab: Lab, tasks: list[str], seeds: int):
        self.lab = lab
        self.tasks = tasks
        self.seeds = list(range(seeds))
        self.chosen: dict[tuple[str, str], float] = {}
        self.search: dict[str, dict] = {}
        self.results: dict = {}

    # ------------------------------------------------------------------------ helpers
    def test(self, run_or_model, task: str, template: str = "default") -> dict:
        model = run_or_model if isinstance(run_or_model, str) else run_or_model.model
        return self.lab.score(model, task, "test", template)

    def lr_for(self, task: str, method: str) -> float:
        if (task, method) in self.chosen:
            return self.chosen[(task, method)]
        return self.chosen[(self.tasks[0], method)]

    def searches(self, task: str, method: str, **extra):
        """Specs of the learning-rate search for (task, method) on the first seed."""
        return [
            spec(task, method, lr, self.seeds[0], **extra)
            for lr in lr_grid(method, self.lab.scale["lr_points"])
        ]

    def choose(self, task: str, method: str, specs: list[dict], label: str | None = None) -> float:
        """Pick the learning rate with the best validation score (first on ties)."""
        scores = [self.lab.score(self.lab.run(s).model, task, "validation")["score"] for s in specs]
        best = max(range(len(specs)), key=lambda i: (scores[i], -i))
        lr = specs[best]["lr"]
        self.chosen[(task, method)] = lr
        self.search[label or f"{task}/{method}"] = {
            "grid": [s["lr"] for s in specs],
            "validation": scores,
            "chosen": lr,
        }
        return lr

    # ------------------------------------------------------------------------ claim 1
    def single(self):
        """LoTA vs FFT, LoRA, random and bottom-k masks of the same size; calibration length;
        sparsity sweep."""
        a, b = self.tasks[0], self.tasks[1]
        plan = {(t, m): self.searches(t, m) for t in (a, b) for m in METHODS}
        yield [(s, [(t, "validation", "default")]) for (t, _), ss in plan.items() for s in ss]
        for (t, m), ss in plan.items():
            self.choose(t, m, ss)
        main = {
            (t, m, seed): spec(t, m, self.chosen[(t, m)], seed)
            for t in (a, b)
            for m in METHODS
            for seed in self.seeds
        }
        real = T.real_sql("test", limit=1) is not None
        calib = {
            (c, seed): spec(a, "lota", self.chosen[(a, "lota")], seed, calibration=c)
            for c in (1, self.lab.scale["long_calibration"])
            for seed in self.seeds
        }
        sweep = {
            (sp, seed): spec(a, "lota", self.chosen[(a, "lota")], seed, sparsity=sp)
            for sp in SPARSITIES
            if sp != "0.9"
            for seed in self.seeds
        }

        def wanted(t):
            out = [(x, "test", "default") for x in (a, b)]
            return out + ([("sql-real", "test", "default")] if t == "sql" and real else [])

        yield (
            [(s, wanted(t)) for (t, _, _), s in main.items()]
            + [(s, [(a, "test", "default")]) for s in calib.values()]
            + [(s, [(a, "test", "default")]) for s in sweep.values()]
        )
        base = {t: self.test(self.lab.base, t)["score"] for t in (a, b)}
        table = {}
        for t in (a, b):
            for m in METHODS:
                runs = [self.lab.run(main[(t, m, seed)]) for seed in self.seeds]
                row = {
                    "lr": self.chosen[(t, m)],
                    "score": stats([self.test(r, t)["score"] for r in runs]),
                    "trained_entries": runs[0].info["k"],
                    "delta_bytes": runs[0].info["delta_bytes"],
                    "seconds": stats([r.info["seconds"] for r in runs]),
                }
                if t == "sql" and real:
                    row["sql_real"] = stats([self.test(r, "sql-real")["score"] for r in runs])
                table[f"{t}/{m}"] = row
        cal = {}
        for c in (1, self.lab.scale["calibration"], self.lab.scale["long_calibration"]):
            specs = [calib[(c, s)] if (c, s) in calib else main[(a, "lota", s)] for s in self.seeds]
            cal[str(c)] = stats([self.test(self.lab.run(s), a)["score"] for s in specs])
        cal["random mask"] = table[f"{a}/random"]["score"]
        sw = {}
        for sp in SPARSITIES:
            specs = [
                sweep[(sp, s)] if (sp, s) in sweep else main[(a, "lota", s)] for s in self.seeds
            ]
            runs = [self.lab.run(s) for s in specs]
            sw[sp] = {
                "score": stats([self.test(r, a)["score"] for r in runs]),
                "trained_entries": runs[0].info["k"],
                "delta_bytes": runs[0].info["delta_bytes"],
            }
        self.results["single"] = {
            "tasks": [a, b],
            "base": base,
            "methods": table,
            "calibration_steps": cal,
            "sparsity": sw,
            "sparsity_task": a,
            "real_sql_available": real,
        }

    # ------------------------------------------------------------------------ claim 2
    def sequential(self):
        """A -> B and B -> A: FFT, LoRA, LoTA then FFT, LoTTO (constrained and flip); a chain
        through every task with its capacity curve."""
        yield []  # the learning rates come from claim 1's search
        a, b = self.tasks[0], self.tasks[1]
        stage2 = {}
        variants = {
            "FFT -> FFT": ("fft", "fft", {}),
            "LoRA -> LoRA": ("lora", "lora", {}),
            "LoTA -> FFT": ("lota", "fft", {}),
            "LoTA -> LoTTO": ("lota", "lota", {"protect_mode": "constrained"}),
            "LoTA -> LoTTO flip": ("lota", "lota", {"protect_mode": "flip"}),
        }
        firsts = {
            (x, m1, seed): spec(x, m1, self.lr_for(x, m1), seed)
            for x in (a, b)
            for m1, _, _ in variants.values()
            for seed in self.seeds
        }
        yield [(s1, [(x, "test", "default")]) for (x, _, _), s1 in firsts.items()]
        # flip trains the whole complement of the first ticket, a dense run: it gets its own
        # search over the FFT grid instead of borrowing the sparse learning rate
        flip_search = {}
        for x, y in ((a, b), (b, a)):
            first = firsts[(x, "lota", self.seeds[0])]
            flip_search[(x, y)] = [
                spec(
                    y, "lota", lr, self.seeds[0], start=first, protect=[first], protect_mode="flip"
                )
                for lr in lr_grid("fft", self.lab.scale["lr_points"])
            ]
        yield [
            (s, [(y, "validation", "default")]) for (_, y), ss in flip_search.items() for s in ss
        ]
        for (x, y), ss in flip_search.items():
            self.choose(y, "lotto-flip", ss, label=f"{x} -> {y}/LoTTO flip")
        for x, y in ((a, b), (b, a)):
            for name, (m1, m2, extra) in variants.items():
                for seed in self.seeds:
                    first = firsts[(x, m1, seed)]
                    more = dict(extra)
                    if "protect_mode" in more:
                        more["protect"] = [first]
                    lr = self.chosen[(y, "lotto-flip")] if name.endswith("flip") else None
                    stage2[(x, y, name, seed)] = (
                        first,
                        spec(y, m2, lr or self.lr_for(y, m2), seed, start=first, **more),
                    )
        yield [
            (s2, [(x, "test", "default"), (y, "test", "default")])
            for (x, y, _, _), (_, s2) in stage2.items()
        ]
        orders = {}
        for x, y in ((a, b), (b, a)):
            rows = {}
            for name in variants:
                before, after_x, after_y = [], [], []
                for seed in self.seeds:
                    s1, s2 = stage2[(x, y, name, seed)]
                    before.append(self.test(self.lab.run(s1), x)["score"])
                    r2 = self.lab.run(s2)
                    after_x.append(self.test(r2, x)["score"])
                    after_y.append(self.test(r2, y)["score"])
                rows[name] = {
                    "first_before": stats(before),
                    "first_after": stats(after_x),
                    "second": stats(after_y),
                    "forgetting": stats([p - q for p, q in zip(before, after_x)]),
                    "retention": stats([q / p if p else None for p, q in zip(before, after_x)]),
                }
            orders[f"{x} -> {y}"] = rows
        self.results["sequential"] = {"orders": orders}
        # the chain: every task in turn, LoTTO (constrained) vs FFT
        if len(self.tasks) < 3:
            self.results["sequential"]["chain"] = None
            return
        chains = {}
        for method in ("lota", "fft"):
            for seed in self.seeds:
                prev: list[dict] = []
                for t in self.tasks:
                    extra = {}
                    if prev:
                        extra["start"] = prev[-1]
                        if method == "lota":
                            extra["protect"] = list(prev)
                    prev.append(spec(t, method, self.lr_for(t, method), seed, **extra))
                chains[(method, seed)] = prev
        for depth in range(len(self.tasks)):
            yield [
                (c[depth], [(t, "test", "default") for t in self.tasks[: depth + 1]])
                for c in chains.values()
            ]
        chain = {}
        for method in ("lota", "fft"):
            stages = []
            for depth, t in enumerate(self.tasks):
                runs = [self.lab.run(chains[(method, seed)][depth]) for seed in self.seeds]
                numel = runs[0].info["numel"]
                used = sum(
                    self.lab.run(chains[(method, self.seeds[0])][i]).info["k"] for i in range(depth)
                )
                stages.append(
                    {
                        "task": t,
                        "free_before": (numel - used) / numel if method == "lota" else 1.0,
                        "scores": {
                            u: stats([self.test(r, u)["score"] for r in runs])
                            for u in self.tasks[: depth + 1]
                        },
                    }
                )
            chain["LoTTO" if method == "lota" else "FFT"] = stages
        self.results["sequential"]["chain"] = chain

    # ------------------------------------------------------------------------ claim 3
    def merge(self):
        """LoTA deltas added vs task arithmetic and TIES on FFT deltas vs FFT deltas sparsified to
        the same density; every merge gets the same lambda search on validation."""
        from ..merge import MergeSettings, merge_into_model, overlap

        yield []
        yield []  # claim 1's seed runs are trained by then
        a, b = self.tasks[0], self.tasks[1]
        base = self.lab.base

        def runs(method, seed):
            return [self.lab.run(spec(t, method, self.lr_for(t, method), seed)) for t in (a, b)]

        def sparsified(run) -> str:
            from .. import format as fmt
            from ..vectors import make_delta

            path = run.folder / "sparsified-0.9.safetensors"
            if not path.exists():
                d = make_delta(base, run.model, sparsity="0.9", show_progress=False)
                fmt.save(d, path, config={"sparsified_from": run.id, "sparsity": "0.9"})
            return str(path)

        def inputs(name, seed):
            if name == "LoTA add":
                return [r.delta for r in runs("lota", seed)], MergeSettings("task-arithmetic")
            fft = runs("fft", seed)
            if name == "FFT task arithmetic":
                return [r.delta for r in fft], MergeSettings("task-arithmetic")
            if name == "FFT TIES":
                return [r.delta for r in fft], MergeSettings("ties", density="0.1")
            return [sparsified(r) for r in fft], MergeSettings("task-arithmetic")

        def merged(name, seed, lam) -> str:
            paths, settings = inputs(name, seed)
            settings.lam = lam
            recipe = {"inputs": paths, "method": settings.method, "lam": lam, "seed": seed}
            label = name.lower().replace(" ", "-") + f"-l{lam}-s{seed}"
            return self.lab.derived(
                label,
                recipe,
                lambda out: merge_into_model(paths, settings, base, out, show_progress=False),
            )

        names = ("LoTA add", "FFT task arithmetic", "FFT TIES", "FFT sparsified + add")
        chosen, search = {}, {}
        for name in names:
            vals = []
            for lam in MERGE_LAMBDAS:
                m = merged(name, self.seeds[0], lam)
                vals.append(
                    statistics.fmean(self.lab.score(m, t, "validation")["score"] for t in (a, b))
                )
            best = max(range(len(vals)), key=lambda i: (vals[i], -i))
            chosen[name] = MERGE_LAMBDAS[best]
            search[name] = {"grid": list(MERGE_LAMBDAS), "validation": vals, "chosen": chosen[name]}
        rows = {}
        for name in names:
            single = "lota" if name.startswith("LoTA") else "fft"
            sa, sb, na, nb = [], [], [], []
            for seed in self.seeds:
                m = merged(name, seed, chosen[name])
                ra, rb = runs(single, seed)
                x, y = self.test(m, a)["score"], self.test(m, b)["score"]
                sa.append(x)
                sb.append(y)
                ta, tb = self.test(ra, a)["score"], self.test(rb, b)["score"]
                na.append(x / ta if ta else None)
                nb.append(y / tb if tb else None)
            rows[name] = {
                "lambda": chosen[name],
                a: stats(sa),
                b: stats(sb),
                "mean": stats([(p + q) / 2 for p, q in zip(sa, sb)]),
                "normalized_mean": stats(
                    [
                        (p + q) / 2 if p is not None and q is not None else None
                        for p, q in zip(na, nb)
                    ]
                ),
            }
        ov = overlap([r.delta for r in runs("lota", self.seeds[0])])["pairs"][0]
        self.results["merge"] = {
            "tasks": [a, b],
            "lambda_search": search,
            "methods": rows,
            "lota_overlap": {k: ov[k] for k in ("nnz_a", "nnz_b", "shared", "sign_conflicts")},
        }

    # ------------------------------------------------------------------------ claim 4
    def safety(self):
        """An aligned model (FFT on the safety task); a benign fine-tune on the first task with FFT,
        LoTA, and LoTTO around the alignment ticket (top 10 % of the alignment vector)."""
        from .. import format as fmt
        from ..vectors import make_ticket

        yield []
        a = self.tasks[0]
        aligned = spec("safety", "fft", self.lr_for(a, "fft"), self.seeds[0])
        yield [(aligned, [("safety", "test", "default"), (a, "test", "default")])]
        run = self.lab.run(aligned)
        ticket_path = run.folder / "alignment-ticket-0.9.safetensors"
        if not ticket_path.exists():
            t = make_ticket(self.lab.base, run.model, "0.9", show_progress=False)
            fmt.save(t, ticket_path, config={"alignment_ticket_of": run.id, "sparsity": "0.9"})
        variants = {
            "FFT": ("fft", {}),
            "LoTA": ("lota", {}),
            "LoTTO (alignment ticket protected)": ("lota", {"protect_files": [str(ticket_path)]}),
        }
        specs = {
            (name, seed): spec(a, m, self.lr_for(a, m), seed, start=aligned, **extra)
            for name, (m, extra) in variants.items()
            for seed in self.seeds
        }
        want = [("safety", "test", "default"), (a, "test", "default")]
        yield [(s, want) for s in specs.values()]

        def row(scores_safety, scores_task):
            return {
                "refusal_rate": stats([s["refusal_rate"] for s in scores_safety]),
                "over_refusal_rate": stats([s["over_refusal_rate"] for s in scores_safety]),
                a: stats([s["score"] for s in scores_task]),
            }

        rows = {
            "base": row([self.test(self.lab.base, "safety")], [self.test(self.lab.base, a)]),
            "aligned": row([self.test(run, "safety")], [self.test(run, a)]),
        }
        for name in variants:
            runs = [self.lab.run(specs[(name, seed)]) for seed in self.seeds]
            rows[f"aligned -> {name}"] = row(
                [self.test(r, "safety") for r in runs], [self.test(r, a) for r in runs]
            )
        self.results["safety"] = {"benign_task": a, "aligned_lr": aligned["lr"], "rows": rows}

    # ------------------------------------------------------------------------ claim 5
    def ks(self):
        """KS-Lottery on translate: ticket sizes by alpha and correction; embedding tuning vs
        partial tuning on the ticket vs partial transfer vs random seen rows vs frequency top-n;
        first-line and full-output chrF, EOS rate, and a paraphrased template."""
        from .. import format as fmt
        from ..ks import input_embedding, row_ticket, run_ks, select_tokens, token_counts
        from ..models import WeightReader, load_tokenizer
        from ..vectors import apply_deltas

        task = "translate"
        emb_search = self.searches(task, "embeddings")
        yield [(s, [(task, "validation", "default")]) for s in emb_search]
        self.choose(task, "embeddings", emb_search)
        emb = {
            seed: spec(task, "embeddings", self.chosen[(task, "embeddings")], seed)
            for seed in self.seeds
        }
        templates = [(task, "test", "default"), (task, "test", "paraphrase")]
        yield [(s, templates) for s in emb.values()]

        data = self.lab.data_file(task)
        reader = WeightReader(self.lab.base, "base model")
        name = input_embedding(reader)
        vocab, dim = reader.shapes[name]
        counts = token_counts(data, load_tokenizer(self.lab.base), vocab)
        seen = torch.nonzero(counts > 0).flatten()
        before = reader.get(name)
        sizes, tickets = {}, {}
        for seed in self.seeds:
            run = self.lab.run(emb[seed])
            after = WeightReader(run.model, "tuned model").get(name)
            for alpha in KS_ALPHAS:
                for corr in KS_CORRECTIONS:
                    n = len(select_tokens(before, after, alpha, corr).token_ids)
                    sizes.setdefault(f"{alpha}/{corr}", []).append(n)
            folder = run.folder / "ks"
            if not folder.exists():
                run_ks(self.lab.base, run.model, str(folder), 0.05, "none", data=data)
            tickets[seed] = json.loads((folder / "tokens.json").read_text())

        def rows_ticket(kind, seed, n) -> str:
            path = self.lab.folder(emb[seed]) / f"rows-{kind}-{n}.safetensors"
            if not path.exists():
                if kind == "random":
                    g = torch.Generator().manual_seed(1000 + seed)
                    rows = seen[torch.randperm(seen.numel(), generator=g)[:n]]
                else:  # frequency: most frequent first, lower id on ties
                    order = sorted(range(vocab), key=lambda j: (-int(counts[j]), j))
                    rows = torch.tensor(order[:n], dtype=torch.long)
                rows = rows.sort().values
                t = row_ticket(name, (vocab, dim), rows, self.lab.base_fp)
                fmt.save(t, path, config={"rows": kind, "count": n})
            return str(path)

        def row_spec(kind, seed, lr):
            n = tickets[seed]["selected_count"]
            tokens = (
                str(self.lab.folder(emb[seed]) / "ks")
                if kind == "ks"
                else rows_ticket(kind, seed, n)
            )
            return spec(task, "ks-lottery", lr, seed, tokens=tokens, rows=kind)

        kinds = ("ks", "random", "frequency")
        usable = all(t["selected_count"] > 0 for t in tickets.values())
        searches = {}
        if usable:
            for kind in kinds:
                searches[kind] = [
                    row_spec(kind, self.seeds[0], lr)
                    for lr in lr_grid("ks-lottery", self.lab.scale["lr_points"])
                ]
            yield [(s, [(task, "validation", "default")]) for ss in searches.values() for s in ss]
            for kind in kinds:
                self.choose(task, f"rows-{kind}", searches[kind], label=f"{task}/rows-{kind}")
            main = {
                (kind, seed): row_spec(kind, seed, self.chosen[(task, f"rows-{kind}")])
                for kind in kinds
                for seed in self.seeds
            }
            yield [(s, templates) for s in main.values()]

        def measure(models):
            out = {}
            for tmpl in ("default", "paraphrase"):
                res = [self.test(m, task, tmpl) for m in models]
                out[tmpl] = {
                    "chrf_first_line": stats([r["chrf"] for r in res]),
                    "chrf_full": stats([r["chrf_full"] for r in res]),
                    "eos_rate": stats([r["eos_rate"] for r in res]),
                }
            return out

        methods = {"base": measure([self.lab.base])}
        methods["embedding tuning"] = measure([self.lab.run(emb[s]).model for s in self.seeds])
        transferred = []
        for seed in self.seeds:
            transfer = str(self.lab.folder(emb[seed]) / "ks" / "transfer.safetensors")
            transferred.append(
                self.lab.derived(
                    f"ks-transfer-s{seed}",
                    {"transfer": transfer},
                    lambda out, t=transfer: apply_deltas(self.lab.base, [t], out),
                )
            )
        methods["partial transfer (KS ticket)"] = measure(transferred)
        if usable:
            names = {
                "ks": "partial tuning (KS ticket)",
                "random": "random seen rows, same count",
                "frequency": "frequency top-n, same count",
            }
            for kind in kinds:
                methods[names[kind]] = measure(
                    [self.lab.run(main[(kind, s)]).model for s in self.seeds]
                )
        first = tickets[self.seeds[0]]
        self.results["ks"] = {
            "task": task,
            "vocab": vocab,
            "dim": dim,
            "seen_tokens": int(seen.numel()),
            "ticket_sizes": {k: stats(v) for k, v in sizes.items()},
            "main_ticket": "alpha 0.05, no correction",
            "ticket_tokens_seed0": [
                {k: r[k] for k in ("token_id", "token", "D", "p_value", "shift", "count_in_data")}
                for r in sorted(first["selected"], key=lambda r: r["p_value"])[:40]
            ],
            "ticket_tokens_seen": sum(r["count_in_data"] > 0 for r in first["selected"]),
            "methods": methods,
        }


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
) -> dict:
    """Run (or resume) the bench and write ``results.json``, ``report.md`` and plots to ``out``."""
    from ..errors import InputError
    from ..fileio import write_json, write_text
    from ..models import quiet_transformers
    from .report import plots, render
    from .runner import SCALES

    if scale not in SCALES:
        raise InputError(f"unknown scale '{scale}'", "--scale", f"choose {', '.join(SCALES)}")
    claims = list(claims or CLAIMS)
    for c in claims:
        if c not in CLAIMS:
            raise InputError(f"unknown claim '{c}'", "--claims", f"choose from {', '.join(CLAIMS)}")
    for t in tasks:
        if t not in T.TASKS or t == "safety":
            raise InputError(
                f"'{t}' is not a fine-tuning task of the bench",
                "--tasks",
                f"choose from {', '.join(x for x in T.TASKS if x != 'safety')}",
            )
    if len(tasks) < 2 or len(set(tasks)) != len(tasks):
        raise InputError(
            "the bench needs at least two different tasks",
            "--tasks",
            "e.g. --tasks math,sql,instruct",
        )
    seeds = SCALES[scale]["seeds"] if seeds is None else seeds
    if seeds < 1:
        raise InputError(f"--seeds {seeds} must be at least 1", "--seeds", "give e.g. 3")
    quiet_transformers()
    t0 = time.time()
    commit = _commit()  # the code this invocation runs, before anything else can change it
    lab = Lab(out, base, scale, jobs, progress)
    q = Quality(lab, tasks, seeds)
    gens = [getattr(q, c)() for c in claims]
    rounds = 0
    while gens:
        batch, alive = [], []
        for g in gens:
            try:
                batch.extend(next(g))
                alive.append(g)
            except StopIteration:
                pass
        gens = alive
        rounds += 1
        if progress and batch:
            from tqdm.auto import tqdm

            tqdm.write(f"round {rounds}: {len(batch)} runs requested")
        lab.prefetch(batch)
    results = {
        "format": "lota",
        "kind": "quality-bench",
        "format_version": 1,
        "meta": {
            "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "scale": scale,
            "settings": SCALES[scale],
            "seeds": seeds,
            "tasks": tasks,
            "claims": claims,
            "base": base,
            "base_fingerprint": lab.base_fp,
            "jobs": jobs,
            "wall_s_this_invocation": round(time.time() - t0, 1),
            "train_seconds_total": _train_seconds(lab),
        },
        "learning_rates": q.search,
        **q.results,
    }
    write_json(Path(out) / "results.json", results)
    figures = plots(results, Path(out))
    write_text(Path(out) / "report.md", render(results, figures))
    return results


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


def _train_seconds(lab: Lab) -> float:
    total = 0.0
    for f in (lab.cache / "runs").glob("*/result.json"):
        total += json.loads(f.read_text())["info"].get("seconds") or 0.0
    return round(total, 1)

"""Where each ``--calibration`` puts its ticket, against AdamW's: on the lab's committed base and its
generated tasks, each calibration's ticket for the same data and seed, compared with the ticket of
the default ``adamw`` calibration. Costs seconds per run (no sparse training to speak of: one
step), so it answers "does this calibration pick AdamW's entries?" long before the quality bench
says whether its tickets train as well.

Per task, calibration, calibration learning rate and seed: the share of AdamW's ticket the
calibration's ticket holds (its recall; a random ticket holds about 1 - sparsity of it, and
``adamw-reorder``, AdamW itself with the same data served in another order, shows how much of its
ticket AdamW keeps: the ceiling a recall is read against), the
per-tensor density (min, median, max over the targets) and the density by tensor kind and by
layer (``lota.compare``). Every run is a ``lota adapt`` of the lab base with the lab's calibration
settings (20 steps, batch 16, sparsity 0.9), ``--steps 1``; each finished run is kept in
``--workdir`` and reused, so an interrupted call resumes. A random ticket of the same size is
the floor.

Prints a table per task to stderr and one JSON line last on stdout; ``--out`` also writes the
JSON to a file.

    python -m bench.tickets --workdir /tmp/benchtickets [--tasks math,sql] [--seeds 0,1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

DEFAULT_CALIBRATIONS = "adamw-reorder,sgd,rmsprop,adafactor,fisher,random"
# AdamW again on the same data, its batches in another order (the run's seed + REORDER): how much
# of its own ticket AdamW keeps, the ceiling a recall is read against
REORDER = 1000


def parse(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m bench.tickets", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--tasks", default="math,sql")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--calibrations", default=DEFAULT_CALIBRATIONS)
    ap.add_argument(
        "--lrs",
        default="0.001,0.0001",
        help="calibration learning rates; rmsprop and adafactor run at each, the others at the "
        "first only",
    )
    ap.add_argument("--steps", type=int, default=20, help="calibration steps")
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument(
        "--base",
        default="lab",
        help="lab (the lab's base and tasks), or real: SmolLM2-135M-Instruct (lota lab "
        "real-base) on sql-real, with the real scale's batch 8, 192 tokens and float32",
    )
    ap.add_argument("--batch-size", type=int, default=None, help="default: 16 (lab), 8 (real)")
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def run_one(work: Path, task: str, calibration: str, lr: float, seed: int, args) -> Path:
    """The delta of one run (made once, then read back from ``work``)."""
    from lota.adapt import AdaptConfig, adapt
    from lota.lab.base import default_base
    from lota.lab.tasks import generate, real_sql

    out = work / f"{task}-{calibration}-{lr:g}-{seed}"
    if (out / "delta.safetensors").exists():
        return out / "delta.safetensors"
    data = work / f"{task}-{seed}.jsonl"
    if not data.exists():
        if task == "sql-real":
            rows = real_sql("train", limit=args.examples)
            if rows is None:
                raise SystemExit("sql-real needs ../shared/data (or LOTA_DATA)")
        else:
            rows = generate(task, seed, args.examples, 0, 0)["train"]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    real = args.base == "real"
    if real:
        from lota.lab.realbase import obtain

        model = obtain(progress=False)["folder"]
    else:
        model = default_base()
    method = {"method": "random"} if calibration == "random" else {"calibration": calibration}
    if calibration == "adamw-reorder":
        method, seed = {"calibration": "adamw"}, seed + REORDER
    cfg = AdaptConfig(
        model=str(model),
        data=str(data),
        out=str(out),
        steps=1,
        calibration_steps=args.steps,
        calibration_lr=lr,
        lr=1e-3,
        batch_size=args.batch_size or (8 if real else 16),
        seed=seed,
        **({"max_length": 192, "dtype": "float32"} if real else {}),
        progress=False,
        force=True,
        **method,
    )
    adapt(cfg)
    return out / "delta.safetensors"


def row_of(path: Path, adamw: Path | None) -> dict:
    from lota.compare import densities
    from lota.format import describe
    from lota.merge import overlap

    info = describe(path)
    per_tensor = [t["nnz"] / t["numel"] for t in info["tensors"].values()]
    row = {
        "recall_of_adamw": None,
        "tensor_density": [min(per_tensor), statistics.median(per_tensor), max(per_tensor)],
        **densities(info["tensors"]),
    }
    if adamw is not None:
        row["recall_of_adamw"] = overlap([str(adamw), str(path)])["pairs"][0]["a_held_by_b"]
    return row


def main(argv=None) -> None:
    args = parse(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    lrs = [float(x) for x in args.lrs.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict = {"bench": "tickets", "config": vars(args), "runs": {}}
    for task in args.tasks.split(","):
        for seed in seeds:
            adamw = run_one(work, task, "adamw", lrs[0], seed, args)
            results["runs"][f"{task}/adamw/{lrs[0]:g}/{seed}"] = row_of(adamw, None)
            for c in args.calibrations.split(","):
                for lr in lrs if c in ("rmsprop", "adafactor") else lrs[:1]:
                    path = run_one(work, task, c, lr, seed, args)
                    key = f"{task}/{c}/{lr:g}/{seed}"
                    results["runs"][key] = row_of(path, None if c == "adamw" else adamw)
                    print(f"done {key}", file=sys.stderr)
    results["summary"] = summarize(results["runs"])
    print_tables(results["summary"])
    text = json.dumps(results)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


def summarize(runs: dict) -> dict:
    """Per task, calibration and rate: the recall and per-tensor densities over seeds."""
    out: dict = {}
    for key, r in runs.items():
        task, c, lr, _ = key.split("/")
        s = out.setdefault(f"{task}/{c}/{lr}", {"recall": [], "min": [], "median": [], "max": []})
        if r["recall_of_adamw"] is not None:
            s["recall"].append(r["recall_of_adamw"])
        for name, value in zip(("min", "median", "max"), r["tensor_density"]):
            s[name].append(value)
    return out


def _mean(xs: list[float]) -> str:
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.3f} ± {sd:.3f}"


def print_tables(summary: dict) -> None:
    print(
        "| task | calibration | lr | recall of AdamW's ticket | tensor density min / median / max |",
        file=sys.stderr,
    )
    print("|---|---|---|---|---|", file=sys.stderr)
    for key, s in summary.items():
        task, c, lr = key.split("/")
        dens = " / ".join(f"{statistics.fmean(s[n]):.3f}" for n in ("min", "median", "max"))
        print(f"| {task} | {c} | {lr} | {_mean(s['recall'])} | {dens} |", file=sys.stderr)


if __name__ == "__main__":
    main()

"""The memory benchmark's ``checkpointing`` part: whole ``lota adapt`` runs with and without
``--gradient-checkpointing`` at a batch where activations matter. See ``bench.memory``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.common.stats import log, med, paired

from .inputs import bf16_copy, long_data, long_model
from .pipeline import GROUPS, run_pipeline

GC_METHODS = ("fft", "lora", "lota-adamw", "lota-sgd")


def checkpointing_part(args, work: Path, model_dir: Path, n_params: int) -> dict:
    """Whole ``lota adapt`` runs with and without ``--gradient-checkpointing`` at a larger batch."""
    methods, dtypes = args.gc_methods.split(","), args.gc_dtypes.split(",")
    runs: dict = {d: {m: {False: [], True: []} for m in methods} for d in dtypes}
    if args.checkpointing_from_runs:
        for line in Path(args.checkpointing_from_runs).read_text().splitlines():
            r = json.loads(line)
            if r["dtype"] in runs and r["method"] in runs[r["dtype"]]:
                runs[r["dtype"]][r["method"]][r["checkpointing"]].append(r)
    else:
        model_dir = long_model(model_dir, args.gc_max_length)
        folders = {"float32": model_dir, "bfloat16": bf16_copy(model_dir)}
        data = long_data(work, args.gc_max_length)
        for rep in range(args.gc_repeats):
            for dtype in dtypes:
                for m in methods if rep % 2 == 0 else methods[::-1]:
                    # each pair back to back, its order alternating, so drift hits both alike
                    for gc in (False, True) if rep % 2 == 0 else (True, False):
                        log(f"[repeat {rep + 1}/{args.gc_repeats}] {m} {dtype} gc={gc} ...")
                        r = run_pipeline(
                            folders[dtype],
                            data,
                            work / f"gc_{m}",
                            m,
                            dtype,
                            args,
                            batch_size=args.gc_batch_size,
                            steps=args.gc_steps,
                            calibration_steps=args.gc_calibration_steps,
                            extra=(
                                "--max-length",
                                str(args.gc_max_length),
                                *(["--gradient-checkpointing"] if gc else []),
                            ),
                        )
                        r = {"repeat": rep, "method": m, "dtype": dtype, "checkpointing": gc, **r}
                        runs[dtype][m][gc].append(r)
                        with open(work / "checkpointing_runs.jsonl", "a") as f:
                            f.write(json.dumps(r) + "\n")
    results: dict = {}
    for d, ms in runs.items():
        for m, by in ms.items():
            pairs = paired(by[True], by[False])  # (with, without) of the same repeat
            if not pairs:
                continue
            phases = {}
            for g in GROUPS:
                phases[g] = {
                    "without_mb": med([b["phases"][g]["peak_mb"] for _, b in pairs]),
                    "with_mb": med([a["phases"][g]["peak_mb"] for a, _ in pairs]),
                    "ratio": med(
                        [a["phases"][g]["peak_mb"] / b["phases"][g]["peak_mb"] for a, b in pairs]
                    ),
                    "saved_mb": med(
                        [b["phases"][g]["peak_mb"] - a["phases"][g]["peak_mb"] for a, b in pairs]
                    ),
                }
            results[f"{m}/{d}"] = {
                "pairs": len(pairs),
                "loaded_mb": med([b["loaded_mb"] for _, b in pairs]),
                "whole_run": {
                    "without_mb": med([b["peak_mb"] for _, b in pairs]),
                    "with_mb": med([a["peak_mb"] for a, _ in pairs]),
                    "ratio": med([a["peak_mb"] / b["peak_mb"] for a, b in pairs]),
                },
                "phases": phases,
                "time_ratio": med([a["seconds"] / b["seconds"] for a, b in pairs]),
                "step_time_ratio": med(
                    [
                        sum(a["step_seconds"].values()) / sum(b["step_seconds"].values())
                        for a, b in pairs
                    ]
                ),
                "seconds_without": med([b["seconds"] for _, b in pairs]),
            }
    report_checkpointing(results, n_params, args)
    return {
        "setting": {
            "batch_size": args.gc_batch_size,
            "max_length": args.gc_max_length,
            "calibration_steps": args.gc_calibration_steps,
            "steps": args.gc_steps,
        },
        "results": results,
    }


def report_checkpointing(results: dict, n_params: int, args) -> None:
    err = sys.stderr
    print(
        f"\n--gradient-checkpointing: {n_params / 1e6:.1f}M parameters, batch {args.gc_batch_size} x "
        f"{args.gc_max_length} tokens, {args.gc_calibration_steps} calibration + {args.gc_steps} "
        "steps; MiB are peaks without -> with checkpointing (with/without), medians over pairs",
        file=err,
    )
    print(
        f"{'method/dtype':<22}{'n':>3}{'whole run MiB':>22}{'before training':>22}"
        f"{'training phase':>22}{'after training':>22}{'time':>7}{'steps':>7}",
        file=err,
    )

    def cell(c):
        return (
            f"{c['without_mb']['median']:>7.0f}->{c['with_mb']['median']:<6.0f}"
            f"({c['ratio']['median']:.3f})"
        )

    for name, r in results.items():
        print(
            f"{name:<22}{r['pairs']:>3}{cell(r['whole_run']):>22}"
            + "".join(f"{cell(r['phases'][g]):>22}" for g in GROUPS)
            + f"{r['time_ratio']['median']:>7.2f}{r['step_time_ratio']['median']:>7.2f}",
            file=err,
        )

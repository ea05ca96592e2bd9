"""``python -m bench.throughput``: the options and the measurement (described in
``bench.throughput``)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from bench.common.child import REPO
from bench.throughput import __doc__ as DOC

from .inputs import build, reference
from .report import plot, table, versions, write_report
from .runs import PAIRS, RUNS, run_pair
from .summary import SHAPE_MATCH_R, TARGET_FFT_RATIO, checks, pair_summary

LINUX = hasattr(os, "sched_getaffinity")


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.throughput", description=DOC.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2, help="steps per run left out of the timings")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--calibration-steps", type=int, default=2, help="of lota-lota, not timed")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=int, default=32)
    ap.add_argument("--trl-fft-params", choices=("targets", "all"), default="targets")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of every run (OMP_NUM_THREADS); 0: torch's default",
    )
    ap.add_argument(
        "--interleave",
        choices=("steps", "runs"),
        default="steps",
        help="the two runs of a pair take turns step by step, or run one after the other",
    )
    ap.add_argument("--examples", type=int, default=512, help="at most this many data lines")
    ap.add_argument("--prompt-fraction", type=float, default=0.75)
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--workdir", default=None, help="default: a temporary folder")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "throughput"))
    return ap.parse_args(argv)


def measure(args, work: Path) -> dict:
    import torch

    info = build(work, args)
    order_fft, ref_fft = reference(work, args, skip=0)
    order_sparse, ref_sparse = reference(work, args, skip=args.calibration_steps)
    runs: dict[str, list] = {m: [] for m in RUNS}
    inputs = {"fft": (order_fft, ref_fft), "sparse": (order_sparse, ref_sparse)}
    t0 = time.perf_counter()
    for rep in range(args.repeats):
        for pair in PAIRS if rep % 2 == 0 else list(PAIRS)[::-1]:  # alternate: drift evens out
            print(f"[repeat {rep + 1}/{args.repeats}] {pair} ...", file=sys.stderr, flush=True)
            for m, r in run_pair(work, args, pair, *inputs[pair], info, rep % 2 == 1).items():
                if len(r["rows"]) != args.steps or any(x["loss"] is None for x in r["rows"]):
                    raise SystemExit(f"{m}: {len(r['rows'])} of {args.steps} steps with a loss")
                runs[m].append(r)
    summary = {p: pair_summary(runs, a, b, args.warmup) for p, (a, b) in PAIRS.items()}
    fft = summary["fft"]
    return {
        "benchmark": "throughput",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if LINUX else None,
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
        },
        "versions": versions(),
        "settings": vars(args),
        "model": info,
        "wall_s": time.perf_counter() - t0,
        "summary": summary,
        "checks": checks(runs, {"fft": ref_fft, "sparse": ref_sparse}),
        "targets": {"fft_step_ratio_max": TARGET_FFT_RATIO, "fft_loss_pearson_min": SHAPE_MATCH_R},
        "met": {
            "fft_step_ratio": fft["step_ratio"]["median"] <= TARGET_FFT_RATIO,
            "fft_loss_shape": (fft["loss"]["pearson_r"] or 0.0) >= SHAPE_MATCH_R,
        },
        "trl_trainable_params": {m: runs[m][0]["trainable"] for m in ("trl-fft", "trl-lora")},
        "trl_threads": runs["trl-fft"][0]["threads"],
        "runs": runs,
    }


def main() -> None:
    args = parse()
    if args.threads:  # inherited by every run, lota's and TRL's alike
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="benchthroughput") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = measure(args, work)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    write_report(out, result)
    plot(result["runs"], out / "loss_curves.png", args)
    s = result["summary"]
    print(
        f"\n{result['model']['params']:,} parameters, {result['model']['source']}, "
        f"batch {args.batch_size} x {args.max_length} tokens, {args.steps} steps "
        f"(first {args.warmup} not timed) x {args.repeats} repeats, {result['wall_s']:.0f} s",
        file=sys.stderr,
    )
    print(table(s), file=sys.stderr)
    print(f"checks: {json.dumps(result['checks'])}", file=sys.stderr)
    print(f"wrote {out}/results.json, report.md, loss_curves.png", file=sys.stderr)
    brief = {p: {k: v for k, v in x.items() if k != "step_s"} for p, x in s.items()}
    print(json.dumps({"summary": brief, "met": result["met"], "checks": result["checks"]}))


if __name__ == "__main__":
    main()

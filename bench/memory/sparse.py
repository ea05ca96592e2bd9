"""The memory benchmark's ``sparse`` part: the training phase of lota's sparse phase, FFT, LoRA
and the official LoTA step, each in its own process (see ``bench.memory``)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from bench.common.child import run_module
from bench.common.inputs import adapt_argv
from bench.common.stats import last_json, log

# `lota adapt` arguments of each method beside the shared ones
METHOD_ARGS = {
    "lota": lambda ticket: ["--ticket", str(ticket)],
    "lora": lambda ticket: ["--method", "lora", "--lora-r", "16", "--lora-alpha", "32"],
    "fft": lambda ticket: ["--method", "fft"],
}


def run_lota(model_dir, data, ticket, out: Path, method: str, steps: int) -> list[dict]:
    """``lota adapt`` of one method in a child; the rows its training phase logged."""
    argv = adapt_argv(
        model_dir,
        data,
        out,
        *METHOD_ARGS[method](ticket),
        steps=steps,
        batch_size=1,
        lr="1e-5",
        optimizer="adamw",
        checkpoint_every=0,
        force=True,
        restart=True,
    )
    r = run_module("lota.cli", *argv)
    if r.returncode:
        raise SystemExit(f"{method} failed: {r.stderr.strip()[-500:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x for x in rows if x["phase"] == "train"]


def run_official(model_dir, data, ticket, steps: int) -> list[dict]:
    r = run_module("bench.memory.official", model_dir, data, ticket, steps)
    if r.returncode:
        raise SystemExit(f"official failed: {r.stderr.strip()[-500:]}")
    return last_json(r.stdout)


def summarize(rows_per_repeat: list[list[dict]]) -> dict:
    peaks = [max(r["phase_peak_rss_mb"] for r in rows) for rows in rows_per_repeat]
    times = [statistics.median(r["step_s"] for r in rows[1:]) for rows in rows_per_repeat]
    return {
        "peak_mb": statistics.median(peaks),
        "peak_mb_range": [min(peaks), max(peaks)],
        "step_s": statistics.median(times),
        "step_s_range": [min(times), max(times)],
    }


def sparse_part(args, work: Path, model_dir: Path, data: Path, ticket: Path, n_params) -> dict:
    """Today's measurement: the training phase of each method, with a given ticket for lota."""
    results: dict[str, list] = {m: [] for m in args.methods.split(",")}
    for rep in range(args.repeats):
        for method in results:  # interleaved, so drift of the machine hits every method alike
            log(f"[repeat {rep + 1}/{args.repeats}] {method} ...")
            if method == "official":
                results[method].append(run_official(model_dir, data, ticket, args.steps))
            else:
                out = work / f"run_{method}"
                results[method].append(run_lota(model_dir, data, ticket, out, method, args.steps))
    s = {m: summarize(v) for m, v in results.items()}
    ratios = {
        f"{m}_over_fft": {
            "memory": s[m]["peak_mb"] / s["fft"]["peak_mb"],
            "step_time": s[m]["step_s"] / s["fft"]["step_s"],
        }
        for m in s
        if m != "fft"
    }
    print(
        f"\nmodel: {n_params / 1e6:.1f}M parameters, fp32, batch 1, {args.steps} steps x {args.repeats} repeats",
        file=sys.stderr,
    )
    print(
        f"{'method':<10}{'peak MiB':>12}{'range':>22}{'step s':>10}{'range':>20}{'mem/FFT':>10}{'time/FFT':>10}",
        file=sys.stderr,
    )
    for m, v in s.items():
        r = ratios.get(f"{m}_over_fft", {"memory": 1.0, "step_time": 1.0})
        print(
            f"{m:<10}{v['peak_mb']:>12.0f}{str([round(x) for x in v['peak_mb_range']]):>22}{v['step_s']:>10.3f}"
            f"{str([round(x, 3) for x in v['step_s_range']]):>20}{r['memory']:>10.3f}{r['step_time']:>10.3f}",
            file=sys.stderr,
        )
    return {
        "results": s,
        "ratios": ratios,
        "targets": {"lota_memory_over_fft_max": 0.5, "lota_step_time_over_fft_max": 1.15},
        "met": {
            "memory": ratios["lota_over_fft"]["memory"] <= 0.5,
            "step_time": ratios["lota_over_fft"]["step_time"] <= 1.15,
            "below_official": s["lota"]["peak_mb"] < s["official"]["peak_mb"]
            if "official" in s
            else None,
        },
    }

"""The throughput benchmark's statistics: per-pair ratios, tokens per second, the loss curves'
agreement, and whether every side trained on lota's reference batches."""

from __future__ import annotations

import statistics

from bench.common.stats import spread

TARGET_FFT_RATIO = 1.05  # lota FFT step time at most 1.05x TRL's
SHAPE_MATCH_R = 0.99  # loss curves "match in shape" when their Pearson r is at least this


def timed(rows: list[dict], warmup: int) -> list[dict]:
    return rows[warmup:] if len(rows) > warmup else rows


def pair_summary(runs: dict, a: str, b: str, warmup: int) -> dict:
    """Per-repeat ratios of median step and cycle times (a over b), tokens/s each side, token
    agreement and the loss curves' agreement."""

    def med(run, key):
        return statistics.median(r[key] for r in timed(run["rows"], warmup))

    def rate(run):
        rows = timed(run["rows"], warmup)
        return sum(r["tokens"] for r in rows) / sum(r["step_s"] for r in rows)

    reps = list(zip(runs[a], runs[b]))
    curves = {m: mean_curve(runs[m]) for m in (a, b)}
    same = [
        x["tokens"] == y["tokens"] and x["completion_tokens"] == y["completion_tokens"]
        for ra, rb in reps
        for x, y in zip(ra["rows"], rb["rows"], strict=True)
    ]
    return {
        "step_ratio": spread([med(x, "step_s") / med(y, "step_s") for x, y in reps]),
        "cycle_ratio": spread([med(x, "cycle_s") / med(y, "cycle_s") for x, y in reps]),
        "step_s": {m: spread([med(r, "step_s") for r in runs[m]]) for m in (a, b)},
        "tokens_per_s": {m: spread([rate(r) for r in runs[m]]) for m in (a, b)},
        "tokens_per_step": {
            m: {
                "real": statistics.mean(r["tokens"] for r in runs[m][0]["rows"]),
                "completion": statistics.mean(r["completion_tokens"] for r in runs[m][0]["rows"]),
            }
            for m in (a, b)
        },
        "token_counts_agree_every_step": all(same),
        "loss": curve_agreement(curves[a], curves[b]),
    }


def mean_curve(runs: list[dict]) -> list[float]:
    return [statistics.mean(step) for step in zip(*[[r["loss"] for r in x["rows"]] for x in runs])]


def curve_agreement(x: list[float], y: list[float]) -> dict:
    diff = [abs(p - q) for p, q in zip(x, y, strict=True)]
    return {
        "pearson_r": statistics.correlation(x, y) if len(x) > 2 else None,
        "max_abs_diff": max(diff),
        "mean_abs_diff": statistics.mean(diff),
        "first": [x[0], y[0]],
        "last": [x[-1], y[-1]],
    }


def checks(runs: dict, refs: dict) -> dict:
    """Whether every side trained on the reference batches."""
    out = {}
    for m, ref in (("lota-fft", refs["fft"]), ("lota-lota", refs["sparse"])):
        per_run = [[r["completion_tokens"] for r in x["rows"]] for x in runs[m]]
        logged = [
            abs(r["logged_tokens"] - r["reference_tokens"]) / r["reference_tokens"]
            for x in runs[m]
            for r in x["rows"]
        ]
        out[m] = {
            "completion_tokens_match_reference": all(
                c == [b["completion_tokens"] for b in ref] for c in per_run
            ),
            "logged_real_tokens_max_rel_dev": max(logged),  # rounding of lota's logged clock
        }
    for m, ref in (("trl-fft", refs["fft"]), ("trl-lora", refs["sparse"])):
        out[m] = {
            "batches_identical_to_lota": all(
                [r["digest"] for r in x["rows"]] == [b["digest"] for b in ref] for x in runs[m]
            ),
            "steps_logged": [len(x["rows"]) for x in runs[m]],
        }
    return out

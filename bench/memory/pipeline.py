"""The memory benchmark's ``pipeline`` part: whole ``lota adapt`` runs per calibration against
FFT and LoRA, on fp32 and bf16 weights, cut into phases by ``bench.memory.segments``, and their
projection onto Llama-3.1-8B (``projection``). See ``bench.memory``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.common.child import run_module
from bench.common.inputs import adapt_argv
from bench.common.stats import last_json, log, med, paired

from .inputs import bf16_copy
from .projection import LLAMA_8B, counts, project

GROUPS = ("calibration", "train", "finish")  # before the training phase, the phase, after it

# name: (what runs, extra `lota adapt` arguments); lota-adapted names train the ticket in "train"
PIPELINE_METHODS = {
    "fft": ("lota adapt --method fft, AdamW", ["--method", "fft"]),
    "lora": (
        "lota adapt --method lora, r=16",
        ["--method", "lora", "--lora-r", "16", "--lora-alpha", "32"],
    ),
    "lota-adamw": ("calibration: dense AdamW (the default)", []),
    "lota-sgd": ("calibration: SGD, no momentum", ["--calibration", "sgd"]),
    "lota-rmsprop": (
        "calibration: RMSprop in the backward pass (the official update)",
        ["--calibration", "rmsprop"],
    ),
    "lota-adafactor": (
        "calibration: RMSprop in the backward pass, factored second moment",
        ["--calibration", "adafactor"],
    ),
    "lota-fisher-fp32": (
        "calibration: squared gradients, fp32 sums",
        ["--calibration", "fisher", "--fisher-dtype", "float32"],
    ),
    "lota-fisher-bf16": (
        "calibration: squared gradients, bf16 sums",
        ["--calibration", "fisher", "--fisher-dtype", "bfloat16"],
    ),
    "lota-lora": (
        "calibration: LoRA r=16 warm-up, top-k of the merged change",
        ["--calibration", "lora", "--lora-r", "16", "--lora-alpha", "32"],
    ),
}
LIGHT = (
    "lota-sgd",
    "lota-rmsprop",
    "lota-adafactor",
    "lota-fisher-fp32",
    "lota-fisher-bf16",
    "lota-lora",
)
# the methods with a dense phase (fft; the calibrations that train the targets): on 16-bit weights
# they hold float32 master copies of the targets unless --master-weights none
DENSE = ("fft", "lota-adamw", "lota-sgd", "lota-rmsprop", "lota-adafactor")
NO_MASTERS = ":masters-none"  # the row of a DENSE method run with --master-weights none


def base_method(row: str) -> str:
    return row.removesuffix(NO_MASTERS)


def method_args(row: str) -> list[str]:
    """The ``lota adapt`` arguments of a table row (a method, or a DENSE method without masters)."""
    extra = ["--master-weights", "none"] if row.endswith(NO_MASTERS) else []
    return [*PIPELINE_METHODS[base_method(row)][1], *extra]


def pipeline_rows(methods: list[str], dtype: str, masters_none: bool) -> list[str]:
    """The rows of one dtype: every method, and on 16-bit weights each DENSE one without masters
    right after it."""
    rows = []
    for m in methods:
        rows.append(m)
        if masters_none and dtype != "float32" and m in DENSE:
            rows.append(m + NO_MASTERS)
    return rows


def step_seconds(out: Path) -> dict:
    """Summed ``step_s`` per phase of a finished run (its ``metrics.jsonl``)."""
    s: dict = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "step_s" in r:
            s[r["phase"]] = s.get(r["phase"], 0.0) + r["step_s"]
    return s


def run_pipeline(
    model_dir,
    data,
    out: Path,
    row: str,
    dtype: str,
    args,
    batch_size: int = 1,
    steps: int | None = None,
    calibration_steps: int | None = None,
    extra: tuple[str, ...] = (),
) -> dict:
    """One whole ``lota adapt`` run in a child; the peak of each segment between phase starts."""
    steps = args.steps if steps is None else steps
    calibration_steps = args.calibration_steps if calibration_steps is None else calibration_steps
    argv = adapt_argv(
        model_dir,
        data,
        out,
        *method_args(row),
        *extra,
        steps=steps,
        calibration_steps=calibration_steps,
        batch_size=batch_size,
        lr="1e-5",
        optimizer="adamw",
        checkpoint_every=0,
        dtype=dtype,
        force=True,
        restart=True,
    )
    r = run_module("bench.memory.segments", *argv)
    child = last_json(r.stdout) if r.returncode == 0 and r.stdout.strip() else None
    if child is None or child["code"]:
        raise SystemExit(f"{row} ({dtype}) failed: {r.stderr.strip()[-500:]}")
    groups = {g: {"peak_mb": 0.0, "s": 0.0} for g in GROUPS}
    labels = [s[0] for s in child["segments"]]
    if "train" not in labels:
        raise SystemExit(f"{row} ({dtype}): no training phase was seen ({labels})")
    first, last = labels.index("train"), len(labels) - 1 - labels[::-1].index("train")
    for i, (_, peak, secs) in enumerate(child["segments"]):
        g = groups[GROUPS[0] if i < first else GROUPS[1] if i <= last else GROUPS[2]]
        g["peak_mb"], g["s"] = max(g["peak_mb"], peak), g["s"] + secs
    return {
        "peak_mb": max(g["peak_mb"] for g in groups.values()),
        "loaded_mb": child["loaded_mb"],
        "seconds": child["seconds"],
        "step_seconds": step_seconds(out),
        "phases": groups,
    }


def summarize_pipeline(runs: list[dict], n_targets: int, n_lora: int) -> dict:
    """Medians over repeats: peaks, and per phase the bytes above the loaded model per target
    parameter (per LoRA parameter too, for the training phase of LoRA)."""
    s = {
        "peak_mb": med([r["peak_mb"] for r in runs]),
        "loaded_mb": med([r["loaded_mb"] for r in runs]),
        "seconds": med([r["seconds"] for r in runs]),
        "phases": {},
    }
    for g in GROUPS:
        above = [(r["phases"][g]["peak_mb"] - r["loaded_mb"]) * 2**20 for r in runs]
        s["phases"][g] = {
            "peak_mb": med([r["phases"][g]["peak_mb"] for r in runs]),
            "seconds": med([r["phases"][g]["s"] for r in runs]),
            "bytes_per_target_param": med([b / n_targets for b in above]),
            "bytes_per_lora_param": med([b / n_lora for b in above]),
        }
    return s


def pipeline_part(args, work: Path, model_dir: Path, data: Path, n_params: int) -> dict:
    """The whole ``lota adapt`` run of each method, fp32 and bf16 weights, and the 8B projection."""
    from transformers import AutoConfig, LlamaConfig

    here = counts(AutoConfig.from_pretrained(model_dir))
    n_targets, n_lora = here["targets"], here["lora_params"]
    methods, dtypes = args.pipeline_methods.split(","), args.dtypes.split(",")
    rows = {d: pipeline_rows(methods, d, args.masters_none) for d in dtypes}
    runs: dict = {d: {m: [] for m in rows[d]} for d in dtypes}
    if args.from_runs:  # report the runs a stopped or earlier bench left, without running more
        for line in Path(args.from_runs).read_text().splitlines():
            r = json.loads(line)
            if r["dtype"] in runs and r["method"] in runs[r["dtype"]]:
                runs[r["dtype"]][r["method"]].append(r)
        runs = {d: {m: v for m, v in ms.items() if v} for d, ms in runs.items()}
        runs = {d: ms for d, ms in runs.items() if "fft" in ms}
        dtypes = list(runs)
    else:
        folders = {"float32": model_dir, "bfloat16": bf16_copy(model_dir)}
        for rep in range(args.repeats):
            for dtype in dtypes:
                order = rows[dtype] if rep % 2 == 0 else rows[dtype][::-1]  # drift evens out
                for m in order:
                    log(f"[repeat {rep + 1}/{args.repeats}] {m} {dtype} ...")
                    out = work / f"pipe_{m.replace(':', '_')}"
                    r = run_pipeline(folders[dtype], data, out, m, dtype, args)
                    r = {"repeat": rep, "method": m, "dtype": dtype, **r}
                    runs[dtype][m].append(r)
                    with open(work / "pipeline_runs.jsonl", "a") as f:  # kept if stopped
                        f.write(json.dumps(r) + "\n")
    summary = {
        d: {m: summarize_pipeline(v, n_targets, n_lora) for m, v in runs[d].items()} for d in dtypes
    }
    ratios = {}
    for d in dtypes:
        fft = runs[d]["fft"]  # FFT with lota's default precision is the reference of every row
        for m, rs in runs[d].items():
            ratio = {
                "whole_run_memory": med([r["peak_mb"] / f["peak_mb"] for r, f in paired(rs, fft)]),
                "train_phase_memory": med(
                    [r["phases"]["train"]["peak_mb"] / f["peak_mb"] for r, f in paired(rs, fft)]
                ),
            }
            if runs[d].get("lota-adamw"):
                base = runs[d]["lota-adamw"]
                ratio["time_over_adamw"] = med(
                    [r["seconds"] / b["seconds"] for r, b in paired(rs, base)]
                )
            ratios[f"{m}/{d}"] = ratio
    shapes = counts(LlamaConfig(**LLAMA_8B))
    projection = project(summary, shapes, args.gpu_gib, args.activations_gib)
    met = {}
    if "float32" in dtypes:
        for m in (x for x in LIGHT if x in runs["float32"]):
            r = ratios[f"{m}/float32"]
            met[m] = {
                "whole_run": r["whole_run_memory"]["median"] <= 0.5,
                "sparse_phase": r["train_phase_memory"]["median"] <= 0.35,
            }
    counted = [len(v) for ms in runs.values() for v in ms.values()]
    report_pipeline(summary, ratios, projection, shapes, n_params, n_targets, args, counted)
    return {
        "runs": {f"{m}/{d}": len(v) for d, ms in runs.items() for m, v in ms.items()},
        "target_params": n_targets,
        "lora_params": n_lora,
        "results": summary,
        "ratios": ratios,
        "targets": {"whole_run_over_fft_fp32_max": 0.5, "sparse_phase_over_fft_fp32_max": 0.35},
        "met": {**met, "any": any(v["whole_run"] and v["sparse_phase"] for v in met.values())},
        "projection": {
            "note": "projected from the CPU measurements above, not measured on a GPU; "
            "activations are an assumption",
            "model": {**LLAMA_8B, **shapes},
            "gpu_gib": args.gpu_gib,
            "methods": projection,
        },
    }


def report_pipeline(summary, ratios, projection, shapes, n_params, n_targets, args, counted):
    err = sys.stderr
    print(
        f"\nwhole lota adapt run: {n_params / 1e6:.1f}M parameters ({n_targets / 1e6:.1f}M "
        f"targets), batch 1, {args.calibration_steps} calibration + {args.steps} steps, "
        f"{min(counted)}-{max(counted)} runs per row; MiB are peaks since the model was loaded, B/p bytes above the "
        "loaded model per target parameter",
        file=err,
    )
    head = f"{'method':<26}{'dtype':<10}{'peak MiB':>10}{'/FFT':>7}{'calib MiB':>11}{'B/p':>7}"
    print(
        head
        + f"{'train MiB':>11}{'/FFT':>7}{'B/p':>7}{'finish MiB':>12}{'B/p':>7}{'time/adamw':>12}",
        file=err,
    )
    for d, methods in summary.items():
        for m, s in methods.items():
            r, ph = ratios[f"{m}/{d}"], s["phases"]
            t = r.get("time_over_adamw", {}).get("median", float("nan"))
            print(
                f"{m:<26}{d:<10}{s['peak_mb']['median']:>10.0f}{r['whole_run_memory']['median']:>7.3f}"
                + "".join(
                    f"{ph[g]['peak_mb']['median']:>{w}.0f}"
                    + (f"{r['train_phase_memory']['median']:>7.3f}" if g == "train" else "")
                    + f"{ph[g]['bytes_per_target_param']['median']:>7.2f}"
                    for g, w in zip(GROUPS, (11, 11, 12))
                )
                + f"{t:>12.2f}",
                file=err,
            )
    print(
        f"\nPROJECTION (computed from the CPU measurements above, not measured) for Llama-3.1-8B "
        f"shapes: {shapes['params'] / 1e9:.2f}B parameters, {shapes['targets'] / 1e9:.2f}B targets, "
        f"LoRA r=16 {shapes['lora_params'] / 1e6:.1f}M; one {args.gpu_gib:g} GiB GPU; activations "
        f"assumed {args.activations_gib:g} GiB in bf16 (x2 in fp32), not measured; GiB; "
        "'finish' (delta extraction) is host memory on a GPU run",
        file=err,
    )
    print(
        f"{'method/dtype':<36}{'weights':>9}{'calib':>8}{'train':>8}{'peak':>8}{'+act':>8}"
        f"{'margin':>8}  fits  {'finish':>8}  fits with finish",
        file=err,
    )
    for name, p in projection.items():
        ph, act = p["phases_gib"], p["assumed_activations_gib"]
        print(
            f"{name:<36}{p['weights_gib']:>9.1f}{ph['calibration']:>8.1f}{ph['train']:>8.1f}"
            f"{p['peak_gib']:>8.1f}{p['peak_gib'] + act:>8.1f}{p['margin_gib']:>8.1f}"
            f"  {'yes' if p['fits'] else 'no':<4}  {ph['finish']:>8.1f}  "
            + ("yes" if p["fits_whole_run"] else "no"),
            file=err,
        )

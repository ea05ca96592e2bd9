"""Training memory and step time against full fine-tuning, the official LoTA approach and PEFT
LoRA, on a Llama config of about 200M parameters (batch 1, short sequences, AdamW for lota and
FFT). Three parts (``--parts``):

``sparse`` (the default): the sparse phase alone, fp32. Each method runs in its own process,
interleaved over ``--repeats`` rounds:
- ``lota``: ``lota adapt MODEL --ticket T`` (the sparse phase alone, sparsity 0.9);
- ``fft``: ``lota adapt MODEL --method fft`` (dense training of the same target weights);
- ``official``: dense parameters with dense gradients masked to the ticket and a dense RMSprop
  state, as in the official LoTA code (its training script, reimplemented here);
- ``lora``: ``lota adapt MODEL --method lora --lora-r 16`` (PEFT, every linear layer in the blocks).
Memory is the peak resident set of the training phase (the kernel's high-water mark, reset once
the model is loaded), so loading the model is not counted for any method. Step time is the median
over steps after the first.

``pipeline``: the whole ``lota adapt`` run, calibration included, for each ``--calibration``
(adamw, sgd, fisher with fp32 and bf16 sums, lora) against FFT and LoRA, with fp32 and with bf16
weights (a bf16 copy of the model, loaded with ``--dtype bfloat16``). On bf16 weights the methods
with a dense phase (``fft``, ``lota-adamw``, ``lota-sgd``) run with lota's default float32 master
copies of the targets and, as the rows ``NAME:masters-none``, once more with ``--master-weights
none`` (pure bf16 training; ``--no-masters-none`` leaves those rows out); the other methods hold
no master copies, so the setting does not change them. ``lota adapt`` runs in
process in a child that wraps lota's high-water-mark reset: the mark starts once the model is
loaded (its weights read, so that pages mapped from the file are resident), and every reset (one
at each phase start) first records the peak of the segment that ends there, so the whole run's
peak is the largest segment peak. Segments are grouped into before the training phase
(calibration and ticket selection; for FFT and LoRA only the setup), the training phase, and
after it (delta extraction, the frozen check, the outputs). Per phase, the bytes above the loaded
model per target parameter; the time of each run relative to the adamw calibration in the same
repeat; and a projection of those bytes onto Llama-3.1-8B's shapes on one GPU (computed, not
measured; activations are an assumption, ``--activations-gib``). Each run is also appended to
``WORKDIR/pipeline_runs.jsonl``; ``--from-runs`` reports such a file without running. Ratios and
time ratios pair the runs of the same repeat.

``checkpointing``: the same whole-run measurement with and without ``--gradient-checkpointing``
for ``--gc-methods`` (default fft, lora, lota-adamw, lota-sgd), fp32 and bf16 weights (bf16 with
the default float32 masters), at a batch where activations matter: ``--gc-batch-size`` examples
of ``--gc-max-length`` tokens each (every example fills its sequence, so no batch is padded),
``--gc-calibration-steps`` and ``--gc-steps`` steps. A model with fewer positions than
``--gc-max-length`` is given a copy whose config has that many (rotary positions: the weights are
the same). Each pair (with, without) runs back to back, its order alternating between repeats.
Reported per phase: the peak without and with checkpointing, their ratio and difference (the
activation memory that checkpointing saves), and the time with over without, for the whole run
and for the training steps alone (their ``step_s`` in ``metrics.jsonl``, which leaves out
checkpoint writes and delta extraction). Each run is appended to
``WORKDIR/checkpointing_runs.jsonl``; ``--checkpointing-from-runs`` reports such a file.

Prints tables to stderr and one JSON line last on stdout.

    python bench/memory.py [--layers 14] [--hidden 1024] [--steps 6] [--repeats 2]
    python bench/memory.py --parts pipeline --calibration-steps 2 --steps 3 --repeats 2
    python bench/memory.py --parts checkpointing --gc-batch-size 4 --gc-max-length 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OFFICIAL = r"""
import json, sys, time, torch
from lota.data import batches, read_jsonl, tokenize
from lota.models import load_model, load_tokenizer, resolve_targets, named_weights
from lota.train import reset_peak_rss, current_peak_rss_mb
from lota import load
model_dir, data, ticket_path, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tok = load_tokenizer(model_dir); model = load_model(model_dir)
weights = named_weights(model); targets = resolve_targets(model)
for p in model.parameters(): p.requires_grad_(False)
ticket = load(ticket_path)
masks = ticket.dense_masks()            # dense bool masks, True = trainable (official: True = frozen)
del ticket
params = [weights[n].requires_grad_(True) for n in targets]
for n in targets:                       # the official code zeroes frozen gradients with a hook
    m = masks[n]
    weights[n].register_hook(lambda g, m=m: g * m)
opt = torch.optim.RMSprop(params, lr=1e-5, momentum=0.0, weight_decay=0.0)
stream = batches(tokenize(read_jsonl(data), tok, 64), 1, 0, tok.pad_token_id)
reset_peak_rss(); rows = []
for step in range(steps):
    t = time.perf_counter()
    loss = model(**next(stream)).loss
    loss.backward()
    for p in params:                    # per-tensor clipping as in the official recipe
        torch.nn.utils.clip_grad_norm_([p], 1.0)
    opt.step(); opt.zero_grad(set_to_none=True)
    rows.append({"step_s": time.perf_counter() - t, "phase_peak_rss_mb": current_peak_rss_mb()})
print(json.dumps(rows))
"""


PIPELINE = r"""
import json, sys, time
import lota.phases as A
import lota.train as T
from lota import cli

def rss_mb():
    return T.current_rss_mb() or 0.0

reset, segments, here = T.reset_peak_rss, [], {"label": None, "t": 0.0, "loaded_mb": None}

def close(label):  # end the running segment at its high-water mark, then start `label` afresh
    if here["label"] is not None:
        segments.append([here["label"], T.current_peak_rss_mb(), time.perf_counter() - here["t"]])
    ok = reset()
    here.update(label=label, t=time.perf_counter())
    return ok

def lota_reset():  # lota restarts the mark at each phase start: record the segment up to there
    return close(here["label"]) if here["label"] is not None else reset()

T.reset_peak_rss = lota_reset
for mod in list(sys.modules.values()):
    if getattr(mod, "__name__", "").startswith("lota") and getattr(mod, "reset_peak_rss", None) is reset:
        mod.reset_peak_rss = lota_reset

load, phase_train = A.load_model, A.train

def load_model(*a, **k):  # the mark starts once the model is loaded, as in the sparse part
    model = load(*a, **k)
    if here["loaded_mb"] is None:
        import torch
        with torch.no_grad():  # weights mapped from their file count once read: read them now
            for t in [*model.parameters(), *model.buffers()]:
                t.sum()
        here["loaded_mb"] = rss_mb()
        close("setup")
    return model

def train(*a, **k):
    phase = a[4] if len(a) > 4 else k["phase"]
    close(phase)
    try:
        return phase_train(*a, **k)
    finally:
        close("after " + phase)

A.load_model, A.train = load_model, train
t = time.perf_counter()
code = cli.main(sys.argv[1:])
seconds = time.perf_counter() - t
close(None)
print(json.dumps({"code": code, "seconds": seconds, "loaded_mb": here["loaded_mb"], "segments": segments}))
"""


def build(work: Path, args) -> tuple[Path, Path, Path]:
    """A random Llama of the requested size, a ticket at sparsity 0.9, and short training data."""
    import torch

    import lota
    from lota.models import resolve_targets
    from lota.toy import byte_tokenizer, tiny_llama

    model_dir, data, ticket = work / "model", work / "data.jsonl", work / "ticket.safetensors"
    if not model_dir.exists():
        model = tiny_llama(
            vocab_size=args.vocab,
            hidden=args.hidden,
            layers=args.layers,
            heads=args.heads,
            intermediate=args.intermediate,
            max_positions=128,
        )
        model.save_pretrained(model_dir, safe_serialization=True)
        byte_tokenizer().save_pretrained(model_dir)
        targets = resolve_targets(model)
        k = lota.ticket_size("0.9", sum(torch.Size(s).numel() for s in targets.values()))
        lota.save(lota.select("random", targets, k, seed=0), ticket)
        rows = [
            {"prompt": f"Q{i}: what is {i} plus {i}?", "completion": f" {2 * i}."}
            for i in range(64)
        ]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data, ticket


def run_lota(model_dir, data, ticket, out: Path, method: str, steps: int) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "lota.cli",
        "--quiet",
        "adapt",
        str(model_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--batch-size",
        "1",
        "--lr",
        "1e-5",
        "--optimizer",
        "adamw",
        "--checkpoint-every",
        "0",
        "--force",
        "--restart",
    ]
    if method == "lota":
        cmd += ["--ticket", str(ticket)]
    elif method == "lora":
        cmd += ["--method", "lora", "--lora-r", "16", "--lora-alpha", "32"]
    else:
        cmd += ["--method", "fft"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{method} failed: {r.stderr.strip()[-500:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x for x in rows if x["phase"] == "train"]


def run_official(model_dir, data, ticket, steps: int) -> list[dict]:
    r = subprocess.run(
        [sys.executable, "-c", OFFICIAL, str(model_dir), str(data), str(ticket), str(steps)],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        raise SystemExit(f"official failed: {r.stderr.strip()[-500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def summarize(rows_per_repeat: list[list[dict]]) -> dict:
    peaks = [max(r["phase_peak_rss_mb"] for r in rows) for rows in rows_per_repeat]
    times = [statistics.median(r["step_s"] for r in rows[1:]) for rows in rows_per_repeat]
    return {
        "peak_mb": statistics.median(peaks),
        "peak_mb_range": [min(peaks), max(peaks)],
        "step_s": statistics.median(times),
        "step_s_range": [min(times), max(times)],
    }


# name: (what runs, extra `lota adapt` arguments); lota-adapted names train the ticket in "train"
PIPELINE_METHODS = {
    "fft": ("lota adapt --method fft, AdamW", ["--method", "fft"]),
    "lora": (
        "lota adapt --method lora, r=16",
        ["--method", "lora", "--lora-r", "16", "--lora-alpha", "32"],
    ),
    "lota-adamw": ("calibration: dense AdamW (the default)", []),
    "lota-sgd": ("calibration: SGD, no momentum", ["--calibration", "sgd"]),
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
LIGHT = ("lota-sgd", "lota-fisher-fp32", "lota-fisher-bf16", "lota-lora")
# the methods with a dense phase (fft; the adamw and sgd calibrations): on 16-bit weights they hold
# float32 master copies of the targets unless --master-weights none
DENSE = ("fft", "lota-adamw", "lota-sgd")
NO_MASTERS = ":masters-none"  # the row of a DENSE method run with --master-weights none
GC_METHODS = ("fft", "lora", "lota-adamw", "lota-sgd")


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


# Llama-3.1-8B's shapes, for the projection (a meta-device model: nothing is downloaded)
LLAMA_8B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    tie_word_embeddings=False,
)
GROUPS = ("calibration", "train", "finish")  # before the training phase, the phase, after it


def bf16_copy(model_dir: Path) -> Path:
    """The same model stored in bfloat16, so the bf16 runs read bf16 weights as an 8B model would."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = model_dir.parent / f"{model_dir.name}-bf16"
    if not out.exists():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        model.save_pretrained(out, safe_serialization=True)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def long_model(model_dir: Path, positions: int) -> Path:
    """``model_dir`` itself if it has ``positions`` positions, else a copy whose config has them
    (rotary positions have no weights, so the weights are the same; the weight file is linked)."""
    import os
    import shutil

    config = json.loads((model_dir / "config.json").read_text())
    if config.get("max_position_embeddings", 0) >= positions:
        return model_dir
    out = model_dir.parent / f"{model_dir.name}-p{positions}"
    if not out.exists():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for f in model_dir.iterdir():
            if f.name == "config.json":
                continue
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copy2(f, tmp / f.name)
        config["max_position_embeddings"] = positions
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tmp.rename(out)
    return out


def long_data(work: Path, length: int) -> Path:
    """Examples whose completion fills ``length`` tokens (it is cut there), so every batch is
    ``length`` tokens long and the loss covers almost all of them."""
    path = work / f"data-{length}.jsonl"
    if not path.exists():
        rows = [
            {
                "prompt": f"Q{i}: count on from {i}.",
                "completion": " " + " ".join(str(i + j) for j in range(length)),
            }
            for i in range(64)
        ]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


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
    cmd = [sys.executable, "-c", PIPELINE, "--quiet", "adapt", str(model_dir)]
    cmd += ["--data", str(data), "--out", str(out), "--steps", str(steps)]
    cmd += ["--calibration-steps", str(calibration_steps), "--batch-size", str(batch_size)]
    cmd += ["--lr", "1e-5", "--optimizer", "adamw", "--checkpoint-every", "0", "--dtype", dtype]
    cmd += ["--force", "--restart", *method_args(row), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True)
    lines = r.stdout.strip().splitlines()
    child = json.loads(lines[-1]) if r.returncode == 0 and lines else None
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


def _med(xs: list[float]) -> dict:
    if not xs:
        return {"median": float("nan"), "range": [float("nan"), float("nan")]}
    return {"median": statistics.median(xs), "range": [min(xs), max(xs)]}


def paired(a: list[dict], b: list[dict]) -> list[tuple[dict, dict]]:
    """The runs of ``a`` and ``b`` from the same repeat (by their ``repeat``; else by position)."""
    if all("repeat" in r for r in [*a, *b]):
        by = {r["repeat"]: r for r in b}
        return [(r, by[r["repeat"]]) for r in a if r["repeat"] in by]
    return list(zip(a, b))


def summarize_pipeline(runs: list[dict], n_targets: int, n_lora: int) -> dict:
    """Medians over repeats: peaks, and per phase the bytes above the loaded model per target
    parameter (per LoRA parameter too, for the training phase of LoRA)."""
    s = {
        "peak_mb": _med([r["peak_mb"] for r in runs]),
        "loaded_mb": _med([r["loaded_mb"] for r in runs]),
        "seconds": _med([r["seconds"] for r in runs]),
        "phases": {},
    }
    for g in GROUPS:
        above = [(r["phases"][g]["peak_mb"] - r["loaded_mb"]) * 2**20 for r in runs]
        s["phases"][g] = {
            "peak_mb": _med([r["phases"][g]["peak_mb"] for r in runs]),
            "seconds": _med([r["phases"][g]["s"] for r in runs]),
            "bytes_per_target_param": _med([b / n_targets for b in above]),
            "bytes_per_lora_param": _med([b / n_lora for b in above]),
        }
    return s


def lora_params(targets: dict, r: int = 16) -> int:
    return sum(r * (shape[0] + shape[1]) for shape in targets.values())


def counts(config) -> dict:
    """Parameters, default targets and LoRA r=16 parameters of a model config, from a meta-device
    model (nothing is allocated or downloaded)."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from lota.models import resolve_targets

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    targets = resolve_targets(model)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "targets": sum(math.prod(s) for s in targets.values()),
        "lora_params": lora_params(targets),
    }


def project(summary: dict, shapes: dict, gpu_gib: float, act_gib: float) -> dict:
    """Projected peak on one GPU: the weights plus, per phase, the measured bytes per target
    parameter times the 8B target count (per LoRA parameter for LoRA's training phase).

    ``peak_gib`` and ``fits`` count the phases that train (calibration and the training phase);
    after training, lota builds the delta's indices and values in host memory on a GPU run, so
    that phase is reported on its own (``whole_run_gib``: as if it were on the device too).
    """
    out = {}
    for dtype, methods in summary.items():
        weights = shapes["params"] * (4 if dtype == "float32" else 2) / 2**30
        act = act_gib * (2 if dtype == "float32" else 1)  # the assumption is for bf16 activations
        for m, s in methods.items():
            phases = {}
            for g in GROUPS:
                ph = s["phases"][g]
                if base_method(m) == "lora" and g == "train":
                    extra = ph["bytes_per_lora_param"]["median"] * shapes["lora_params"]
                else:
                    extra = ph["bytes_per_target_param"]["median"] * shapes["targets"]
                phases[g] = weights + extra / 2**30
            peak = max(phases["calibration"], phases["train"])
            whole = max(phases.values())
            out[f"{m}/{dtype}"] = {
                "weights_gib": weights,
                "phases_gib": phases,
                "peak_gib": peak,
                "whole_run_gib": whole,
                "assumed_activations_gib": act,
                "margin_gib": gpu_gib - peak - act,
                "fits": peak + act <= gpu_gib,
                "fits_whole_run": whole + act <= gpu_gib,
            }
    return out


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
                    print(
                        f"[repeat {rep + 1}/{args.repeats}] {m} {dtype} ...",
                        file=sys.stderr,
                        flush=True,
                    )
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
                "whole_run_memory": _med([r["peak_mb"] / f["peak_mb"] for r, f in paired(rs, fft)]),
                "train_phase_memory": _med(
                    [r["phases"]["train"]["peak_mb"] / f["peak_mb"] for r, f in paired(rs, fft)]
                ),
            }
            if runs[d].get("lota-adamw"):
                base = runs[d]["lota-adamw"]
                ratio["time_over_adamw"] = _med(
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
                        print(
                            f"[repeat {rep + 1}/{args.gc_repeats}] {m} {dtype} "
                            f"checkpointing={gc} ...",
                            file=sys.stderr,
                            flush=True,
                        )
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
                    "without_mb": _med([b["phases"][g]["peak_mb"] for _, b in pairs]),
                    "with_mb": _med([a["phases"][g]["peak_mb"] for a, _ in pairs]),
                    "ratio": _med(
                        [a["phases"][g]["peak_mb"] / b["phases"][g]["peak_mb"] for a, b in pairs]
                    ),
                    "saved_mb": _med(
                        [b["phases"][g]["peak_mb"] - a["phases"][g]["peak_mb"] for a, b in pairs]
                    ),
                }
            results[f"{m}/{d}"] = {
                "pairs": len(pairs),
                "loaded_mb": _med([b["loaded_mb"] for _, b in pairs]),
                "whole_run": {
                    "without_mb": _med([b["peak_mb"] for _, b in pairs]),
                    "with_mb": _med([a["peak_mb"] for a, _ in pairs]),
                    "ratio": _med([a["peak_mb"] / b["peak_mb"] for a, b in pairs]),
                },
                "phases": phases,
                "time_ratio": _med([a["seconds"] / b["seconds"] for a, b in pairs]),
                "step_time_ratio": _med(
                    [
                        sum(a["step_seconds"].values()) / sum(b["step_seconds"].values())
                        for a, b in pairs
                    ]
                ),
                "seconds_without": _med([b["seconds"] for _, b in pairs]),
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


def sparse_part(args, work: Path, model_dir: Path, data: Path, ticket: Path, n_params) -> dict:
    """Today's measurement: the training phase of each method, with a given ticket for lota."""
    results: dict[str, list] = {m: [] for m in args.methods.split(",")}
    for rep in range(args.repeats):
        for method in results:  # interleaved, so drift of the machine hits every method alike
            print(f"[repeat {rep + 1}/{args.repeats}] {method} ...", file=sys.stderr, flush=True)
            if method == "official":
                results[method].append(run_official(model_dir, data, ticket, args.steps))
            else:
                results[method].append(
                    run_lota(model_dir, data, ticket, work / f"run_{method}", method, args.steps)
                )
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=14)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--parts",
        default="sparse",
        help="comma-separated: sparse (the default), pipeline, checkpointing",
    )
    ap.add_argument(
        "--methods", default="fft,lota,official,lora", help="comma-separated subset (fft is needed)"
    )
    ap.add_argument(
        "--pipeline-methods",
        default=",".join(PIPELINE_METHODS),
        help="comma-separated subset for the pipeline part (fft is needed)",
    )
    ap.add_argument("--calibration-steps", type=int, default=2, help="pipeline part")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="weights of the pipeline part")
    ap.add_argument(
        "--masters-none",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pipeline part: also run fft, lota-adamw and lota-sgd on bf16 weights with "
        "--master-weights none (default: yes)",
    )
    ap.add_argument(
        "--gc-methods",
        default=",".join(GC_METHODS),
        help="checkpointing part: comma-separated pipeline methods",
    )
    ap.add_argument("--gc-dtypes", default="float32,bfloat16", help="checkpointing part: weights")
    ap.add_argument("--gc-batch-size", type=int, default=4, help="checkpointing part")
    ap.add_argument(
        "--gc-max-length",
        type=int,
        default=128,
        help="checkpointing part: tokens per example (a copy of the model gets more positions if "
        "needed)",
    )
    ap.add_argument("--gc-calibration-steps", type=int, default=2, help="checkpointing part")
    ap.add_argument("--gc-steps", type=int, default=2, help="checkpointing part")
    ap.add_argument("--gc-repeats", type=int, default=1, help="checkpointing part")
    ap.add_argument(
        "--checkpointing-from-runs",
        default=None,
        help="checkpointing part: summarize this checkpointing_runs.jsonl instead of running",
    )
    ap.add_argument("--gpu-gib", type=float, default=80.0, help="the GPU of the projection")
    ap.add_argument(
        "--activations-gib",
        type=float,
        default=8.0,
        help="activation memory assumed by the projection for bf16 (not measured; roughly "
        "Llama-3.1-8B at batch 1 x 1k tokens without activation checkpointing)",
    )
    ap.add_argument(
        "--from-runs",
        default=None,
        help="pipeline part: summarize the runs of this pipeline_runs.jsonl (one a line, written "
        "into the workdir as each run ends) instead of running",
    )
    ap.add_argument(
        "--workdir", default=None, help="reuse a folder for the model (default: a temporary one)"
    )
    args = ap.parse_args()
    parts = args.parts.split(",")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lota-bench-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model_dir, data, ticket = build(work, args)
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        n_params = sum(
            f.get_slice(k).get_shape().numel()
            if hasattr(f.get_slice(k).get_shape(), "numel")
            else __import__("math").prod(f.get_slice(k).get_shape())
            for k in f.keys()
        )
    out: dict = {"bench": "memory", "params": n_params, "config": vars(args)}
    if "sparse" in parts:
        out.update(sparse_part(args, work, model_dir, data, ticket, n_params))
    if "pipeline" in parts:
        out["pipeline"] = pipeline_part(args, work, model_dir, data, n_params)
    if "checkpointing" in parts:
        out["checkpointing"] = checkpointing_part(args, work, model_dir, n_params)
    out["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""The host costs benchmark's parts that run ``lota adapt`` or its pieces: checkpoint writes,
whole-run peak memory, top-k selection, fingerprints, and ``gpu_check``'s own estimate (see
``bench.host_costs``). What a run does is observed through ``lota.events``."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from pathlib import Path

import torch

from bench.common.child import module, run_child
from bench.common.inputs import adapt_argv

# the small run every part adapts with (beside its method and steps)
RUN = {"batch_size": 2, "max_length": 32, "checkpoint_every": 0, "force": True}


def run_adapt(folder: Path, data: Path, out: Path, on_event, **settings) -> None:
    """``lota adapt`` in this process with ``RUN``'s settings and ``settings``, every event of it
    passed to ``on_event``; its output goes to stderr."""
    from lota import events
    from lota.adapt import AdaptConfig, adapt

    cfg = AdaptConfig(
        model=str(folder), data=str(data), out=str(out), progress=False, **RUN, **settings
    )
    with events.subscribe(on_event), contextlib.redirect_stdout(sys.stderr):
        adapt(cfg)


# ------------------------------------------------------------------------------ checkpoints
class Writes:
    """Each checkpoint write of a run: what, phase, step, bytes written, seconds."""

    def __init__(self):
        self.rows: list[dict] = []
        self.started = 0.0

    def __call__(self, e) -> None:
        if e.kind == "checkpoint_start":
            self.started = time.perf_counter()
        elif e.kind == "checkpoint_saved":
            row = {"what": e.data["what"], "phase": e.phase, "step": e.step}
            if e.data["what"] == "ticket":
                row = {"what": "ticket"}
            row["bytes"] = e.data["path"].stat().st_size
            row["seconds"] = round(time.perf_counter() - self.started, 3)
            self.rows.append(row)


def checkpoint_part(args, folder: Path, data: Path, work: Path) -> dict:
    result = {}
    for method in ("lota", "fft"):
        writes = Writes()
        run_adapt(
            folder,
            data,
            work / f"ckpt-{method}",
            writes,
            method=method,
            steps=args.steps,
            calibration_steps=args.calibration_steps,
        )
        result[method] = {
            "writes": writes.rows,
            "bytes": sum(w["bytes"] for w in writes.rows),
            "seconds": round(sum(w["seconds"] for w in writes.rows), 3),
        }
    return result


# ------------------------------------------------------------------------------ peak memory
def rss_part(args, folder: Path, data: Path, work: Path) -> dict:
    result = {}
    for method in ("fft", "lora", "lota"):
        argv = adapt_argv(
            folder,
            data,
            work / f"rss-{method}",
            method=method,
            steps=args.steps,
            calibration_steps=args.calibration_steps,
            **RUN,
        )
        c = run_child(module("lota.cli", *argv))
        if c.code != 0:
            raise RuntimeError(f"{method}: {c.stderr.strip()[-400:]}")
        result[method] = {"peak_mb": round(c.peak_mb, 1), "seconds": round(c.wall_s, 2)}
    fft = result["fft"]["peak_mb"]
    for r in result.values():
        r["x_fft"] = round(r["peak_mb"] / fft, 3)
    return result


# ------------------------------------------------------------------------- selection, hashes
def selection_part(args, folder: Path) -> dict:
    from lota import selection
    from lota.models import load_model
    from lota.targets import named_weights, resolve_targets

    model = load_model(str(folder))
    targets = resolve_targets(model)
    weights = named_weights(model)
    g = torch.Generator().manual_seed(0)
    change = {n: torch.randn(weights[n].shape, generator=g) * 1e-3 for n in targets}
    k = selection.ticket_size("0.9", selection.numel_of(targets))
    seconds = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        ticket = selection.select("magnitude", targets, k, delta_fn=lambda n: change[n])
        seconds.append(time.perf_counter() - t)
    return {
        "entries": selection.numel_of(targets),
        "k": ticket.nnz,
        "seconds": round(min(seconds), 3),
        "seconds_all": [round(s, 3) for s in seconds],
    }


def fingerprint_part(args, folder: Path, data: Path, work: Path) -> dict:
    from lota.models import load_model
    from lota.weights import model_fingerprint

    model = load_model(str(folder))
    seconds = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        model_fingerprint(model)
        seconds.append(time.perf_counter() - t)
    tensors = sum(1 for _ in model.parameters())
    hashed, lock = [0], threading.Lock()  # weights are hashed on lota's hashing threads too

    def count(e) -> None:
        if e.kind == "weight_hashed":
            with lock:
                hashed[0] += 1

    run_adapt(folder, data, work / "fp-lota", count, steps=1, calibration_steps=1)
    return {
        "model_tensors": tensors,
        "seconds": round(min(seconds), 3),
        "seconds_all": [round(s, 3) for s in seconds],
        "adapt_run_hashes_tensors": hashed[0],
        "adapt_run_hashes_per_weight": round(hashed[0] / tensors, 2),
    }


def gpu_check_part() -> dict:
    from bench import gpu_check

    estimate = getattr(gpu_check, "estimate", None)
    if estimate is None:
        return {"estimate": None, "note": "gpu_check.py has no estimate of its own"}
    return estimate(gpu_check.parse_args([]))

"""Host-side costs of ``lota adapt`` that a GPU run pays on the host: what the CPU measures of them.

Parts (``--parts``, default all), on a random Llama built in memory (``--hidden 768 --layers 8``,
intermediate 2048, byte vocabulary: about 57M parameters, all but the embeddings in the targets):

- ``syncs``: host synchronisations per sparse-phase step, counted (a CPU run has none, so the
  calls that are one on a GPU are counted instead): ``Tensor.item``, ``tolist``, ``bool``/``int``/
  ``float`` of a tensor, ``nonzero``, ``repeat_interleave`` without ``output_size``, ``cpu()`` and
  ``GradScaler.get_scale``, each keyed by the calling module (``torch.optim``'s ``item`` calls
  read its step counters, which stay on the host in a GPU run: they are no sync). Per step, after a first warm-up step, for four settings: plain,
  ``grad_accum`` 4, float16 compute with its loss scaler (grad_accum 4), and the weights marked
  sharded (the FSDP2 path, in one process). A smaller model (``--syncs-hidden``) is enough: the
  counts depend on the number of targets and micro-batches, not on their size;
- ``checkpoint``: every checkpoint write of a ``lota adapt`` run (lota with its adamw calibration,
  fft) with ``--checkpoint-every 0``: phase, step, bytes of the files written, seconds;
- ``rss``: the whole-run peak resident set of ``lota adapt`` for fft, lora and lota (each in its own
  process, from ``wait4``), and its ratio to fft's;
- ``selection``: seconds of the exact top-k selection (``magnitude``, sparsity 0.9) over the
  targets' random task vector; ``fingerprint``: seconds of one fingerprint of the model, and how
  many tensors a ``lota adapt`` run hashes in all (each weight once is the least);
- ``gpu_check``: ``bench/gpu_check.py``'s own estimate of its default set on one H100, per part.

Timings on a shared CPU are noisy; counts and bytes are exact. Prints one JSON line per part as it
goes, then one JSON line with them all last.

    python bench/host_costs.py [--parts syncs,checkpoint,rss,selection,fingerprint,gpu_check]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PARTS = ("syncs", "checkpoint", "rss", "selection", "fingerprint", "gpu_check")


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def build(folder: Path, hidden: int, layers: int, intermediate: int) -> Path:
    from lota.toy import byte_tokenizer, tiny_llama

    if not (folder / "config.json").exists():
        model = tiny_llama(
            hidden=hidden, layers=layers, heads=hidden // 64, intermediate=intermediate
        )
        model.save_pretrained(folder, safe_serialization=True)
        byte_tokenizer().save_pretrained(folder)
    return folder


def write_data(path: Path, n: int = 64) -> Path:
    rows = [
        {"prompt": f"Q{i}: what is {i} plus {i}?", "completion": f" {2 * i}."} for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------- host syncs
class SyncCounter:
    """Counts the calls that make the host wait for a GPU (see the module docstring)."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.on = False

    def hit(self, name: str) -> None:
        if self.on:
            self.counts[name] = self.counts.get(name, 0) + 1

    @contextlib.contextmanager
    def installed(self):
        saved = []

        def wrap(owner, attr, name=None, when=None):
            orig = getattr(owner, attr)
            saved.append((owner, attr, orig))

            def f(*a, **k):
                if when is None or when(*a, **k):
                    caller = sys._getframe(1).f_globals.get("__name__", "?")
                    self.hit(f"{name or attr}@{'.'.join(caller.split('.')[:2])}")
                return orig(*a, **k)

            setattr(owner, attr, f)

        t = torch.Tensor
        for attr in ("item", "tolist", "nonzero", "cpu"):
            wrap(t, attr)
        for attr in ("__bool__", "__int__", "__float__"):
            wrap(t, attr, attr.strip("_"))
        wrap(torch, "nonzero")

        def no_size(*a, **k):  # repeats given as a tensor and no output_size: a sync
            repeats = a[1] if len(a) > 1 else k.get("repeats")
            return isinstance(repeats, torch.Tensor) and k.get("output_size") is None

        wrap(torch, "repeat_interleave", "repeat_interleave(no output_size)", no_size)
        wrap(t, "repeat_interleave", "repeat_interleave(no output_size)", no_size)
        wrap(torch.amp.GradScaler, "get_scale", "GradScaler.get_scale")
        try:
            yield self
        finally:
            for owner, attr, orig in reversed(saved):
                setattr(owner, attr, orig)


def syncs_part(args, work: Path) -> dict:
    from lota import selection, sparse_model
    from lota.data import batches, read_jsonl, tokenize
    from lota.dist import World
    from lota.models import load_model, load_tokenizer, resolve_targets
    from lota.precision import Precision
    from lota.train import MetricsLog, TrainSettings, train

    folder = build(work / "small", args.syncs_hidden, 2, 2 * args.syncs_hidden)
    data = tokenize(read_jsonl(write_data(work / "data.jsonl")), load_tokenizer(str(folder)), 64)
    settings = {
        "plain": {"accum": 1, "fp16": False, "sharded": False},
        "grad_accum_4": {"accum": 4, "fp16": False, "sharded": False},
        "fp16_scaler_grad_accum_4": {"accum": 4, "fp16": True, "sharded": False},
        "sharded": {"accum": 1, "fp16": False, "sharded": True},
    }
    out = {"model": {"hidden": args.syncs_hidden, "layers": 2}, "steps": args.syncs_steps}
    for label, s in settings.items():
        model = load_model(str(folder))
        targets = resolve_targets(model)
        k = selection.ticket_size("0.9", selection.numel_of(targets))
        ticket = selection.select("random", targets, k, seed=0)
        sparse_model.prepare(model, ticket)
        if s["sharded"]:
            sparse_model.mark_sharded(model)
        params = sparse_model.trainable_parameters(model)
        prec = Precision("cpu", torch.float16, torch.amp.GradScaler("cpu")) if s["fp16"] else None
        counter = SyncCounter()
        steps = args.syncs_steps + 1

        def on_step(step, opt, counter=counter):
            counter.on = True  # from the second step on: the first one warms up

        stream = batches(data, 4 * s["accum"], 0, 0)
        with counter.installed():
            train(
                model,
                params,
                stream,
                TrainSettings(lr=1e-3, steps=steps),
                "train",
                MetricsLog(None),
                show_progress=False,
                on_step=on_step,
                world=World(),
                grad_accum=s["accum"],
                precision=prec,
            )
        per_step = {k: v / args.syncs_steps for k, v in sorted(counter.counts.items())}
        out[label] = {
            "targets": len(targets),
            "micro_batches": s["accum"],
            "per_step": per_step,
            "total_per_step": sum(per_step.values()),
            "lota_per_step": sum(v for k, v in per_step.items() if "@lota" in k),
        }
    return out


# ------------------------------------------------------------------------------ checkpoints
def checkpoint_part(args, folder: Path, data: Path, work: Path) -> dict:
    from lota import checkpoint
    from lota.adapt import adapt
    from lota.adapt_config import AdaptConfig

    writes: list[dict] = []
    save, save_ticket = checkpoint.Checkpointer.save, checkpoint.Checkpointer.save_ticket

    def timed_save(self, phase, step, *a, **k):
        t = time.perf_counter()
        save(self, phase, step, *a, **k)
        writes.append(
            {
                "what": "state",
                "phase": phase,
                "step": step,
                "bytes": self.state_path.stat().st_size if self.writer else 0,
                "seconds": round(time.perf_counter() - t, 3),
            }
        )

    def timed_ticket(self, ticket):
        t = time.perf_counter()
        save_ticket(self, ticket)
        writes.append(
            {
                "what": "ticket",
                "bytes": self.ticket_path.stat().st_size if self.writer else 0,
                "seconds": round(time.perf_counter() - t, 3),
            }
        )

    checkpoint.Checkpointer.save, checkpoint.Checkpointer.save_ticket = timed_save, timed_ticket
    result = {}
    try:
        for method in ("lota", "fft"):
            writes.clear()
            cfg = AdaptConfig(
                model=str(folder),
                data=str(data),
                out=str(work / f"ckpt-{method}"),
                method=method,
                steps=args.steps,
                calibration_steps=args.calibration_steps,
                batch_size=2,
                max_length=32,
                checkpoint_every=0,
                progress=False,
                force=True,
            )
            with contextlib.redirect_stdout(sys.stderr):
                adapt(cfg)
            result[method] = {
                "writes": list(writes),
                "bytes": sum(w["bytes"] for w in writes),
                "seconds": round(sum(w["seconds"] for w in writes), 3),
            }
    finally:
        checkpoint.Checkpointer.save, checkpoint.Checkpointer.save_ticket = save, save_ticket
    return result


# ------------------------------------------------------------------------------ peak memory
def rss_part(args, folder: Path, data: Path, work: Path) -> dict:
    from child import run_child

    result = {}
    for method in ("fft", "lora", "lota"):
        out = work / f"rss-{method}"
        cmd = [
            sys.executable,
            "-m",
            "lota.cli",
            "--quiet",
            "adapt",
            str(folder),
            "--data",
            str(data),
            "--out",
            str(out),
            "--method",
            method,
            "--steps",
            str(args.steps),
            "--calibration-steps",
            str(args.calibration_steps),
            "--batch-size",
            "2",
            "--max-length",
            "32",
            "--checkpoint-every",
            "0",
            "--force",
        ]
        c = run_child(cmd)
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
    from lota.models import load_model, named_weights, resolve_targets

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
    from lota import fileio
    from lota.adapt import adapt
    from lota.adapt_config import AdaptConfig
    from lota.models import load_model, model_fingerprint

    model = load_model(str(folder))
    seconds = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        model_fingerprint(model)
        seconds.append(time.perf_counter() - t)
    tensors = sum(1 for _ in model.parameters())
    hashed = {"tensors": 0, "bytes": 0}
    digest = fileio.weight_digest

    def counted(t):
        hashed["tensors"] += 1
        hashed["bytes"] += t.numel() * 4
        return digest(t)

    fileio.weight_digest = counted
    import lota.models as models

    models.weight_digest = counted
    try:
        cfg = AdaptConfig(
            model=str(folder),
            data=str(data),
            out=str(work / "fp-lota"),
            steps=1,
            calibration_steps=1,
            batch_size=2,
            max_length=32,
            checkpoint_every=0,
            progress=False,
            force=True,
        )
        with contextlib.redirect_stdout(sys.stderr):
            adapt(cfg)
    finally:
        fileio.weight_digest = models.weight_digest = digest
    return {
        "model_tensors": tensors,
        "seconds": round(min(seconds), 3),
        "seconds_all": [round(s, 3) for s in seconds],
        "adapt_run_hashes_tensors": hashed["tensors"],
        "adapt_run_hashes_per_weight": round(hashed["tensors"] / tensors, 2),
    }


def gpu_check_part() -> dict:
    import gpu_check

    estimate = getattr(gpu_check, "estimate", None)
    if estimate is None:
        return {"estimate": None, "note": "gpu_check.py has no estimate of its own"}
    return estimate(gpu_check.parse_args([]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--syncs-hidden", type=int, default=128)
    ap.add_argument("--syncs-steps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--calibration-steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="kept between runs (the model is reused)")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from lota.models import quiet_transformers

    quiet_transformers()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lota-host-costs-"))
    work.mkdir(parents=True, exist_ok=True)
    folder = build(work / "model", args.hidden, args.layers, args.intermediate)
    data = write_data(work / "data.jsonl")
    n = sum(
        math.prod(p.shape) for p in __import__("lota").models.load_model(str(folder)).parameters()
    )
    report = {
        "bench": "host_costs",
        "model": {"hidden": args.hidden, "layers": args.layers, "params": n},
        "torch": torch.__version__,
    }
    run = {
        "syncs": lambda: syncs_part(args, work),
        "checkpoint": lambda: checkpoint_part(args, folder, data, work),
        "rss": lambda: rss_part(args, folder, data, work),
        "selection": lambda: selection_part(args, folder),
        "fingerprint": lambda: fingerprint_part(args, folder, data, work),
        "gpu_check": gpu_check_part,
    }
    for part in parts:
        t = time.perf_counter()
        report[part] = run[part]()
        log(f"{part}: {round(time.perf_counter() - t, 1)} s")
        print(json.dumps({"part": part, **report[part]}), flush=True)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

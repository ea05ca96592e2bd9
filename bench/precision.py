"""Loss curves of ``lota adapt`` with the lab's base model stored in float32, bfloat16 and float16.

With the default settings (AdamW, lr 1e-5, batch 8), float16 weights used to give a NaN loss by the
second step: AdamW's epsilon (1e-8) is 0 in float16, so the first update divides by zero. lota now
keeps float32 master copies of the targets in dense phases and scales the loss where the compute
is float16. This script trains the same task from the three copies of the base with each method
and plots the per-step losses, so the curves can be compared.

    python bench/precision.py [--out bench/results/precision] [--steps 60] [--methods lota,fft]

Options: ``--steps`` training steps (default 60), ``--calibration-steps`` (default 8), ``--lr``
(default 1e-5, lota's default), ``--methods`` comma-separated ``lota adapt`` methods (default
``lota,fft,lora``), ``--dtypes`` (default ``float32,bfloat16,float16``), ``--out`` folder for
``results.json`` and ``loss_curves.png``. Prints a table to stderr and one JSON line on stdout.
Runs on the CPU in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/precision")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--calibration-steps", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--methods", default="lota,fft,lora")
    ap.add_argument("--dtypes", default="float32,bfloat16,float16")
    args = ap.parse_args()

    from lota.adapt import adapt
    from lota.adapt_config import AdaptConfig
    from lota.lab.base import default_base
    from lota.lab.tasks import generate
    from lota.model_folder import quiet_transformers
    from lota.models import load_model, load_tokenizer

    quiet_transformers()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods, dtypes = args.methods.split(","), args.dtypes.split(",")
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "math.jsonl"
        rows = generate("math", 0, 2000, 0, 0)["train"]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        tokenizer = load_tokenizer(default_base())
        for dtype in dtypes:  # a copy of the base stored in each dtype
            model = load_model(default_base()).to(getattr(torch, dtype))
            model.save_pretrained(work / dtype)
            tokenizer.save_pretrained(work / dtype)
            del model
        for method in methods:
            for dtype in dtypes:
                key = f"{method}/{dtype}"
                folder = work / key.replace("/", "-")
                t = time.perf_counter()
                error = None
                try:
                    adapt(
                        AdaptConfig(
                            model=str(work / dtype),
                            data=str(data),
                            out=str(folder),
                            method=method,
                            steps=args.steps,
                            calibration_steps=args.calibration_steps,
                            lr=args.lr,
                            progress=False,
                        )
                    )
                except Exception as e:  # a NaN loss stops a run: record it as measured
                    error = str(e).splitlines()[0]
                rows = [
                    json.loads(x)
                    for x in (folder / "metrics.jsonl").read_text().splitlines()
                    if x.strip()
                ]
                train = [r for r in rows if r["phase"] == "train"]
                runs[key] = {
                    "method": method,
                    "dtype": dtype,
                    "losses": [r["loss"] for r in train],
                    "calibration_losses": [r["loss"] for r in rows if r["phase"] == "calibration"],
                    "skipped_steps": sum(bool(r.get("skipped")) for r in train),
                    "loss_scale_last": train[-1].get("loss_scale") if train else None,
                    "seconds": round(time.perf_counter() - t, 1),
                    "error": error,
                }
                print(f"{key}: {_last(runs[key])}", file=sys.stderr)
    result = {
        "bench": "precision",
        "steps": args.steps,
        "calibration_steps": args.calibration_steps,
        "lr": args.lr,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "runs": runs,
    }
    _report(runs, methods, dtypes, out)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: _last(v) for k, v in runs.items()}))


def _last(run: dict) -> str:
    losses = run["losses"]
    finite = all(math.isfinite(x) for x in losses)
    tail = f"{losses[-1]:.4f}" if losses else "-"
    return f"final loss {tail}, {'finite' if finite and not run['error'] else run['error']}"


def _report(runs: dict, methods: list[str], dtypes: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.4), squeeze=False)
    for ax, method in zip(axes[0], methods):
        for dtype in dtypes:
            losses = runs[f"{method}/{dtype}"]["losses"]
            ax.plot(range(1, len(losses) + 1), losses, label=dtype, lw=1.2)
        ax.set_title(f"--method {method}")
        ax.set_xlabel("training step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
    fig.suptitle("lota adapt on the lab base stored in each dtype (AdamW, lr 1e-5)")
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)
    print(f"{'run':<20} {'first':>8} {'last':>8} {'skipped':>8} {'s':>7}", file=sys.stderr)
    for key, r in runs.items():
        first = f"{r['losses'][0]:.4f}" if r["losses"] else "-"
        last = f"{r['losses'][-1]:.4f}" if r["losses"] else "-"
        print(f"{key:<20} {first:>8} {last:>8} {r['skipped_steps']:>8} {r['seconds']:>7}",
              file=sys.stderr)  # fmt: skip


if __name__ == "__main__":
    main()

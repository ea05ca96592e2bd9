"""``python -m bench.host_costs``: the options and the parts (described in ``bench.host_costs``)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common.inputs import save_llama, sums_data
from bench.common.stats import log
from bench.host_costs import __doc__ as DOC

from .runs import checkpoint_part, fingerprint_part, gpu_check_part, rss_part, selection_part
from .syncs import syncs_part

PARTS = ("syncs", "checkpoint", "rss", "selection", "fingerprint", "gpu_check")


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.host_costs", description=DOC.splitlines()[0])
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
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from lota.model_folder import quiet_transformers
    from lota.models import load_model

    quiet_transformers()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lota-host-costs-"))
    work.mkdir(parents=True, exist_ok=True)
    folder = work / "model"
    shape = dict(hidden=args.hidden, layers=args.layers, intermediate=args.intermediate)
    save_llama(folder, heads=args.hidden // 64, **shape)
    data = sums_data(work / "data.jsonl")
    n = sum(math.prod(p.shape) for p in load_model(str(folder)).parameters())
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

"""``python -m bench.memory``: the options of the memory benchmark (described in ``bench.memory``)."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.memory import __doc__ as DOC

from .checkpointing import GC_METHODS, checkpointing_part
from .inputs import build, count_params
from .pipeline import PIPELINE_METHODS, pipeline_part
from .sparse import sparse_part


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.memory", description=DOC.splitlines()[0])
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
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    parts = args.parts.split(",")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lota-bench-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model_dir, data, ticket = build(work, args)
    n_params = count_params(model_dir)
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

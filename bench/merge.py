"""``lota merge`` side by side with mergekit on the same models, and lota's memory against the
number of sparse inputs.

Models: a small Llama base (``--hidden``, ``--layers``) and ``max(--inputs)`` fine-tunes, each the
base plus random changes on 30 % of the entries of the linear layers in the blocks (lota's default
targets; every other tensor is unchanged, so mergekit, which merges every tensor, and lota compute
the same model). Built once into ``--workdir``.

Part 1, model folders in, model folder out, each method in its own process, interleaved over
``--repeats`` (median wall time and peak resident set):
- ``lota merge FT... --base BASE --method M --out-model OUT``
- ``mergekit-yaml CONFIG OUT`` with the equivalent configuration (``dtype: float32``)
for task arithmetic (weights 1, 0.5, 0.25, ...) and TIES (density 0.2, weights 1: with equal
weights mergekit's weighted sign election and normalisation coincide with TIES as lota and PEFT
define it). The outputs are compared tensor by tensor (largest absolute difference). DARE is
timed too, but its outputs differ by design (mergekit rescales by the L1 norm and draws from the
global RNG; lota rescales by 1 / (1 - drop) with per-input generators).

Part 2, lota's native path: the fine-tunes as sparse deltas (``lota delta --sparsity 0.9``) merged
with TIES into a delta file, for 2, 4, ... inputs: peak memory and time against the inputs' total
size on disk.

mergekit installs beside lota's torch in its own environment (see docs/benchmarks.md):

    python3 -m venv /tmp/mk/venv && /tmp/mk/venv/bin/pip install torch==2.13.0
    echo torch==2.13.0 > /tmp/mk/c.txt && /tmp/mk/venv/bin/pip install mergekit -c /tmp/mk/c.txt
    python -m bench.merge --workdir /tmp/benchmerge [--mergekit /tmp/mk/venv/bin/mergekit-yaml]

Prints each run to stderr and one JSON line last on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from bench.common import child


def run_child(cmd: list[str]) -> tuple[float, float, int, str]:
    """``(wall s, peak MiB, exit code, stderr tail)`` of one child process."""
    r = child.run_child(cmd)
    return r.wall_s, r.peak_mb, r.code, r.stderr[-800:]


def build(work: Path, n: int, hidden: int, layers: int) -> tuple[Path, list[Path]]:
    from lota.models import load_model, load_tokenizer, save_model
    from lota.targets import default_targets
    from lota.toy import save_toy_model

    base = work / "base"
    if not (base / "model.safetensors").exists():
        save_toy_model(base, hidden=hidden, layers=layers, heads=8, intermediate=hidden * 11 // 4)
    tuned = []
    for i in range(n):
        folder = work / f"ft{i}"
        tuned.append(folder)
        if (folder / "model.safetensors").exists():
            continue
        model = load_model(str(base))
        targets = default_targets(model)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in targets:
                    mask = torch.rand(p.shape, generator=g) < 0.3
                    p.add_(torch.randn(p.shape, generator=g) * 0.02 * mask)
        save_model(model, load_tokenizer(str(base)), folder)
    return base, tuned


def mergekit_config(method: str, base: Path, tuned: list[Path], weights: list[float]) -> str:
    models = []
    for t, w in zip(tuned, weights):
        params = {"weight": w}
        if method == "ties":
            params["density"] = 0.2
        if method == "dare_linear":
            params["density"] = 0.1
        models.append({"model": str(t), "parameters": params})
    cfg = {"merge_method": method, "base_model": str(base), "models": models, "dtype": "float32"}
    return json.dumps(cfg)  # JSON is YAML


def lota_args(method: str, weights: list[float]) -> list[str]:
    if method == "task_arithmetic":
        return ["--method", "task-arithmetic", "--weights", ",".join(map(str, weights))]
    if method == "ties":
        return ["--method", "ties", "--density", "0.2"]
    return ["--method", "dare-linear", "--drop", "0.9", "--weights", ",".join(map(str, weights))]


def max_difference(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert set(wa) == set(wb), "the two outputs hold different tensors"
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--mergekit", default="/tmp/mk/venv/bin/mergekit-yaml")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--inputs", default="2,4", help="numbers of inputs for part 1")
    ap.add_argument("--sparse-inputs", default="2,4,8", help="numbers of inputs for part 2")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    t0 = time.time()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    counts = [int(x) for x in args.inputs.split(",")]
    sparse_counts = [int(x) for x in args.sparse_inputs.split(",")]
    base, tuned = build(work, max(counts + sparse_counts), args.hidden, args.layers)
    lota_cli = [sys.executable, "-m", "lota.cli", "--quiet"]
    have_mergekit = Path(args.mergekit).exists()
    if not have_mergekit:
        print(f"mergekit not found at {args.mergekit}: part 1 runs lota alone", file=sys.stderr)

    part1 = []
    for n in counts:
        for method in ("task_arithmetic", "ties", "dare_linear"):
            weights = [1.0] * n if method == "ties" else [1.0 / 2**i for i in range(n)]
            rows = {"lota": [], "mergekit": []}
            for _ in range(args.repeats):
                out_l, out_m = work / f"out_lota_{method}_{n}", work / f"out_mk_{method}_{n}"
                cmd = lota_cli + ["merge", *map(str, tuned[:n]), "--base", str(base)]
                cmd += lota_args(method, weights) + ["--out-model", str(out_l), "--force"]
                rows["lota"].append(run_child(cmd))
                if have_mergekit:
                    cfg = work / f"mk_{method}_{n}.yml"
                    cfg.write_text(mergekit_config(method, base, tuned[:n], weights))
                    cmd = [args.mergekit, str(cfg), str(out_m), "--random-seed", "0", "--quiet"]
                    rows["mergekit"].append(run_child(cmd))
                for who, r in rows.items():
                    if r and r[-1][2]:
                        raise SystemExit(f"{who} failed ({method}, {n} inputs): {r[-1][3]}")
            row = {"method": method, "inputs": n}
            for who, r in rows.items():
                if r:
                    walls, peaks = [x[0] for x in r], [x[1] for x in r]
                    row[who] = {
                        "wall_s": statistics.median(walls),
                        "wall_s_range": [min(walls), max(walls)],
                        "peak_mb": statistics.median(peaks),
                        "peak_mb_range": [min(peaks), max(peaks)],
                    }
            if have_mergekit:
                row["time_ratio"] = row["lota"]["wall_s"] / row["mergekit"]["wall_s"]
                row["memory_ratio"] = row["lota"]["peak_mb"] / row["mergekit"]["peak_mb"]
                row["max_abs_difference"] = max_difference(out_l, out_m)
            part1.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)

    part2 = []
    deltas = []
    for i, t in enumerate(tuned[: max(sparse_counts)]):
        d = work / f"delta{i}.safetensors"
        if not d.exists():
            cmd = lota_cli + ["delta", str(base), str(t), "--sparsity", "0.9", "--out", str(d)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        deltas.append(d)
    for n in sparse_counts:
        out = work / f"merged_{n}.safetensors"
        out.unlink(missing_ok=True)
        cmd = lota_cli + ["merge", *map(str, deltas[:n]), "--method", "ties", "--density", "0.05"]
        wall, peak, code, tail = run_child(cmd + ["--out", str(out)])
        if code:
            raise SystemExit(f"lota merge failed: {tail}")
        row = {
            "inputs": n,
            "inputs_bytes": sum(d.stat().st_size for d in deltas[:n]),
            "output_bytes": out.stat().st_size,
            "wall_s": wall,
            "peak_mb": peak,
        }
        part2.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    from safetensors import safe_open

    with safe_open(str(base / "model.safetensors"), "pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    print(
        json.dumps(
            {
                "bench": "merge",
                "params": params,
                "model_bytes_fp32": (base / "model.safetensors").stat().st_size,
                "mergekit": have_mergekit,
                "part1": part1,
                "part2": part2,
                "wall_s": round(time.time() - t0, 1),
            }
        )
    )


if __name__ == "__main__":
    main()

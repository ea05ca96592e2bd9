"""When do 16-bit delta values reproduce a half-precision tuned model exactly?

For a bfloat16 and a float16 base ``b`` and a tuned model ``t`` of the same dtype, the float32
difference ``d = t.float() - b.float()`` is what ``lota delta`` stores by default. Per trainable
entry this measures three rules, each reconstructed with ``lota apply``'s own arithmetic
(``delta.write_entries_``: ``b + v`` in the values' precision, cast to the base's dtype):
- ``f32_applies``: the float32 ``d`` reconstructs ``t``;
- ``exact16``: ``d`` is exactly representable in the base's 16-bit dtype (so the 16-bit file holds
  the very same numbers as the float32 one, and every consumer sees identical values);
- ``applies16``: ``d`` rounded to 16 bits still reconstructs ``t`` (a weaker rule: merges and
  exports would then see a value that differs from ``d``).
Each is reported as the fraction of entries and of tensors where it holds for every entry.

Tuned models: random perturbations ``N(0, sigma)`` of every entry of a ``N(0, 0.02)`` weight,
``sigma`` from 1e-4 to 1e-2, restricted to the top 10 % by ``|d|`` as ``lota delta --sparsity 0.9``
would be; and a real ``lota adapt`` of a small bfloat16 Llama (its float32 master values and the
saved model's effective difference both measured).

File sizes: a bfloat16 delta over a TinyLlama-shaped layer (2048x2048 and 5632x2048, 15.7M
entries, ``sigma`` 1e-4 and 1e-3, top-``d`` ticket) written with ``values_dtype`` auto, float32
and (lossy) bfloat16, against the bound ``H(d) + 16 d`` bits per eligible entry of 16-bit values.
Prints a table to stderr and one JSON line last on stdout.

    python bench/halfdelta.py [--numel 1000000] [--tensors 8] [--steps 30]
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
from safetensors.torch import load_file

from lota.delta import write_entries_

HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def entry_rules(b: torch.Tensor, t: torch.Tensor, v32: torch.Tensor | None = None) -> dict:
    """Boolean masks of the rules for base entries ``b`` and tuned entries ``t`` (both 1-D, the
    base's dtype); ``v32`` are the float32 values a file holds (default ``t - b`` in float32)."""
    dt = b.dtype
    d = t.float() - b.float() if v32 is None else v32

    def applies(v: torch.Tensor) -> torch.Tensor:
        out = b.clone()
        write_entries_(out, torch.arange(b.numel()), b, v)
        return out.view(torch.int16) == t.view(torch.int16)

    d16 = d.to(dt)
    return {
        "f32_applies": applies(d),
        "exact16": d16.float() == d,
        "applies16": applies(d16),
    }


def summarise(per_tensor: list[dict]) -> dict:
    n = sum(int(m["exact16"].numel()) for m in per_tensor)
    out = {}
    for rule in per_tensor[0]:
        out[rule] = {
            "entries": sum(int(m[rule].sum()) for m in per_tensor) / n,
            "tensors": sum(bool(m[rule].all()) for m in per_tensor) / len(per_tensor),
        }
    return out


def random_case(dtype: torch.dtype, sigma: float, numel: int, tensors: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    per_tensor = []
    for _ in range(tensors):
        b = (torch.randn(numel, generator=g) * 0.02).to(dtype)
        t = (b.float() + torch.randn(numel, generator=g) * sigma).to(dtype)
        d = t.float() - b.float()
        keep = d.abs().topk(numel // 10).indices.sort().values  # the ticket at sparsity 0.9
        per_tensor.append(entry_rules(b[keep], t[keep]))
    return summarise(per_tensor)


def adapt_case(steps: int, lr: float) -> dict:
    """A real ``lota adapt`` on a small bfloat16 Llama: the master values and the saved model."""
    from lota import format as fmt
    from lota.adapt import AdaptConfig, adapt
    from lota.toy import save_toy_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_toy_model(tmp / "base", seed=0, hidden=64, layers=2, heads=2)
        rows = [
            {"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(10) for b in range(10)
        ]
        (tmp / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfg = AdaptConfig(
            model=str(tmp / "base"),
            data=str(tmp / "a.jsonl"),
            out=str(tmp / "run"),
            dtype="bfloat16",
            steps=steps,
            calibration_steps=4,
            lr=lr,
            batch_size=8,
            save_model=True,
            progress=False,
        )
        adapt(cfg)
        delta = fmt.load(tmp / "run" / "delta.safetensors")
        base = {
            k: v.to(torch.bfloat16)
            for k, v in load_file(str(tmp / "base" / "model.safetensors")).items()
        }
        tuned = load_file(str(tmp / "run" / "model" / "model.safetensors"))
        master, effective = [], []
        for name, idx in delta.indices.items():
            if not idx.numel():
                continue
            b, t = base[name].reshape(-1)[idx], tuned[name].reshape(-1)[idx]
            master.append(entry_rules(b, t, delta.values[name]))
            effective.append(entry_rules(b, t))
        return {
            "master_values": summarise(master),
            "effective_difference": summarise(effective),
            "tensors": len(master),
            "nnz": delta.nnz,
        }


SIZE_SHAPES = {"q_proj": (2048, 2048), "up_proj": (5632, 2048)}  # a TinyLlama-1.1B layer


def entropy(d: float) -> float:
    return -d * math.log2(d) - (1 - d) * math.log2(1 - d) if 0 < d < 1 else 0.0


def size_case(sigma: float, densities: list[float], seed: int = 2) -> list[dict]:
    """File sizes of a bfloat16 delta at each density: auto, float32, and the 16-bit bound."""
    from lota import format as fmt
    from lota.delta import SparseDelta
    from lota.ticket import Ticket

    g = torch.Generator().manual_seed(seed)
    diffs = {}
    for name, shape in SIZE_SHAPES.items():
        b = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16).reshape(-1)
        t = (b.float() + torch.randn(b.numel(), generator=g) * sigma).to(torch.bfloat16)
        diffs[name] = t.float() - b.float()
    n = sum(d.numel() for d in diffs.values())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for density in densities:
            indices = {
                k: d.abs().topk(round(density * d.numel())).indices.sort().values
                for k, d in diffs.items()
            }
            delta = SparseDelta(
                Ticket(shapes={k: tuple(s) for k, s in SIZE_SHAPES.items()}, indices=indices),
                {k: diffs[k][i] for k, i in indices.items()},
            )
            sizes = {}
            for vd in ("auto", "float32", "bfloat16"):
                sizes[vd] = fmt.save(delta, Path(tmp) / f"{vd}.safetensors", values_dtype=vd)
            _, header = fmt.read_header(Path(tmp) / "auto.safetensors")
            fixes = sum(e.get("fix", {}).get("nnz", 0) for e in header["tensors"].values())
            bound = (entropy(density) + 16 * density) * n / 8
            rows.append(
                {
                    "sigma": sigma,
                    "density": density,
                    "nnz": delta.nnz,
                    "float32_fixes": fixes / delta.nnz,
                    "dtypes": sorted({e["values_dtype"] for e in header["tensors"].values()}),
                    "bytes": sizes,
                    "bound16_bytes": bound,
                    "ratio_to_bound16": {k: v / bound for k, v in sizes.items()},
                }
            )
            r = rows[-1]["ratio_to_bound16"]
            print(
                f"sizes sigma={sigma:<7g}d={density:<6g} fixes {fixes / delta.nnz:.4f}  auto "
                f"{r['auto']:.3f}x  float32 {r['float32']:.3f}x  bfloat16 (lossy) "
                f"{r['bfloat16']:.3f}x of the 16-bit bound",
                file=sys.stderr,
                flush=True,
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--numel", type=int, default=1_000_000)
    ap.add_argument("--tensors", type=int, default=8)
    ap.add_argument("--sigmas", default="1e-4,1e-3,1e-2")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--densities", default="0.001,0.01,0.1,0.5")
    args = ap.parse_args()
    t0 = time.time()
    rows = []
    for dname, dtype in HALF.items():
        for sigma in [float(s) for s in args.sigmas.split(",")]:
            r = random_case(dtype, sigma, args.numel, args.tensors, seed=1)
            rows.append({"base": dname, "sigma": sigma, **r})
            print(
                f"{dname:9} sigma={sigma:<7g}"
                + "".join(
                    f"  {k} {v['entries']:.5f} ({v['tensors']:.2f} of tensors)"
                    for k, v in r.items()
                ),
                file=sys.stderr,
                flush=True,
            )
    densities = [float(x) for x in args.densities.split(",")]
    sizes = [r for sigma in (1e-4, 1e-3) for r in size_case(sigma, densities)]
    adapted = adapt_case(args.steps, args.lr)
    for kind in ("master_values", "effective_difference"):
        print(
            f"adapt bf16 {kind:21}"
            + "".join(
                f"  {k} {v['entries']:.5f} ({v['tensors']:.2f} of tensors)"
                for k, v in adapted[kind].items()
            ),
            file=sys.stderr,
        )
    print(
        json.dumps(
            {
                "bench": "halfdelta",
                "random": rows,
                "sizes": sizes,
                "adapt": adapted,
                "wall_s": round(time.time() - t0, 1),
            }
        )
    )


if __name__ == "__main__":
    main()

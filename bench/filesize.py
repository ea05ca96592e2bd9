"""Size of sparse delta files against the entropy bound, and the speed of loading and applying them.

For each density ``d`` and value width ``b`` (16 = bfloat16, 32 = float32), a delta with uniformly
random positions over the eligible entries of two Llama-7B-sized matrices (4096x4096 and
11008x4096, 61.9M entries) is written with ``lota.save``, and beside it the same delta in the
layouts users have today, each as a safetensors file with the same values:
- ``dense_bool``: a dense bool mask, one byte per eligible entry (the official LoTA code pickles
  dense bool masks, which cost the same);
- ``int32_flat``: int32 flat indices, 32 bits per trainable entry;
- ``shira_pairs``: int32 (row, column) pairs as PEFT's SHiRA adapters keep them, 64 bits per entry.
The bound is ``H(d) + d*b`` bits per eligible entry (``H`` the binary entropy); ``ratio`` is a
file's size over it, safetensors header included.

Speed: ``load`` is ``lota.load`` (checksums verified) of the lota file, ``apply`` adds the loaded
delta into dense weights of the value dtype, as ``lota apply`` does. Both are reported in GB/s of
the dense weights they serve (weight bytes / seconds), beside a reference copy of those weights
(``torch.clone``) measured in the same run, so the figures read as a fraction of memory bandwidth.
Medians over ``--repeats``. Prints a table to stderr and one JSON line last on stdout.

    python bench/filesize.py [--densities 0.001,0.01,0.1,0.5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import lota
from lota.delta import SparseDelta, apply_delta_
from lota.ticket import Ticket

SHAPES = {
    "model.layers.0.self_attn.q_proj.weight": (4096, 4096),
    "model.layers.0.mlp.up_proj.weight": (11008, 4096),
}
DTYPES = {16: torch.bfloat16, 32: torch.float32}


def entropy(d: float) -> float:
    return -d * math.log2(d) - (1 - d) * math.log2(1 - d) if 0 < d < 1 else 0.0


def make_delta(d: float, bits: int, seed: int) -> SparseDelta:
    g = torch.Generator().manual_seed(seed)
    indices, values = {}, {}
    for name, shape in SHAPES.items():
        numel = math.prod(shape)
        idx = torch.randperm(numel, generator=g)[: round(d * numel)].sort().values
        indices[name] = idx
        values[name] = (torch.randn(idx.numel(), generator=g) * 1e-3).to(DTYPES[bits])
    return SparseDelta(Ticket(shapes=dict(SHAPES), indices=indices), values)


def baselines(delta: SparseDelta, folder: Path) -> dict[str, int]:
    """Bytes of the same delta in other layouts, each written as a safetensors file."""
    sizes = {}
    layouts = {"dense_bool": {}, "int32_flat": {}, "shira_pairs": {}}
    for name, idx in delta.ticket.indices.items():
        rows, cols = SHAPES[name]
        mask = torch.zeros(rows * cols, dtype=torch.bool)
        mask[idx] = True
        v = delta.values[name]
        layouts["dense_bool"].update({f"{name}.mask": mask.view(rows, cols), f"{name}.values": v})
        layouts["int32_flat"].update({f"{name}.index": idx.to(torch.int32), f"{name}.values": v})
        pairs = torch.stack([idx // cols, idx % cols]).to(torch.int32)
        layouts["shira_pairs"].update({f"{name}.indices": pairs, f"{name}.values": v})
    for layout, tensors in layouts.items():
        path = folder / f"{layout}.safetensors"
        save_file(tensors, str(path))
        sizes[layout] = path.stat().st_size
        path.unlink()
    return sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--densities", default="0.001,0.003,0.01,0.03,0.1,0.2,0.3,0.5")
    ap.add_argument("--bits", default="16,32")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    t0 = time.time()
    n = sum(math.prod(s) for s in SHAPES.values())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for bits in [int(b) for b in args.bits.split(",")]:
            dense = {k: torch.zeros(s, dtype=DTYPES[bits]) for k, s in SHAPES.items()}
            dense_bytes = sum(t.numel() * t.element_size() for t in dense.values())
            for d in [float(x) for x in args.densities.split(",")]:
                delta = make_delta(d, bits, seed=int(d * 1e6) + bits)
                path = folder / "delta.safetensors"
                size = lota.save(delta, path)
                bound_bits = (entropy(d) + d * bits) * n
                loaded = lota.load(path)
                assert all(
                    torch.equal(loaded.ticket.indices[k], delta.ticket.indices[k]) for k in SHAPES
                )
                assert all(torch.equal(loaded.values[k], delta.values[k]) for k in SHAPES)
                encodings = sorted(set(_encodings(path)))
                load_s, apply_s, copy_s = [], [], []
                for _ in range(args.repeats):  # interleaved: copy, load, apply
                    t = time.perf_counter()
                    copies = [w.clone() for w in dense.values()]
                    copy_s.append(time.perf_counter() - t)
                    del copies
                    t = time.perf_counter()
                    again = lota.load(path)
                    load_s.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    apply_delta_(dense, again)
                    apply_s.append(time.perf_counter() - t)
                other = baselines(delta, folder)
                row = {
                    "density": d,
                    "bits": bits,
                    "eligible": n,
                    "nnz": sum(i.numel() for i in delta.ticket.indices.values()),
                    "encodings": encodings,
                    "bound_bytes": bound_bits / 8,
                    "bytes": {"lota": size, **other},
                    "ratio_to_bound": {
                        k: v * 8 / bound_bits for k, v in {"lota": size, **other}.items()
                    },
                    "load_gb_s": dense_bytes / statistics.median(load_s) / 1e9,
                    "load_gb_s_range": [
                        dense_bytes / max(load_s) / 1e9,
                        dense_bytes / min(load_s) / 1e9,
                    ],
                    "apply_gb_s": dense_bytes / statistics.median(apply_s) / 1e9,
                    "apply_gb_s_range": [
                        dense_bytes / max(apply_s) / 1e9,
                        dense_bytes / min(apply_s) / 1e9,
                    ],
                    "copy_gb_s": dense_bytes / statistics.median(copy_s) / 1e9,
                }
                rows.append(row)
                r = row["ratio_to_bound"]
                print(
                    f"b={bits:<3}d={d:<7}{'+'.join(encodings):<9}lota {r['lota']:6.3f}  "
                    f"dense_bool {r['dense_bool']:7.2f}  int32 {r['int32_flat']:6.2f}  "
                    f"shira {r['shira_pairs']:6.2f}  |  load {row['load_gb_s']:6.2f} GB/s  "
                    f"apply {row['apply_gb_s']:6.2f} GB/s  copy {row['copy_gb_s']:5.2f} GB/s",
                    file=sys.stderr,
                    flush=True,
                )
    worst = max(r["ratio_to_bound"]["lota"] for r in rows)
    print(
        json.dumps(
            {
                "bench": "filesize",
                "shapes": {k: list(v) for k, v in SHAPES.items()},
                "rows": rows,
                "worst_lota_ratio": worst,
                "target": {"lota_ratio_max": 1.15},
                "met": worst <= 1.15,
                "wall_s": round(time.time() - t0, 1),
            }
        )
    )


def _encodings(path: Path) -> list[str]:
    _, header = lota.format.read_header(path)
    return [e["encoding"] for e in header["tensors"].values()]


if __name__ == "__main__":
    main()

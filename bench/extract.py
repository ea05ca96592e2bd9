"""Out-of-core ticket extraction: ``lota mask BASE TUNED`` on a synthetic model of about 1e9
eligible entries stored as two sharded safetensors folders, against an in-memory numpy partition
of the same values and the official concatenate-and-topk approach.

The synthetic model is a Llama config (hidden 2048, intermediate 5504, 20 blocks: 1.012e9 entries
in the linear layers of the blocks, the default targets) whose base weights are random and whose
tuned weights are the base plus small random changes. It is written once into ``--workdir`` as
shards of at most ``--shard-gb`` GB and reused.

Methods, each in its own process (peak memory is the child's peak resident set):
- ``lota``: ``lota mask BASE TUNED --sparsity 0.9`` (reads tensor by tensor, two-pass exact top-k,
  writes the ticket); wall time covers the whole command, reading both models included.
- ``numpy``: the same job in memory: read both models, form every |tuned - base| in one float32
  array, ``np.partition`` for the k-th largest value, then the positions above it and the ties
  at the lowest positions. Reported end to end (the yardstick for lota's wall time) and for the
  partition alone. Both give a digest of the ticket, which must equal lota's.
- ``official``: the official LoTA code's approach: every |Δ| flattened and concatenated into one
  tensor, then ``torch.topk``; run under an address-space limit of ``--official-limit-gb`` so that
  it fails cleanly instead of taking the machine down when it runs out of memory.

lota and numpy run ``--repeats`` times, interleaved (medians with ranges); official runs once.
Prints each run to stderr and one JSON line last on stdout.

    python -m bench.extract --workdir /tmp/benchextract [--layers 20] [--dtype bfloat16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench.common import child
from lota.selection import ticket_size

NUMPY = r"""
import hashlib, json, sys, time, numpy as np, torch
from safetensors import safe_open
base, tuned, k, names = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(",")
def where(folder):
    index = json.load(open(f"{folder}/model.safetensors.index.json"))["weight_map"]
    return {n: f"{folder}/{index[n]}" for n in names}
wb, wt = where(base), where(tuned)
t0 = time.perf_counter()
parts = []
for x in names:                    # read both models and form |tuned - base| in one array
    with safe_open(wt[x], "pt") as f:
        d = f.get_tensor(x).float()
    with safe_open(wb[x], "pt") as f:
        d.sub_(f.get_tensor(x))
    parts.append(d.abs_().reshape(-1).numpy())
a = np.concatenate(parts)
del parts, d
n = a.size
t1 = time.perf_counter()
kth = np.partition(a, n - k)[n - k]  # partitions a copy, so a keeps the positions
t2 = time.perf_counter()
above = np.flatnonzero(a > kth)
ties = np.flatnonzero(a == kth)[: k - above.size]   # ties to the lowest positions, as lota
idx = np.sort(np.concatenate([above, ties]))
t3 = time.perf_counter()
bounds = np.cumsum([0] + json.loads(sys.argv[5]))
h = hashlib.blake2b(digest_size=16)
for lo, hi in zip(bounds[:-1], bounds[1:]):
    h.update((idx[np.searchsorted(idx, lo):np.searchsorted(idx, hi)] - lo).astype(np.int64).tobytes())
print(json.dumps({"read_s": t1 - t0, "partition_s": t2 - t1, "indices_s": t3 - t2,
                  "total_s": t3 - t0, "kth": float(kth), "digest": h.hexdigest()}))
"""

OFFICIAL = r"""
import json, sys, time, torch
from lota.weights import WeightReader
base, tuned, k = WeightReader(sys.argv[1]), WeightReader(sys.argv[2]), int(sys.argv[3])
t = time.perf_counter()
try:
    deltas = [(tuned.get(x).float() - base.get(x).float()).abs_().reshape(-1)
              for x in sorted(base.targets())]
    flat = torch.cat(deltas)
    del deltas
    values, index = torch.topk(flat, k)
    print(json.dumps({"ok": True, "s": time.perf_counter() - t, "kth": float(values.min())}))
except (RuntimeError, MemoryError) as e:
    print(json.dumps({"ok": False, "s": time.perf_counter() - t, "error": str(e).splitlines()[0][:200]}))
"""


def build(folder: Path, layers: int, dtype: str, shard_gb: float, tuned_of: Path | None) -> None:
    """Write the synthetic model (or, with ``tuned_of``, its tuned version) as sharded safetensors."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (folder / "model.safetensors.index.json").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=2048,
        intermediate_size=5504,
        num_hidden_layers=layers,
        num_attention_heads=16,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        torch_dtype=dtype,
    )
    config.save_pretrained(folder)
    h, i = config.hidden_size, config.intermediate_size
    shapes = {
        "model.embed_tokens.weight": (256, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (256, h),
    }
    for layer in range(layers):
        p = f"model.layers.{layer}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (h, h),
                p + "self_attn.v_proj.weight": (h, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
    dt = getattr(torch, dtype)
    limit = shard_gb * 1e9
    shard, shard_bytes, shards, weight_map = {}, 0, [], {}

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            shards.append(name)
            weight_map.update({k: name for k in shard})
            shard, shard_bytes = {}, 0

    for j, (name, shape) in enumerate(shapes.items()):
        g = torch.Generator().manual_seed(j)
        w = torch.randn(shape, generator=g) * 0.02
        if tuned_of is not None:
            g2 = torch.Generator().manual_seed(10_000 + j)
            w += torch.randn(shape, generator=g2) * 1e-3
        t = w.to(dt)
        del w
        size = t.numel() * t.element_size()
        if shard_bytes + size > limit:
            flush()
        shard[name] = t
        shard_bytes += size
        print(f"\r  writing {folder.name}: {j + 1}/{len(shapes)} tensors", end="", file=sys.stderr)
    flush()
    print(file=sys.stderr)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def run_child(cmd: list[str], limit_gb: float | None = None) -> tuple[float, float, str, int]:
    """``(wall s, peak MiB, stdout, exit code)``; a failure's stderr is shown."""
    r = child.run_child(cmd, limit_gb)
    if r.code:
        print(f"exit code {r.code}: {r.stderr[-1500:]}", file=sys.stderr)
    return r.wall_s, r.peak_mb, r.stdout, r.code


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--workdir", required=True, help="folder for the two synthetic models (about 4-8 GB each)"
    )
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--shard-gb", type=float, default=1.0)
    ap.add_argument("--sparsity", default="0.9")
    ap.add_argument("--methods", default="lota,numpy,official")
    ap.add_argument("--official-limit-gb", type=float, default=16.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    t0 = time.time()
    work = Path(args.workdir)
    base, tuned = (
        work / f"base-{args.layers}-{args.dtype}",
        work / f"tuned-{args.layers}-{args.dtype}",
    )
    build(base, args.layers, args.dtype, args.shard_gb, None)
    build(tuned, args.layers, args.dtype, args.shard_gb, base)
    names, sizes = target_names(args.layers)
    n = sum(sizes)
    k = ticket_size(args.sparsity, n)
    for folder in (base, tuned):  # every method reads the files from the page cache
        for f in sorted(folder.glob("*.safetensors")):
            with open(f, "rb") as h:
                while h.read(1 << 24):
                    pass
    runs: dict[str, list[dict]] = {}
    methods = args.methods.split(",")
    for rep in range(args.repeats):  # lota and numpy interleaved; official once, last
        for method in methods:
            if method == "official" and rep:
                continue
            runs.setdefault(method, []).append(
                run_method(method, base, tuned, work, args, k, names, sizes)
            )
            print(f"{method:<9} {json.dumps(runs[method][-1])}", file=sys.stderr, flush=True)
    results = {m: summarize(r) for m, r in runs.items()}
    lo, nu = results.get("lota", {}), results.get("numpy", {})
    both = lo.get("ok") and nu.get("ok")
    ratios = {  # of medians
        "lota_over_numpy_in_memory": lo["wall_s"] / nu["total_s"] if both else None,
        "lota_over_numpy_partition_alone": lo["wall_s"] / nu["partition_s"] if both else None,
    }
    print(
        json.dumps(
            {
                "bench": "extract",
                "eligible": n,
                "k": k,
                "dtype": args.dtype,
                "results": results,
                "ratios": ratios,
                "same_ticket": lo.get("digest") == nu.get("digest") if both else None,
                "targets": {"lota_peak_mb_max": 2000, "lota_time_over_numpy_max": 1.5},
                "met": {
                    "memory": lo.get("peak_mb", 1e9) <= 2000,
                    "time": both and ratios["lota_over_numpy_in_memory"] <= 1.5,
                },
                "wall_s": round(time.time() - t0, 1),
            }
        )
    )


def run_method(method, base, tuned, work, args, k, names, sizes) -> dict:
    if method == "lota":
        out = work / "ticket.safetensors"
        cmd = [sys.executable, "-m", "lota.cli", "--quiet", "mask", str(base), str(tuned)]
        cmd += ["--sparsity", args.sparsity, "--out", str(out)]
        wall, peak, _, rc = run_child(cmd)
        r = {"ok": rc == 0, "wall_s": wall, "peak_mb": peak}
        if rc == 0:
            r["digest"] = ticket_digest(out, names)
        return r
    if method == "numpy":
        cmd = [sys.executable, "-c", NUMPY, str(base), str(tuned), str(k), ",".join(names)]
        wall, peak, text, rc = run_child(cmd + [json.dumps(sizes)])
        r = json.loads(text.strip().splitlines()[-1]) if rc == 0 else {}
        return {"ok": rc == 0, **r, "peak_mb": peak}
    if method == "official":
        cmd = [sys.executable, "-c", OFFICIAL, str(base), str(tuned), str(k)]
        wall, peak, text, rc = run_child(cmd, args.official_limit_gb)
        lines = text.strip().splitlines()
        r = json.loads(lines[-1]) if lines else {"ok": False, "error": f"exit code {rc}"}
        return {**r, "peak_mb": peak, "limit_gb": args.official_limit_gb}
    raise SystemExit(f"unknown method {method}")


def summarize(rows: list[dict]) -> dict:
    """Medians (and ranges) of the numeric fields over repeats; other fields from the first run."""
    out = dict(rows[0])
    out["ok"] = all(r.get("ok") for r in rows)
    out["repeats"] = len(rows)
    for key, value in rows[0].items():
        if isinstance(value, float):
            values = [r[key] for r in rows if key in r]
            out[key] = statistics.median(values)
            out[key + "_range"] = [min(values), max(values)]
    digests = {r.get("digest") for r in rows}
    if len(digests) > 1:
        out["digest"] = "differs between repeats"
    return out


def target_names(layers: int) -> tuple[list[str], list[int]]:
    """The default targets (linear layers of the blocks) in name order, and their sizes."""
    h, i = 2048, 5504
    sizes = {}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sizes[p + f"self_attn.{m}.weight"] = h * h
        for m in ("gate_proj", "up_proj", "down_proj"):
            sizes[p + f"mlp.{m}.weight"] = h * i
    names = sorted(sizes)
    return names, [sizes[x] for x in names]


def ticket_digest(path: Path, names: list[str]) -> str:
    import hashlib

    import lota

    ticket = lota.load(path)
    assert sorted(ticket.indices) == names
    h = hashlib.blake2b(digest_size=16)
    for x in names:
        h.update(ticket.indices[x].numpy().astype("int64").tobytes())
    return h.hexdigest()


if __name__ == "__main__":
    main()

"""Sparse-phase training memory and step time against full fine-tuning, the official LoTA
approach and PEFT LoRA, on a Llama config of about 200M parameters (fp32, batch 1, short
sequences, AdamW for lota and FFT).

Each method runs in its own process, interleaved over ``--repeats`` rounds:
- ``lota``: ``lota adapt MODEL --ticket T`` (the sparse phase alone, sparsity 0.9);
- ``fft``: ``lota adapt MODEL --method fft`` (dense training of the same target weights);
- ``official``: dense parameters with dense gradients masked to the ticket and a dense RMSprop
  state, as in the official LoTA code (its training script, reimplemented here);
- ``lora``: ``lota adapt MODEL --method lora --lora-r 16`` (PEFT, every linear layer in the blocks).
Memory is the peak resident set of the training phase (the kernel's high-water mark, reset once
the model is loaded), so loading the model is not counted for any method. Step time is the median
over steps after the first. Prints a table to stderr and one JSON line last on stdout.

    python bench/memory.py [--layers 14] [--hidden 1024] [--steps 6] [--repeats 2]
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
        "--methods", default="fft,lota,official,lora", help="comma-separated subset (fft is needed)"
    )
    ap.add_argument(
        "--workdir", default=None, help="reuse a folder for the model (default: a temporary one)"
    )
    args = ap.parse_args()
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
    print(
        json.dumps(
            {
                "bench": "memory",
                "params": n_params,
                "config": vars(args),
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
                "wall_s": round(time.time() - t0, 1),
            }
        )
    )


if __name__ == "__main__":
    main()

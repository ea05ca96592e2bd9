"""GPU check of ``lota adapt``: memory, throughput and the frozen-entry invariant on one GPU.

A Llama of TinyLlama-1.1B's shapes (hidden 2048, 22 layers, intermediate 5632, 32 heads, 4 KV
heads, vocab 32000, untied input and output embeddings: 1,100,048,384 parameters, 968,884,224 of
them in the default targets) is built in memory with random weights, stored in bfloat16 with lota's
byte-level tokenizer in a work folder, and trained on synthetic prompt/completion data in which
every example is exactly ``--seq`` tokens (no padding, so each step trains ``batch x seq`` real
tokens). Nothing is downloaded.

Six in-process ``lota adapt`` runs on ``--device``: ``fft``, ``lora`` (r 16) and ``lota``
(calibration, then the sparse phase at sparsity 0.9), each without and with
``--gradient-checkpointing``, at lota's precision defaults (the stored bfloat16 weights, float32
master copies of the targets in the dense phases, float32 sparse deltas and LoRA adapters).
Per run and phase:

- peak memory: the largest ``cuda_peak_mb`` of the phase's steps in ``metrics.jsonl``
  (``torch.cuda.max_memory_allocated`` since the phase started, MiB). On the CPU there is no such
  number: ``peak_mb`` is null there, and ``rss_mb`` (the largest ``phase_peak_rss_mb``, the
  process's resident high-water mark since the phase started, which also counts what earlier
  runs of the same process left on the heap) is shown instead;
- tokens/s: the median over the steps after the first of ``batch x seq / step_s``;
- the ratios of both to ``fft`` without checkpointing (its training phase);
- the losses (all finite), and, for ``lota``, the summary's ``frozen_verified``.

An independent frozen check follows the first ``lota`` run (written with ``save_model``): every
tensor of the saved model is compared with the base, read with ``lota.weights.WeightReader``, bit
for bit, on ``--device``: the whole tensor where the delta has no entries, every entry outside the
delta's ticket otherwise. It also counts the ticket entries whose stored value changed.

With two or more GPUs visible (and ``--device`` a GPU), ``torchrun --nproc-per-node 2 -m lota.cli
adapt`` runs twice on a smaller Llama (hidden 1024, 4 layers): plain (DDP over NCCL) and with
``--fsdp`` (with ``--master-weights none``, as FSDP2 holds one dtype per block; float16 weights
load as float32 under fp16 autocast instead), ``--steps 2``; their summaries' ``frozen_verified`` are reported. With one GPU (or on the CPU) they are skipped, and the
JSON says why.

A run that fails is reported with its one-line error and the other runs still go ahead; the exit
status is 0 when every run finished with finite losses and every frozen check held, 1 otherwise,
and 2 (one line on stderr) when the device is refused before anything runs.
Each part prints one JSON line on stdout as it finishes (``{"part": "estimate" | "run" |
"frozen_check" | "distributed", ...}``), so a run cut short still reports what it did; the table
goes to stderr and the whole report is the last JSON line (also written to ``--out FILE``).

    python bench/gpu_check.py [--out gpu_check.json] [--workdir DIR]
    python bench/gpu_check.py --tiny --device cpu    # smoke run: well under a minute on a CPU

Options: ``--device`` (default cuda; cpu, cuda:N, auto), ``--tiny`` (a 2-layer hidden-64 Llama,
seq 32, batch 4, 2 steps of each phase), ``--seq`` (512), ``--batch-size`` (8), ``--steps`` (5),
``--calibration-steps`` (3), ``--lr`` (1e-4: large enough that the trained entries change in
bfloat16), ``--lora-r`` (16), ``--dtype`` (stored weights, bfloat16), ``--mixed-precision`` and
``--master-weights`` (passed to ``lota adapt``), ``--methods`` (default fft,lora,lota),
``--workdir`` (default a temporary folder, removed at the end; a given one keeps the base model
for the next run), ``--keep`` (keep each run's output folder), ``--out FILE``.

Expected duration: the script estimates each part on one H100 before it starts (``estimate``:
the rates it assumes, ``H100``, and what each part computes and writes), logs the total and
prints it as the first JSON line. The default set comes to about 3 minutes (177 s): the training
steps take seconds; most of the time goes to what each run writes around them: FFT's
end-of-training checkpoint (the float32 targets and AdamW's two moments, about 12 GB) and the
dense deltas of fft and lora (about 4 GB each). A lota calibration ends in its ticket, not in a
checkpoint of its weights. The work folder needs about 20 GB free (the base, and one run's files
at a time), and the host about 32 GB of memory. ``--methods`` runs a subset.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from lota.errors import LotaError

# TinyLlama-1.1B's shapes; untied embeddings as in TinyLlama
FULL = {
    "hidden": 2048,
    "layers": 22,
    "intermediate": 5632,
    "heads": 32,
    "kv_heads": 4,
    "vocab": 32000,
    "positions": 2048,
}
TINY = {
    "hidden": 64,
    "layers": 2,
    "intermediate": 176,
    "heads": 4,
    "kv_heads": 2,
    "vocab": 259,
    "positions": 256,
}
DIST = {**FULL, "hidden": 1024, "layers": 4, "intermediate": 2816, "heads": 16}
TINY_RUN = {"seq": 32, "batch_size": 4, "steps": 2, "calibration_steps": 2}
METHODS = ("fft", "lora", "lota")
SPARSE = ("lota",)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
WORDS = "the of and a to in is was that for on as with by he at from his an were are which".split()


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def emit(part: str, result: dict) -> None:
    """One JSON line on stdout for a finished part, so a run cut short still reports."""
    print(json.dumps({"part": part, **result}), flush=True)


# ---------------------------------------------------------------------------- the estimate
# What the estimate assumes of one H100 and its host (rates, not measurements of this script):
# bf16 training at about 40 % of the H100's dense peak, a local SSD, blake2b on one core.
H100 = {
    "train_tflops": 150.0,
    "write_gb_s": 1.0,  # safetensors written and fsync'd
    "read_gb_s": 2.0,  # safetensors read
    "hash_gb_s": 1.0,  # blake2b per thread: checkpoints hash on 1, fingerprints on 4
    "run_setup_s": 8.0,  # one run's model init, tokenization, first kernel launches
}


def estimate(args) -> dict:
    """Seconds of each part of the default (or given) set on one H100, from ``H100``'s rates and
    what each part computes and writes: 6 x params x tokens per training step (8 with gradient
    checkpointing, 4 and 6 for LoRA, whose frozen weights get no gradient), and per run the model
    read and fingerprinted, FFT's end-of-training checkpoint (float32 targets and AdamW's moments,
    12 bytes per target parameter, hashed and written), the dense deltas of FFT and LoRA (4 bytes
    per target parameter), the sparse phase's state at sparsity 0.9, and the first lota run's
    saved model and independent frozen check."""
    shape, rate = (TINY if args.tiny else FULL), H100
    n = counts(shape)
    params, targets = n["params"], n["target_params"]
    stored = torch.empty(0, dtype=DTYPES[args.dtype]).element_size()
    tokens, gb = args.seq * args.batch_size, 1e9

    def written(nbytes: float) -> float:  # hashed (checksums), then written
        return nbytes / gb / rate["write_gb_s"] + nbytes / gb / rate["hash_gb_s"]

    def read(nbytes: float) -> float:
        return nbytes / gb / rate["read_gb_s"]

    def steps(count: int, flops_per_token: float) -> float:
        return count * flops_per_token * params * tokens / (rate["train_tflops"] * 1e12)

    load = rate["run_setup_s"] + read(params * stored) + params * 4 / gb / (4 * rate["hash_gb_s"])
    parts = [{"part": "build", "seconds": params * stored / gb / rate["write_gb_s"] + 10.0}]
    first_lota = True
    for method in args.method_list:
        for checkpointing in (False, True):
            dense = 8 if checkpointing else 6
            s = load
            if method == "fft":
                s += steps(args.steps, dense) + written(12 * targets) + written(4 * targets)
                s += read(targets * stored)  # the base, for the delta
            elif method == "lora":
                s += steps(args.steps, dense - 2) + written(4 * targets) + read(targets * stored)
            else:  # calibration, the reset to the base, the sparse phase, the frozen check
                s += steps(args.calibration_steps + args.steps, dense) + 2 * read(targets * stored)
                s += written(0.1 * targets * 12) + written(0.1 * targets * 5)
                if first_lota:  # saved with the model, then the independent frozen check
                    s += params * stored / gb / rate["write_gb_s"] + 2 * read(params * stored)
                    first_lota = False
            parts.append(
                {"part": "run", "method": method, "gradient_checkpointing": checkpointing,
                 "seconds": s}
            )  # fmt: skip
    for p in parts:
        p["seconds"] = round(p["seconds"], 1)
    return {
        "device": "one H100 (estimate)",
        "assumptions": rate,
        "parts": parts,
        "total_s": round(sum(p["seconds"] for p in parts), 1),
        "two_gpu_runs": "not included: they run only where 2 GPUs are visible",
    }


def llama_config(shape: dict):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=shape["positions"],
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def counts(shape: dict) -> dict:
    """Parameters of the config and of lota's default targets, from a model on the meta device."""
    from transformers import LlamaForCausalLM

    from lota.targets import resolve_targets

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(shape))
    targets = resolve_targets(model)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "target_params": sum(math.prod(s) for s in targets.values()),
    }


def build_model(folder: Path, shape: dict, dtype: str, device: torch.device, seed: int) -> bool:
    """A random Llama of ``shape`` stored in ``dtype`` with lota's byte tokenizer; a folder that
    already holds this shape and dtype is kept. Initialised on ``device`` (fast on a GPU).
    Returns whether it was built."""
    from transformers import LlamaForCausalLM

    from lota.toy import byte_tokenizer

    marker = folder / "gpu_check.json"
    wanted = {"shape": shape, "dtype": dtype, "seed": seed}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return False
    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(shape)).to(DTYPES[dtype])
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder, safe_serialization=True)
    byte_tokenizer().save_pretrained(folder)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    marker.write_text(json.dumps(wanted))
    return True


def write_data(path: Path, seq: int, n: int, seed: int) -> None:
    """``n`` prompt/completion examples of ASCII words: the prompt is half of ``seq`` bytes and the
    completion longer than the rest, so that each example is cut to exactly ``seq`` tokens."""
    rng = random.Random(seed)

    def text(chars: int) -> str:
        out = ""
        while len(out) < chars:
            out += rng.choice(WORDS) + " "
        return out[:chars]

    rows = [{"prompt": text(seq // 2), "completion": text(seq)} for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def tokens_per_example(model_dir: Path, data: Path, seq: int) -> int:
    """The length every example tokenizes to (lota's own tokenization); refuses unequal ones."""
    from lota.data import read_jsonl, tokenize
    from lota.models import load_tokenizer

    lengths = {
        len(t.input_ids) for t in tokenize(read_jsonl(data), load_tokenizer(str(model_dir)), seq)
    }
    if len(lengths) != 1:
        raise RuntimeError(f"synthetic examples tokenize to several lengths: {sorted(lengths)}")
    return lengths.pop()


# ---------------------------------------------------------------------------- the runs
def phase_stats(records: list[dict], phase: str, tokens_per_step: int) -> dict:
    rows = [r for r in records if r["phase"] == phase]
    later = rows[1:] or rows  # the first step pays for warm-up (allocations, kernels, autotuning)
    losses = [r["loss"] for r in rows]
    cuda = [r["cuda_peak_mb"] for r in rows if "cuda_peak_mb" in r]
    return {
        "steps": len(rows),
        "losses": losses,
        "losses_finite": bool(losses) and all(math.isfinite(x) for x in losses),
        "peak_mb": max(cuda) if cuda else None,
        "rss_mb": max(r["phase_peak_rss_mb"] for r in rows),
        "step_s": statistics.median(r["step_s"] for r in later),
        "tokens_per_s": statistics.median(tokens_per_step / r["step_s"] for r in later),
        "tokens_per_s_logged": rows[-1]["tokens_per_s"],  # lota's: since the phase started
    }


def one_run(
    args,
    method: str,
    checkpointing: bool,
    model_dir: Path,
    data: Path,
    runs: Path,
    tokens_per_step: int,
    save_model: bool,
) -> tuple[dict, Path]:
    from lota.adapt import adapt
    from lota.adapt_config import AdaptConfig

    out = runs / (method + ("-checkpointing" if checkpointing else ""))
    shutil.rmtree(out, ignore_errors=True)
    cfg = AdaptConfig(
        model=str(model_dir),
        data=str(data),
        out=str(out),
        method=method,
        steps=args.steps,
        calibration_steps=args.calibration_steps,
        lr=args.lr,
        batch_size=args.batch_size,
        max_length=args.seq,
        lora_r=args.lora_r,
        device=args.device,
        mixed_precision=args.mixed_precision,
        master_weights=args.master_weights,
        gradient_checkpointing=checkpointing,
        checkpoint_every=0,
        save_model=save_model,
        seed=args.seed,
        progress=False,
    )
    cuda = args.dev.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    row: dict = {
        "method": method,
        "gradient_checkpointing": checkpointing,
        "ok": False,
        "error": None,
        # what earlier runs left allocated (it counts in this run's peaks): should be about 0
        "allocated_before_mb": round(torch.cuda.memory_allocated(args.dev) / 2**20, 1)
        if cuda
        else None,
    }
    t = time.perf_counter()
    info = None
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON line alone
            info = adapt(cfg)
    except LotaError as e:
        row["error"] = e.line()
    except Exception as e:  # any failure of one run is reported; the rest go on
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        row["error"] = f"{type(e).__name__}: {first}"
    row["seconds"] = round(time.perf_counter() - t, 2)
    metrics = out / "metrics.jsonl"
    records = (
        [json.loads(x) for x in metrics.read_text(encoding="utf-8").splitlines() if x.strip()]
        if metrics.exists()
        else []
    )
    phases = [p for p in ("calibration", "train") if any(r["phase"] == p for r in records)]
    row["phases"] = {p: phase_stats(records, p, tokens_per_step) for p in phases}
    if info is not None:
        row["frozen_verified"] = info.get("frozen_verified") if method in SPARSE else None
        row["ticket_nnz"] = info.get("ticket_nnz")
        row["device"] = info.get("device")
        row["weights_dtype"] = info.get("weights_dtype")
        finite = all(s["losses_finite"] for s in row["phases"].values())
        verified = method not in SPARSE or row["frozen_verified"] is True
        row["ok"] = "train" in row["phases"] and finite and verified
        if not row["ok"] and row["error"] is None:
            row["error"] = "non-finite loss" if not finite else "frozen entries not verified"
    return row, out


def frozen_check(base_dir: Path, run_dir: Path, device: torch.device) -> dict:
    """Every tensor of the saved model against the base, bit for bit, outside the delta's ticket."""
    from lota import format as fmt
    from lota.weights import WeightReader

    t = time.perf_counter()
    delta = fmt.load(run_dir / "delta.safetensors")
    base, tuned = WeightReader(str(base_dir)), WeightReader(str(run_dir / "model"))
    differ, outside, inside, changed = [], 0, 0, 0
    if set(base.shapes) != set(tuned.shapes):
        differ.append("tensor names")
    for name in sorted(set(base.shapes) & set(tuned.shapes)):
        b, w = base.get(name).to(device), tuned.get(name).to(device)
        if b.dtype != w.dtype or b.shape != w.shape:
            differ.append(name)
            continue
        bb, wb = _bits(b), _bits(w)
        idx = delta.indices.get(name)
        n = 0 if idx is None else idx.numel()
        if n:
            idx = idx.to(device)
            changed += int((wb[idx] != bb[idx]).sum())
            wb = wb.clone()
            wb[idx] = bb[idx]  # the ticket's entries may differ; every other entry must not
        inside += n
        outside += b.numel() - n
        if not torch.equal(wb, bb):
            differ.append(name)
    return {
        "ok": not differ,
        "tensors": len(base.shapes),
        "tensors_differing": differ[:10],
        "entries_outside_ticket": outside,
        "ticket_entries": inside,
        "ticket_entries_changed": changed,
        "on": str(device),
        "seconds": round(time.perf_counter() - t, 2),
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as integers, flat (so -0.0 and NaNs compare by their bits)."""
    kind = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().reshape(-1).view(kind)


def add_ratios(rows: list[dict]) -> None:
    """Memory and tokens/s of every phase relative to fft without checkpointing (its training)."""
    base = next(
        (
            r["phases"].get("train")
            for r in rows
            if r["method"] == "fft" and not r["gradient_checkpointing"] and r["ok"]
        ),
        None,
    )
    for r in rows:
        for s in r["phases"].values():
            mem = base and base["peak_mb"] and s["peak_mb"]
            s["memory_ratio"] = round(s["peak_mb"] / base["peak_mb"], 3) if mem else None
            tps = base and base["tokens_per_s"]
            s["tokens_per_s_ratio"] = (
                round(s["tokens_per_s"] / base["tokens_per_s"], 3) if tps else None
            )


# ---------------------------------------------------------------------------- two processes
def distributed(args, work: Path, data: Path) -> dict:
    """``torchrun --nproc-per-node 2 -m lota.cli adapt``: DDP, then FSDP2, on a smaller Llama."""
    if args.dev.type != "cuda":
        return {"skipped": "needs --device cuda and 2 or more GPUs"}
    visible = torch.cuda.device_count()
    if visible < 2:
        return {"skipped": f"torch sees {visible} GPU; the DDP and FSDP runs need 2"}
    gc.collect()
    torch.cuda.empty_cache()  # what this process cached stays out of the way of rank 0's GPU
    shape = TINY if args.tiny else DIST
    model_dir = work / "dist-model"
    build_model(model_dir, shape, args.dtype, args.dev, args.seed)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    out: dict = {"model": {**shape, **counts(shape)}, "processes": 2}
    # FSDP2 shards one dtype per block, so it holds no float32 master copies of 16-bit weights:
    # bfloat16 weights train as they are; float16 ones (AdamW's epsilon is 0 there) load as
    # float32 and compute under fp16 autocast
    half = ["--dtype", "float32", "--mixed-precision", "fp16"]
    fsdp = ["--fsdp", *(half if args.dtype == "float16" else ["--master-weights", "none"])]
    ddp = ["--mixed-precision", args.mixed_precision, "--master-weights", args.master_weights]
    for name, extra in (("ddp", ddp), ("fsdp", fsdp)):
        run = work / "runs" / f"dist-{name}"
        shutil.rmtree(run, ignore_errors=True)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
        ]
        cmd += ["-m", "lota.cli", "--quiet", "adapt", str(model_dir), "--data", str(data)]
        cmd += ["--out", str(run), "--device", "cuda", "--steps", "2", "--calibration-steps", "2"]
        cmd += ["--batch-size", str(args.batch_size), "--max-length", str(args.seq)]
        cmd += ["--lr", str(args.lr), "--checkpoint-every", "0", *extra]
        t = time.perf_counter()
        result: dict = {"command": " ".join(cmd[1:]), "ok": False, "error": None}
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            result["rc"] = p.returncode
            if p.returncode != 0:
                lines = [x for x in p.stderr.splitlines() if x.strip()]
                errors = [x for x in lines if "error" in x.lower()]
                result["error"] = (errors or lines or ["(no output)"])[-1][:400]
        except subprocess.TimeoutExpired:
            result["error"] = "timed out after 600 s"
        result["seconds"] = round(time.perf_counter() - t, 2)
        summary = run / "summary.json"
        if summary.exists():
            s = json.loads(summary.read_text(encoding="utf-8"))
            result.update(
                {k: s.get(k) for k in ("frozen_verified", "processes", "fsdp", "final_loss")}
            )
        result["ok"] = result.get("rc") == 0 and result.get("frozen_verified") is True
        out[name] = result
        if not args.keep:
            shutil.rmtree(run, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------- report
def table(rows: list[dict], check: dict | None, dist: dict) -> None:
    head = (
        f"{'method':6} {'ckpt':4} {'phase':11} {'steps':>5} {'loss first>last':>17} "
        f"{'peak MiB':>9} {'mem x':>6} {'rss MiB':>8} {'tok/s':>9} {'tok/s x':>7} "
        f"{'s/step':>7} {'frozen':>6}"
    )
    log(head)
    log("-" * len(head))

    def f(x, spec):
        return "-" if x is None else format(x, spec)

    for r in rows:
        ckpt = "on" if r["gradient_checkpointing"] else "off"
        frozen = "-" if r.get("frozen_verified") is None else str(r["frozen_verified"]).lower()
        if not r["phases"]:
            log(f"{r['method']:6} {ckpt:4} {'(none)':11} failed: {r['error']}")
            continue
        for phase, s in r["phases"].items():
            losses = s["losses"]
            loss = f"{losses[0]:.3f}>{losses[-1]:.3f}" if losses else "-"
            log(
                f"{r['method']:6} {ckpt:4} {phase:11} {s['steps']:>5} {loss:>17} "
                f"{f(s['peak_mb'], '.0f'):>9} {f(s['memory_ratio'], '.2f'):>6} "
                f"{f(s['rss_mb'], '.0f'):>8} {f(s['tokens_per_s'], '.0f'):>9} "
                f"{f(s['tokens_per_s_ratio'], '.2f'):>7} {f(s['step_s'], '.3f'):>7} "
                f"{frozen if phase == 'train' else '':>6}"
            )
        if r["error"]:
            log(f"{'':6} {'':4} failed: {r['error']}")
    if check is not None:
        if "error" in check:
            log(f"independent frozen check: not run ({check['error']})")
        else:
            log(
                f"independent frozen check ({check['run']}, on {check['on']}): "
                f"{'ok' if check['ok'] else 'FAILED ' + ', '.join(check['tensors_differing'])}; "
                f"{check['entries_outside_ticket']:,} entries outside the ticket bit-identical "
                f"over {check['tensors']} tensors, {check['ticket_entries_changed']:,} of "
                f"{check['ticket_entries']:,} ticket entries changed ({check['seconds']} s)"
            )
    if "skipped" in dist:
        log(f"two processes: skipped ({dist['skipped']})")
    else:
        for name in ("ddp", "fsdp"):
            d = dist[name]
            log(
                f"two processes, {name}: rc {d.get('rc')}, frozen_verified "
                f"{d.get('frozen_verified')}, {d['seconds']} s"
                + (f"; {d['error']}" if d["error"] else "")
            )


def versions() -> dict:
    import importlib.metadata

    import peft
    import transformers

    import lota

    try:  # lota loads a model onto a GPU through a device_map, which transformers serves with it
        accelerate = importlib.metadata.version("accelerate")
    except importlib.metadata.PackageNotFoundError:
        accelerate = None
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "lota": lota.__version__,
        "accelerate": accelerate,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, cpu or auto")
    ap.add_argument(
        "--tiny", action="store_true", help="a 2-layer hidden-64 Llama, seq 32, batch 4, 2 steps"
    )
    ap.add_argument("--seq", type=int, default=None, help="tokens per example (512; --tiny 32)")
    ap.add_argument("--batch-size", type=int, default=None, help="examples per step (8; --tiny 4)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (5; --tiny 2)")
    ap.add_argument(
        "--calibration-steps", type=int, default=None, help="lota's calibration (3; --tiny 2)"
    )
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES), help="stored weights")
    ap.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    ap.add_argument("--master-weights", default="float32", choices=("float32", "none"))
    ap.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated subset of fft,lora,lota"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep each run's output folder")
    ap.add_argument("--out", default=None, help="also write the JSON to this file")
    args = ap.parse_args(argv)
    defaults = (
        TINY_RUN if args.tiny else {"seq": 512, "batch_size": 8, "steps": 5, "calibration_steps": 3}
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.method_list) - set(METHODS))
    if unknown or not args.method_list:
        ap.error(
            f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from fft,lora,lota"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lota import dist

    try:
        args.dev = dist.resolve_device(args.device, "--device")  # refuses a GPU that is not there
    except LotaError as e:
        print(f"gpu_check: error: {e.line()}", file=sys.stderr)
        return 2
    from lota.model_folder import quiet_transformers

    quiet_transformers()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    own_work = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="lota-gpu-check-") if own_work else args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        report = check(args, work)
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    line = json.dumps(report)
    if args.out:
        Path(args.out).write_text(line + "\n", encoding="utf-8")
    print(line)
    return 0 if report["ok"] else 1


def check(args, work: Path) -> dict:
    shape = TINY if args.tiny else FULL
    cuda = args.dev.type == "cuda"
    gpu = torch.cuda.get_device_name(args.dev) if cuda else None
    size = counts(shape)
    log(
        f"gpu_check: {gpu or args.dev}; Llama of {size['params']:,} parameters "
        f"({size['target_params']:,} in the targets), {args.dtype}, seq {args.seq}, batch "
        f"{args.batch_size}, {args.calibration_steps} calibration + {args.steps} training steps"
    )
    planned = estimate(args)
    log(f"estimated on one H100: {planned['total_s']:.0f} s for these parts")
    emit("estimate", planned)
    model_dir, data, runs = work / "model", work / "data.jsonl", work / "runs"
    t = time.perf_counter()
    built = build_model(model_dir, shape, args.dtype, args.dev, args.seed)
    build_s = round(time.perf_counter() - t, 1)
    write_data(data, args.seq, max(4 * args.batch_size, 32), args.seed)
    per_example = tokens_per_example(model_dir, data, args.seq)
    tokens_per_step = per_example * args.batch_size
    rows, frozen = [], None
    for method in args.method_list:
        for checkpointing in (False, True):
            verify = method == "lota" and frozen is None
            log(f"run {method}, gradient checkpointing {'on' if checkpointing else 'off'} ...")
            row, out = one_run(
                args, method, checkpointing, model_dir, data, runs, tokens_per_step, verify
            )
            log(f"  {row['seconds']} s" + (f"; failed: {row['error']}" if row["error"] else ""))
            rows.append(row)
            emit("run", row)
            if verify:
                if row["ok"] and (out / "model").is_dir():
                    try:
                        frozen = frozen_check(model_dir, out, args.dev)
                    except Exception as e:  # reported in the JSON
                        frozen = {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
                else:
                    frozen = {"ok": False, "error": "the run failed"}
                frozen["run"] = row["method"] + ("-checkpointing" if checkpointing else "")
                emit("frozen_check", frozen)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
    add_ratios(rows)
    dist_report = distributed(args, work, data)
    emit("distributed", dist_report)
    table(rows, frozen, dist_report)
    dist_ok = "skipped" in dist_report or all(dist_report[k]["ok"] for k in ("ddp", "fsdp"))
    ok = all(r["ok"] for r in rows) and (frozen is None or frozen["ok"]) and dist_ok
    return {
        "bench": "gpu_check",
        "ok": ok,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(args.dev),
        "gpu": gpu,
        "gpu_memory_gib": round(torch.cuda.get_device_properties(args.dev).total_memory / 2**30, 1)
        if cuda
        else None,
        "gpus_visible": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "versions": versions(),
        "settings": {
            "tiny": args.tiny,
            "model": {"arch": "llama", **shape, "tied_embeddings": False, **size},
            "dtype": args.dtype,
            "mixed_precision": args.mixed_precision,
            "master_weights": args.master_weights,
            "seq": args.seq,
            "batch_size": args.batch_size,
            "tokens_per_step": tokens_per_step,
            "steps": args.steps,
            "calibration_steps": args.calibration_steps,
            "lr": args.lr,
            "lora_r": args.lora_r,
            "sparsity": "0.9",
            "methods": args.method_list,
            "seed": args.seed,
        },
        "memory_field": (
            "peak_mb: torch.cuda.max_memory_allocated since the phase started (MiB)"
            if cuda
            else "peak_mb: null on the CPU; rss_mb: the process's resident high-water mark since "
            "the phase started (MiB)"
        ),
        "model_build_s": build_s if built else None,
        "estimate": planned,
        "runs": rows,
        "frozen_check": frozen,
        "distributed": dist_report,
    }


if __name__ == "__main__":
    sys.exit(main())

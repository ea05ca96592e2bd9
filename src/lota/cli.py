"""The ``lota`` command line. The only place that prints, sets up logging and exits.

Every failure lota knows about prints one line, ``lota: error: <what> -- <how to fix>``, and exits
with 2 for bad input or 1 for a failed run; no traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import warnings

from . import commands as C
from .adapt_config import AdaptConfig
from .errors import InputError, LotaError
from .settings import MergeSettings, add_arguments, as_config, explicit, from_args


def _run_adapt(s: AdaptConfig, a: argparse.Namespace) -> None:
    from .adapt import adapt

    cfg = dataclasses.replace(s, progress=not a.quiet)
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
        f"{info['final_loss']:.4f}; {files} -> {s.out}"
        + (" (already finished: nothing to do)" if info.get("already_finished") else "")
    )
    # After the run, not before: a run that then fails must still end with its one error line.
    for warning in cfg.warnings():
        print(f"lota: warning: {warning}", file=sys.stderr)


def _run_mask(s: C.MaskSettings, a: argparse.Namespace) -> None:
    from . import format as fmt
    from .task_vectors import make_ticket

    _check_new_file(s.out, s.force, [s.base, s.tuned, *s.protect])
    t = make_ticket(
        s.base,
        s.tuned,
        s.sparsity,
        s.targets,
        s.protect,
        s.selector,
        s.seed,
        show_progress=not a.quiet,
    )
    size = fmt.save(
        t,
        s.out,
        config={
            "command": "mask",
            "base": s.base,
            "tuned": s.tuned,
            "sparsity": s.sparsity,
            "targets": s.targets,
            "protect": s.protect,
            "selector": s.selector,
        },
    )
    _summary(f"mask: ticket of {t.summary()}; {size:,} bytes -> {s.out}")


def _run_delta(s: C.DeltaSettings, a: argparse.Namespace) -> None:
    from . import format as fmt
    from .task_vectors import make_delta

    _check_new_file(s.out, s.force, [s.base, s.tuned, s.ticket, *s.protect])
    ticket = None
    if s.ticket:
        from .weights import WeightReader

        # checked against the base's tensors, which also vouch for a ticket of whole tensors
        ticket = fmt.load(s.ticket, shapes=WeightReader(s.base, "base").shapes)
        ticket = ticket.ticket
    d = make_delta(
        s.base,
        s.tuned,
        ticket=ticket,
        sparsity=s.sparsity,
        targets=s.targets,
        protect=s.protect,
        show_progress=not a.quiet,
    )
    size = fmt.save(
        d,
        s.out,
        values_dtype=s.values_dtype,
        config={
            "command": "delta",
            "base": s.base,
            "tuned": s.tuned,
            "ticket": s.ticket,
            "sparsity": s.sparsity,
            "targets": s.targets,
            "values_dtype": s.values_dtype,
        },
    )
    _summary(f"delta: {d.summary()}; {size:,} bytes -> {s.out}")


def _run_apply(s: C.ApplySettings, a: argparse.Namespace) -> None:
    from .task_vectors import apply_deltas

    info = apply_deltas(
        s.base, s.deltas, s.out, allow_mismatch=s.allow_mismatch, scales=s.scales, force=s.force
    )
    _summary(f"apply: {info['deltas']} delta(s), {info['entries']:,} entries -> {s.out}")


def _run_merge(s: C.MergeCommand, a: argparse.Namespace) -> None:
    from . import format as fmt
    from .merge import merge, merge_into_model

    # a method refuses the settings it does not use; the method itself is never refused
    settings = dataclasses.replace(s.merge, given=explicit(MergeSettings, a) - {"method"})
    if s.out_model and not s.base:
        raise InputError("--out-model needs the base model", "--out-model", "pass --base BASE")
    if s.out:
        _check_new_file(s.out, s.force, [*s.inputs, s.base])
    config = {"command": "merge", "inputs": s.inputs, **as_config(settings), "base": s.base}
    if s.out:
        d = merge(s.inputs, settings, base=s.base, targets=s.targets, show_progress=not a.quiet)
        size = fmt.save(d, s.out, config=config)
        _summary(
            f"merge ({settings.method}): {len(s.inputs)} inputs -> {d.summary()}; "
            f"{size:,} bytes -> {s.out}"
        )
    else:
        info = merge_into_model(
            s.inputs,
            settings,
            s.base,
            s.out_model,
            targets=s.targets,
            show_progress=not a.quiet,
            force=s.force,
        )
        _summary(
            f"merge ({settings.method}): {len(s.inputs)} inputs, {info['entries']:,} entries "
            f"-> {s.out_model}"
        )


def _run_ks(s: C.KsSettings, a: argparse.Namespace) -> None:
    from .datafiles import Fields
    from .ks import run_ks

    report = run_ks(
        s.model,
        s.tuned,
        s.out,
        s.alpha,
        s.correction,
        s.top,
        s.mode,
        s.data,
        device=s.device,
        force=s.force,
        split=s.split,
        fields=Fields.of(s),
    )
    if s.json:
        print(json.dumps(report, indent=2))
        return
    shown = ", ".join(repr(r["token"]) for r in report["selected"][:50])
    more = len(report["selected"]) - 50
    print(f"selected tokens: {shown}" + (f" and {more} more" if more > 0 else ""))
    _summary(
        f"ks: {report['selected_count']:,} of {report['vocab']:,} rows of {report['tensor']} "
        f"-> {s.out}/ticket.safetensors, transfer.safetensors, tokens.json, tokens.csv"
    )


def _run_import_mask(s: C.ImportMaskSettings, a: argparse.Namespace) -> None:
    from . import format as fmt
    from .official import import_official

    _check_new_file(s.out, s.force, [s.mask, s.base])
    t = import_official(s.mask, s.base)
    size = fmt.save(t, s.out, config={"command": "import-mask", "mask": s.mask, "base": s.base})
    _summary(f"import-mask: ticket of {t.summary()}; {size:,} bytes -> {s.out}")


def _run_export_mask(s: C.ExportMaskSettings, a: argparse.Namespace) -> None:
    from . import format as fmt
    from .official import export_official

    _check_new_file(s.out, s.force, [s.ticket])
    t = fmt.load(s.ticket)
    t = t.ticket
    size = export_official(t, s.out)
    _summary(f"export-mask: {t.summary()}; {size:,} bytes -> {s.out}")


def _run_import_lora(s: C.ImportLoraSettings, a: argparse.Namespace) -> None:
    from . import format as fmt
    from .lora_import import import_lora

    _check_new_file(s.out, s.force, [s.adapter, s.base])
    d = import_lora(s.adapter, s.base, s.sparsity)
    config = {
        "command": "import-lora",
        "adapter": s.adapter,
        "base": s.base,
        "sparsity": s.sparsity,
        "values_dtype": s.values_dtype,
    }
    size = fmt.save(d, s.out, values_dtype=s.values_dtype, config=config)
    _summary(f"import-lora: {d.summary()}; {size:,} bytes -> {s.out}")


def _run_export_peft(s: C.ExportPeftSettings, a: argparse.Namespace) -> None:
    from .peft_export import export_peft

    info = export_peft(s.delta, s.base, s.out, force=s.force, allow_mismatch=s.allow_mismatch)
    exact = (
        "merge exact"
        if info["exact"]
        else f"{info['inexact_entries']:,} entries off by up to {info['max_error']:.3g}"
    )
    whole = info["whole_layers"]
    whole = f", {whole} layer(s) stored whole ({info['whole_entries']:,} weights)" if whole else ""
    _summary(
        f"export-peft: SHiRA adapter, {info['entries']:,} entries in {info['layers']} linear "
        f"layer(s) (r={info['r']}, {info['stored']:,} stored with zero padding{whole}; {exact}) "
        f"-> {s.out}"
    )


def _run_lab_pretrain(s: C.LabPretrainSettings, a: argparse.Namespace) -> None:
    from .lab.base import pretrain

    info = pretrain(s.out, s.size, s.steps, show_progress=not a.quiet, force=s.force)
    _summary(
        f"lab pretrain: {info['params']:,} parameters, {info['recipe']['steps']} steps, loss "
        f"{info['first_loss']:.3f} -> {info['final_loss']:.3f} in {info['wall_s']:.0f} s -> {s.out}"
    )


def _run_lab_real_base(s: C.LabRealBaseSettings, a: argparse.Namespace) -> None:
    from .lab.realbase import obtain
    from .output_checks import check_new_folder

    if s.out is not None:
        check_new_folder(s.out, s.force)
    info = obtain(s.out, progress=not a.quiet)
    how = "cached" if info["cached"] else f"converted in {info['convert_seconds']:.0f} s"
    _summary(
        f"lab real-base: {info['model']} ({info['parameters']:,} parameters, {info['quantization']} "
        f"dequantized to {info['dtype']}; {how}) -> {info['folder']}"
    )


def _run_bench_quality(s: C.BenchQualitySettings, a: argparse.Namespace) -> None:
    from .lab.base import default_base
    from .lab.quality import run_quality

    if s.commit and s.ledger is None:
        raise InputError("--commit commits ledger entries", "--commit", "give --ledger DIR too")
    if s.commit and s.report_only:
        raise InputError(
            "--report-only never writes the ledger",
            "--commit",
            "leave out --commit or --report-only",
        )
    real = s.base == "real"
    if real:
        from .lab.realbase import obtain

        base = obtain(progress=not a.quiet)["folder"]
    else:
        base = s.base or default_base()
    tasks = s.tasks or ("sql-real,translate" if real else "math,sql,translate")
    claims = s.claims or ("real" if real else None)
    results = run_quality(
        s.out,
        base,
        [t.strip() for t in tasks.split(",") if t.strip()],
        seeds=s.seeds,
        claims=[c.strip() for c in claims.split(",")] if claims else None,
        scale=s.scale or ("real" if real else "full"),
        jobs=s.jobs,
        progress=not a.quiet,
        ledger=s.ledger,
        commit_ledger=s.commit,
        device=s.device,
        train=not s.report_only,
    )
    _summary(
        f"bench quality: {', '.join(c for c in results['meta']['claims'])} in "
        f"{results['meta']['wall_s_this_invocation']:.0f} s -> {s.out}/report.md"
    )


def _run_eval(s: C.EvalSettings, a: argparse.Namespace) -> None:
    from .datafiles import Fields
    from .evaluate import evaluate

    r = evaluate(
        s.model,
        s.data,
        s.metric,
        s.max_new_tokens,
        s.batch_size,
        s.limit,
        show_progress=not a.quiet,
        deltas=s.delta,
        each=s.each,
        allow_mismatch=s.allow_mismatch,
        allow_overlap=s.allow_overlap,
        device=s.device,
        split=s.split,
        fields=Fields.of(s),
    )
    if s.json:
        print(json.dumps(r, indent=2))
        return
    for one in r.get("results", [r]):
        with_ = f" with {' + '.join(one['deltas'])}" if one["deltas"] else ""
        value = f"{s.metric} = {one['score']:.4f}"
        if "acc_norm" in one:
            value = f"{s.metric} acc = {one['acc']:.4f}, acc_norm = {one['acc_norm']:.4f}"
        _summary(f"eval: {value} on {one['n']} examples of {s.data}{with_}")


def _run_inspect(s: C.InspectSettings, a: argparse.Namespace) -> None:
    from .compare import inspect_report
    from .format import describe

    infos = [describe(f) for f in s.files]
    pairs = None
    if len(s.files) > 1:
        from .merge import overlap

        pairs = overlap([str(f) for f in s.files])["pairs"]
    lines, out = inspect_report(infos, pairs)
    if s.json:
        print(json.dumps(out, indent=2))
        return
    print("\n".join(lines))


def _run_demo(s: C.DemoSettings, a: argparse.Namespace) -> None:
    from .lab.demo import run_demo

    if s.scale not in ("demo", "smoke"):
        raise InputError(f"unknown scale '{s.scale}'", "--scale", "choose demo or smoke")
    run_demo(s.out, seed=s.seed, base=s.base, scale=s.scale, jobs=s.jobs, show_progress=not a.quiet)


def _check_new_file(path: str, force: bool, inputs: list) -> None:
    from .output_checks import check_new_file

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


RUNS = {
    "adapt": _run_adapt,
    "mask": _run_mask,
    "delta": _run_delta,
    "apply": _run_apply,
    "merge": _run_merge,
    "ks": _run_ks,
    "import-mask": _run_import_mask,
    "export-mask": _run_export_mask,
    "import-lora": _run_import_lora,
    "export-peft": _run_export_peft,
    "lab pretrain": _run_lab_pretrain,
    "lab real-base": _run_lab_real_base,
    "bench quality": _run_bench_quality,
    "eval": _run_eval,
    "inspect": _run_inspect,
    "demo": _run_demo,
}  # {command name: what runs it, given its settings and the parsed namespace}


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command in ``commands.COMMANDS``, each from its settings dataclass."""
    from . import __version__

    parser = _Parser(prog="lota", description="Lottery-ticket sparse adaptation of causal LMs.")
    parser.add_argument("--version", action="version", version=f"lota {__version__}")
    add_arguments(parser, C.CommonOptions)
    parser.set_defaults(**dataclasses.asdict(C.CommonOptions()))
    # The same two flags are accepted after the command too (but not after a group's command).
    common = argparse.ArgumentParser(add_help=False)
    add_arguments(common, C.CommonOptions)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups = {}
    for name, command in C.COMMANDS.items():
        group, _, own = name.rpartition(" ")
        if not group:
            p = sub.add_parser(
                name, parents=[common], help=command.help, description=command.description
            )
        else:
            if group not in groups:
                help, metavar = C.GROUPS[group]
                g = sub.add_parser(group, parents=[common], help=help)
                groups[group] = g.add_subparsers(
                    dest=f"{group}_command", required=True, metavar=metavar
                )
            p = groups[group].add_parser(own, help=command.help, description=command.description)
        add_arguments(p, command.settings)
        p.set_defaults(run=RUNS[name], command_settings=command.settings)
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
        args.run(from_args(args.command_settings, args), args)
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

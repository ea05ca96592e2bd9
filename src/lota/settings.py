"""Settings declared once: each field of a settings dataclass carries its command-line option.

A field declared with ``setting(default, help=..., ...)`` is a command-line option; from that one
declaration:

- ``add_arguments(parser, cls)`` adds the options, in field order;
- ``from_args(cls, args)`` builds the dataclass from the parsed namespace;
- ``explicit(cls, args)`` names the settings the user set on the command line;
- ``as_config(obj)`` is the resolved config written into file metadata, keyed by config key;
- ``flags(cls)`` lists the option strings, in order.

A field declared with ``included(Other)`` holds an ``Other`` whose options are added in its place:
a command's settings take in a shared settings class (``lota merge`` takes ``MergeSettings``).

Options never fill in a default themselves (``argparse.SUPPRESS``): a setting left out is absent
from the namespace, so ``explicit`` sees exactly what was typed and the dataclass supplies every
default. Fields declared with plain ``field()`` are not options.

``AdaptConfig`` (``lota adapt``) and ``MergeSettings`` (``lota merge``) are declared here: this
module imports nothing heavy, so the command line is built without torch (``lota.adapt`` and
``lota.merge`` re-export them); what their checks need is imported when they run.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from typing import TYPE_CHECKING, Any

from . import names, sources
from .errors import InputError

if TYPE_CHECKING:
    from .train import TrainSettings

_KEY = "lota.setting"
_INCLUDED = "lota.included"


@dataclass(frozen=True)
class Option:
    """How one field is spelled on the command line."""

    help: str | None
    flag: str | None  # None: ``--`` + the field name with dashes
    positional: bool
    names: tuple[str, ...]  # the known values, listed as ``{names}`` in help
    fallback: Any  # what a None value stands for, shown as ``{default}`` in help
    config_key: str | None  # None: the field name
    parse: Callable[[Any, str], Any] | None  # (command-line value, flag) -> field value
    aliases: tuple[tuple[str, str], ...]  # (flag, help): more options for the same field
    exclusive: str | None  # name of a mutually exclusive group
    kwargs: dict  # anything else ``add_argument`` takes: type, choices, metavar, nargs, ...


def setting(
    default: Any = MISSING,
    *,
    help: str | None = None,
    flag: str | None = None,
    positional: bool = False,
    names: tuple[str, ...] = (),
    fallback: Any = None,
    config_key: str | None = None,
    parse: Callable[[Any, str], Any] | None = None,
    factory: Callable[[], Any] | Any = MISSING,
    aliases: dict[str, str] | None = None,
    exclusive: str | None = None,
    **argparse_kwargs: Any,
):
    """A dataclass field that is also a command-line option.

    ``help`` may name ``{default}`` (the fallback, else the default) and ``{names}`` (the known
    values joined by `` | ``). A ``False`` default makes a ``store_true`` flag; an int or float
    default sets ``type``. ``parse(value, flag)`` turns a given value into the field's, raising
    ``InputError``. A required option (``required=True``) in an ``exclusive`` group makes the
    group required. Other keyword arguments go to ``add_argument`` unchanged.
    """
    option = Option(
        help=help,
        flag=flag,
        positional=positional,
        names=tuple(names),
        fallback=fallback,
        config_key=config_key,
        parse=parse,
        aliases=tuple((aliases or {}).items()),
        exclusive=exclusive,
        kwargs=argparse_kwargs,
    )
    return field(default=default, default_factory=factory, metadata={_KEY: option})


def included(cls):
    """A dataclass field holding a ``cls`` whose options the command line adds in its place."""
    return field(default_factory=cls, metadata={_INCLUDED: cls})


def declared(cls) -> list[tuple[dataclasses.Field, Option]]:
    """The fields of ``cls`` declared with ``setting``, in order, with their options."""
    return [(f, f.metadata[_KEY]) for f in dataclasses.fields(cls) if _KEY in f.metadata]


def flag_of(f: dataclasses.Field, option: Option) -> str:
    return option.flag or "--" + f.name.replace("_", "-")


def key_of(f: dataclasses.Field, option: Option) -> str:
    return option.config_key or f.name


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add one option per declared field of ``cls`` to ``parser``, in field order (the options of
    an ``included`` field in its place). An ``exclusive`` group lies within one class."""
    fields = declared(cls)
    required = {o.exclusive for _, o in fields if o.exclusive and o.kwargs.get("required")}
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if _INCLUDED in f.metadata:
            add_arguments(parser, f.metadata[_INCLUDED])
            continue
        if _KEY not in f.metadata:
            continue
        option = f.metadata[_KEY]
        kw = _add_argument_kwargs(f, option)
        if option.positional:
            parser.add_argument(f.name, **kw)
            continue
        target = parser
        if option.exclusive:  # argparse wants the group required, never its members
            kw.pop("required", None)
            if option.exclusive not in groups:
                group = parser.add_mutually_exclusive_group(required=option.exclusive in required)
                groups[option.exclusive] = group
            target = groups[option.exclusive]
        target.add_argument(flag_of(f, option), dest=f.name, default=argparse.SUPPRESS, **kw)
        for alias, alias_help in option.aliases:
            kw["help"] = alias_help
            target.add_argument(alias, dest=f.name, default=argparse.SUPPRESS, **kw)


def _add_argument_kwargs(f: dataclasses.Field, option: Option) -> dict:
    kw = dict(option.kwargs)
    if "action" not in kw and f.default is False:
        kw["action"] = "store_true"
    elif "action" not in kw and type(f.default) in (int, float):
        kw.setdefault("type", type(f.default))
    if option.help is not None:
        shown = f.default if option.fallback is None else option.fallback
        kw["help"] = option.help.format(default=shown, names=" | ".join(option.names))
    return kw


def from_args(cls, args: argparse.Namespace, **extra: Any):
    """``cls`` from the parsed ``args``: given values (parsed), the dataclass's defaults for the
    rest, and ``extra`` for fields that are not options."""
    given = vars(args)
    values = {}
    for f in dataclasses.fields(cls):
        if _INCLUDED in f.metadata:
            values[f.name] = from_args(f.metadata[_INCLUDED], args)
        elif _KEY in f.metadata and f.name in given:
            option, value = f.metadata[_KEY], given[f.name]
            values[f.name] = option.parse(value, flag_of(f, option)) if option.parse else value
    return cls(**values, **extra)


def flags(cls) -> list[str]:
    """The option strings of ``cls`` (aliases too, ``included`` ones in place), in order;
    positionals by their field names."""
    out = []
    for f in dataclasses.fields(cls):
        if _INCLUDED in f.metadata:
            out += flags(f.metadata[_INCLUDED])
        elif _KEY in f.metadata:
            option = f.metadata[_KEY]
            out += [f.name] if option.positional else [flag_of(f, option)]
            out += [alias for alias, _ in option.aliases]
    return out


def explicit(cls, args: argparse.Namespace) -> set[str]:
    """Config keys of the options of ``cls`` set on the command line."""
    given = vars(args)
    return {key_of(f, o) for f, o in declared(cls) if f.name in given and not o.positional}


def as_config(obj) -> dict:
    """``{config key: value}`` of the declared fields of ``obj``, in field order."""
    return {key_of(f, o): getattr(obj, f.name) for f, o in declared(type(obj))}


def fallbacks(cls) -> dict[str, Any]:
    """``{field name: fallback}`` of the declared fields that have one."""
    return {f.name: o.fallback for f, o in declared(cls) if o.fallback is not None}


def numbers(text: str, flag: str) -> list[float]:
    """A comma-separated list of numbers, e.g. ``1,0.5``."""
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise InputError(
            f"'{text}' is not a comma-separated list of numbers", flag, f"e.g. {flag} 1,0.5"
        ) from None


FLOAT32_MAX = 3.4028234663852886e38


def check_factors(values: list[float], name: str, where: str, fix: str) -> None:
    """Refuse a factor (merge weight, lambda, apply or activation scale) that is NaN, inf, or
    beyond float32's range: it multiplies float32 (or 16-bit) values, where it would be inf, and
    the output NaN or inf."""
    for x in values:
        if not (math.isfinite(x) and abs(x) <= FLOAT32_MAX):
            raise InputError(
                f"{name} {x:g} is not a finite number within float32's range (|x| <= 3.4e38): "
                "the result would be NaN or inf",
                where,
                fix,
            )


# ---------------------------------------------------------------------------- lota adapt
OPTIMIZERS = names.OPTIMIZERS
PROTECT_MODES = ("constrained", "flip")
REPORT_TO = ("none", "tensorboard")  # metrics.jsonl is always written
LOAD_DTYPES = names.LOAD_DTYPES
VALUE_DTYPES = names.VALUE_DTYPES
MIXED_PRECISION = ("no", "bf16", "fp16")
MASTER_WEIGHTS = ("float32", "none")
LARGE_LR = 1.0  # far above any rate that fine-tunes a pretrained model without wrecking it


def zero_is_none(value: float, flag: str) -> float | None:
    """``0`` given for a limit: no limit."""
    return value or None


@dataclass
class AdaptConfig:
    """The settings of one ``lota adapt`` run; written, resolved, beside its outputs."""

    model: str = setting(
        positional=True, help="model folder (config, safetensors weights, tokenizer)"
    )
    data: str = setting(required=True, help="training data, JSONL of prompt/completion or messages")
    out: str = setting(required=True, help="output folder")
    method: str = setting(
        sources.DEFAULT_METHOD, help="{names} (default {default})", names=sources.method_names()
    )
    sparsity: str = setting(
        "0.9", help="fraction of target entries frozen, in [0, 1) (default {default})"
    )
    calibration_steps: int = setting(8, help="dense steps before extraction (default {default})")
    calibrated: str | None = setting(
        None,
        metavar="TUNED",
        help="a model already fine-tuned from MODEL (e.g. a Trainer checkpoint): its task vector "
        "gives the ticket, no calibration run",
    )
    calibration_lr: float | None = setting(
        None, type=float, help="learning rate of calibration (default --lr)"
    )
    calibration: str = setting(
        sources.DEFAULT_CALIBRATION,
        names=sources.calibration_names(),
        help="how --method lota and bottomk calibrate: {names} (default {default})",
    )
    fisher_dtype: str = setting(
        "float32",
        names=sources.FISHER_DTYPES,
        help="--calibration fisher: precision of the score buffer, {names} (default {default})",
    )
    lora_calibration_score: str = setting(
        "change",
        names=sources.LORA_CALIBRATION_SCORES,
        help="--calibration lora: the ticket from the adapter's merged change or the full "
        "weights' squared gradients, {names} (default {default})",
    )
    steps: int | None = setting(None, type=int, help="training steps (default: one epoch)")
    epochs: float | None = setting(None, type=float, help="training epochs instead of --steps")
    lr: float = setting(1e-5, help="learning rate (default 1e-5)")
    batch_size: int = setting(8)
    group_by_length: bool = setting(
        False,
        help="batch examples of similar length together, so that less of each batch is padding "
        "(batches keep a random order)",
    )
    optimizer: str = setting("adamw", help="{names} (default {default})", names=OPTIMIZERS)
    weight_decay: float = setting(0.0)
    momentum: float = setting(0.0, help="momentum for rmsprop and sgd")
    max_grad_norm: float | None = setting(
        1.0, parse=zero_is_none, help="gradient clipping, 0 to disable"
    )
    grad_accum: int = setting(
        1,
        help="micro-batches per process and step; --batch-size is the global batch "
        "(default {default})",
    )
    fsdp: bool = setting(
        False,
        help="shard weights across processes with FSDP2 (under torchrun / accelerate launch)",
    )
    dist_timeout: float = setting(
        120.0,
        help="minutes a process waits for the others (the main process alone writes checkpoints "
        "and outputs) before the run fails (default {default})",
    )
    report_to: str = setting(
        "none",
        names=REPORT_TO,
        help="also log metrics to: {names} (OUT/tensorboard); OUT/metrics.jsonl always",
    )
    seed: int = setting(0)
    targets: str | None = setting(
        None, help="regex of parameter names to adapt (default: linear layers in blocks)"
    )
    ticket: str | None = setting(
        None,
        help="reuse this ticket (or delta's ticket); skips calibration",
        aliases={"--tokens": "--method ks-lottery: the folder (or ticket) written by 'lota ks'"},
    )
    protect: list[str] = setting(
        factory=list, nargs="+", metavar="FILE", help="tickets or deltas to keep untouched (LoTTO)"
    )
    protect_mode: str = setting(
        "constrained", help="{names} (default {default})", names=PROTECT_MODES
    )
    max_length: int | None = setting(  # None: 512, or the model's positions if it has fewer
        None,
        type=int,
        help="tokens per example, at most the model's positions (default 512, or the positions "
        "if fewer)",
    )
    lora_r: int = setting(16)
    lora_alpha: int = setting(32)
    device: str = setting(
        "auto",
        help="where to train: auto (cuda when torch sees a GPU, else cpu), cpu, cuda, cuda:N "
        "(default {default})",
    )
    dtype: str = setting("auto", choices=LOAD_DTYPES, help="load precision")
    mixed_precision: str = setting(
        "no",
        names=MIXED_PRECISION,
        help="compute precision of the forward and backward passes (torch autocast): {names} "
        "(default {default}: the weights' own)",
    )
    master_weights: str = setting(
        "float32",
        names=MASTER_WEIGHTS,
        help="dense phases (calibration, fft) on 16-bit weights: the optimizer updates float32 "
        "copies of the targets, or the 16-bit weights themselves: {names} (default {default})",
    )
    gradient_checkpointing: bool = setting(
        False,
        help="recompute each block's activations in the backward pass (transformers' "
        "non-reentrant checkpointing): less memory, about a third more compute",
    )
    deterministic: bool = setting(
        False,
        help="on a GPU, deterministic kernels only (torch.use_deterministic_algorithms, cuBLAS's "
        "fixed workspace), so that a resumed run ends with the same bits as an uninterrupted one; "
        "slower, and refused by ops that have no deterministic kernel",
    )
    values_dtype: str = setting(
        "float32", choices=VALUE_DTYPES, help="precision of the delta's values on disk"
    )
    save_model: bool = setting(False, help="also write a loadable model folder to OUT/model")
    checkpoint_every: int = setting(
        100,
        help="steps between checkpoints (default {default}; every phase start and the end of "
        "training always checkpoint, and a calibration ends in its ticket)",
    )
    force: bool = setting(False, help="write into an existing, non-empty --out")
    resume: bool = setting(False, help="continue an interrupted run (also automatic)")
    restart: bool = setting(False, help="discard an interrupted run's checkpoint and start over")
    progress: bool = True  # the command line's --quiet turns it off

    def validate(self) -> None:
        """Check every setting, reporting all problems at once."""
        import importlib.util

        from . import dist, selection

        errors = []
        method = sources.METHODS.get(self.method)
        if method is None:
            names = ", ".join(sources.method_names())
            errors.append(f"--method '{self.method}' is not one of {names}")
        if self.optimizer not in OPTIMIZERS:
            errors.append(f"--optimizer '{self.optimizer}' is not one of {', '.join(OPTIMIZERS)}")
        if self.protect_mode not in PROTECT_MODES:
            errors.append(
                f"--protect-mode '{self.protect_mode}' is not one of {', '.join(PROTECT_MODES)}"
            )
        try:
            selection.parse_sparsity(self.sparsity)
        except InputError as e:
            errors.append(e.what)
        errors += self._float_errors()
        for name, lo in [
            ("batch_size", 1),
            ("max_length", 2),
            ("lora_r", 1),
            ("lora_alpha", 1),
            ("grad_accum", 1),
        ]:
            value = getattr(self, name)
            if value is not None and value < lo:
                errors.append(f"--{name.replace('_', '-')} {value} must be >= {lo}")
        if self.steps is not None and self.steps < 1:
            errors.append(f"--steps {self.steps} must be >= 1")
        if self.steps is not None and self.epochs is not None:
            errors.append("give --steps or --epochs, not both")
        if self.calibration_steps < 1 and sources.calibrates(self):
            errors.append(f"--calibration-steps {self.calibration_steps} must be >= 1")
        if self.checkpoint_every < 0:
            errors.append(f"--checkpoint-every {self.checkpoint_every} must be >= 0")
        if self.resume and self.restart:
            errors.append("give --resume or --restart, not both")
        errors += sources.option_errors(self)
        if self.protect and method is not None and not method.sparse:
            errors.append(
                f"--protect needs a sparse method; --method {self.method} trains every target entry"
            )
        errors += sources.requirement_errors(self)
        errors += sources.calibration_errors(self)
        w = dist.world()
        parts = w.size * self.grad_accum
        if self.batch_size >= 1 and self.grad_accum >= 1 and self.batch_size % parts:
            errors.append(
                f"--batch-size {self.batch_size} does not split into {w.size} process(es) x "
                f"--grad-accum {self.grad_accum} equal micro-batches; make it a multiple of {parts}"
            )
        for name, names in [
            ("mixed_precision", MIXED_PRECISION),
            ("master_weights", MASTER_WEIGHTS),
        ]:
            if getattr(self, name) not in names:
                errors.append(
                    f"--{name.replace('_', '-')} '{getattr(self, name)}' is not one of "
                    f"{', '.join(names)}"
                )
        if self.report_to not in REPORT_TO:
            errors.append(f"--report-to '{self.report_to}' is not one of {', '.join(REPORT_TO)}")
        if self.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            errors.append("--report-to tensorboard needs the tensorboard package (pip install it)")
        plugin = dist.accelerate_plugin()
        if plugin == "deepspeed":
            errors.append(
                "lota adapt does not run under DeepSpeed; launch with torchrun or accelerate "
                "without a DeepSpeed config (add --fsdp to shard)"
            )
        if plugin == "fsdp1":
            errors.append(
                "lota shards with FSDP2 only; set fsdp_version: 2 in the accelerate config"
            )
        if self.fsdp and not w.distributed:
            errors.append(
                "--fsdp needs several processes: start lota with torchrun or accelerate launch"
            )
        if self.fsdp:
            errors += sources.fsdp_errors(self)
        if errors:
            raise InputError("; ".join(errors), "lota adapt", "fix the arguments above")

    def _float_errors(self) -> list[str]:
        """Non-finite numbers first: inf passes a ``> 0`` check and would only fail (or wreck the
        model) after training started."""
        errors = []
        for name, positive in [
            ("lr", True),
            ("calibration_lr", True),
            ("epochs", True),
            ("weight_decay", False),
            ("momentum", False),
            ("max_grad_norm", False),
            ("dist_timeout", True),
        ]:
            value, flag = getattr(self, name), "--" + name.replace("_", "-")
            if value is None:
                continue
            if not math.isfinite(value):
                errors.append(f"{flag} {value} must be a finite number")
            elif positive and not value > 0:
                errors.append(f"{flag} {value} must be > 0")
            elif not positive and value < 0:
                disable = " (0 disables clipping)" if name == "max_grad_norm" else ""
                errors.append(f"{flag} {value} must be >= 0{disable}")
        return errors

    def warnings(self) -> list[str]:
        """Settings that are valid but very likely a mistake, one line each."""
        out = []
        for name in ("lr", "calibration_lr"):
            value = getattr(self, name)
            if value is not None and math.isfinite(value) and value > LARGE_LR:
                out.append(
                    f"--{name.replace('_', '-')} {value:g} is above {LARGE_LR:g}: a rate this large "
                    "usually wrecks the model even when the loss stays finite -- check the value "
                    "(1e-5 to 1e-3 are usual)"
                )
        return out

    @property
    def calibration_rate(self) -> float:
        """The learning rate of calibration: ``--calibration-lr``, else ``--lr``."""
        return self.calibration_lr if self.calibration_lr is not None else self.lr

    def settings(self, lr: float, steps: int) -> TrainSettings:
        from .train import TrainSettings

        return TrainSettings(
            lr=lr,
            steps=steps,
            optimizer=self.optimizer,
            weight_decay=self.weight_decay,
            momentum=self.momentum,
            max_grad_norm=self.max_grad_norm,
            seed=self.seed,
        )


# ---------------------------------------------------------------------------- lota merge
MERGE_METHODS = names.MERGE_METHODS


@dataclass
class MergeSettings:
    """How ``lota merge`` combines its inputs; None fractions stand for their fallback."""

    method: str = setting("add", help="{names} (default {default})", names=MERGE_METHODS)
    weights: list[float] | None = setting(
        None, help="comma-separated weight per input", parse=numbers
    )
    lam: float = setting(1.0, flag="--lambda", config_key="lambda", help="scale of the result")
    density: str | float | None = setting(
        None, fallback="0.2", help="ties, breadcrumbs: fraction kept ({default})"
    )
    drop: str | float | None = setting(
        None, fallback="0.9", help="dare-*, della: drop probability ({default})"
    )
    gamma: str | float | None = setting(
        None, fallback="0.01", help="breadcrumbs: top outlier fraction ({default})"
    )
    epsilon: str | float | None = setting(
        None, fallback="0.05", help="della: drop spread ({default})"
    )
    seed: int = setting(0, help="dare-*, della: random seed ({default})")
    given: set[str] = field(default_factory=set)  # settings the user set explicitly

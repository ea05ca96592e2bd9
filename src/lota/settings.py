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

``MergeSettings`` (``lota merge``) is declared here and ``AdaptConfig`` (``lota adapt``) in
``lota.adapt_config``, from the names of values listed here: this module imports nothing heavy, so
the command line is built without torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from typing import Any

from . import names
from .errors import InputError

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


# ---------------------------------------------------------------------------- lota adapt's values
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

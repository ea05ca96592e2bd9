"""Options that several commands take, each declared once here.

Each function returns a settings field (``settings.setting``) for a command's settings dataclass
(``lota.commands``): the flag, its kind, its checks and the shape of its help are fixed here; a
command passes only what differs (its default, what its output is). The checks run when the
command's settings are built from the command line, before anything is read or written.

Like ``settings``, this module imports nothing heavy: the command line is built without torch.
``AdaptConfig`` takes its declarations from here too.
"""

from __future__ import annotations

from dataclasses import MISSING
from typing import Any

from .errors import InputError
from .names import VALUE_DTYPES
from .settings import numbers, setting


# ---------------------------------------------------------------------------- checks
def checked_sparsity(value: str, flag: str) -> str:
    """A sparsity in [0, 1), kept as the text given (what metadata records)."""
    from .selection import parse_sparsity

    parse_sparsity(value)
    return value


def at_least_one(value: int, flag: str) -> int:
    if value < 1:
        raise InputError(f"{flag} {value} must be at least 1", flag, "give e.g. 2")
    return value


def optional_numbers(text: str, flag: str) -> list[float] | None:
    """A comma-separated list of numbers; an empty one is no list."""
    return numbers(text, flag) if text else None


# ---------------------------------------------------------------------------- outputs
def out(help: str | None = None, default: Any = MISSING, **kw: Any):
    """``--out``: where the command writes; required unless it has a default."""
    if default is MISSING:
        kw.setdefault("required", True)
    return setting(default, help=help, **kw)


def force(replaced: str = "--out file"):
    """``--force``: replace what is at the output path instead of refusing."""
    return setting(False, help=f"replace an existing {replaced}")


def values_dtype(default: str, help: str | None = None):
    """``--values-dtype``: the precision a delta's values are written in (``auto``: 16 bits where
    they hold the value exactly)."""
    return setting(default, choices=("auto", *VALUE_DTYPES), help=help)


def json_output(help: str | None = None):
    """``--json``: print the result as JSON instead of lines."""
    return setting(False, help=help)


# ---------------------------------------------------------------------------- inputs
def base(help: str | None = None, required: bool = False):
    """``--base``: the base model the inputs were made from."""
    if required:
        return setting(help=help, required=True)
    return setting(None, help=help)


def sparsity(default: str | None, help: str | None = None, **kw: Any):
    """``--sparsity``: the fraction of target entries frozen, in [0, 1)."""
    return setting(default, help=help, parse=checked_sparsity, **kw)


def targets(help: str | None = None):
    """``--targets``: a regex of the tensor names to work on."""
    return setting(None, help=help)


def protect(help: str | None = None):
    """``--protect``: tickets or deltas whose entries stay untouched."""
    return setting(factory=list, nargs="+", metavar="FILE", help=help)


def allow_mismatch(help: str):
    """``--allow-mismatch``: use deltas made for a base of another fingerprint."""
    return setting(False, help=help)


def seed(help: str | None = None):
    return setting(0, help=help)


# ---------------------------------------------------------------------------- data
DATA_FORMATS = (
    "JSONL, JSON array, CSV/TSV, Parquet, a datasets save_to_disk folder or a Hub dataset"
)


def data(what: str, required: bool = True):
    """``--data``: the examples, in any format ``lota.datafiles`` reads."""
    help = f"{what}: {DATA_FORMATS} name"
    return setting(help=help, required=True) if required else setting(None, help=help)


def split(default: str):
    """``--split``: which split of data that holds several (a datasets folder, a Hub dataset)."""
    return setting(
        None,
        fallback=default,
        help="the split of a datasets folder or Hub dataset to read (default {default})",
    )


def field_name(default: str, what: str):
    """``--prompt-field`` and the like: the field (column) an example's part is read from."""
    return setting(default, metavar="NAME", help=f"the field of {what} (default {{default}})")


def prompt_field():
    return field_name("prompt", "the prompt")


def completion_field():
    return field_name("completion", "the completion")


def messages_field():
    return field_name("messages", "a conversation, whose last message is the assistant's answer")


def text_field():
    return field_name("text", "a plain text trained on every token")


# ---------------------------------------------------------------------------- how it runs
def device(what: str):
    """``--device``: where the command computes."""
    return setting(
        "auto",
        help=f"where to {what}: auto (cuda when torch sees a GPU, else cpu), cpu, cuda, cuda:N "
        "(default {default})",
    )


def jobs(default: int):
    """``--jobs``: runs trained at once."""
    return setting(default, parse=at_least_one, help="runs trained at once (one thread each)")


def quiet(help: str = "no progress bars"):
    """``--quiet``: no progress output."""
    return setting(False, help=help)
